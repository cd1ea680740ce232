"""The projector: regenerated bit-identically, unbiased, clipped, described by a JSON spec."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from gradlake import models
from gradlake.errors import InputError
from gradlake.grads import Projector, compute
from gradlake.grads.projector import random_factor

CPU = torch.device("cpu")


def test_factors_are_pure_functions_of_their_key():
    a = random_factor(0, "enc.conv", (8, 4, 3, 3), "in", "rademacher", 6, 36)
    assert np.array_equal(a, random_factor(0, "enc.conv", (8, 4, 3, 3), "in", "rademacher", 6, 36))
    for other in [(1, "enc.conv", (8, 4, 3, 3), "in"), (0, "enc.conv2", (8, 4, 3, 3), "in"),
                  (0, "enc.conv", (8, 4, 3, 5), "in"), (0, "enc.conv", (8, 4, 3, 3), "out")]:
        assert not np.array_equal(a, random_factor(*other, "rademacher", 6, 36))
    assert set(np.unique(a)) == {np.float32(-1 / np.sqrt(6)), np.float32(1 / np.sqrt(6))}


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_projected_inner_products_are_unbiased(kind):
    gen = np.random.default_rng(0)
    x, y = gen.standard_normal(50), gen.standard_normal(50)
    y += 0.5 * x
    estimates = [float((f @ x) @ (f @ y)) for f in
                 (random_factor(s, "w", (50,), "dense", kind, 8, 50).astype(np.float64) for s in range(2000))]
    exact = float(x @ y)
    spread = np.std(estimates) / np.sqrt(len(estimates))
    assert abs(np.mean(estimates) - exact) < 4 * spread
    # JL variance (|x|²|y|² + <x,y>²)/k (Gaussian); Rademacher is no larger.
    assert np.var(estimates) < 1.3 * (x @ x * (y @ y) + exact**2) / 8
    if kind == "gaussian":
        f = random_factor(0, "w", (4000,), "dense", kind, 100, 4000) * np.sqrt(100)
        assert abs(f.mean()) < 0.01 and abs(f.var() - 1) < 0.01


def test_factors_clip_to_the_layer_and_become_the_identity():
    p = Projector(seed=0, k_in=16, k_out=4)
    assert p.factor("fc", (8, 10), "in", 10, CPU, torch.float32) is None  # 16 >= 10: identity
    assert p.factor("fc", (8, 10), "out", 8, CPU, torch.float32).shape == (4, 8)
    model = models.build("vit", "tiny", channels=4, resolution=16)
    spec = p.spec(model)
    by_name = {b["name"]: b for b in spec["parameters"]}
    head = by_name["unpatch.weight"]  # Linear(16 -> 64)
    assert (head["k_in"], head["k_out"], head["k"]) == (16, 4, 64)
    assert by_name["unpatch.bias"]["k"] == 4
    assert by_name["position.weight"]["path"] == "exact" and by_name["position.weight"]["k"] == 64
    assert by_name["norm.weight"]["k"] == 16  # 16 <= k_dense = 64: identity
    assert spec["k"] == p.k(model) == sum(b["k"] for b in spec["parameters"])
    assert [b["name"] for b in spec["parameters"]] == [n for n, _ in model.named_parameters()]


def test_spec_round_trips_through_json():
    model = models.build("unet", "tiny", channels=4, resolution=16)
    p = Projector(seed=5, k_in=3, k_out=7, kind="gaussian", k_dense=11)
    spec = json.loads(json.dumps(p.spec(model)))
    q = Projector.from_spec(spec)
    assert q.spec(model) == spec and q.settings() == p.settings()
    f = p.factor("down.0.skip", (8, 4, 1, 1), "out", 8, CPU, torch.float32)
    assert torch.equal(f, q.factor("down.0.skip", (8, 4, 1, 1), "out", 8, CPU, torch.float32))
    with pytest.raises(InputError, match="generator"):
        Projector.from_spec({**spec, "generator": "other"})
    with pytest.raises(InputError, match="format"):
        Projector.from_spec({"seed": 0})


def test_bad_settings_are_refused():
    for kwargs, field in [({"k_in": 0}, "k_in"), ({"k_out": 2.5}, "k_out"), ({"kind": "sparse"}, "kind"),
                          ({"seed": "a"}, "seed"), ({"k_dense": -1}, "k_dense")]:
        with pytest.raises(InputError, match=field):
            Projector(**kwargs)


_SCRIPT = """
import hashlib, sys, torch
from gradlake import models
from gradlake.grads import Projector, compute
torch.manual_seed(0)
model = models.build("unet", "tiny", channels=4, resolution=16)
x = torch.rand(2, 4, 16, 16, generator=torch.Generator().manual_seed(1)) + 0.5
phi = compute(model, x, 0.9 * x, ("C", "V"), Projector(seed=4, k_in=5, k_out=6), sample_ids=[0, 1])
sys.stdout.write(hashlib.sha256(b"".join(phi[o].numpy().tobytes() for o in ("C", "V"))).hexdigest())
"""


def test_same_seed_gives_bit_identical_phi_in_separate_processes():
    procs = [subprocess.Popen([sys.executable, "-c", _SCRIPT], stdout=subprocess.PIPE, text=True,
                              env={"OMP_NUM_THREADS": "1", "PATH": ""}) for _ in range(2)]
    runs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    assert runs[0] == runs[1] and len(runs[0]) == 64
    torch.manual_seed(0)  # and in this process, with its own thread settings
    model = models.build("unet", "tiny", channels=4, resolution=16)
    x = torch.rand(2, 4, 16, 16, generator=torch.Generator().manual_seed(1)) + 0.5
    phi = compute(model, x, 0.9 * x, ("C", "V"), Projector(seed=4, k_in=5, k_out=6), sample_ids=[0, 1])
    other = compute(model, x, 0.9 * x, ("C", "V"), Projector(seed=5, k_in=5, k_out=6), sample_ids=[0, 1])
    assert not torch.equal(phi["C"], other["C"])
    if torch.get_num_threads() == 1:
        digest = hashlib.sha256(b"".join(phi[o].numpy().tobytes() for o in ("C", "V"))).hexdigest()
        assert digest == runs[0]
