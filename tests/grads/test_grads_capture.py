"""Capture against an independent per-sample autograd loop, block by block."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from grads_helpers import IDENTITY, ConvNet1d, ConvNet2d, TokenBlock, fixed_cotangents, loop_grads, rel_err
from torch import nn

from gradlake.errors import GradlakeError, InputError
from gradlake.grads import Projector, describe
from gradlake.grads.affine import Affine
from gradlake.grads.capture import projected_grads
from gradlake.grads.capture_plan import plan
from gradlake.grads.full import full_grads

CASES = [(TokenBlock, (4, 5, 3)), (ConvNet2d, (3, 3, 8, 8)), (ConvNet1d, (3, 2, 12))]


def _model(cls, shape, seed=0):
    torch.manual_seed(seed)
    return cls(), torch.randn(*shape)


def _assert_blocks_close(model, projector, phi, ref, tol=1e-5):
    """Every parameter's block separately, so one wrong small layer cannot hide."""
    for block in projector.spec(model)["parameters"] if projector else []:
        sl = slice(block["offset"], block["offset"] + block["k"])
        assert rel_err(phi[:, sl], ref[:, sl]) < tol, block
    assert rel_err(phi, ref) < tol


@pytest.mark.parametrize("conv", ["full", "separable"])
@pytest.mark.parametrize("cls,shape", CASES, ids=[c.__name__ for c, _ in CASES])
def test_identity_projection_is_the_exact_per_sample_gradient(cls, shape, conv):
    model, x = _model(cls, shape)
    cotangents = fixed_cotangents(probes=2)
    identity = Projector(seed=0, k_in=10**6, k_out=10**6, k_dense=10**9, conv=conv)
    phi, pred = projected_grads(model, x, cotangents, identity)
    cots = cotangents(model(x).detach())
    assert torch.allclose(pred, model(x).detach())
    _assert_blocks_close(model, identity, phi["C"], loop_grads(model, x, cots["C"]))
    assert phi["V"].shape == (shape[0], 2, identity.k(model))
    for j in range(2):
        _assert_blocks_close(model, identity, phi["V"][:, j], loop_grads(model, x, cots["V"][:, j]))


@pytest.mark.parametrize("cls,shape", CASES, ids=[c.__name__ for c, _ in CASES])
def test_full_gradients_match_the_loop(cls, shape):
    model, x = _model(cls, shape)
    cotangents = fixed_cotangents(probes=1)
    phi, _ = full_grads(model, x, cotangents)
    cots = cotangents(model(x).detach())
    assert rel_err(phi["C"], loop_grads(model, x, cots["C"])) < 1e-5
    assert rel_err(phi["V"][:, 0], loop_grads(model, x, cots["V"][:, 0])) < 1e-5


@pytest.mark.parametrize("kind,conv", [("rademacher", "separable"), ("gaussian", "separable"), ("rademacher", "full")])
@pytest.mark.parametrize("cls,shape", CASES, ids=[c.__name__ for c, _ in CASES])
def test_projection_equals_the_dense_projection_of_the_exact_gradient(cls, shape, kind, conv):
    model, x = _model(cls, shape)
    projector = Projector(seed=3, k_in=5, k_out=3, kind=kind, k_dense=5, conv=conv, k_space=2)
    cotangents = fixed_cotangents()
    phi, _ = projected_grads(model, x, cotangents, projector)
    # Projector.apply builds P block by block from the factors and applies it to full gradients.
    ref = projector.apply(model, loop_grads(model, x, cotangents(model(x).detach())["C"]))
    assert phi["C"].shape == ref.shape == (shape[0], projector.k(model))
    _assert_blocks_close(model, projector, phi["C"], ref)


def test_every_parameter_is_covered_once_by_the_expected_path():
    model = ConvNet2d()
    spec = IDENTITY.spec(model)
    names = [b["name"] for b in spec["parameters"]]
    assert names == [n for n, _ in model.named_parameters()]
    paths = {b["name"]: b["path"] for b in spec["parameters"]}
    assert paths["c1.weight"] == paths["c3.weight"] == "kron" and paths["c1.bias"] == "kron-bias"
    for name in ("gn.weight", "gn.bias", "grouped.weight", "up.weight", "up.bias"):
        assert paths[name] == "exact"
    assert spec["k"] == sum(p.numel() for p in model.parameters())
    offsets = [(b["offset"], b["k"]) for b in spec["parameters"]]
    assert all(o1 + k1 == o2 for (o1, k1), (o2, _) in zip(offsets, offsets[1:]))


