"""The exact mode end to end on a tiny ViT checkpoint, as Ray tasks: the minibatch plan, exact H
against a dense Jacobian on every minibatch, the statistics, the agreement report, restart, the CLI."""

import json
import os
import socket
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr
from reduce_helpers import make_dataset

from gradlake import models, physics
from gradlake.config import ExactConfig
from gradlake.distributed.exact_tasks import run_exact
from gradlake.reduce import minibatch
from gradlake.reduce.exact import normalize_matrix

LAM = 0.1


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ray_session):
    from gradlake.models.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("exact")
    # two test trajectories per class, 4 transitions each: 2 trajectories x 2 windows = 4 minibatches
    ds = make_dataset(str(root / "data"), classes=("b", "a", "c"), splits=("train", "test", "test"))
    torch.manual_seed(0)
    cfg = models.config("vit", "tiny", channels=4, resolution=8, dim=8, depth=1, mlp_ratio=1)
    ckpt = save_checkpoint(str(root / "epoch-0001"), models.from_config(cfg), cfg, {"epoch": 1})
    settings = ExactConfig(enabled=True, per_class=2, classes=2, minibatches=0, agreement=2, rtol=1e-7,
                           ks=(2, 8), probes=32, device="cpu", method="pcg", space="output", rank=8)
    summary = run_exact(ckpt, ds.url, str(root / "out"), settings, LAM, pairs=("CC", "EC"),
                        normalize=("none", "row-std", "cosine"))
    return ds, ckpt, root / "out", summary, settings


