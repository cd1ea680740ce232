"""The grads stage on a real local Ray (2 workers): local disk, S3, and the faults it survives."""

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from gradlake.cli.app import app
from gradlake.distributed.grads_stage import run_grads
from gradlake.errors import GradlakeError
from gradlake.store import GradientStore

from grads_fixtures import N_TRAJ, N_TIMES, SETTINGS, reference_phis, write_dataset

BIN = Path(sys.executable).parent
N_SAMPLES = N_TRAJ * (N_TIMES - 1)
CLI_ARGS = ["--workers", "2", "--observables", "C,M,V", "--k-in", "4", "--k-out", "4", "--probes", "2",
            "--shard-rows", "8", "--batch-size", "3", "--retries", "2", "--allocation", "uniform"]


def plain_check(url, storage_options=None):
    """Open a finished store with plain fsspec, zarr and pyarrow (no gradlake): every sample once."""
    import fsspec
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    import zarr

    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    meta = json.loads(fs.cat_file(f"{root}/store.json"))
    spec = meta["spec"]
    table = pads.dataset(f"{root}/samples.parquet", filesystem=fs, format="parquet",
                         partitioning="hive").to_table()
    group = zarr.open_group(f"{url}/grads.zarr", mode="r", storage_options=storage_options)
    arrays = {}
    for name in meta["checkpoints"]:
        part = table.filter(pc.field("checkpoint") == name).sort_by("row")
        rows = part["row"].to_numpy()
        assert rows.tolist() == list(range(spec["n_rows"])), "every sample exactly once"
        assert (part["shard"].to_numpy() == rows // spec["shard_rows"]).all()
        assert not fs.exists(f"{root}/commits/{name}") or not fs.ls(f"{root}/commits/{name}"), "compacted"
        for obs in spec["observables"]:
            array = group[name][obs]
            assert array.metadata.dimension_names[0] == "sample" and str(array.dtype) == spec["dtype"]
            values = np.asarray(array[:], dtype=np.float32)
            assert np.isfinite(values).all()
            norms = np.linalg.norm(values.reshape(len(values), -1), axis=1)
            np.testing.assert_allclose(part[f"norm_{obs}"].to_numpy(), norms, rtol=5e-3)
            arrays[name, obs] = values
    return arrays


def assert_matches_reference(arrays, data_url, checkpoints, storage_options=None):
    for path in checkpoints:
        rows, phis, _ = reference_phis(data_url, path, storage_options=storage_options)
        for obs, expected in phis.items():
            got = arrays[os.path.basename(path), obs][rows]
            np.testing.assert_allclose(got, expected, rtol=2e-3, atol=1e-3 * np.abs(expected).max())


@pytest.fixture(scope="module")
def clean_run(ray_session, grads_inputs, tmp_path_factory):
    """The stage run once through the CLI (quiet), on local disk: (store URL, summary, stderr).

    ``--checkpoint`` names the training directory: all of its checkpoints.
    """
    data, checkpoints = grads_inputs
    url = str(tmp_path_factory.mktemp("clean") / "store")
    train_dir = os.path.dirname(os.path.dirname(checkpoints[0]))
    result = CliRunner().invoke(app, ["grads", "--data", data, "--checkpoint", train_dir,
                                      "--out", url, "--quiet", *CLI_ARGS])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    return url, summary, result.stderr


def test_local_stage_with_two_workers(clean_run, grads_inputs):
    url, summary, stderr = clean_run
    data, checkpoints = grads_inputs
    assert summary["checkpoints"] == ["epoch-0001", "epoch-0002"]
    assert summary["workers"] == 2 and summary["shards_total"] == 10 and summary["shards_computed"] == 10
    assert summary["samples_computed"] == 2 * N_SAMPLES and summary["shards_failed"] == 0
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    per_shard = [line for line in lines if line.get("stage") == "grads"]
    assert 2 <= len(per_shard) <= 10 and per_shard[-1]["done"] == 10  # throttled: first, last, one per 5 s
    assert {"samples_s", "mb", "eta_s", "shard", "checkpoint"} <= set(per_shard[-1])
    assert_matches_reference(plain_check(url), data, checkpoints)
    store = GradientStore.open(url)
    assert store.provenance["stages"]["grads"]["status"] == "complete"
    xr = pytest.importorskip("xarray")
    ds = xr.open_zarr(f"{url}/grads.zarr", group="epoch-0002", consolidated=True)
    assert ds["V"].dims == ("sample", "probe", "proj") and set(ds.coords) == {"trajectory", "t", "class", "split"}
    table = store.samples("epoch-0002")
    for name in ("trajectory", "t", "class", "split"):
        assert ds[name].values[table["row"].to_numpy()].tolist() == table[name].to_pylist()
    # Re-running the same command recomputes nothing.
    again = run_grads(data, checkpoints, url, SETTINGS)
    assert again["shards_skipped"] == 10 and again["shards_computed"] == 0


def test_killed_actor_mid_shard(ray_session, grads_inputs, clean_run, tmp_path, monkeypatch):
    data, checkpoints = grads_inputs
    marker = tmp_path / "died-once"
    monkeypatch.setenv("GRADLAKE_TEST_FAULT", f"die:epoch-0001:2:{marker}")
    url = str(tmp_path / "store")
    summary = run_grads(data, checkpoints[:1], url, dataclasses.replace(SETTINGS, workers=1))
    assert marker.exists(), "the worker process was killed"  # and the actor restarted (max_restarts)
    assert summary["retries"] >= 1 and summary["shards_computed"] == 5 and summary["shards_failed"] == 0
    clean = plain_check(clean_run[0])
    for (name, obs), values in plain_check(url).items():
        np.testing.assert_array_equal(values, clean[name, obs])


@pytest.mark.slow
def test_killed_driver_resumes_with_only_the_uncommitted_shards(ray_session, grads_inputs, clean_run, tmp_path):
    data, checkpoints = grads_inputs
    url, marker = tmp_path / "store", tmp_path / "hung"
    env = {**os.environ, "GRADLAKE_TEST_FAULT": f"hang:epoch-0001:2:{marker}",
           "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    args = ["grads", "--data", data, "--checkpoint", checkpoints[0], "--out", str(url), "--quiet",
            *CLI_ARGS[2:], "--workers", "1"]
    driver = subprocess.Popen([str(BIN / "gradlake"), *args], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    commits = url / "commits" / "epoch-0001"
    deadline = time.monotonic() + 120
    while not (marker.exists() and commits.exists() and len(os.listdir(commits)) == 2):
        assert driver.poll() is None, driver.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the driver never reached shard 2"
        time.sleep(0.2)
    driver.kill()
    driver.wait()
    assert GradientStore.open(str(url)).committed_shards() == {0, 1}  # shard 2 was half-written
    summary = run_grads(data, checkpoints[:1], str(url), SETTINGS)
    assert summary["shards_skipped"] == 2 and summary["shards_computed"] == 3
    clean = plain_check(clean_run[0])
    for (name, obs), values in plain_check(str(url)).items():
        np.testing.assert_array_equal(values, clean[name, obs])


def test_a_shard_that_keeps_failing_fails_the_stage_after_the_others(ray_session, grads_inputs, tmp_path,
                                                                      monkeypatch):
    data, checkpoints = grads_inputs
    monkeypatch.setenv("GRADLAKE_TEST_FAULT", "nan:epoch-0001:3")
    url = str(tmp_path / "store")
    with pytest.raises(GradlakeError, match=r"1 of 5 shards failed.*\n  epoch-0001/shard-3: .*NaN or inf"):
        run_grads(data, checkpoints[:1], url, dataclasses.replace(SETTINGS, retries=1, workers=1))
    store = GradientStore.open(url)
    assert store.committed_shards() == {0, 1, 2, 4}
    status = store.provenance["stages"]["grads"]
    assert status["status"] == "failed" and "epoch-0001/shard-3" in status["errors"]


def test_an_interrupted_driver_records_it(grads_inputs, tmp_path, monkeypatch):
    import gradlake.distributed.cluster as cluster

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cluster, "ensure_ray", interrupted)
    data, checkpoints = grads_inputs
    url = str(tmp_path / "store")
    with pytest.raises(KeyboardInterrupt):
        run_grads(data, checkpoints[:1], url, SETTINGS)
    assert GradientStore.open(url).provenance["stages"]["grads"]["status"] == "interrupted"


@pytest.mark.s3
@pytest.mark.slow
def test_s3_stage_through_transient_faults_equals_the_clean_run(ray_session, grads_inputs, clean_run, s3_bucket,
                                                                faulty_s3):
    """The stage reading and writing S3 through its endpoint, with 503 SlowDown / 500 InternalError
    on every 9th request (dataset reads, store writes, commits; driver and workers): retried;
    every sample once; φ equal to the clean local run's; the endpoint not in the store."""
    bucket, options = s3_bucket
    _, checkpoints = grads_inputs
    data, url = f"{bucket}/data", f"{bucket}/store"
    write_dataset(data, storage_options=options)  # written cleanly, straight to moto
    faulty_s3.every, faulty_s3.budget = 9, 20
    faulty = {"endpoint_url": faulty_s3.endpoint}
    summary = run_grads(data, checkpoints[:1], url, SETTINGS, storage_options=faulty)
    assert faulty_s3.injected >= 10 and set(faulty_s3.by_code) == {"SlowDown", "InternalError"}
    assert summary["shards_computed"] == 5 and summary["shards_failed"] == 0 and summary["workers"] == 2
    assert faulty["endpoint_url"] not in json.dumps(GradientStore.open(url, options).provenance)
    arrays = plain_check(url, options)  # every sample exactly once, every commit record
    clean = plain_check(clean_run[0])
    for obs in SETTINGS.observables:
        np.testing.assert_array_equal(arrays["epoch-0001", obs], clean["epoch-0001", obs])


def test_groups_are_compacted_as_soon_as_their_shards_commit(ray_session, grads_inputs, tmp_path, monkeypatch):
    """Plain readers see a group's rows while the stage still runs; the rest at its end."""
    import pyarrow.dataset as pads

    import gradlake.distributed.grads_stage as stage
    import gradlake.store.layout as layout

    data, checkpoints = grads_inputs
    url = str(tmp_path / "store")
    monkeypatch.setattr(layout, "GROUP_ROWS", 2 * SETTINGS.shard_rows)  # 2 shards per group
    seen, compact = [], stage.compact

    def spy(store, groups=None):  # what a plain reader sees after each compaction
        done = compact(store, groups)
        table = pads.dataset(f"{url}/samples.parquet", partitioning="hive").to_table()
        seen.append((groups, sorted(set(table["shard"].to_pylist()))))
        return done

    monkeypatch.setattr(stage, "compact", spy)
    summary = run_grads(data, checkpoints[:1], url, dataclasses.replace(SETTINGS, workers=1))
    assert summary["shards_compacted"] == 5
    assert seen[-1] == (None, [0, 1, 2, 3, 4])  # the final pass (nothing left for it)
    mid_run = {group: shards for groups, shards in seen[:-1] for group in groups["epoch-0001"]}
    assert sorted(mid_run) == [0, 1, 2] and set(mid_run[0]) >= {0, 1}
    assert plain_check(url)


def test_the_grads_stage_refuses_a_store_another_driver_holds(grads_inputs, tmp_path):
    """Inputs are checked first (nothing written), then the lease: a held store is refused."""
    from gradlake.errors import InputError
    from gradlake.store import Lease
    from gradlake.store.layout import StoreFiles

    data, checkpoints = grads_inputs
    url = str(tmp_path / "store")
    with Lease(StoreFiles(url), "another driver"):
        with pytest.raises(InputError, match="being written by"):
            run_grads(data, checkpoints[:1], url, SETTINGS)
    assert not (tmp_path / "store" / "store.json").exists()


def _changed_checkpoint(source, path, change):
    """A copy of checkpoint ``source`` at ``path`` whose model went through ``change(model)``."""
    import torch

    from gradlake.models.checkpoint import load_checkpoint, save_checkpoint

    model, meta = load_checkpoint(source)
    with torch.no_grad():
        change(model)
    return save_checkpoint(path, model, meta["model"], meta)


def _foreign_weights(source, path):
    """A copy of checkpoint ``source`` whose model.safetensors holds a UNet's weights (its config: a ViT)."""
    from safetensors.torch import save_file

    from gradlake import models

    copy = _changed_checkpoint(source, path, lambda model: None)
    unet = models.from_config(models.config("unet", "tiny", channels=4, resolution=16))
    save_file(unet.state_dict(), f"{copy}/model.safetensors")
    return copy


def _scaled(model, factor=1000.0):
    for parameter in model.parameters():
        parameter.mul_(factor)


def test_checkpoints_that_every_shard_would_fail_on_are_refused_up_front(grads_inputs, tmp_path, cli):
    data, checkpoints = grads_inputs
    nan = _changed_checkpoint(checkpoints[0], str(tmp_path / "nan" / "epoch-0001"),
                              lambda model: next(model.parameters()).view(-1)[0].fill_(float("nan")))
    cases = {nan: "holds NaN or inf values; these weights cannot be used",
             _foreign_weights(checkpoints[0], str(tmp_path / "foreign" / "epoch-0001")): "is missing (the config",
             _changed_checkpoint(checkpoints[0], str(tmp_path / "big" / "epoch-0001"), _scaled):
                 "overflows float16 (|phi| up to"}
    out = tmp_path / "store"
    for checkpoint, says in cases.items():
        code, stdout, stderr = cli(["grads", "--data", data, "--checkpoint", checkpoint, "--out", str(out),
                                    *CLI_ARGS])
        assert code == 2 and len(stderr.strip().splitlines()) == 1 and says in stderr, stderr
        assert not out.exists()  # nothing created
    assert "use --storage-dtype float32 (grads.storage_dtype)" in stderr


@pytest.mark.slow
def test_an_overflow_in_a_shard_stops_the_stage_at_once_naming_the_fix(ray_session, grads_inputs, tmp_path,
                                                                       monkeypatch, capsys):
    from gradlake.errors import InputError

    data, checkpoints = grads_inputs
    monkeypatch.setenv("GRADLAKE_TEST_FAULT", "big:epoch-0001:3")
    url = str(tmp_path / "store")
    with pytest.raises(InputError, match=r"^grads: checkpoint epoch-0001, shard 3: phi_C overflows float16: "
                                         r"NaN or inf at rows \[24\].*use --storage-dtype float32") as raised:
        run_grads(data, checkpoints[:1], url, dataclasses.replace(SETTINGS, retries=2, workers=1))
    assert str(raised.value).count("float32") == 1 and "retrying" not in capsys.readouterr().err  # not retried
    status = GradientStore.open(url).provenance["stages"]["grads"]
    assert status["status"] == "failed" and "overflows float16" in status["error"]
