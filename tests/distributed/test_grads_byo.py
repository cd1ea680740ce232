"""The grads stage's shard work on a 1-D dataset read in place, a user model and a user task."""

import os

import numpy as np

from gradlake.config import GradsConfig, ModelConfig, TaskConfig, TrainConfig
from gradlake.plugins import use_paths
from gradlake.stages.grads_plan import prepare
from gradlake.stages.grads_unit import ShardWorker, WorkerSettings
from well_helpers import write_well

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")
TASK = TaskConfig("byo_surrogate.task:RelativeL2Task")
SETTINGS = GradsConfig(observables=("C", "mass_drift", "V"), probes=2, k_in=4, k_out=4, shard_rows=8,
                       batch_size=3, storage_dtype="float32", allocation="uniform")


def test_a_1d_well_dataset_flows_through_training_and_the_shard_work(tmp_path):
    from gradlake.data import Dataset
    from gradlake.grads import Projector, compute
    from gradlake.models.checkpoint import load_checkpoint
    from gradlake.physics import load_task
    from gradlake.store import GradientStore
    from gradlake.train import train

    use_paths([EXAMPLES])
    path, _ = write_well(tmp_path / "toy.hdf5", d=1, n=6, steps=4)
    ds = Dataset.open(path)
    assert ds.resolution == (10,) and ds.channels == ("rho", "E", "rho_vx")
    model = ModelConfig(path="byo_surrogate.model:ResidualConvNet", kwargs={"channels": 3, "width": 4, "dims": 1})
    checkpoint = train(path, model, TrainConfig(epochs=1, batch_size=4), str(tmp_path / "run"), task=TASK)[-1]

    url = str(tmp_path / "store")
    plan = prepare(path, [checkpoint], url, SETTINGS, {})  # no task given: the one it was trained with
    assert plan.task == TASK
    worker = ShardWorker(WorkerSettings(path, url, SETTINGS, task=plan.task, python_path=(EXAMPLES,)))
    for task in plan.tasks:
        worker.run(task)
    store = GradientStore.open(url)
    assert store.spec.task == {"path": TASK.path, "kwargs": {}} and store.spec.model["kwargs"]["dims"] == 1
    assert store.spec.observables == SETTINGS.observables and store.spec.dataset["fingerprint"] == ds.fingerprint
    rows = store.samples().column("row").to_numpy()
    assert len(rows) == len(ds.index().select(splits=SETTINGS.splits))
    net, _ = load_checkpoint(checkpoint)
    x, y = ds.samples(rows)
    expected, loss = compute(net, x, y, SETTINGS.observables, Projector.from_config(SETTINGS), channels=ds.channels,
                             sample_ids=rows, probes=2, task=load_task(TASK.path), return_loss=True)
    np.testing.assert_allclose(store.samples().column("loss").to_numpy(), loss.numpy(), rtol=1e-5)
    for name in SETTINGS.observables:
        np.testing.assert_allclose(store.read(None, name), expected[name].numpy(), rtol=1e-4,
                                   atol=1e-5 * float(expected[name].abs().max()))


def test_the_store_records_where_imported_weights_came_from(tmp_path):
    from safetensors.torch import save_file

    from gradlake.models.checkpoint import file_sha256
    from gradlake.store import GradientStore
    from gradlake.train import train

    use_paths([EXAMPLES])
    path, _ = write_well(tmp_path / "toy.hdf5", d=1, n=3, steps=3)
    from byo_surrogate.model import ResidualConvNet

    weights = str(tmp_path / "pretrained.safetensors")
    save_file(ResidualConvNet(3, width=4, dims=1).state_dict(), weights)
    model = ModelConfig(path="byo_surrogate.model:ResidualConvNet", kwargs={"channels": 3, "width": 4, "dims": 1},
                        checkpoint=weights)
    checkpoints = train(path, model, TrainConfig(epochs=0), str(tmp_path / "run"))
    prepare(path, checkpoints, str(tmp_path / "store"), SETTINGS, {}, TASK)
    record = GradientStore.open(str(tmp_path / "store")).provenance["checkpoints"]["epoch-0000"]
    assert record["source"] == {"url": weights, "sha256": file_sha256(weights)}
    assert record["sha256"] == file_sha256(f"{checkpoints[0]}/model.safetensors")
