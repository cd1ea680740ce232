"""build_report end to end: a real training run, gradient store, reduce (with the exact mode)
and rollout on a tiny dataset; the page, its figures, what they are drawn from, the notes for
missing inputs, idempotence, a non-local output folder and the CLI."""

from __future__ import annotations

import importlib.util
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import zarr

from gradlake.config import ExactConfig, ModelConfig, RayConfig, ReduceConfig, TrainConfig
from gradlake.errors import InputError
from gradlake.reduce.output import coordinates
from gradlake.pipeline import build_report

pytestmark = pytest.mark.slow  # one module fixture: train, store, reduce on Ray, exact mode (~10 s)

DAMPING = 0.1  # large enough for a quick exact (Krylov) solve
SWEEP = 1.0
CHECKPOINTS = ("epoch-0001", "epoch-0002")


def _reduce_helpers():
    """The reduce tests' small dataset and store builders (tests/reduce/reduce_helpers.py)."""
    path = Path(__file__).parents[1] / "reduce" / "reduce_helpers.py"
    spec = importlib.util.spec_from_file_location("report_reduce_helpers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, ray_session):
    """(store url, train dir, reduce settings): two trained tiny-ViT checkpoints, a rollout of
    the last, a store of random φ naming them, and a reduce with a λ sweep and the exact mode."""
    from gradlake.distributed.reduce_tasks import run_reduce
    from gradlake.rollout import rollout
    from gradlake.train import train

    helpers = _reduce_helpers()
    root = tmp_path_factory.mktemp("report")
    ds = helpers.make_dataset(str(root / "data"))
    model = ModelConfig("vit", "tiny", {"dim": 8, "depth": 1, "mlp_ratio": 1})
    paths = train(ds.url, model, TrainConfig(epochs=2, batch_size=8, device="cpu"), str(root / "train"))
    rollout(paths[-1], ds.url, device="cpu", out=paths[-1])
    blocks = [("embed.1.weight", 0, 2), ("blocks.0.mlp.weight", 2, 3), ("unpatch.weight", 5, 1)]
    store = helpers.make_store(str(root / "store"), ds, CHECKPOINTS,
                               paths={p.rsplit("/", 1)[-1]: p for p in paths}, projector={
                                   "seed": 0, "parameters": [{"name": n, "offset": o, "k": k} for n, o, k in blocks]})
    settings = ReduceConfig(damping=DAMPING, lambdas=(SWEEP,), pairs=("MC",), normalize=("none", "row-std"),
                            block_rows=16, topk=0, tile_max=0, distance_pairs=60, distance_bins=3, by_layer=True,
                            exact=ExactConfig(enabled=True, per_class=2, classes=2, ks=(2, 4), probes=8,
                                              rtol=1e-4, device="cpu"))
    run_reduce(store.url, settings, RayConfig())
    return store.url, str(root / "train"), settings


class Page(HTMLParser):
    """Images (src, alt), section ids, and the text of notes and captions of an index.html."""

    def __init__(self, text: str):
        super().__init__()
        self.images, self.sections, self.notes, self.captions, self.scripts = [], [], [], [], 0
        self._into = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "section":
            self.sections.append(attrs["id"])
        elif tag == "p" and attrs.get("class") == "note":
            self._into = self.notes
        elif tag == "figcaption":
            self._into = self.captions
        elif tag in ("script", "link", "iframe"):
            self.scripts += 1

    def handle_endtag(self, tag):
        if tag in ("p", "figcaption"):
            self._into = None

    def handle_data(self, data):
        if self._into is not None:
            self._into.append(data)


def read_page(out: Path) -> Page:
    return Page((out / "index.html").read_text())


def assert_links_complete(out: Path, page: Page):
    """Every <img> exists and is a PNG; every PNG written is linked."""
    for src in page.images:
        assert not src.startswith(("/", "http")), src
        assert (out / src).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", src
    on_disk = {str(p.relative_to(out)) for p in (out / "figures").glob("*.png")}
    assert on_disk == set(page.images)


def test_full_report(inputs, tmp_path):
    store_url, train_dir, settings = inputs
    out = tmp_path / "report"
    index = build_report(store_url, str(out), train_dir=train_dir)
    assert index == str(out / "index.html")
    page = read_page(out)
    assert page.scripts == 0
    assert page.sections == ["provenance", "training", "rollout", "exact", "spectrum", "intra", "inter", "lags",
                             "transfer", "distance"]
    assert page.notes == []  # every input is there
    assert_links_complete(out, page)
    per_checkpoint = [f"figures/{kind}-{c}-{pair}-row-std.png" for c in CHECKPOINTS
                      for kind in ("intra", "inter", "lags", "lags-layers", "transfer", "distance") for pair in ("MC",)]
    overall = ["figures/training-curves.png", "figures/rollout-epoch-0002.png", "figures/metric-spectrum.png",
               "figures/exact-none.png", "figures/exact-row-std.png", "figures/lags-training-MC-row-std.png",
               "figures/exact-twotime-MC-row-std.png"]
    assert sorted(page.images) == sorted(per_checkpoint + overall)
    assert len(page.captions) == len(page.images) and all(len(c) > 40 for c in page.captions)
    text = (out / "index.html").read_text()
    for expected in ("dataset fingerprint", "sha256", "k = 6", "<th>lambda (damping)</th><td>0.1; sweep 1</td>",
                     "C, M, E, V", "<th>normalisations drawn</th><td>row-std</td>"):
        assert expected in text
    manifest = json.loads((out / "report.json").read_text())
    assert sorted(manifest["files"]) == sorted([*page.images, "index.html"])


def test_missing_reduce_and_train_dir_become_notes(inputs, tmp_path):
    store_url, _, _ = inputs
    out = tmp_path / "report"
    build_report(store_url, str(out), reduce_name="nope")
    page = read_page(out)
    notes = " ".join(page.notes)
    assert "No training directory was given" in notes
    assert notes.count("No complete reduce named 'nope'") == 7
    # The rollout table is still found through the checkpoint paths the store records.
    assert page.images == ["figures/rollout-epoch-0002.png"]
    assert_links_complete(out, page)


def test_missing_exact_and_rollout(inputs, tmp_path):
    """A reduce without the exact mode and a train dir without rollout tables: notes, not errors."""
    import shutil

    from gradlake.reduce.output import ReduceOutput

    store_url, train_dir, _ = inputs
    copy = tmp_path / "store"
    shutil.copytree(store_url, copy)
    reduce_dir = ReduceOutput(str(copy / "reduce" / "default"))
    reduce_dir.remove("exact.json")
    train_copy = tmp_path / "train"
    shutil.copytree(train_dir, train_copy)
    for table in train_copy.rglob("rollout.parquet"):
        table.unlink()
    # The copied store still names the original checkpoints; point the report at the copies only.
    meta = json.loads((copy / "store.json").read_text())
    for name in meta["checkpoints"]:
        meta["checkpoints"][name]["path"] = str(train_copy / "checkpoints" / name)
    (copy / "store.json").write_text(json.dumps(meta))
    out = tmp_path / "report"
    build_report(str(copy), str(out), train_dir=str(train_copy))
    page = read_page(out)
    notes = " ".join(page.notes)
    assert "exact minibatch mode was not run" in notes and "No rollout table" in notes
    assert "figures/training-curves.png" in page.images
    assert not any("exact" in src or "rollout" in src for src in page.images)
    assert_links_complete(out, page)


def test_figures_show_the_damping_slice(inputs, tmp_path, monkeypatch):
    """Each figure gets the reduce's arrays at λ = damping (not the sweep), checked against a
    direct read of the results with plain zarr / pyarrow."""
    from gradlake.report import figures

    store_url, _, _ = inputs
    calls = {}

    def recorder(name):
        def record(out, **kwargs):
            calls.setdefault(name, []).append(kwargs)
        return record

    for name in ("two_time_heatmaps", "lag_curves", "transfer_matrix", "influence_vs_distance", "metric_spectrum",
                 "exact_agreement"):
        monkeypatch.setattr(figures, name, recorder(name))
    build_report(store_url, str(tmp_path / "r"), normalizations=["none"])

    results = zarr.open_group(f"{store_url}/reduce/default/results.zarr", mode="r")
    ckpt, pair = CHECKPOINTS[-1], "MC"
    coords = coordinates(results[ckpt], "twotime")
    assert coords["lambda"] == [DAMPING, SWEEP]
    p, n = coords["pair"].index(pair), coords["normalization"].index("none")
    want_transfer = results[ckpt]["transfer"][0, p, n]
    got = [c for c in calls["transfer_matrix"] if c["title"].startswith(f"Class transfer H_{pair}")
           and ckpt in c["title"]]
    assert len(got) == 1
    np.testing.assert_array_equal(got[0]["matrix"], want_transfer)
    assert not np.allclose(want_transfer, results[ckpt]["transfer"][1, p, n])  # the sweep differs

    intra = [c for c in calls["two_time_heatmaps"] if f"H_{pair}" in c["title"] and "per class" in c["title"]
             and ckpt in c["title"]]
    assert len(intra) == 1
    twotime = results[ckpt]["twotime"][0, p, n]
    labels = [label for label, _ in intra[0]["panels"]]
    assert labels[0] == "a · same trajectory" and labels[-1] == "c · other classes"
    for (label, matrix), want in zip(intra[0]["panels"], twotime.reshape(-1, *twotime.shape[-2:])):
        np.testing.assert_array_equal(matrix, want)

    field = pads.field
    stats = pads.dataset(f"{store_url}/reduce/default/lag_stats.parquet", partitioning="hive").to_table(
        filter=(field("checkpoint") == ckpt) & (field("pair") == pair) & (field("normalization") == "none")
        & (field("lambda") == DAMPING) & (field("relation") == "same_trajectory") & (field("class") == "all")
    ).sort_by("lag")
    lag = [c for c in calls["lag_curves"] if f"H_{pair}" in c["title"] and ckpt in c["title"]]
    x, median, q25, q75 = lag[0]["panels"][0][1]["all"]
    assert stats.num_rows == len(x) > 1
    for name, got_values in (("lag", x), ("median", median), ("q25", q25), ("q75", q75)):
        np.testing.assert_array_equal(got_values, stats.column(name).to_numpy())
    layers = [c for c in calls["lag_curves"] if "by layer group" in c["title"] and ckpt in c["title"]]
    curves = layers[0]["panels"][0][1]  # same trajectory: the pooled share of each layer group, and the total
    assert list(curves) == ["embed", "blocks", "unpatch", "all"] and layers[0]["legend"].startswith("layer group")
    for group, (x, share, _, _) in curves.items():
        name = "pooled_mean" if group == "all" else f"pooled_share:{group}"
        np.testing.assert_array_equal(share, stats.column(name).to_numpy())
    np.testing.assert_allclose(sum(curves[g][1] for g in ("embed", "blocks", "unpatch")), curves["all"][1],
                               rtol=1e-9)

    spectrum = calls["metric_spectrum"][0]
    assert spectrum["damping"] == DAMPING
    np.testing.assert_array_equal(spectrum["spectra"][ckpt], results[ckpt]["metric_eigenvalues"][...])
    assert {tuple(c["ks"]) for c in calls["exact_agreement"]} == {(2, 4)}


def test_deterministic_idempotent_and_keeps_other_files(inputs, tmp_path):
    store_url, train_dir, _ = inputs
    out = tmp_path / "report"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    build_report(store_url, str(out), train_dir=train_dir, normalizations=["none"])
    first = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert any("-none.png" in str(p) for p in first)
    build_report(store_url, str(out), train_dir=train_dir, normalizations=["none"])
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == first
    build_report(store_url, str(out), reduce_name="nope")  # no reduce: its figures go, the rollout stays
    assert [p.name for p in (out / "figures").glob("*.png")] == ["rollout-epoch-0002.png"]
    assert (out / "notes.txt").read_text() == "mine"
    assert_links_complete(out, read_page(out))


def test_unknown_normalization_and_missing_store(inputs, tmp_path):
    store_url, _, _ = inputs
    with pytest.raises(InputError, match="cosine"):
        build_report(store_url, str(tmp_path / "r"), normalizations=["cosine"])
    with pytest.raises(InputError, match="no gradient store"):
        build_report(str(tmp_path / "nothing"), str(tmp_path / "r"))


def test_report_to_a_non_local_folder(inputs):
    import fsspec

    store_url, _, _ = inputs
    index = build_report(store_url, "memory://report-test/out", reduce_name="nope")  # few figures
    fs = fsspec.filesystem("memory")
    page = Page(fs.cat_file("/report-test/out/index.html").decode())
    assert index == "memory://report-test/out/index.html"
    assert page.images
    for src in page.images:
        assert fs.cat_file(f"/report-test/out/{src}")[:4] == b"\x89PNG"


def test_cli(inputs, tmp_path, capsys):
    from gradlake.cli import main

    store_url, train_dir, _ = inputs
    out = tmp_path / "cli"
    with pytest.raises(SystemExit) as exit_info:
        main(["report", store_url, "--train", train_dir, "--out", str(out), "--normalize", "none", "--quiet"])
    assert exit_info.value.code in (0, None)
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out / "index.html")
    assert (out / "figures" / "intra-epoch-0002-MC-none.png").exists()
    for bad in (["report", str(tmp_path / "none"), "--out", str(out)],
                ["report", store_url, "--train", str(tmp_path / "none"), "--out", str(out)]):
        with pytest.raises(SystemExit) as exit_info:
            main(bad)
        assert exit_info.value.code == 2