class _Shared(nn.Module):
    """A Linear called twice, followed by an in-place activation."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.fc(x).relu_()
        return self.head(self.norm(self.fc(h)) + self.norm(x))


def test_modules_called_twice_and_inplace_activations():
    model, x = _model(_Shared, (5, 4))
    cotangents = fixed_cotangents()
    phi, _ = projected_grads(model, x, cotangents, IDENTITY)
    ref = loop_grads(model, x, cotangents(model(x).detach())["C"])
    _assert_blocks_close(model, IDENTITY, phi["C"], ref)


def test_a_sample_does_not_depend_on_its_batch_mates():
    model, x = _model(ConvNet2d, (5, 3, 8, 8))
    projector = Projector(seed=1, k_in=4, k_out=4)
    fixed = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(9))

    def cotangents(rows):
        return lambda pred: {"C": fixed[rows]}

    full, _ = projected_grads(model, x, cotangents(slice(None)), projector)
    alone, _ = projected_grads(model, x[2:3], cotangents(slice(2, 3)), projector)
    other, _ = projected_grads(model, x[[4, 2]], cotangents([4, 2]), projector)
    assert rel_err(alone["C"][0], full["C"][2]) < 1e-6  # equal up to float32 summation order
    assert rel_err(other["C"][1], full["C"][2]) < 1e-6
    assert rel_err(other["C"][0], full["C"][4]) < 1e-6


def test_parameters_are_frozen_during_capture_and_restored():
    model, x = _model(TokenBlock, (2, 5, 3))
    model.head.weight.requires_grad_(False)
    projected_grads(model, x, fixed_cotangents(), Projector(k_in=2, k_out=2))  # (+ the dry run, once)
    seen = []
    model.qkv.register_forward_hook(lambda m, a, o: seen.append(m.weight.requires_grad))
    projected_grads(model, x, fixed_cotangents(), Projector(k_in=2, k_out=2))
    assert seen and not any(seen)
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "head.weight")
    assert not model.head.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("cls,shape", CASES, ids=[c.__name__ for c, _ in CASES])
def test_a_capture_keeps_nothing_of_its_batch_alive(cls, shape):
    """The batch's graph (held inputs, outputs and their hooks) goes with the capture, without
    waiting for (or escaping) Python's cycle collector."""
    model, x = _model(cls, shape)
    projector = Projector(k_in=2, k_out=2)
    projected_grads(model, x, fixed_cotangents(probes=1), projector)  # (+ the dry run, once)
    outputs = []
    for module in model.modules():
        module.register_forward_hook(lambda m, a, o: outputs.append(weakref.ref(o)))
    gc.disable()
    try:
        projected_grads(model, x, fixed_cotangents(probes=1), projector)
        assert outputs and not any(ref() is not None for ref in outputs)
    finally:
        gc.enable()


def test_structures_hooks_cannot_capture_are_refused():
    with pytest.raises(InputError, match="MultiheadAttention"):
        plan(nn.Sequential(nn.MultiheadAttention(4, 2)))
    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    with pytest.raises(InputError, match="tied"):
        plan(tied)


class _InplaceAfterUse(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        h = x + 1.0  # autograd itself saves nothing here
        y = self.fc(h)
        h.mul_(2.0)  # the layer's input changes after the layer read it
        return y + h


def test_an_input_changed_in_place_after_use_is_an_error_not_a_wrong_answer():
    model, x = _model(_InplaceAfterUse, (2, 3))
    with pytest.raises(InputError, match="backward through the model fails.*inplace"):
        projected_grads(model, x, fixed_cotangents(), Projector(k_in=8, k_out=8))



_NORMS = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)


def _set_norms(model, bias_ratio: float, zero_weight: bool = False):
    """Random norm parameters with |bias| = bias_ratio * |weight| ~ 1 (and one weight entry 0)."""
    gen = torch.Generator().manual_seed(5)
    for module in model.modules():
        if isinstance(module, _NORMS):
            sign = 1 - 2 * (torch.rand(module.weight.shape, generator=gen) < 0.3).float()
            weight = (torch.rand(module.weight.shape, generator=gen) + 0.5) * sign / bias_ratio
            if zero_weight:
                weight.view(-1)[0] = 0.0
            module.weight.data = weight
            if getattr(module, "bias", None) is not None:
                module.bias.data = bias_ratio * weight.abs() * torch.randn(weight.shape, generator=gen).sign()


