"""The transposed-conv rule (gradlake.grads.transposed) against a per-sample autograd loop, and the
capture of a model with transposed convs against the projected loop."""

from __future__ import annotations

import pytest
import torch
from grads_helpers import loop_grads, module_loop, rel_err, rule_against_loop
from torch import nn

from gradlake.grads import Projector, transposed
from gradlake.grads.capture import projected_grads
from gradlake.grads.module_rules import ModuleGrads

CONVS = {  # (module, input shape [B, C_in, ...], forward kwargs)
    "1d-stride-padding-output-padding": (lambda: nn.ConvTranspose1d(3, 5, 3, stride=2, padding=1, output_padding=1),
                                         (4, 3, 7), {}),
    "2d-anisotropic-dilated": (lambda: nn.ConvTranspose2d(4, 3, (2, 3), stride=(2, 1), padding=(0, 1),
                                                          dilation=(1, 2)), (3, 4, 5, 6), {}),
    "2d-output-padding-past-the-stride": (lambda: nn.ConvTranspose2d(2, 3, 3, stride=2, dilation=3,
                                                                     output_padding=2), (3, 2, 4, 4), {}),
    "2d-output-size": (lambda: nn.ConvTranspose2d(2, 3, 2, stride=2), (3, 2, 4, 5), {"output_size": (9, 11)}),
    "3d-patch-no-bias": (lambda: nn.ConvTranspose3d(3, 2, 2, stride=2, bias=False), (2, 3, 3, 2, 4), {}),
}


@pytest.mark.parametrize("name", list(CONVS))
def test_transposed_rule_equals_the_per_sample_loop(name):
    factory, shape, kwargs = CONVS[name]
    torch.manual_seed(0)
    module, x = factory(), torch.randn(shape)
    want = rule_against_loop(module, x, kwargs, "transposed")
    delta = torch.randn(module(x, **kwargs).shape)
    got = transposed.per_sample_grads(module, dict(module.named_parameters()), (x,), kwargs, delta)
    want = module_loop(module, tuple(want), x, kwargs, delta)
    for n, w in want.items():
        assert float((got[n] - w).norm()) <= 1e-5 * float(w.norm()), n


def test_grouped_transposed_convs_keep_the_general_rules():
    module = nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2)
    x = torch.randn(2, 4, 3, 3)
    assert not transposed.supported(module, (x,), {})
    grads = ModuleGrads(module, ("weight", "bias"))
    grads((x,), {}, torch.randn(2, 4, 6, 6))
    assert grads.path() == "vmap"


class _UpNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 6, 2, stride=2)
        self.up = nn.ConvTranspose2d(6, 3, 2, stride=2)

    def forward(self, x):
        return self.up(torch.tanh(self.down(x)))


def test_capture_of_transposed_convs_equals_the_projected_loop():
    torch.manual_seed(0)
    model = _UpNet()
    x, cot = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    projector = Projector(seed=1, k_in=5, k_out=4, k_dense=20)
    phi, _ = projected_grads(model, x, lambda pred: {"C": cot}, projector)
    want = projector.apply(model, loop_grads(model, x, cot))
    assert rel_err(phi["C"], want) <= 1e-5
