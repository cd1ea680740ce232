"""The exact mode end to end on a tiny ViT checkpoint: batch, exact H against a dense
Jacobian, the agreement report, the CLI."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr
from reduce_helpers import make_dataset

from gradlake import models, physics
from gradlake.config import ExactConfig
from gradlake.reduce import run_exact
from gradlake.reduce.output import coordinates

LAM = 0.1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from gradlake.models.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("exact")
    ds = make_dataset(str(root / "data"), classes=("b", "a", "c"))
    torch.manual_seed(0)
    cfg = models.config("vit", "tiny", channels=4, resolution=8, dim=8, depth=1, mlp_ratio=1)
    ckpt = save_checkpoint(str(root / "epoch-0001"), models.from_config(cfg), cfg, {"epoch": 1})
    settings = ExactConfig(enabled=True, per_class=2, classes=2, rtol=1e-7, ks=(2, 8), probes=32,
                           device="cpu")
    summary = run_exact(ckpt, ds.url, str(root / "out"), settings, LAM, pairs=("CC", "EC"),
                        normalize=("none", "cosine"))
    return ds, ckpt, root / "out", summary


def test_batch_and_exact_against_dense_jacobian(setup):
    ds, ckpt, out, summary = setup
    batch = pq.read_table(out / "exact_batch.parquet").to_pylist()
    # Classes a and b (sorted), the first test trajectory of each, t = 0, 1.
    assert [(b["class"], b["t"]) for b in batch] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert all(ds.splits[b["trajectory"]] == "test" for b in batch)
    rows = np.array([b["row"] for b in batch])
    from gradlake.models.checkpoint import load_checkpoint

    model, _ = load_checkpoint(ckpt)
    model = model.double().eval()
    x, y = (torch.from_numpy(a).double() for a in ds.samples(rows))
    params = {n: p.detach() for n, p in model.named_parameters()}
    f = lambda p: torch.func.functional_call(model, p, (x,))  # noqa: E731
    pred = f(params)
    jac = torch.func.jacrev(f)(params)
    J = torch.cat([jac[n].reshape(pred.numel(), -1) for n in params], 1).numpy()
    res = physics.residuals(pred, x, y, ("C", "E"), physics.EULER_CHANNELS)
    g = {o: np.stack([J[i * (J.shape[0] // 4):(i + 1) * (J.shape[0] // 4)].T @ r[i].reshape(-1).numpy()
                      for i in range(4)]) for o, r in res.items()}
    eta = J.T @ J
    H = zarr.open_group(str(out / "results.zarr"), mode="r")["exact"]["exact"]
    coords = coordinates(zarr.open_group(str(out / "results.zarr"), mode="r")["exact"], "exact")
    assert coords["pair"] == ["CC", "EC", "EE"]  # EE's diagonal serves cosine
    for p, pair in enumerate(coords["pair"]):
        want = g[pair[0]] @ np.linalg.solve(eta + LAM * np.eye(len(eta)), g[pair[1]].T)
        np.testing.assert_allclose(H[p], want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    top = np.linalg.eigvalsh(J @ J.T)[-1] + LAM
    assert abs(summary["top_eigenvalue"] - top) <= max(summary["top_eigenvalue_bound"], 1e-8 * top)
    assert summary["cg"]["C"]["max_relative_residual"] <= 1e-7 * 1.01


def test_agreement_report(setup):
    _, _, out, summary = setup
    rows = pq.read_table(out / "exact_agreement.parquet").to_pylist()
    assert {(r["k"], r["pair"], r["normalization"]) for r in rows} == {
        (k, p, n) for k in (2, 8) for p in ("CC", "EC") for n in ("none", "cosine")}
    for r in rows:
        assert np.isfinite(r["relative_frobenius"]) and -1 <= r["spearman"] <= 1
    projected = zarr.open_group(str(out / "results.zarr"), mode="r")["exact"]["projected"]
    assert projected.shape == (2, 3, 4, 4)
    assert json.loads((out / "exact.json").read_text())["complete"]


def test_exact_cli_writes_into_a_folder(setup, tmp_path):
    from gradlake.cli import main

    ds, ckpt, _, _ = setup
    with pytest.raises(SystemExit) as exit_info:
        main(["exact", "--checkpoint", ckpt, "--data", ds.url, "--out", str(tmp_path / "x"), "--per-class", "1",
              "--classes", "1", "--ks", "2", "--probes", "4", "--lambda", "0.1", "--pairs", "CC",
              "--normalize", "none", "--device", "cpu", "--quiet"])
    assert exit_info.value.code in (0, None)
    assert json.loads((tmp_path / "x" / "exact.json").read_text())["batch_size"] == 1
    with pytest.raises(SystemExit) as exit_info:
        main(["exact", "--checkpoint", ckpt, "--data", ds.url, "--out", str(tmp_path / "y"), "--split", "nope"])
    assert exit_info.value.code == 2
