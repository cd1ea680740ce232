"""run_reduce on a real store and Ray: every output against dense numpy from the stored φ."""

import dataclasses
import glob
import json
import os

import numpy as np
import pyarrow.dataset as pads
import pytest
import zarr
from reduce_helpers import dense_h, eta_from_probes, make_dataset, make_store, samples_columns

from gradlake.config import RayConfig, ReduceConfig
from gradlake.errors import InputError
from gradlake.reduce.output import coordinates

LAM = 1e-3
RTOL = 1e-6
BLOCKS = [("down.0.w", 2, "down"), ("across.w", 1, "across"), ("up.0.w", 3, "up")]  # φ's parameter blocks

pytestmark = pytest.mark.slow  # a real Ray: ~10-30 s of worker start-up on 2 busy cores


@pytest.fixture(scope="module")
def reduced(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("reduce")
    ds = make_dataset(str(root / "data"))
    offsets = np.cumsum([0] + [k for _, k, _ in BLOCKS])
    store = make_store(str(root / "store"), ds, projector={"seed": 0, "parameters": [
        {"name": n, "offset": int(o), "k": k} for (n, k, _), o in zip(BLOCKS, offsets)]})
    settings = ReduceConfig(damping=LAM, lambdas=(1e-2,), block_rows=7, topk=3, distance_pairs=50,
                            distance_bins=4, tile_rows="", tile_cols="split == 'train'", tile_size=5,
                            tile_max=12, topk_queries="split == 'test'", by_layer=True)
    summary = __import__("gradlake.distributed.reduce_tasks", fromlist=["run_reduce"]).run_reduce(
        store.url, settings, RayConfig())
    return store, settings, summary


def _ckpt_dense(store, ckpt, pair, norm, lam=LAM, entries=None):
    """Samples columns, dense H (or the share of H of φ_A's ``entries``) and η̃."""
    table = store.samples(ckpt)
    cols = samples_columns(table)
    ref = cols["split"] == "train"
    v = store.read(ckpt, "V", cols["row"]).astype(np.float64)
    eta = eta_from_probes(v[ref])
    pa_, pb_ = (store.read(ckpt, o, cols["row"]).astype(np.float64) for o in pair)
    if entries is not None:  # share: φ_A[g] · (W φ_B)[g]
        return cols, (pa_[:, entries] @ np.linalg.inv(eta + lam * np.eye(len(eta)))[entries] @ pb_.T), eta
    return cols, dense_h(pa_, pb_, eta, lam, norm, reference=np.flatnonzero(ref)), eta


@pytest.mark.parametrize("norm", ["none", "row-std", "cosine"])
def test_aggregates_and_spectrum_match_dense(reduced, norm):
    store, settings, summary = reduced
    out = zarr.open_group(store.reduce_url(settings.name) + "/results.zarr", mode="r")
    for ckpt in store.checkpoints:
        group = out[ckpt]
        coords = coordinates(group, "twotime")
        cols, H, eta = _ckpt_dense(store, ckpt, "MC", norm)
        p, n = coords["pair"].index("MC"), coords["normalization"].index(norm)
        classes = coords["class"]
        same_traj = cols["trajectory"][:, None] == cols["trajectory"][None, :]
        cls = np.searchsorted(classes, cols["class"])
        transfer = group["transfer"][0, p, n]
        for c in range(len(classes)):
            for e in range(len(classes)):
                sel = ~same_traj & (cls == c)[:, None] & (cls == e)[None, :]
                np.testing.assert_allclose(transfer[c, e], H[sel].mean(), rtol=RTOL)
        twotime = group["twotime"][0, p, n]
        for c in range(len(classes)):
            for t in range(4):
                for u in range(4):
                    at = (cls == c)[:, None] & (cols["t"] == t)[:, None] & (cols["t"] == u)[None, :]
                    np.testing.assert_allclose(twotime[0, c, t, u], H[at & same_traj].mean(), rtol=RTOL)
                    np.testing.assert_allclose(twotime[1, c, t, u], H[at & ~same_traj & (cls == c)[None, :]].mean(),
                                               rtol=RTOL)
                    np.testing.assert_allclose(twotime[2, c, t, u], H[at & (cls != c)[None, :]].mean(), rtol=RTOL)
        np.testing.assert_allclose(group["metric_eigenvalues"][:], np.linalg.eigvalsh(eta)[::-1], rtol=1e-9)
        # The λ sweep: the second lambda is computed too and differs.
        assert not np.allclose(group["transfer"][1, p, n], transfer)


def test_lag_statistics_match_dense(reduced):
    store, settings, _ = reduced
    url = store.reduce_url(settings.name)
    ckpt = store.checkpoints[0]
    cols, H, _ = _ckpt_dense(store, ckpt, "CC", "none")
    stats = pads.dataset(url + "/lag_stats.parquet", partitioning="hive").to_table().to_pylist()
    lag = cols["t"][:, None] - cols["t"][None, :]
    same_class = (cols["class"][:, None] == cols["class"][None, :]) & (cols["trajectory"][:, None] != cols["trajectory"][None, :])
    for delta in (-2, 0, 3):
        per_traj = [H[(cols["trajectory"] == n)[:, None] & same_class & (lag == delta)].mean()
                    for n in np.unique(cols["trajectory"])]
        row = [r for r in stats if r["checkpoint"] == ckpt and r["pair"] == "CC" and r["normalization"] == "none"
               and r["relation"] == "same_class" and r["class"] == "all" and r["lag"] == delta
               and r["lambda"] == LAM]
        assert len(row) == 1
        np.testing.assert_allclose(row[0]["median"], np.median(per_traj), rtol=RTOL)
        np.testing.assert_allclose(row[0]["q75"], np.percentile(per_traj, 75), rtol=RTOL)
        pooled = H[same_class & (lag == delta)].mean()
        np.testing.assert_allclose(row[0]["pooled_mean"], pooled, rtol=RTOL)
        # by layer: each layer group's pooled share, against the dense share; they sum to the mean
        start = 0
        for _, k, group in BLOCKS:
            _, share, _ = _ckpt_dense(store, ckpt, "CC", "none", entries=np.arange(start, start + k))
            np.testing.assert_allclose(row[0][f"pooled_share:{group}"], share[same_class & (lag == delta)].mean(),
                                       rtol=RTOL)
            start += k
        np.testing.assert_allclose(sum(row[0][f"pooled_share:{g}"] for _, _, g in BLOCKS), pooled, rtol=RTOL)
    over = pads.dataset(url + "/lag_checkpoints.parquet").to_table().to_pylist()
    assert {r["checkpoints"] for r in over} == {2}


def test_every_table_carries_the_provenance(reduced):
    from pathlib import Path

    import pyarrow.parquet as pq

    from gradlake.provenance import description_of

    store, settings, _ = reduced
    url = store.reduce_url(settings.name)
    files = sorted(p for p in Path(url).rglob("*.parquet") if p.is_file())
    assert len(files) >= 4
    for path in files:
        about = description_of(pq.read_schema(path))
        assert about["format"] == "gradlake-reduce/1" and about["store"] == store.url, path
        assert about["reduce"] == settings.name and about["dataset"] == store.spec.dataset and about["gradlake_version"]
        assert about["checkpoints"] == {n: store.provenance["checkpoints"][n]["sha256"] for n in store.checkpoints}
        assert str(path).startswith(f"{url}/{about['table'].split('/')[0]}")


def test_pairwise_outputs_match_dense(reduced):
    store, settings, _ = reduced
    url = store.reduce_url(settings.name)
    ckpt = store.checkpoints[1]
    cols, H, _ = _ckpt_dense(store, ckpt, "EC", "none")
    tiles = zarr.open_group(url + "/results.zarr", mode="r")[ckpt]["tiles"]
    r, c = tiles["response_rows"][:], tiles["perturbation_rows"][:]
    assert len(r) == 12 and len(c) == 12 and set(cols["split"][c]) == {"train"}
    np.testing.assert_allclose(tiles["EC"][:], H[np.ix_(r, c)], rtol=1e-4, atol=1e-6 * np.abs(H).max())

    table = pads.dataset(url + "/topk.parquet", partitioning="hive").to_table()
    top = [t for t in table.to_pylist() if t["checkpoint"] == ckpt and t["pair"] == "EC"]
    train = np.flatnonzero(cols["split"] == "train")
    for q in np.flatnonzero(cols["split"] == "test")[:3]:
        mine = sorted((t for t in top if t["query_row"] == q and t["kind"] == "top"), key=lambda t: t["rank"])
        want = train[np.argsort(-H[q, train])][:3]
        assert [t["row"] for t in mine] == want.tolist()
        assert [t["rank"] for t in mine] == [1, 2, 3]
        np.testing.assert_allclose([t["influence"] for t in mine], H[q, want], rtol=1e-4)
        start = 0
        for b, (_, k, group) in enumerate(BLOCKS):  # by layer: the listed pairs' shares
            _, share, _ = _ckpt_dense(store, ckpt, "EC", "none", entries=np.arange(start, start + k))
            np.testing.assert_allclose([t[f"share:{group}"] for t in mine], share[q, want], rtol=1e-9)
            np.testing.assert_allclose([t["block_shares"][b] for t in mine], share[q, want], rtol=1e-9)
            start += k
        assert mine[0]["query_class"] == cols["class"][q] and mine[0]["t"] == cols["t"][want[0]]
    # One top-k table: the query's for the same settings has the reduce's schema and rows.
    from gradlake.query import topk

    asked = topk(store, "split == 'test'", "split == 'train'", k=3, pair="EC", checkpoint=ckpt, damping=LAM,
                 by_layer=True)
    assert table.drop_columns(["checkpoint"]).schema.equals(asked.schema, check_metadata=False)
    reduce_rows = sorted((t["query_row"], t["kind"], t["rank"], t["row"]) for t in top)
    assert reduce_rows == sorted(zip(*(asked[c].to_pylist() for c in ("query_row", "kind", "rank", "row"))))

    selfinf = pads.dataset(url + "/self_influence.parquet", partitioning="hive").to_table().to_pylist()
    got = {s["row"]: s["h_self"] for s in selfinf if s["checkpoint"] == ckpt and s["pair"] == "EC" and s["lambda"] == LAM}
    np.testing.assert_allclose([got[i] for i in range(len(H))], np.diag(H), rtol=RTOL)

    pairs = pads.dataset(url + "/distance_pairs.parquet", partitioning="hive").to_table().to_pylist()
    pairs = [p for p in pairs if p["checkpoint"] == ckpt and p["pair"] == "EC" and p["normalization"] == "none"]
    assert len(pairs) > 30
    np.testing.assert_allclose([p["h"] for p in pairs], [H[p["row_i"], p["row_j"]] for p in pairs], rtol=RTOL)
    curve = pads.dataset(url + "/distance_curve.parquet", partitioning="hive").to_table().to_pylist()
    assert sum(c["pairs"] for c in curve if c["checkpoint"] == ckpt and c["pair"] == "EC"
               and c["normalization"] == "none") == len(pairs)


def test_summary_restart_and_settings_change(reduced, tmp_path):
    from gradlake.distributed.reduce_tasks import run_reduce

    store, settings, summary = reduced
    url = store.reduce_url(settings.name)
    on_disk = json.loads(open(url + "/summary.json").read())
    assert on_disk["complete"] and set(on_disk["checkpoints"]) == set(store.checkpoints)
    # 24 reference samples x 2 probes >= k = 6: a full-rank metric, no warning.
    assert on_disk["warnings"] == []
    assert all(c["metric_rank"] == 6 and c["metric_vectors"] == 48 for c in on_disk["checkpoints"].values())
    # Same settings: every checkpoint is reused from its completion record.
    again = run_reduce(store.url, settings, RayConfig())
    assert again["checkpoints"] == summary["checkpoints"]
    # Other settings under the same name: refused, nothing touched; replaced whole with overwrite.
    changed = dataclasses.replace(settings, pairs=("CC",), lambdas=(), topk=0, distance_pairs=0, tile_max=0)
    before = {p: os.path.getmtime(p) for p in glob.glob(url + "/**", recursive=True) if os.path.isfile(p)}
    with pytest.raises(InputError, match="--overwrite"):
        run_reduce(store.url, changed, RayConfig())
    assert {p: os.path.getmtime(p) for p in glob.glob(url + "/**", recursive=True) if os.path.isfile(p)} == before
    third = run_reduce(store.url, changed, RayConfig(), overwrite=True)
    coords = coordinates(zarr.open_group(url + "/results.zarr", mode="r")[store.checkpoints[0]], "twotime")
    assert coords["pair"] == ["CC"] and coords["lambda"] == [LAM]
    assert third["checkpoints"][store.checkpoints[0]]["topk"] == {"skipped": "reduce.topk = 0"}
    # The command line runs the same stage.
    from gradlake.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["reduce", store.url, "--name", "cli", "--lambda", "0.01", "--pairs", "CC", "--normalize", "row-std",
              "--topk", "0", "--distance-pairs", "0", "--tile-max", "0", "--checkpoints", store.checkpoints[0],
              "--quiet"])
    assert exit_info.value.code in (0, None)
    cli = json.loads(open(store.reduce_url("cli") + "/summary.json").read())
    assert cli["settings"]["damping"] == 0.01 and list(cli["checkpoints"]) == [store.checkpoints[0]]
    with pytest.raises(SystemExit) as exit_info:  # a second reduce of the name, other settings
        main(["reduce", store.url, "--name", "cli", "--lambda", "0.02", "--quiet"])
    assert exit_info.value.code == 2
    assert json.loads(open(store.reduce_url("cli") + "/summary.json").read()) == cli
    with pytest.raises(SystemExit) as exit_info:
        main(["reduce", store.url, "--metric", "X"])
    assert exit_info.value.code == 2
    with pytest.raises(InputError, match="reduce.perturbation"):
        run_reduce(store.url, dataclasses.replace(settings, perturbation="class == 'zzz'"), RayConfig())
    with pytest.raises(InputError, match="reduce.pairs"):
        run_reduce(store.url, dataclasses.replace(settings, pairs=("CV",)), RayConfig())