@pytest.mark.parametrize("bias_ratio,zero_weight", [(3.0, False), (20.0, False), (1.0, True)])
@pytest.mark.parametrize("cls,shape", CASES[:2], ids=[c.__name__ for c, _ in CASES[:2]])
def test_norm_grads_from_the_output_or_an_extra_forward(cls, shape, bias_ratio, zero_weight, monkeypatch):
    """Affine norms: from the output where |bias| <= 16 |weight|, else from an extra forward; exact either way."""
    model, x = _model(cls, shape)
    _set_norms(model, bias_ratio, zero_weight)
    cotangents = fixed_cotangents(probes=2)
    projected_grads(model, x, cotangents, IDENTITY)  # the first call's dry run and check, not counted
    calls = {"output": 0, "forward": 0}
    for name, key in (("from_output", "output"), ("from_base", "forward")):
        original = getattr(Affine, name)
        monkeypatch.setattr(Affine, name, lambda self, *a, _f=original, _k=key: calls.__setitem__(
            _k, calls[_k] + 1) or _f(self, *a))
    cotangents = fixed_cotangents(probes=2)
    phi, _ = projected_grads(model, x, cotangents, IDENTITY)
    cots = cotangents(model(x).detach())
    norms = [m for m in model.modules() if isinstance(m, _NORMS)]
    extra = sum(zero_weight or (bias_ratio > 16 and getattr(m, "bias", None) is not None) for m in norms)
    assert 0 < len(norms) and calls == {"output": 3 * (len(norms) - extra), "forward": 3 * extra}  # 3 passes
    _assert_blocks_close(model, IDENTITY, phi["C"], loop_grads(model, x, cots["C"]))
    _assert_blocks_close(model, IDENTITY, phi["V"][:, 1], loop_grads(model, x, cots["V"][:, 1]))


class _NormOutputChanged(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(3, 3)
        self.norm = nn.LayerNorm(3)
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        h = self.norm(self.first(x))
        y = self.fc(h * 1.0)  # nothing keeps h itself for backward ...
        h.add_(1.0)  # ... so autograd allows changing it in place
        return y + h


def test_a_norm_output_changed_in_place_falls_back_to_the_extra_forward():
    model, x = _model(_NormOutputChanged, (4, 3))
    _set_norms(model, 2.0)
    cotangents = fixed_cotangents()
    phi, _ = projected_grads(model, x, cotangents, IDENTITY)
    _assert_blocks_close(model, IDENTITY, phi["C"], loop_grads(model, x, cotangents(model(x).detach())["C"]))


class _WeightUsedOutside(nn.Module):
    """fc is called, and its weight is also read directly (F.linear): hooks on fc see only part."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x)) + nn.functional.linear(x, self.fc.weight))


class _LayerOnAParameter(nn.Module):
    """A Linear applied to a learned code (no batch dimension): covered by the model's own rule."""

    def __init__(self):
        super().__init__()
        self.code = nn.Parameter(torch.randn(1, 3))
        self.hyper = nn.Linear(3, 4)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) * self.hyper(self.code)


class _MixesSamples(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) + self.fc(x).flip(0)


def test_a_weight_used_outside_its_module_or_samples_mixed_are_refused_not_wrong():
    for cls, match in ((_WeightUsedOutside, r"fc\.weight \(relative error"), (_MixesSamples, "fc.weight")):
        model, x = _model(cls, (3, 4))
        with pytest.raises(InputError, match=match):
            projected_grads(model, x, fixed_cotangents(), Projector(k_in=8, k_out=8))


def test_a_layer_applied_to_a_parameter_is_covered_by_its_caller():
    model, x = _model(_LayerOnAParameter, (3, 4))
    cotangents = fixed_cotangents()
    phi, _ = projected_grads(model, x, cotangents, IDENTITY)
    _assert_blocks_close(model, IDENTITY, phi["C"], loop_grads(model, x, cotangents(model(x).detach())["C"]))
    projector = Projector(seed=2, k_in=2, k_out=2, k_dense=2)
    phi, _ = projected_grads(model, x, cotangents, projector)
    ref = projector.apply(model, loop_grads(model, x, cotangents(model(x).detach())["C"]))
    _assert_blocks_close(model, projector, phi["C"], ref)


