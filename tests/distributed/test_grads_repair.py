"""A damaged store through the real grads stage: a resumed run recomputes a shard whose commit
file is truncated, `repair` drops a shard with a flipped byte or a missing object, and the store
then answers exactly as a clean run's."""

import dataclasses
import os

import numpy as np
import pytest

import gradlake.distributed.grads_stage as grads_stage
from gradlake.distributed.grads_stage import run_grads
from gradlake.store import GradientStore

from grads_fixtures import SETTINGS as TWO_WORKERS

NAME = "epoch-0001"
SETTINGS = dataclasses.replace(TWO_WORKERS, workers=1)  # one actor to start per run


@pytest.mark.slow
def test_resume_and_repair_answer_as_a_clean_run(ray_session, grads_inputs, tmp_path, monkeypatch, cli):
    data, checkpoints = grads_inputs
    url = str(tmp_path / "store")
    with monkeypatch.context() as patch:  # every shard stays in commits/, as in an interrupted run
        patch.setattr(grads_stage, "compact", lambda store, groups=None: {})
        run_grads(data, checkpoints[:1], url, SETTINGS)
    clean = {obs: query(cli, url, tmp_path / f"clean-{obs}.npy", obs) for obs in SETTINGS.observables}
    clean_samples = GradientStore.open(url).samples()

    commit = os.path.join(url, "commits", NAME, "shard-000002.parquet")
    open(commit, "r+b").truncate(os.path.getsize(commit) // 2)
    code, _, err = cli(["query", url, "--out", str(tmp_path / "x.npy")])
    assert code == 1 and f"commits/{NAME}/shard-000002.parquet cannot be read" in err
    summary = run_grads(data, checkpoints[:1], url, SETTINGS)  # resumed: that shard is recomputed
    assert summary["shards_computed"] == 1 and summary["shards_skipped"] == 4

    flipped = os.path.join(url, "grads.zarr", NAME, "C", "c", "1", "0")
    data_bytes = bytearray(open(flipped, "rb").read())
    data_bytes[40] ^= 0x01
    open(flipped, "wb").write(bytes(data_bytes))
    os.remove(os.path.join(url, "grads.zarr", NAME, "V", "c", "3", "0", "0"))
    code, out, _ = cli(["info", url, "--verify"])
    assert code == 1 and sum(line.startswith("FINDING") for line in out.splitlines()) == 2, out
    code, out, err = cli(["repair", url])
    assert code == 0 and f"checkpoint {NAME}: shard(s) 1, 3 (now uncommitted)" in out, (out, err)
    summary = run_grads(data, checkpoints[:1], url, SETTINGS)
    assert summary["shards_computed"] == 2 and summary["shards_skipped"] == 3
    assert cli(["info", url, "--verify"])[0] == 0

    for obs in SETTINGS.observables:
        repaired = query(cli, url, tmp_path / f"repaired-{obs}.npy", obs)
        assert repaired.shape[0] == 40 and repaired.tobytes() == clean[obs].tobytes(), obs
    assert GradientStore.open(url).samples().equals(clean_samples)


def query(cli, url, out, observable):
    """The φ's of every sample, through `gradlake query`."""
    code, _, err = cli(["query", url, "--observable", observable, "--out", str(out)])
    assert code == 0, err
    return np.load(out)
