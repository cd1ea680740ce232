"""User tasks (loss + named observables) and user models by import path, against autograd."""

from pathlib import Path

import pytest
import torch
from torch import nn

from gradlake import models, physics
from gradlake.config import ModelConfig, TaskConfig, TrainConfig, parse_job
from gradlake.errors import InputError
from gradlake.grads import compute
from gradlake.plugins import use_paths

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CHANNELS = physics.EULER_CHANNELS
use_paths([str(EXAMPLES)])  # the example user package, as a job's python_path would
from byo_surrogate.model import ResidualConvNet  # noqa: E402
from byo_surrogate.task import RelativeL2Task  # noqa: E402

TASK_PATH = "byo_surrogate.task:RelativeL2Task"
MODEL_PATH = "byo_surrogate.model:ResidualConvNet"


def _batch(b=3, grid=(8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 1.0 + torch.rand(b, len(CHANNELS), *grid, generator=g)
    return x, x + 0.1 * torch.randn(x.shape, generator=g)


def test_an_import_path_names_a_task_and_the_default_is_the_papers():
    assert isinstance(physics.load_task(""), physics.PDETask)
    task = physics.load_task(TASK_PATH, {"eps": 1e-3})
    assert isinstance(task, RelativeL2Task) and task.eps == 1e-3
    assert physics.available_observables(CHANNELS, task) == ("C", "K", "mass_drift", "V")
    assert physics.available_observables(physics.NS_CHANNELS, task) == ("C", "V")
    for path, kwargs, message in (("byo_surrogate.task", {}, "expected an import path"),
                                  ("no_such_package.x:Task", {}, "cannot import 'no_such_package.x'"),
                                  ("byo_surrogate.task:Nope", {}, "has no attribute 'Nope'"),
                                  (TASK_PATH, {"bad": 1}, "does not accept"),
                                  ("byo_surrogate.model:ResidualConvNet", {"channels": 4}, "not a task")):
        with pytest.raises(InputError, match=message):
            physics.load_task(path, kwargs)


@pytest.mark.parametrize("grid,dims", [((16,), 1), ((8, 8), 2), ((4, 4, 4), 3)])
def test_exact_per_sample_gradients_of_a_user_task_equal_an_autograd_loop(grid, dims):
    torch.manual_seed(0)
    model = ResidualConvNet(len(CHANNELS), width=4, depth=1, dims=dims)
    task = RelativeL2Task()
    x, y = _batch(grid=grid)
    phi, loss = compute(model, x, y, ("C", "K", "mass_drift"), projector=None, channels=CHANNELS,
                        task=task, return_loss=True)
    for i in range(len(x)):
        for name in ("C", "K", "mass_drift"):
            model.zero_grad()
            pred = model(x[i:i + 1])
            value = task.loss(pred, x[i:i + 1], y[i:i + 1]) if name == "C" else \
                task.observables(CHANNELS)[name](pred, x[i:i + 1], y[i:i + 1])
            value.sum().backward()
            expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
            torch.testing.assert_close(phi[name][i], expected, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(loss[i], task.loss(model(x[i:i + 1]), x[i:i + 1], y[i:i + 1])[0].detach())


class _Bad(physics.Task):
    def __init__(self, kind):
        self.kind = kind

    def loss(self, pred, inputs, targets):
        return physics.scaled_mse(pred, targets)

    def observables(self, channels):
        fns = {"shape": lambda p, x, y: p.sum(),
               "batch": lambda p, x, y: p.sum(dim=(1, 2, 3)) - p.mean(),
               "detached": lambda p, x, y: p.detach().sum(dim=(1, 2, 3)),
               "nan": lambda p, x, y: p.sum(dim=(1, 2, 3)) * float("nan"),
               "fails": lambda p, x, y: p[:, 99].sum(dim=(1, 2))}
        return {"X" if self.kind in fns else self.kind: fns.get(self.kind, lambda p, x, y: p.sum(dim=(1, 2, 3)))}


@pytest.mark.parametrize("kind,message", [
    ("shape", r"expected one float scalar per sample \[2\], got torch.float64 \[\]"),
    ("batch", "depends on the other samples of its batch"),
    ("detached", "does not depend differentiably"),
    ("nan", "not finite"),
    ("fails", "failed on samples of shape"),
    ("V", "reserved"),
    ("a-b", "names must be a letter then"),
])
def test_a_bad_observable_is_refused_before_work_naming_it(kind, message):
    x, y = _batch(b=2)
    name = "X" if kind in ("shape", "batch", "detached", "nan", "fails") else kind
    with pytest.raises(InputError, match=message):
        physics.check_task(_Bad(kind), CHANNELS, ("C", name), x.numpy(), y.numpy())


def test_a_user_model_by_import_path_is_checked_and_recorded():
    cfg = models.import_config(MODEL_PATH, {"channels": 4, "width": 4})
    assert cfg == {"name": "import", "path": MODEL_PATH, "kwargs": {"channels": 4, "width": 4}}
    assert isinstance(models.from_config(cfg), ResidualConvNet)
    with pytest.raises(InputError, match="returned RelativeL2Task, not a torch.nn.Module"):
        models.import_config(TASK_PATH)
    with pytest.raises(InputError, match="does not accept"):
        models.import_config(MODEL_PATH, {"chanels": 4})
    wrong = models.from_config(models.import_config(MODEL_PATH, {"channels": 2}))
    with pytest.raises(InputError, match="fails on a sample of shape"):
        models.check_output(wrong, _batch(b=1)[0], "model")
    with pytest.raises(InputError, match="to the same shape"):
        models.check_output(nn.Conv2d(4, 3, 1), _batch(b=1)[0], "model")


def test_job_settings_of_models_and_tasks_are_checked():
    for values, message in (({"model": {"path": "pkg.mod"}}, "model.path: expected an import path"),
                            ({"model": {"path": "a:B", "overrides": {"width": 2}}}, "use model.kwargs"),
                            ({"model": {"kwargs": {"width": 2}}}, "only for a model named by model.path"),
                            ({"train": {"epochs": 0}}, "0 only with model.checkpoint"),
                            ({"task": {"path": "nocolon"}}, "task.path: expected an import path"),
                            ({"grads": {"observables": ["C", "a-b"]}}, "not an observable name"),
                            ({"task": {"path": TASK_PATH}, "reduce": {"exact": {"enabled": True}}},
                             "exact minibatch mode supports the preset models and the default task only")):
        with pytest.raises(InputError, match=message):
            parse_job(values)
    job = parse_job({"model": {"path": MODEL_PATH, "checkpoint": "w.safetensors"}, "train": {"epochs": 0},
                     "task": {"path": TASK_PATH}, "grads": {"observables": ["C", "mass_drift"]},
                     "reduce": {"pairs": ["CC"], "metric": "C"}})
    assert job.task == TaskConfig(TASK_PATH) and job.model.checkpoint == "w.safetensors"


def test_user_weights_become_epoch_zero_with_their_sha256(tmp_path):
    from safetensors.torch import save_file

    from gradlake.data import generate
    from gradlake.config import DataConfig
    from gradlake.models.checkpoint import file_sha256, load_checkpoint
    from gradlake.train import train

    ds = generate(DataConfig(classes=("rp",), trajectories=2, steps=3, resolution=16), str(tmp_path / "data"))
    torch.manual_seed(3)
    mine = ResidualConvNet(4, width=4, depth=1)
    weights = str(tmp_path / "mine.safetensors")
    save_file(mine.state_dict(), weights)
    model = ModelConfig(path=MODEL_PATH, kwargs={"channels": 4, "width": 4, "depth": 1}, checkpoint=weights)
    paths = train(ds.url, model, TrainConfig(epochs=0, batch_size=4), str(tmp_path / "run"),
                  task=TaskConfig(TASK_PATH))
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["epoch-0000"]
    loaded, meta = load_checkpoint(paths[0])
    assert meta["source"] == {"url": weights, "sha256": file_sha256(weights)}
    assert meta["task"] == {"path": TASK_PATH, "kwargs": {}} and meta["model"]["path"] == MODEL_PATH
    for name, tensor in mine.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    # fine-tuning continues from them; other weights in the same folder are refused
    paths = train(ds.url, model, TrainConfig(epochs=1, batch_size=4), str(tmp_path / "run2"), task=TaskConfig(TASK_PATH))
    assert load_checkpoint(paths[-1])[1]["source"]["sha256"] == file_sha256(weights)
    from gradlake.report.inputs import training_runs

    assert training_runs(str(tmp_path / "run2"))[0].task == TASK_PATH  # the report names the loss
    save_file(ResidualConvNet(4, width=4, depth=1).state_dict(), weights)
    with pytest.raises(InputError, match="started from other weights"):
        train(ds.url, model, TrainConfig(epochs=1, batch_size=4), str(tmp_path / "run2"), task=TaskConfig(TASK_PATH))
    bad = ModelConfig(path=MODEL_PATH, kwargs={"channels": 4, "width": 8}, checkpoint=weights)
    with pytest.raises(InputError, match="mine.safetensors: tensor 'lift.weight' is torch.float32 \\[4, 4, 1, 1\\]"):
        train(ds.url, bad, TrainConfig(epochs=0), str(tmp_path / "run3"))


def test_a_task_or_a_user_model_reruns_training_and_what_follows():
    from gradlake.pipeline import _stage_plan

    def hashes(**values):
        return {stage: h for stage, (h, _) in _stage_plan(parse_job({"out": "/tmp/x", **values})).items()}

    base = hashes()
    for values in ({"task": {"path": TASK_PATH}}, {"model": {"path": MODEL_PATH}},
                   {"model": {"checkpoint": "w.safetensors"}}):
        changed = hashes(**values)
        assert changed["data"] == base["data"]
        assert all(changed[s] != base[s] for s in ("train", "grads", "reduce", "report"))
    assert hashes(task={"path": TASK_PATH, "kwargs": {"eps": 1.0}})["train"] != hashes(task={"path": TASK_PATH})["train"]


def test_a_job_naming_missing_user_code_fails_before_any_stage(tmp_path):
    from gradlake.pipeline import run_job

    lines = []
    for values, message in (({"task": {"path": "byo_surrogate.task:Missing"}}, "task.path: module .* has no attribute"),
                            ({"model": {"path": "nowhere.models:Net"}}, "model.path: cannot import 'nowhere.models'")):
        with pytest.raises(InputError, match=message):
            run_job(parse_job({"out": str(tmp_path / "run"), **values}), echo=lines.append)
    assert lines == [] and not (tmp_path / "run").exists()