def test_by_layer_needs_parameter_blocks(tmp_path, ray_session, cli):
    store = make_store(str(tmp_path / "store"), make_dataset(str(tmp_path / "data")))  # no blocks recorded
    code, _, err = cli(["reduce", store.url, "--pairs", "CC", "--by-layer"])
    assert code == 2 and "reduce.by_layer: the store's projector spec records no parameter blocks" in err
    assert "Traceback" not in err and not (tmp_path / "store" / "reduce").exists()


def test_reduce_runs_the_exact_mode_on_the_recorded_checkpoint(tmp_path, ray_session):
    import torch

    from gradlake import models
    from gradlake.config import ExactConfig
    from gradlake.models.checkpoint import save_checkpoint
    from gradlake.distributed.reduce_tasks import run_reduce

    ds = make_dataset(str(tmp_path / "data"))
    torch.manual_seed(0)
    cfg = models.config("vit", "tiny", channels=4, resolution=8, dim=8, depth=1, mlp_ratio=1)
    path = save_checkpoint(str(tmp_path / "train" / "epoch-0003"), models.from_config(cfg), cfg, {"epoch": 3})
    store = make_store(str(tmp_path / "store"), ds, checkpoints=("epoch-0003",), paths={"epoch-0003": path})
    settings = ReduceConfig(damping=0.1, pairs=("CC",), normalize=("none",), topk=0, distance_pairs=0,
                            tile_max=0, exact=ExactConfig(enabled=True, per_class=2, classes=1, ks=(2,),
                                                          probes=4, device="cpu"))
    summary = run_reduce(store.url, settings, RayConfig())
    assert summary["exact"]["complete"] and summary["exact"]["checkpoint"] == path
    assert summary["exact"]["batch_size"] == 2 and summary["exact"]["damping"] == 0.1
    exact = zarr.open_group(store.reduce_url("default") + "/results.zarr", mode="r")["exact"]["H"]
    assert exact.shape == (1, 1, 2, 2) and np.isfinite(exact[:]).all()


