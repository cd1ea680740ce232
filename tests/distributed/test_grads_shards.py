"""The shard plan and the per-shard work, without Ray, on real components."""

import dataclasses

import numpy as np
import pytest

from gradlake.errors import GradlakeError, InputError
from gradlake.stages.grads_plan import plan_shards, prepare
from gradlake.stages.grads_unit import Capture, Fault, ShardWorker, WorkerSettings
from gradlake.store import GradientStore

from grads_fixtures import SETTINGS, reference_phis


def test_plan_covers_every_held_row_once_in_aligned_shards():
    held = np.array([0, 1, 2, 9, 10, 11, 12, 13, 30, 31, 47])
    plan = plan_shards(held[::-1], shard_rows=8)
    assert sorted(plan) == [0, 1, 3, 5]
    np.testing.assert_array_equal(np.concatenate([plan[s] for s in sorted(plan)]), held)
    for shard, rows in plan.items():
        assert (rows // 8 == shard).all() and (np.diff(rows) > 0).all()


def test_shard_worker_matches_a_direct_computation(grads_inputs, tmp_path):
    data, checkpoints = grads_inputs
    url = str(tmp_path / "store")
    plan = prepare(data, checkpoints[:1], url, SETTINGS, {})
    assert plan.skipped == 0 and [t.shard for t in plan.tasks] == [0, 1, 2, 3, 4]
    worker = ShardWorker(WorkerSettings(data, url, SETTINGS))
    records = [worker.run(task) for task in plan.tasks]
    assert sum(r["samples"] for r in records) == 40 and not any(r["skipped"] for r in records)
    assert worker.run(plan.tasks[0])["skipped"]  # at-least-once delivery: a committed shard is skipped

    rows, phis, loss = reference_phis(data, checkpoints[0])
    store = GradientStore.open(url)
    assert store.is_complete("epoch-0001")
    table = store.samples("epoch-0001")
    np.testing.assert_array_equal(table["row"].to_numpy(), rows)
    np.testing.assert_allclose(table["loss"].to_numpy(), loss, rtol=1e-5)
    for obs in SETTINGS.observables:
        got = store.read("epoch-0001", obs)
        scale = np.abs(phis[obs]).max()
        np.testing.assert_allclose(got, phis[obs], rtol=2e-3, atol=1e-3 * scale)
    assert store.read("epoch-0001", "V").shape == (40, 2, store.k)


def test_non_finite_phi_fails_the_shard_and_commits_nothing(grads_inputs, tmp_path):
    data, checkpoints = grads_inputs
    url = str(tmp_path / "store")
    plan = prepare(data, checkpoints[:1], url, SETTINGS, {})
    worker = ShardWorker(WorkerSettings(data, url, SETTINGS, fault="nan:epoch-0001:1"))
    worker.run(plan.tasks[0])
    with pytest.raises(GradlakeError, match=r"shard 1: phi_C: NaN or inf at rows \[8\]"):
        worker.run(plan.tasks[1])
    assert GradientStore.open(url).committed_shards() == {0}


def test_non_finite_loss_from_the_model_fails_the_shard(grads_inputs, tmp_path):
    data, checkpoints = grads_inputs
    url = str(tmp_path / "store")
    plan = prepare(data, checkpoints[:1], url, SETTINGS, {})

    class Diverged(Capture):
        def __call__(self, model, inputs, targets, rows):
            phis, loss = super().__call__(model, inputs, targets, rows)
            return phis, loss * np.inf

    worker = ShardWorker(WorkerSettings(data, url, SETTINGS),
                         capture=Diverged(SETTINGS, worker_channels(data), None))
    with pytest.raises(GradlakeError, match="loss: NaN or inf"):
        worker.run(plan.tasks[0])
    assert GradientStore.open(url).committed_shards() == set()


def worker_channels(data):
    from gradlake.data import Dataset

    return Dataset.open(data).channels


def test_bad_inputs_are_refused_before_anything_is_written(grads_inputs, tmp_path):
    data, checkpoints = grads_inputs
    url = str(tmp_path / "store")
    cases = [
        (dataclasses.replace(SETTINGS, splits=("train", "holdout")), "grads.splits: .* has no split 'holdout'"),
        (dataclasses.replace(SETTINGS, observables=("C", "Q")), "'Q' is not defined for channels"),
        (dataclasses.replace(SETTINGS, observables=("C", "C")), "expected distinct observables"),
        (dataclasses.replace(SETTINGS, device="gpu0"), "grads.device"),
    ]
    for settings, message in cases:
        with pytest.raises(InputError, match=message):
            prepare(data, checkpoints, url, settings, {})
    with pytest.raises(InputError, match="no complete gradlake dataset"):
        prepare(str(tmp_path / "nodata"), checkpoints, url, SETTINGS, {})
    with pytest.raises(InputError, match="two checkpoints are named 'epoch-0001'"):
        prepare(data, [checkpoints[0], checkpoints[0]], url, SETTINGS, {})
    with pytest.raises(InputError, match="config.json: no such file"):
        prepare(data, [str(tmp_path / "epoch-0009")], url, SETTINGS, {})
    assert not (tmp_path / "store").exists()


def test_fault_spec_parsing(tmp_path):
    marker = tmp_path / "once"
    fault = Fault.parse(f"die:epoch-0001:3:{marker}")
    assert (fault.action, fault.checkpoint, fault.shard) == ("die", "epoch-0001", 3)
    with pytest.raises(InputError, match="GRADLAKE_TEST_FAULT"):
        Fault.parse("explode:epoch-0001:3")


def test_mismatched_projector_or_checkpoint_is_refused_and_nothing_written(grads_inputs, tmp_path):
    from grads_fixtures import write_checkpoints

    data, checkpoints = grads_inputs
    url = tmp_path / "store"
    plan = prepare(data, checkpoints[:1], str(url), SETTINGS, {})
    ShardWorker(WorkerSettings(data, str(url), SETTINGS)).run(plan.tasks[0])
    before = {p: p.read_bytes() for p in url.rglob("*") if p.is_file()}
    with pytest.raises(InputError, match=r"different run \(projector\.k_in: store has 4, this run has 8\)"):
        prepare(data, checkpoints, str(url), dataclasses.replace(SETTINGS, k_in=8), {})
    retrained = write_checkpoints(str(tmp_path / "retrained"), n=1, seed=7)[0]  # epoch-0001, other weights
    with pytest.raises(InputError, match=r"checkpoint 'epoch-0001' is in the store with weights sha256"):
        prepare(data, [checkpoints[1], retrained], str(url), SETTINGS, {})
    after = {p: p.read_bytes() for p in url.rglob("*") if p.is_file()}
    assert before == after


def test_cli_bad_settings_exit_2_before_any_work(grads_inputs, tmp_path, capsys):
    from gradlake.cli import main

    data, checkpoints = grads_inputs
    out = tmp_path / "store"
    for args, message in ((["--dtype", "float8"], "grads.storage_dtype: expected one of 'float16', 'float32'"),
                          (["--k-in", "0"], "grads.k_in: expected int > 0"),
                          (["--observables", "C,X"], "'X' is not defined for channels")):
        with pytest.raises(SystemExit) as exit_info:
            main(["grads", "--data", data, "--checkpoint", checkpoints[0], "--out", str(out), *args])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not out.exists()


def test_checkpoints_given_as_names_to_paths(grads_inputs, tmp_path):
    data, checkpoints = grads_inputs
    url = str(tmp_path / "store")
    plan = prepare(data, {"seed-7-epoch-0001": checkpoints[0], "seed-8-epoch-0001": checkpoints[1]},
                   url, SETTINGS, {})
    assert plan.names == GradientStore.open(url).checkpoints == ["seed-7-epoch-0001", "seed-8-epoch-0001"]
    assert {t.checkpoint_path for t in plan.tasks if t.checkpoint == "seed-8-epoch-0001"} == {checkpoints[1]}
    with pytest.raises(InputError, match="checkpoint name 'a/b' must be letters"):
        prepare(data, {"a/b": checkpoints[0]}, str(tmp_path / "other"), SETTINGS, {})


def test_shard_rows_0_sizes_a_new_store_and_keeps_an_existing_stores(grads_inputs, tmp_path):
    from gradlake.store.spec import shard_rows_for

    data, checkpoints = grads_inputs
    auto = dataclasses.replace(SETTINGS, shard_rows=0)
    fresh = prepare(data, checkpoints[:1], str(tmp_path / "fresh"), auto, {}).store.spec
    widest = fresh.k * 2 * SETTINGS.probes  # float16 V rows
    assert fresh.shard_rows == shard_rows_for(fresh.n_rows, widest) < 8  # small data: at least 32 shards
    url = str(tmp_path / "store")
    prepare(data, checkpoints[:1], url, SETTINGS, {})  # 8-row shards
    resumed = prepare(data, checkpoints, url, auto, {})
    assert resumed.store.spec.shard_rows == 8 and len(resumed.tasks) == 2 * 5


def test_a_worker_refuses_a_dataset_other_than_the_stores(grads_inputs, tmp_path):
    from grads_fixtures import write_dataset

    data, checkpoints = grads_inputs
    url = str(tmp_path / "store")
    prepare(data, checkpoints[:1], url, SETTINGS, {})
    other = write_dataset(str(tmp_path / "other"), seed=1)  # same shape and channels, other values
    with pytest.raises(InputError, match=f"{other.fingerprint[:12]} is not .*--data"):
        ShardWorker(WorkerSettings(other.url, url, SETTINGS))