def dense_h(model, ds, rows, lam=LAM):
    """Every solved pair's H from a dense reverse-mode J (independent of the JVP/VJP path)."""
    x, y = (torch.from_numpy(a).double() for a in ds.samples(rows))
    params = {n: p.detach() for n, p in model.named_parameters()}
    f = lambda p: torch.func.functional_call(model, p, (x,))  # noqa: E731
    pred = f(params)
    jac = torch.func.jacrev(f)(params)
    J = torch.cat([jac[n].reshape(pred.numel(), -1) for n in params], 1).numpy()
    res = physics.residuals(pred, x, y, ("C", "E"), physics.EULER_CHANNELS)
    n = len(rows)
    g = {o: np.stack([J[i * (J.shape[0] // n):(i + 1) * (J.shape[0] // n)].T @ r[i].reshape(-1).numpy()
                      for i in range(n)]) for o, r in res.items()}
    inv = np.linalg.inv(J.T @ J + lam * np.eye(J.shape[1]))
    return {a + b: g[a] @ inv @ g[b].T for a in "CE" for b in "CE"}, J


def test_plan_covers_every_minibatch_of_the_split(setup):
    ds, _, out, summary, _ = setup
    table = pq.read_table(out / "exact_batches.parquet").to_pylist()
    assert summary["minibatches"] == 4 and summary["batch_size"] == 4
    batches = {}
    for r in table:
        batches.setdefault(r["minibatch"], []).append((r["class"], r["trajectory"], r["t"]))
    # minibatch 0 is the paper's: the first test trajectory of classes a and b, t = 0, 1
    first = sorted(batches[0])
    assert [(c, t) for c, _, t in first] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    samples = {(tr, t) for b in batches.values() for _, tr, t in b}
    tests = [i for i, s in enumerate(ds.splits) if s == "test" and ds.classes[i] in ("a", "b")]
    assert samples == {(tr, t) for tr in tests for t in range(4)}  # each test sample of a, b exactly once
    assert sum(len(b) for b in batches.values()) == len(samples)


def test_every_minibatch_against_dense_jacobian(setup):
    ds, ckpt, out, summary, _ = setup
    from gradlake.models.checkpoint import load_checkpoint

    model, _ = load_checkpoint(ckpt)
    model = model.double().eval()
    table = pq.read_table(out / "exact_batches.parquet")
    group = zarr.open_group(str(out / "results.zarr"), mode="r")["exact"]
    H = group["H"]
    solved = group["solved_pair"][...].tolist()
    assert solved == ["CC", "EC", "EE"]  # EE's diagonal serves cosine
    for m in range(summary["minibatches"]):
        rows = np.array([r["row"] for r in table.to_pylist() if r["minibatch"] == m])
        want, _ = dense_h(model, ds, rows)
        for p, pair in enumerate(solved):
            np.testing.assert_allclose(H[m, p], want[pair], rtol=1e-5, atol=1e-6 * np.abs(want[pair]).max())
    assert summary["solver"]["max_relative_residual"] <= 1e-7 * 1.01
    assert summary["solver"]["method"] == ["pcg"]


def test_statistics_against_numpy(setup):
    _, _, out, summary, _ = setup
    table = pq.read_table(out / "exact_batches.parquet")
    H = zarr.open_group(str(out / "results.zarr"), mode="r")["exact"]["H"][...]
    sums = {}
    for m in range(4):
        b = [r for r in table.to_pylist() if r["minibatch"] == m]
        h = normalize_matrix(H[m, 0], "row-std")
        for i, ri in enumerate(b):
            for j, rj in enumerate(b):
                key = None
                if ri["trajectory"] == rj["trajectory"]:
                    lag = abs(ri["t"] - rj["t"])
                    key = {0: "dt0", 1: "dt1"}.get(lag, "tail" if lag >= 3 else None)
                elif ri["class"] != rj["class"]:
                    key = "other_class"
                if key:
                    sums.setdefault(key, []).append(h[i, j])
    got = summary["headline"]["CC"]["row-std"]["all"]
    assert got["tail"] is None  # windows of 2 transitions have no |Δt| >= 3
    for key in ("dt0", "dt1", "other_class"):
        assert got[key] == pytest.approx(np.mean(sums[key]), rel=1e-12)
    twotime = zarr.open_group(str(out / "results.zarr"), mode="r")["exact"]["twotime"]
    assert twotime.shape == (2, 3, 2, 2, 4, 4)  # pair, normalization, relation, class, t, t
    # same trajectory, class a, t_r = t_p = 0: minibatches 0 and 2 (the window t = 0, 1) hold it
    diagonal = [normalize_matrix(H[m, 0], "row-std")[i, i] for m in range(4)
                for i, r in enumerate(r for r in table.to_pylist() if r["minibatch"] == m)
                if r["class"] == "a" and r["t"] == 0]
    assert len(diagonal) == 2
    assert twotime[0, 1, 0, 0, 0, 0] == pytest.approx(np.mean(diagonal), rel=1e-12)
    lags = pq.read_table(out / "exact_lags.parquet").to_pylist()
    assert {r["lag"] for r in lags} == {-1, 0, 1} and all(r["pairs"] > 0 for r in lags)
    assert set(summary["paper"]["CC"]["row-std"]["all"]) == set(minibatch.HEADLINE)


def test_agreement_report(setup):
    _, _, out, summary, _ = setup
    rows = pq.read_table(out / "exact_agreement.parquet").to_pylist()
    assert {(r["minibatch"], r["allocation"], r["k"], r["pair"], r["normalization"]) for r in rows} == {
        (m, a, k, p, n) for m in (0, 1) for a in ("uniform", "energy") for k in (2, 8) for p in ("CC", "EC")
        for n in ("none", "row-std", "cosine")}
    for r in rows:
        assert np.isfinite(r["relative_frobenius"]) and -1 <= r["spearman"] <= 1
    projected = zarr.open_group(str(out / "results.zarr"), mode="r")["exact"]["projected"]
    assert projected.shape == (2, 2, 2, 3, 4, 4)  # minibatch, allocation, k, pair, response, perturbation
    assert json.loads((out / "exact.json").read_text())["complete"]


def test_restart_skips_finished_minibatches(setup, tmp_path):
    ds, ckpt, out, summary, settings = setup
    import shutil

    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    (copy / "exact.json").unlink()
    (copy / "exact" / "done" / "mb-000002.json").unlink()  # as if killed before its record
    H = zarr.open_array(str(copy / "results.zarr" / "exact" / "H"), mode="r+")
    H[2] = np.nan
    stamps = {p.name: p.stat().st_mtime_ns for p in (copy / "exact" / "done").iterdir()}
    again = run_exact(ckpt, ds.url, str(copy), settings, LAM, pairs=("CC", "EC"), normalize=("none", "row-std", "cosine"))
    assert {p.name: p.stat().st_mtime_ns for p in (copy / "exact" / "done").iterdir() if p.name in stamps} == stamps
    assert (copy / "exact" / "done" / "mb-000002.json").exists()
    np.testing.assert_allclose(zarr.open_array(str(copy / "results.zarr" / "exact" / "H"))[...],
                               zarr.open_array(str(out / "results.zarr" / "exact" / "H"))[...], rtol=1e-9)
    assert again["headline"] == summary["headline"]


def test_exact_cli_writes_into_a_folder(setup, tmp_path):
    from gradlake.cli import main

    ds, ckpt, _, _, _ = setup
    with pytest.raises(SystemExit) as exit_info:
        main(["exact", "--checkpoint", ckpt, "--data", ds.url, "--out", str(tmp_path / "x"), "--per-class", "1",
              "--num-classes", "1", "--ks", "2", "--probes", "4", "--lambda", "0.1", "--pairs", "CC",
              "--normalize", "none", "--device", "cpu", "--quiet"])
    assert exit_info.value.code in (0, None)
    assert json.loads((tmp_path / "x" / "exact.json").read_text())["batch_size"] == 1
    assert not (tmp_path / "x" / "lease.json").exists()  # released
    held = {"owner": f"{socket.gethostname()}:{os.getpid()}:other", "expires": time.time() + 60, "purpose": "x"}
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "lease.json").write_text(json.dumps(held))  # a live driver writes there
    with pytest.raises(SystemExit) as exit_info:
        main(["exact", "--checkpoint", ckpt, "--data", ds.url, "--out", str(tmp_path / "z"), "--quiet"])
    assert exit_info.value.code == 2 and sorted(p.name for p in (tmp_path / "z").iterdir()) == ["lease.json"]
    with pytest.raises(SystemExit) as exit_info:
        main(["exact", "--checkpoint", ckpt, "--data", ds.url, "--out", str(tmp_path / "y"), "--split", "nope"])
    assert exit_info.value.code == 2


def test_lanczos_sweep_spectrum_and_effective_ridge(setup, tmp_path):
    """method = "lanczos" with a λ sweep: H at every λ of one solve against the dense J, d_eff(λ) from the
    probes, the sweep table, μ_k in the agreement rows, and the paper's solve compared on minibatch 0."""
    ds, ckpt, _, _, _ = setup
    from gradlake.models.checkpoint import load_checkpoint

    settings = ExactConfig(enabled=True, per_class=2, classes=2, minibatches=2, agreement=1, htol=1e-6,
                           ks=(2,), device="cpu", method="lanczos", deff_probes=64, paper_check=1, max_iter=40)
    sweep = (1e-3, 1.0)
    summary = run_exact(ckpt, ds.url, str(tmp_path / "out"), settings, LAM, lambdas=sweep, pairs=("CC", "EC"),
                        normalize=("none", "row-std"))
    model = load_checkpoint(ckpt)[0].double().eval()
    group = zarr.open_group(str(tmp_path / "out" / "results.zarr"), mode="r")["exact"]
    assert group["lambda"][...].tolist() == list(sweep)
    table = pq.read_table(tmp_path / "out" / "exact_batches.parquet").to_pylist()
    solved = group["solved_pair"][...].tolist()
    for m in range(2):
        rows = np.array([r["row"] for r in table if r["minibatch"] == m])
        for li, lam in enumerate((LAM, *sweep)):
            want, J = dense_h(model, ds, rows, lam)
            got = group["H"][m] if li == 0 else group["H_sweep"][m, li - 1]
            for p, pair in enumerate(solved):
                np.testing.assert_allclose(got[p], want[pair], rtol=1e-5, atol=1e-6 * np.abs(want[pair]).max())
    mu = np.clip(np.linalg.eigvalsh(J @ J.T), 0, None)  # the last minibatch's spectrum
    spectrum = [r for r in pq.read_table(tmp_path / "out" / "exact_spectrum.parquet").to_pylist() if r["minibatch"] == 1]
    for r in spectrum:
        if r["lambda"] in (LAM, *sweep):
            want = (mu / (mu + r["lambda"])).sum()
            assert abs(r["d_eff"] - want) <= 4 * np.sqrt(2 * want / 64) + 1e-6
    rows = pq.read_table(tmp_path / "out" / "exact_sweep.parquet").to_pylist()
    assert {r["lambda"] for r in rows} == {LAM, *sweep}
    # λ at or above the run's are within htol; a smaller one may be flagged (its round-off floor), never hidden
    assert all(r["converged"] for r in rows if r["lambda"] >= LAM)
    agreement = summary["agreement"]
    assert all(r["mu_k"] > 0 and np.isfinite(r["relative_frobenius_mu_k"]) for r in agreement)
    assert summary["solver"]["method"] == ["lanczos"] and summary["solver"]["max_h_error_bound"] <= 1e-6
    paper = summary["paper_solver"]
    assert {r["minibatch"] for r in paper} == {0} and all(r["relative_frobenius"] > 0 for r in paper)