def test_an_undersampled_metric_warns_in_the_summary_and_the_report(tmp_path, ray_session):
    from gradlake.distributed.reduce_tasks import run_reduce
    from gradlake.pipeline import build_report

    ds = make_dataset(str(tmp_path / "data"))
    store = make_store(str(tmp_path / "store"), ds, checkpoints=("epoch-0001",), k=40, probes=1)
    settings = ReduceConfig(damping=LAM, pairs=("CC",), normalize=("row-std",), topk=0, tile_max=0,
                            distance_pairs=0)
    summary = run_reduce(store.url, settings, RayConfig())
    on_disk = json.loads(open(store.reduce_url(settings.name) + "/summary.json").read())
    kinds = {w["kind"]: w for w in on_disk["warnings"]}
    assert set(kinds) == {"undersampled", "cliff"} and summary["warnings"] == on_disk["warnings"]
    assert kinds["undersampled"]["checkpoint"] == "epoch-0001"
    assert (kinds["undersampled"]["vectors"], kinds["undersampled"]["rank"]) == (24, 24)  # 24 train samples
    assert kinds["cliff"]["index"] == 23
    assert on_disk["checkpoints"]["epoch-0001"]["metric_rank"] == 24
    out = tmp_path / "report"
    build_report(store.url, str(out))
    text = open(out / "index.html").read()
    assert "Warning, checkpoint epoch-0001: the metric η̃ is a sum of 24 reference samples × 1 probe = 24" in text
    assert "store at least 2 V probes per sample" in text
    # The shrinkage estimator: a full-rank metric; the warnings still describe the probe estimate.
    shrunk = run_reduce(store.url, dataclasses.replace(settings, name="shrunk", metric_estimator="shrink"),
                        RayConfig())
    info = shrunk["checkpoints"]["epoch-0001"]
    assert 0 < info["metric_shrinkage"] < 1 and {w["kind"] for w in shrunk["warnings"]} == {"undersampled", "cliff"}
    eigenvalues = zarr.open_group(store.reduce_url("shrunk") + "/results.zarr", mode="r")["epoch-0001"][
        "metric_eigenvalues"][:]
    assert eigenvalues[-1] > 1e-6 * eigenvalues[0]


