"""Third-party architectures: full Gram against a per-sample autograd loop, projected Gram against the full one.

neuraloperator's FNO and TFNO are built from the package (a test dependency). timm's ViT and
Swin and torchvision's ViT run where those packages load (not next to the CPU torch wheel:
see thirdparty_models.py); the same module patterns always run through the models written
in thirdparty_models.py.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from grads_helpers import DataDependent, loop_grads, rel_err
from thirdparty_models import (Conv1dNet, Conv3dNet, ConvNeXtNet, SpectralNormMLP, SwinLike, TimmViT, TltorchFNO,
                               TorchTransformer, TorchvisionViT, afno, refno_like)

from gradlake.errors import InputError
from gradlake.grads import Projector, describe
from gradlake.grads.capture import projected_grads
from gradlake.grads.full import full_grads

BATCH = 6
K = 16


def _optional(name: str):
    try:
        return importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - e.g. torchvision built for CUDA torch: RuntimeError on import
        pytest.skip(f"{name} does not load here ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                    "its module pattern is covered by the model written in thirdparty_models.py")


def _fno(dims: int, factorization=None):
    neuralop = pytest.importorskip("neuralop.models")
    kwargs = {"factorization": factorization, "rank": 0.5} if factorization else {}
    cls = neuralop.TFNO if factorization else neuralop.FNO
    return cls(n_modes=(4, 4, 4)[:dims] if dims < 3 else (2, 2, 2), hidden_channels=6, in_channels=2,
               out_channels=2, n_layers=2, **kwargs)


def _tltorch(factory, **kwargs):
    pytest.importorskip("tltorch")
    return factory(**kwargs)


def _timm(name: str, **kwargs):
    timm = _optional("timm")
    return timm.create_model(name, pretrained=False, num_classes=8, **kwargs)


def _torchvision_vit():
    models = _optional("torchvision.models")
    return models.VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16,
                                    mlp_dim=32, num_classes=8)


CASES = {
    # name: (model factory, input shape, paths expected in describe(); None: not pinned, for
    # packages that cannot be run here)
    "fno-2d": (lambda: _fno(2), (BATCH, 2, 16, 16), {"spectral", "kron", "affine"}),
    "tfno-2d-tucker": (lambda: _fno(2, "tucker"), (BATCH, 2, 16, 16), {"spectral", "kron", "affine"}),
    "fno-1d": (lambda: _fno(1), (BATCH, 2, 16), {"spectral", "kron", "affine"}),
    "fno-3d": (lambda: _fno(3), (BATCH, 2, 6, 6, 6), {"spectral", "kron", "affine"}),
    "tltorch-fno-dense": (lambda: _tltorch(TltorchFNO), (BATCH, 2, 10, 8), {"spectral", "kron"}),
    "tltorch-fno-tucker": (lambda: _tltorch(TltorchFNO, factorization="ComplexTucker"), (BATCH, 2, 10, 8),
                           {"spectral", "kron"}),
    "refno-style": (refno_like, (BATCH, 3, 8, 8), {"kron", "vmap"}),
    "timm-vit": (lambda: _timm("vit_tiny_patch16_224", img_size=16, patch_size=4, in_chans=4, embed_dim=16,
                               depth=2, num_heads=2, init_values=0.5), (BATCH, 4, 16, 16), None),
    "timm-swin": (lambda: _timm("swin_tiny_patch4_window7_224", img_size=16, patch_size=2, in_chans=4,
                                embed_dim=8, depths=(1, 1), num_heads=(2, 2), window_size=2),
                  (BATCH, 4, 16, 16), None),
    "torchvision-vit": (_torchvision_vit, (BATCH, 3, 16, 16), None),
    "timm-style-vit": (TimmViT, (BATCH, 4, 16, 16), {"kron", "affine", "expand"}),
    "swin-style": (SwinLike, (BATCH, 4, 16, 16), {"kron", "affine", "vmap"}),
    "torchvision-style-vit": (TorchvisionViT, (BATCH, 4, 16, 16), {"kron", "affine", "attention", "expand"}),
    "torch-transformer-encoder": (TorchTransformer, (BATCH, 3, 10), {"kron", "affine", "attention"}),
    "spectral-norm-mlp": (SpectralNormMLP, (BATCH, 12, 10), {"vmap"}),
    "afno-channels-last": (afno, (BATCH, 4, 8, 8), {"kron", "affine", "vmap"}),
    "data-dependent-branch": (DataDependent, (BATCH, 6, 3), {"kron", "loop"}),
    "convnext-style": (ConvNeXtNet, (BATCH, 4, 12, 12), {"kron", "expand", "affine", "vmap"}),
    "conv-1d": (Conv1dNet, (BATCH, 3, 16), {"kron", "transposed", "vmap"}),
    "conv-3d": (Conv3dNet, (BATCH, 2, 4, 4, 4), {"kron", "affine", "transposed", "vmap"}),
}


def _setup(name):
    factory, shape, _ = CASES[name]
    torch.manual_seed(0)
    model = factory().eval()  # eval: spectral_norm's power iteration holds still
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen)
    with torch.no_grad():
        out = model(x)
    cot = torch.randn(out.shape, generator=gen)
    return model, x, cot, lambda pred: {"C": cot}


def _gram(phi):
    phi = phi.double()
    return phi @ phi.T


def _correlation(a, b):
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("name", list(CASES))
def test_full_and_projected_grams(name):
    model, x, cot, cotangents = _setup(name)
    ref = loop_grads(model, x, cot)  # independent: plain autograd, one sample at a time
    full, _ = full_grads(model, x, cotangents)
    assert full["C"].shape == ref.shape
    assert rel_err(_gram(full["C"]), _gram(ref)) <= 1e-4
    assert rel_err(full["C"], ref) <= 1e-4

    projector = Projector(seed=0, k_in=K, k_out=K)
    phi, _ = projected_grads(model, x, cotangents, projector)
    # Exactly the projection of the true per-sample gradients (block by block, Projector.apply) ...
    assert rel_err(phi["C"], projector.apply(model, ref)) <= 1e-4
    # ... whose Gram matrix follows the full one.
    assert _correlation(_gram(phi["C"]), _gram(ref)) >= 0.95


@pytest.mark.parametrize("name", list(CASES))
def test_every_parameter_is_covered_by_the_expected_paths(name):
    model, x, _, _ = _setup(name)
    rows = describe(model, x)
    covered = [p for row in rows for p in row["parameters"]]
    assert sorted(covered) == sorted(n for n, _ in model.named_parameters())
    paths = {part for row in rows for part in row["path"].split("+")}
    assert paths == (CASES[name][2] or paths), rows
    assert paths <= {"kron", "expand", "affine", "additive", "attention", "transposed", "spectral", "vmap", "loop"}
    for row in rows:
        assert ("reason" in row) == ("loop" in row["path"]), row


def test_complex_parameters_are_real_and_imaginary_parts_not_the_real_part_only():
    model, x, cot, cotangents = _setup("afno-channels-last")
    ref = loop_grads(model, x, cot)
    block = dict(model.named_parameters())["model.block.w1"]
    spec = {b["name"]: b for b in Projector(k_in=10**6, k_out=10**6, k_dense=10**9).spec(model)["parameters"]}
    entry = spec["model.block.w1"]
    assert entry["shape"] == [*block.shape, 2] and entry["k"] == 2 * block.numel()
    imag = ref[:, entry["offset"] + 1:entry["offset"] + entry["k"]:2]
    assert imag.norm() > 0.1 * ref[:, entry["offset"]:entry["offset"] + entry["k"]].norm()
    full, _ = full_grads(model, x, cotangents)
    assert rel_err(full["C"][:, entry["offset"] + 1:entry["offset"] + entry["k"]:2], imag) <= 1e-4


def test_unsupported_modules_are_refused_up_front_with_their_name():
    rnn = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.GRU(3, 3, batch_first=True))
    with pytest.raises(InputError, match=r"'1' \(GRU\): recurrent"):
        describe(rnn, torch.randn(2, 4, 3))
    mha = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16)  # batch_first=False
    with pytest.raises(InputError, match=r"'self_attn' \(MultiheadAttention\): batch_first=False"):
        describe(mha, torch.randn(2, 4, 8))
