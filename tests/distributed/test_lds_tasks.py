"""The LDS stage end to end on a tiny job: outputs against independent computations, resume, bad input."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from gradlake import fsio, lds, physics
from gradlake.config import parse_job
from gradlake.data import Dataset
from gradlake.stages.lds_plan import record_settings
from gradlake.models.checkpoint import load_checkpoint
from gradlake.pipeline import run_job
from gradlake.query import metric_of
from gradlake.store import GradientStore

TINY = {
    "name": "tiny-lds", "stages": ["data", "train", "grads", "lds"],
    "data": {"classes": ["rp", "crp", "rpui"], "trajectories": 2, "steps": 4, "resolution": 16},
    "train": {"epochs": 1, "batch_size": 8},
    "grads": {"k_in": 4, "k_out": 4, "shard_rows": 8, "workers": 1, "probes": 2},
    "eval": {"lds": {"enabled": True, "subsets": 2, "seed": 5}},  # M = 2: one retraining (subset 1)
    "ray": {"num_cpus": 2},
}


def _observables(checkpoint: str, ds: Dataset, rows: np.ndarray) -> dict[str, np.ndarray]:
    model, _ = load_checkpoint(checkpoint)
    x, y = (torch.from_numpy(a) for a in ds.samples(rows))
    with torch.no_grad():
        pred = model(x)
        return {a: physics.observable(a, pred, x, y, ds.channels).double().numpy() for a in ("C", "M", "E")}


@pytest.mark.slow
def test_lds_stage_scores_resumes_a_finished_subset_and_redoes_a_stale_one(tmp_path, ray_session):
    job = parse_job({**TINY, "out": str(tmp_path / "run")})
    run_job(dataclasses.replace(job, stages=("data", "train", "grads")), echo=lambda _: None)
    ds, store = Dataset.open(job.data_url), GradientStore.open(job.store_url)
    name = store.checkpoints[-1]
    test = store.samples(name, "split == 'test'")
    rows = test.column("row").to_numpy()
    train_ids = np.flatnonzero(ds.splits == "train")
    masks = lds.sample_subsets(len(train_ids), 2, 0.5, seed=5)
    folder = fsio.Folder(job.lds_dir)
    planted = {a: [5.0] * len(rows) for a in ("C", "M", "E")}
    for m, settings in ((0, record_settings(job, ds.fingerprint, rows)), (1, "from other settings")):
        folder.write_json(f"subsets/s-{m:04d}/record.json", {"settings": settings, "subset": m, "seconds": 0.0,
                                                             "trajectories": train_ids[masks[m]].tolist(),
                                                             "values": planted})

    summary = run_job(job, echo=lambda _: None)["lds"]

    assert not folder.exists("subsets/s-0000/checkpoints")  # finished: never retrained
    assert folder.read_json("subsets/s-0000/record.json")["values"] == planted
    redone = folder.read_json("subsets/s-0001/record.json")
    assert redone["values"] != planted and folder.exists("subsets/s-0001/checkpoints")
    info = folder.read_json("lds.json")
    assert (info["subsets"], info["alpha"], info["subset_seed"]) == (2, 0.5, 5) == (summary["subsets"], 0.5, 5)
    assert info["subset_trajectories"] == [train_ids[mask].tolist() for mask in masks]
    assert "skipped" in info["exact"]

    table = pq.read_table(io.BytesIO(folder.read_bytes("lds.parquet")))
    assert table.num_rows == 2 * len(rows) * 3
    full = _observables(f"{job.train_dir}/checkpoints/{name}", ds, rows)
    train_rows = store.rows(name, "split == 'train'")
    inverse = metric_of(store, "split == 'train'", "V", name).inverse(job.reduce.damping)
    phi_train = store.read(name, "C", train_rows).astype(np.float64)
    train_trajectory = ds.index().locate(train_rows)[0]
    for a in ("C", "M", "E"):
        part = table.filter(table.column("observable").to_numpy(zero_copy_only=False) == a)
        actual = part.column("actual").to_numpy().reshape(2, -1)
        np.testing.assert_allclose(actual[0], 5.0 - full[a], rtol=1e-6)
        subset1 = _observables(redone["checkpoint"], ds, rows)[a]
        np.testing.assert_allclose(actual[1], subset1 - full[a], rtol=1e-5, atol=1e-7)
        h = store.read(name, a, rows).astype(np.float64) @ inverse @ phi_train.T  # dense H_AC(i, j)
        for method, scores in (("projected", h), ("inner_product", store.read(name, a, rows) @ phi_train.T)):
            predicted = part.column(f"predicted_{method}").to_numpy().reshape(2, -1)
            for m in range(2):
                left_out = ~np.isin(train_trajectory, train_ids[masks[m]])
                np.testing.assert_allclose(predicted[m], scores[:, left_out].sum(axis=1), rtol=2e-4,
                                           atol=1e-6 * np.abs(scores).sum(axis=1).max())
            np.testing.assert_allclose(info["lds"][method][a], lds.lds(actual, predicted)[0])


@pytest.mark.parametrize("setting, message", [
    ("alpha = 1.5", "eval.lds.alpha: expected float in (0, 1), got 1.5"),
    ("alpha = 0.0", "eval.lds.alpha: expected float in (0, 1), got 0.0"),
    ("subsets = 1", "eval.lds.subsets: expected int >= 2, got 1"),
])
def test_bad_lds_settings_are_one_line_exit_2_before_any_work(tmp_path, capsys, setting, message):
    from gradlake.cli import main

    job = tmp_path / "job.toml"
    job.write_text(f'out = "{tmp_path / "run"}"\n[eval.lds]\n{setting}\n')
    with pytest.raises(SystemExit) as exit_:
        main(["lds", str(job)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists()
