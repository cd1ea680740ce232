"""The spectral rule (gradlake.grads.spectral) against a per-sample autograd loop, and the
'spectral' blocks of φ (a spectral weight projected as a matrix by P_out ⊗ P_in)."""

from __future__ import annotations

import pytest
import torch
from grads_helpers import module_loop, rel_err, rule_against_loop
from thirdparty_models import TltorchFNO
from torch import nn

from gradlake.grads import Projector
from gradlake.grads.allocation import allocate, block_statistics
from gradlake.grads.capture import projected_grads
from gradlake.grads.capture_plan import plan
from gradlake.grads.full import full_grads


def _neuralop(factorization=None, dims=2):
    layers = pytest.importorskip("neuralop.layers.spectral_convolution")
    kwargs = {"factorization": factorization, "rank": 0.5} if factorization else {}
    return layers.SpectralConv(5, 4, n_modes=(6, 4, 4)[:dims], **kwargs)


def _tltorch(factorization):
    pytest.importorskip("tltorch")
    return TltorchFNO(factorization=factorization).conv  # called with a layer index


CONVS = {
    "neuralop-dense-2d": (lambda: _neuralop(), (4, 5, 12, 10), {}),
    "neuralop-tucker-2d": (lambda: _neuralop("tucker"), (4, 5, 12, 10), {}),
    "neuralop-dense-3d": (lambda: _neuralop(dims=3), (4, 5, 8, 6, 6), {}),
    "tltorch-dense-layer-1": (lambda: _tltorch("ComplexDense"), (4, 6, 10, 8), {"indices": 1}),
    "tltorch-tucker-layer-0": (lambda: _tltorch("ComplexTucker"), (4, 6, 10, 8), {"indices": 0}),
}


@pytest.mark.parametrize("name", list(CONVS))
def test_spectral_rule_equals_the_per_sample_loop(name):
    factory, shape, kwargs = CONVS[name]
    torch.manual_seed(0)
    module = factory()
    want = rule_against_loop(module, torch.randn(shape), kwargs, "spectral")
    assert sum(float(w.norm()) for n, w in want.items() if "bias" not in n) > 0  # the weights' grads, not only the bias's


def test_spectral_weights_are_projected_as_matrices_and_allocated_as_layers():
    pytest.importorskip("tltorch")
    torch.manual_seed(0)
    model = TltorchFNO()
    x, cot = torch.randn(6, 2, 10, 8), torch.randn(6, 2, 10, 8)
    model_plan = plan(model)
    spectral = {name: (d_out, d_in) for name, d_out, d_in in model_plan.spectral}
    assert spectral == {f"conv.weight.{i}.tensor": (6, 6 * 4 * 3 * 2) for i in range(2)}
    blocks = {b["name"]: b for b in Projector(k_in=5, k_out=3).spec(model)["parameters"]}
    assert blocks["conv.weight.0.tensor"]["path"] == "spectral" and blocks["conv.weight.0.tensor"]["k"] == 15
    assert blocks["conv.bias"]["path"] == "exact"
    full, _ = full_grads(model, x, lambda pred: {"C": cot})
    dims = allocate(model_plan, block_statistics(model, full["C"]), 300)
    assert set(spectral) <= set(dims["layers"])
    for projector in (Projector(seed=1, k_in=5, k_out=3),
                      Projector(seed=1, allocation="energy", k_total=300, dims=dims)):
        phi, _ = projected_grads(model, x, lambda pred: {"C": cot}, projector)
        assert rel_err(phi["C"], projector.apply(model, full["C"])) <= 1e-5


def test_capture_takes_the_weights_from_the_batchs_own_forward(monkeypatch):
    model = _neuralop()
    x, cot = torch.randn(4, 5, 12, 10), torch.randn(4, 4, 12, 10)
    projector = Projector(seed=2, k_in=3, k_out=3)
    first, _ = projected_grads(model, x, lambda pred: {"C": cot}, projector)  # prepares: the rule chosen

    def rerun(*args, **kwargs):
        raise AssertionError("the module was run again for its gradients")

    monkeypatch.setattr("gradlake.grads.spectral.spectral_grads", rerun)
    again, _ = projected_grads(model, x, lambda pred: {"C": cot}, projector)
    assert rel_err(again["C"], first["C"]) <= 1e-6
    full, _ = full_grads(model, x, lambda pred: {"C": cot})
    assert rel_err(again["C"], projector.apply(model, full["C"])) <= 1e-5


@pytest.mark.parametrize("factorization", [None, "tucker"])
@pytest.mark.parametrize("k_in, k_out", [(3, 2), (3, 10_000), (10_000, 2), (10_000, 10_000)])
def test_spectral_blocks_projected_in_the_capture_equal_the_projected_autograd_loop(factorization, k_in, k_out):
    """The capture's projection of the weights' per-sample gradients, with each of P_out and P_in a
    projection or the identity (a dense weight, a Tucker core; the Tucker factors: dense blocks)."""
    torch.manual_seed(0)
    module = _neuralop(factorization)
    x, cot = torch.randn(3, 5, 12, 10), torch.randn(3, 4, 12, 10)
    projector = Projector(seed=3, k_in=k_in, k_out=k_out)
    assert any(b["path"] == "spectral" for b in projector.spec(module)["parameters"])
    phi, _ = projected_grads(module, x, lambda pred: {"C": cot}, projector)  # prepares: the rule chosen
    phi, _ = projected_grads(module, x, lambda pred: {"C": cot}, projector)  # the recorded forward
    names = [n for n, _ in module.named_parameters()]
    loop = module_loop(module, names, x, {}, cot)
    want = projector.apply(module, torch.cat([loop[n] for n in names], dim=1))
    assert rel_err(phi["C"], want) <= 1e-5


class _BlockEinsum(nn.Module):
    """AFNO's block-diagonal complex MLP: a real [blocks, size, size, 2] parameter used as a complex
    einsum operand on the last dim of a complex input (returned as (real, imaginary) pairs)."""

    def __init__(self, blocks=2, size=3):
        super().__init__()
        self.blocks, self.size = blocks, size
        self.weight = nn.Parameter(torch.randn(blocks, size, size, 2))

    def forward(self, x):
        x = x.reshape(*x.shape[:-1], self.blocks, self.size)
        y = torch.einsum("...bi,bio->...bo", x, torch.view_as_complex(self.weight))
        return torch.view_as_real(y.reshape(*y.shape[:-2], -1))


class _WeightFirstEinsum(nn.Module):
    """A real einsum with the weight first and a list of operands, and a bias added."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3))
        self.bias = nn.Parameter(torch.randn(4, 1))

    def forward(self, x):
        return torch.einsum("oi,zij->zoj", [self.weight, x]) + self.bias


@pytest.mark.parametrize("factory, x", [(_BlockEinsum, torch.randn(3, 5, 6, dtype=torch.cfloat)),
                                        (_WeightFirstEinsum, torch.randn(3, 3, 7))])
def test_einsums_with_a_parameter_take_the_spectral_rule(factory, x):
    torch.manual_seed(0)
    rule_against_loop(factory(), x, {}, "spectral")