def test_the_dataset_is_checked_by_fingerprint_and_a_moved_one_found_by_data(tmp_path, ray_session):
    """The reduce's distance pass reads the store's dataset: another dataset at the recorded URL
    is not used (the pass is skipped, saying why); --data finds a moved one, checked first."""
    import shutil

    from gradlake.distributed.reduce_tasks import run_reduce

    ds = make_dataset(str(tmp_path / "data"))
    store = make_store(str(tmp_path / "store"), ds, checkpoints=("epoch-0001",))
    settings = ReduceConfig(damping=LAM, pairs=("CC",), normalize=("none",), topk=0, tile_max=0,
                            distance_pairs=20, distance_bins=2)
    shutil.move(ds.url, str(tmp_path / "moved"))
    make_dataset(ds.url, seed=1)  # another dataset where the store's was
    stale = run_reduce(store.url, settings, RayConfig())["checkpoints"]["epoch-0001"]["distance"]
    assert "skipped" in stale and "--data" in stale["skipped"] and ds.fingerprint[:12] in stale["skipped"]
    with pytest.raises(InputError, match="--data"):  # refused before any work
        run_reduce(store.url, dataclasses.replace(settings, name="wrong"), RayConfig(), data_url=ds.url)
    assert not os.path.exists(store.reduce_url("wrong"))
    moved = run_reduce(store.url, dataclasses.replace(settings, name="moved"), RayConfig(),
                       data_url=str(tmp_path / "moved"))
    table = pads.dataset(store.reduce_url("moved") + "/distance_pairs.parquet", partitioning="hive").to_table()
    assert moved["checkpoints"]["epoch-0001"]["distance"] == {"pairs": table.num_rows,
                                                              "dataset": str(tmp_path / "moved")}
    inputs, _ = make_dataset(str(tmp_path / "again")).samples(np.r_[table["row_i"].to_numpy(), table["row_j"].to_numpy()])
    n = table.num_rows
    expected = np.sqrt(((inputs[:n].astype(np.float64) - inputs[n:]) ** 2).reshape(n, -1).mean(1))
    np.testing.assert_allclose(table["distance"].to_numpy(), expected, rtol=1e-6)
