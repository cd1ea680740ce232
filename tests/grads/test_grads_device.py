"""compute() on a GPU (skipped without one): same φ as on the CPU, and the bf16 option."""

from __future__ import annotations

import pytest
import torch
from grads_helpers import rel_err

from gradlake import models
from gradlake.grads import Projector, compute

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("name", ["unet", "vit"])
def test_cuda_matches_cpu_and_bf16_stays_close(name):
    torch.manual_seed(0)
    model = models.build(name, "tiny", channels=4, resolution=32)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(4, 4, 32, 32, generator=gen) + 0.5
    y = x + 0.1 * torch.randn(x.shape, generator=gen)
    projector = Projector(seed=2, k_in=8, k_out=8)
    cpu = compute(model, x, y, ("C", "V"), projector, sample_ids=[0, 1, 2, 3])
    model.cuda()
    gpu = compute(model, x, y, ("C", "V"), projector, sample_ids=[0, 1, 2, 3])
    for obs in ("C", "V"):
        assert gpu[obs].device.type == "cuda" and gpu[obs].dtype == torch.float32
        assert rel_err(gpu[obs].cpu(), cpu[obs]) < 1e-4  # TF32 is off by default for matmuls
    half = compute(model, x, y, ("C",), projector, precision="bfloat16")
    assert half["C"].dtype == torch.float32
    assert rel_err(half["C"].cpu(), cpu["C"]) < 0.05