class _Attention(nn.Module):
    """nn.MultiheadAttention as cross-attention (query from one Linear, key/value from another),
    optionally with a causal mask and a per-sample key padding mask (those calls take vmap)."""

    def __init__(self, masked: bool):
        super().__init__()
        self.masked = masked
        self.q, self.kv = nn.Linear(3, 8), nn.Linear(3, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x):  # [B, T, 3]
        kwargs = {}
        if self.masked:
            t = x.shape[1]
            kwargs = {"attn_mask": torch.triu(torch.ones(t, t, dtype=torch.bool), 1),
                      "key_padding_mask": x[..., 0] > 1.5}
        out, _ = self.mha(self.q(x), self.kv(x), self.kv(x).flip(1), need_weights=False, **kwargs)
        return self.head(out)


@pytest.mark.parametrize("masked,path", [(False, "attention"), (True, "vmap")])
def test_multihead_attention_per_sample_gradients(masked, path):
    model, x = _model(lambda: _Attention(masked), (4, 5, 3))
    model.eval()
    rows = {row["module"]: row["path"] for row in describe(model, x)}
    assert rows["mha"] == path
    cotangents = fixed_cotangents()
    ref = loop_grads(model, x, cotangents(model(x).detach())["C"])
    phi, _ = projected_grads(model, x, cotangents, IDENTITY)
    _assert_blocks_close(model, IDENTITY, phi["C"], ref)
    projector = Projector(seed=4, k_in=3, k_out=3, k_dense=7)
    phi, _ = projected_grads(model, x, cotangents, projector)
    _assert_blocks_close(model, projector, phi["C"], projector.apply(model, ref))


class _Rows(nn.Module):
    """A Linear and a norm on [batch * T, D] rows: sample-major (kept on the fast paths, rows summed
    per sample) or time-major (rows of one sample scattered: covered by the model's own rule)."""

    def __init__(self, sample_major: bool):
        super().__init__()
        self.sample_major = sample_major
        self.fc = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):  # [B, T, 3]
        b, t, _ = x.shape
        rows = x.reshape(b * t, 3) if self.sample_major else x.transpose(0, 1).reshape(t * b, 3)
        h = self.norm(torch.tanh(self.fc(rows)))
        h = h.reshape(b, t, 4) if self.sample_major else h.reshape(t, b, 4).transpose(0, 1)
        return self.head(h)


@pytest.mark.parametrize("sample_major,paths", [(True, {"fc": "kron", "norm": "affine"}), (False, {"": "vmap"})])
def test_modules_on_rows_of_several_per_sample(sample_major, paths):
    model, x = _model(lambda: _Rows(sample_major), (3, 5, 3))
    rows = {row["module"]: row["path"] for row in describe(model, x)}
    assert paths.items() <= rows.items(), rows
    cotangents = fixed_cotangents()
    ref = loop_grads(model, x, cotangents(model(x).detach())["C"])
    projector = Projector(seed=4, k_in=2, k_out=3, k_dense=3)
    phi, _ = projected_grads(model, x, cotangents, projector)
    _assert_blocks_close(model, projector, phi["C"], projector.apply(model, ref))


class _Squash(nn.Module):
    """A parameter inside a nonlinearity: the vmap rule, run in the batch's own forward."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 1))

    def forward(self, x):
        return torch.tanh(x * self.w)


class _ReturnsItsChild(nn.Module):
    """A module whose own parameter goes in before a child and whose output is the child's output
    (ReFNO's pos_embedding before its decoder)."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(3, 6))
        self.inner = _Squash()

    def forward(self, x):
        return self.inner(torch.sin(x + self.pos))


def test_a_module_returning_a_per_sample_forward_child_output_keeps_its_own_gradient():
    model, x = _model(_ReturnsItsChild, (4, 3, 6))
    assert {e["module"]: e["path"] for e in describe(model, x)} == {"": "vmap", "inner": "vmap"}
    identity = Projector(seed=0, k_in=10**6, k_out=10**6, k_dense=10**9)
    cotangents = fixed_cotangents(probes=1)
    phi, _ = projected_grads(model, x, cotangents, identity)
    _assert_blocks_close(model, identity, phi["C"], loop_grads(model, x, cotangents(model(x).detach())["C"]))
