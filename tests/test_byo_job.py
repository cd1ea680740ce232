"""`gradlake run jobs/byo-model.toml`: a user model and a user loss by import path, end to end."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gradlake.cli import main

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

JOB = Path(__file__).resolve().parents[1] / "jobs" / "byo-model.toml"


def _toml(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)  # strings, numbers, booleans and lists of them


def _smaller_job(tmp_path: Path) -> Path:
    """The repo's job file, shrunk (less data, one epoch, no report), its python_path made absolute."""
    job = tomllib.loads(JOB.read_text())
    job["python_path"] = [str((JOB.parent / p).resolve()) for p in job["python_path"]]
    job["stages"] = ["data", "train", "grads", "reduce"]
    job["data"].update(classes=["rp", "crp"], trajectories=2, steps=3, resolution=16)
    job["train"]["epochs"] = 1
    job["grads"]["workers"] = 1
    job["reduce"].update(distance_pairs=20, tile_max=0)
    lines = [f"{k} = {_toml(v)}" for k, v in job.items() if not isinstance(v, dict)]
    lines += [f"{k} = {_toml(v)}" for k, v in job.items() if isinstance(v, dict)]
    path = tmp_path / "byo.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_gradlake_run_on_a_user_model_and_task(tmp_path, ray_session, capsys):
    from gradlake.data import Dataset
    from gradlake.models.checkpoint import checkpoint_sha256, load_checkpoint
    from gradlake.physics import load_task, scaled_mse
    from gradlake.store import GradientStore

    out = tmp_path / "run"
    try:
        main(["run", str(_smaller_job(tmp_path)), "--out", str(out), "--quiet"])
    except SystemExit as stop:
        assert stop.code in (0, None), capsys.readouterr().err
    record = json.loads((out / "job.json").read_text())
    assert [s for s, r in record["stages"].items() if r["status"] == "done"] == \
        ["data", "train", "grads", "reduce"]

    store = GradientStore.open(str(out / "store"))
    spec = store.spec
    assert spec.model["path"] == "byo_surrogate.model:ResidualConvNet"
    assert spec.task == {"path": "byo_surrogate.task:RelativeL2Task", "kwargs": {"eps": 1e-8}}
    assert spec.observables == ("C", "K", "mass_drift", "V")
    checkpoint = store.checkpoints[-1]
    path = store.provenance["checkpoints"][checkpoint]["path"]
    assert store.provenance["checkpoints"][checkpoint]["sha256"] == checkpoint_sha256(path)

    # the stored loss is the user's loss of the trained user model, not the scaled MSE
    samples = store.samples(checkpoint)
    rows = samples.column("row").to_numpy()[:4]
    x, y = (torch.from_numpy(a) for a in Dataset.open(str(out / "data")).samples(rows))
    model, _ = load_checkpoint(path)
    with torch.no_grad():
        pred = model(x)
    mine = load_task("byo_surrogate.task:RelativeL2Task").loss(pred, x, y).numpy()
    np.testing.assert_allclose(samples.column("loss").to_numpy()[:4], mine, rtol=1e-4)
    assert not np.allclose(mine, scaled_mse(pred, y).numpy(), rtol=1e-2)
    phi = {o: store.read(checkpoint, o, rows) for o in ("C", "K", "mass_drift")}
    assert all(np.isfinite(v).all() and np.abs(v).max() > 0 for v in phi.values())
    assert not np.allclose(phi["K"], phi["C"]) and not np.allclose(phi["mass_drift"], phi["C"])
    assert (out / "store" / "reduce" / "default").is_dir()
