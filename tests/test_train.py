"""Training, checkpoints, resume and rollout on a tiny generated Euler dataset."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.numpy import load_file

from gradlake import models, physics
from gradlake.config import DataConfig, ModelConfig, TrainConfig
from gradlake.errors import InputError
from gradlake.provenance import description_of
from gradlake.models.checkpoint import (
    check_weights,
    checkpoint_sha256,
    list_checkpoints,
    load_checkpoint,
    load_optimizer_state,
    read_weights,
    save_checkpoint,
)
from gradlake.rollout import rollout
from gradlake.train import TrajectoryCache, epoch_order, evaluate, train

TINY = ModelConfig("unet", "tiny")
FAST = TrainConfig(epochs=2, batch_size=4, lr=2e-3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from gradlake.data import generate

    return generate(DataConfig(classes=("rp", "crp", "rpui"), trajectories=2, steps=5, resolution=32),
                    str(tmp_path_factory.mktemp("data") / "euler"))


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "run")
    return out, train(dataset.url, TINY, FAST, out)


def test_training_lowers_the_validation_smse(dataset, run):
    out, paths = run
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["epoch-0001", "epoch-0002"]
    _, meta = load_checkpoint(paths[-1])
    split = meta["metrics"]["val_split"]
    rows = dataset.index().select(splits=[split])
    torch.manual_seed(FAST.seed)  # the run's initial weights
    untrained = models.from_config(meta["model"])
    before = evaluate(untrained, TrajectoryCache(dataset, 8), rows, 4, torch.device("cpu"))
    assert meta["metrics"]["val_smse"] < 0.95 * before
    assert meta["history"][0]["val_smse"] > meta["history"][1]["val_smse"]


def test_checkpoints_are_plain_safetensors_and_json(run):
    _, paths = run
    weights = load_file(f"{paths[-1]}/model.safetensors")
    config = json.loads(open(f"{paths[-1]}/config.json").read())
    model = models.from_config(config["model"])
    assert set(weights) == set(model.state_dict())
    assert config["epoch"] == 2 and config["channels"] == ["rho", "rho_vx", "rho_vy", "E"]


def test_checkpoint_round_trip_is_bitwise(tmp_path):
    torch.manual_seed(0)
    cfg = models.config("vit", "tiny", channels=2, resolution=16)
    model = models.from_config(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 2, 16, 16)).square().mean().backward()
    optimizer.step()
    path = save_checkpoint(str(tmp_path / "ck"), model, cfg, {"epoch": 1, "metrics": {}, "channels": ["vx", "vy"]},
                           optimizer)
    loaded, meta = load_checkpoint(path)
    assert meta["model"] == cfg and meta["epoch"] == 1
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    fresh = torch.optim.AdamW(loaded.parameters(), lr=1e-3)
    load_optimizer_state(path, fresh)
    saved, restored = optimizer.state_dict()["state"], fresh.state_dict()["state"]
    assert sorted(saved) == sorted(restored) and len(saved) == len(list(model.parameters()))
    for i, entries in saved.items():
        assert all(torch.equal(entries[k], restored[i][k]) for k in entries), i
    assert fresh.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    assert list_checkpoints(str(tmp_path)) == []  # not under <dir>/checkpoints
    assert len(checkpoint_sha256(path)) == 64


def test_resume_equals_an_uninterrupted_run(dataset, run, tmp_path):
    out, paths = run
    resumed = str(tmp_path / "resumed")
    first = train(dataset.url, TINY, TrainConfig(epochs=1, batch_size=4, lr=2e-3), resumed)
    assert len(first) == 1
    second = train(dataset.url, TINY, FAST, resumed)  # continues from epoch 1
    assert checkpoint_sha256(second[-1]) == checkpoint_sha256(paths[-1])
    with open(f"{second[-1]}/optimizer.safetensors", "rb") as a, open(f"{paths[-1]}/optimizer.safetensors", "rb") as b:
        assert a.read() == b.read()
    assert train(dataset.url, TINY, FAST, resumed) == second  # done: nothing to do
    with pytest.raises(InputError, match="train.lr"):
        train(dataset.url, TINY, TrainConfig(epochs=3, batch_size=4, lr=1e-3), resumed)
    with pytest.raises(InputError, match="model"):
        train(dataset.url, ModelConfig("unet", "tiny", {"width": 8}), FAST, resumed)


def test_loading_rejects_a_mismatched_checkpoint(run, tmp_path):
    _, paths = run
    weights = read_weights(f"{paths[-1]}/model.safetensors")
    config = json.loads(open(f"{paths[-1]}/config.json").read())
    wider = models.from_config({**config["model"], "params": {**config["model"]["params"], "width": 8}})
    with pytest.raises(InputError, match=r"tensor 'proj_in.1.weight' is torch.float32 \[4, 4, 3, 3\]"):
        check_weights(weights, wider, "ck")
    del weights["down.0.skip.bias"]
    with pytest.raises(InputError, match="'down.0.skip.bias' is missing"):
        check_weights(weights, models.from_config(config["model"]), "ck")
    with pytest.raises(InputError, match="refusing"):
        read_weights(str(tmp_path / "model.pkl"))
    torch.save({"w": torch.ones(1), "evil": object()}, tmp_path / "pickled.pt")
    with pytest.raises(InputError, match="weights-only"):
        read_weights(str(tmp_path / "pickled.pt"))


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    trajectories, steps = np.array([0, 2, 5, 7]), 3
    a = epoch_order(trajectories, steps, seed=1, epoch=2, window=2)
    assert np.array_equal(a, epoch_order(trajectories, steps, seed=1, epoch=2, window=2))
    assert not np.array_equal(a, epoch_order(trajectories, steps, seed=1, epoch=3, window=2))
    assert sorted(a) == sorted(t * steps + s for t in trajectories for s in range(steps))
    # Each window of two trajectories is contiguous in the order.
    assert len({int(r) // steps for r in a[:6]}) == 2 and len({int(r) // steps for r in a[6:]}) == 2


def test_trajectory_cache_serves_the_datasets_samples_within_its_bound(dataset):
    cache = TrajectoryCache(dataset, capacity=2)
    rng = np.random.default_rng(0)
    for _ in range(5):
        rows = rng.choice(len(dataset.index()), size=3, replace=False)
        for got, want in zip(cache.samples(rows), dataset.samples(rows)):
            assert np.array_equal(got, want)
        assert len(cache._cache) <= 3


def test_rollout_first_step_is_the_one_step_error(dataset, run, tmp_path):
    _, paths = run
    table = rollout(paths[-1], dataset.url, horizon=3, device="cpu", out=str(tmp_path / "r")).to_pylist()
    assert {r["class"] for r in table} == {"rp", "crp", "rpui", "all"} and len(table) == 4 * 3
    model, _ = load_checkpoint(paths[-1])
    test = np.flatnonzero(dataset.splits == "test")
    truth = torch.from_numpy(dataset.read(test))
    with torch.no_grad():
        one_step = physics.scaled_mse(model(truth[:, 0]), truth[:, 1]).mean().item()
        two_step = physics.scaled_mse(model(model(truth[:, 0])), truth[:, 2]).mean().item()
    by_key = {(r["class"], r["horizon"]): r for r in table}
    assert by_key["all", 1]["smse_mean"] == pytest.approx(one_step, rel=1e-5)
    assert by_key["all", 2]["smse_mean"] == pytest.approx(two_step, rel=1e-5)
    assert json.loads((tmp_path / "r" / "rollout.json").read_text())["rows"] == table
    about = description_of(pq.read_schema(tmp_path / "r" / "rollout.parquet"))
    assert about["format"] == "gradlake-rollout/1" and about["checkpoint"] == paths[-1]
    assert about["fingerprint"] == dataset.fingerprint and about["gradlake_version"]
    about = description_of(pq.read_schema(f"{dataset.url}/trajectories.parquet"))  # the dataset's table too
    assert about["format"] == "gradlake-dataset/1" and about["provenance"] == dataset.manifest["provenance"]
    with pytest.raises(InputError, match="horizon"):
        rollout(paths[-1], dataset.url, horizon=9)


def _cli(args):
    from gradlake.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code


def test_cli_trains_and_lists_models(dataset, tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert _cli(["train", "--data", dataset.url, "--model", "unet", "--preset", "tiny", "--epochs", "1",
                 "--batch-size", "6", "--out", out, "--quiet"]) == 0
    assert [p.rsplit("/", 1)[-1] for p in list_checkpoints(out)] == ["epoch-0001"]
    assert load_file(f"{out}/checkpoints/epoch-0001/model.safetensors")
    assert _cli(["models"]) == 0
    printed = capsys.readouterr().out
    assert printed.count(" ok") == 2 and "13,000,000" in printed
    assert _cli(["train", "--data", dataset.url, "--out", out, "--set", "width"]) == 2


@pytest.mark.s3
def test_checkpoints_live_at_any_fsspec_url(s3_bucket, tmp_path):
    root, options = s3_bucket
    torch.manual_seed(0)
    cfg = models.config("unet", "tiny", channels=2, resolution=16)
    model = models.from_config(cfg)
    optimizer = torch.optim.AdamW(model.parameters())
    for where, so in ((f"{root}/run", options), (str(tmp_path / "run"), None)):
        for epoch in (1, 2):
            save_checkpoint(f"{where}/checkpoints/epoch-000{epoch}", model, cfg, {"epoch": epoch}, optimizer, so)
    remote = list_checkpoints(f"{root}/run", options)
    assert [p.rsplit("/", 1)[-1] for p in remote] == ["epoch-0001", "epoch-0002"]
    assert checkpoint_sha256(remote[-1], options) == checkpoint_sha256(list_checkpoints(str(tmp_path / "run"))[-1])
    loaded, meta = load_checkpoint(remote[-1], options)
    assert meta["epoch"] == 2 and all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    load_optimizer_state(remote[-1], torch.optim.AdamW(loaded.parameters()), options)


def test_stalled_stops_when_validation_stops_falling():
    from gradlake.train import stalled

    h = [{"val_smse": v} for v in (5.0, 4.0, 3.0, 3.5, 3.2)]
    assert stalled(h, 2) and not stalled(h, 3) and not stalled(h, 0)
    assert not stalled(h[:3], 1)  # still falling


def test_patience_ends_training_early_with_a_checkpoint(dataset, tmp_path, monkeypatch):
    import gradlake.train as train_module

    calls = []
    monkeypatch.setattr(train_module, "stalled", lambda history, patience: calls.append(len(history)) or
                        len(history) >= 2)
    paths = train_module.train(dataset.url, ModelConfig(name="unet", preset="tiny"),
                               TrainConfig(epochs=5, batch_size=4, lr=2e-3, patience=1, checkpoint_every=10),
                               str(tmp_path / "run"))
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["epoch-0002"]  # stopped at epoch 2, checkpointed
    again = train_module.train(dataset.url, ModelConfig(name="unet", preset="tiny"),
                               TrainConfig(epochs=5, batch_size=4, lr=2e-3, patience=1, checkpoint_every=10),
                               str(tmp_path / "run"))
    assert again == paths  # a rerun of a stopped run trains no further


def _with_a_nan(dataset, url, split="train"):
    """A copy of ``dataset`` at ``url`` with one NaN in the last trajectory of ``split`` at t = 2
    (written behind the writer's back, as a damaged file would hold it)."""
    import shutil

    import zarr

    shutil.copytree(dataset.url, url)
    trajectory = int(np.flatnonzero(dataset.splits == split)[-1])
    array = zarr.open_group(f"{url}/fields.zarr", mode="r+")["fields"]
    block = array[trajectory]
    block[2, 0, 3, 3] = np.nan
    array[trajectory] = block
    return trajectory


def test_a_nan_in_the_data_stops_training_in_the_first_epoch_naming_the_sample(dataset, tmp_path, capsys):
    url, out = str(tmp_path / "nan-data"), str(tmp_path / "run")
    trajectory = _with_a_nan(dataset, url)
    code = _cli(["train", "--data", url, "--out", out, "--epochs", "2", "--batch-size", "4", "--quiet"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert f"error: {url}: epoch 1, batch " in errors[0] and "NaN or inf in the states of" in err
    assert f"trajectory {trajectory} t 1" in err or f"trajectory {trajectory} t 2" in err
    assert list_checkpoints(out) == [] and not (tmp_path / "run" / "checkpoints").exists()


def test_a_nan_in_the_validation_data_is_named_too(dataset, tmp_path):
    url = str(tmp_path / "nan-val")
    split = "val" if (dataset.splits == "val").any() else "test"
    trajectory = _with_a_nan(dataset, url, split)
    with pytest.raises(InputError, match=rf"epoch 1, validation batch \d+: NaN or inf in the states of "
                                         rf".*trajectory {trajectory} t"):
        train(url, TINY, TrainConfig(epochs=1, batch_size=4), str(tmp_path / "run"))
    assert list_checkpoints(str(tmp_path / "run")) == []


class _Poisoned(torch.nn.Module):
    """The identity, with a weight whose loss is ``loss`` and whose gradient is NaN (``grad``)."""

    def __init__(self, loss: float, grad: bool):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([loss]))
        self.grad = grad

    def forward(self, x):
        if self.grad:  # d sqrt(w)/dw at w = 0 is inf, times 0: NaN; the output stays x
            return x + 0 * torch.sqrt(self.w - self.w.detach())
        return x * self.w


@pytest.mark.parametrize("loss, grad, what", [(float("nan"), False, "loss"), (1.0, True, "gradient")])
def test_a_non_finite_loss_or_gradient_stops_before_the_step(dataset, loss, grad, what):
    from gradlake.progress import progress
    from gradlake.train import train_epoch

    net = _Poisoned(loss, grad)
    before = net.w.detach().clone()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    order = dataset.index().select(splits=["train"])[:10]
    with pytest.raises(InputError) as raised:
        train_epoch(net, optimizer, TrajectoryCache(dataset, 4), order, 4, torch.device("cpu"),
                    progress(total=10, desc="t"), epoch=3)
    trajectory, t = dataset.index().locate(order[:1])
    assert f"epoch 3, batch 1: non-finite {what} on trajectory {trajectory[0]} t {t[0]}" in str(raised.value)
    assert "lower train.lr, now 0.001" in str(raised.value)
    torch.testing.assert_close(net.w.detach(), before, rtol=0, atol=0, equal_nan=True)  # no step was taken


def test_a_subset_of_trajectories_trains_on_those_only_and_resumes_only_with_them(dataset, tmp_path):
    ds, dataset = dataset, dataset.url
    train_ids = np.flatnonzero(ds.splits == "train")
    settings = TrainConfig(epochs=1, batch_size=4, device="cpu")
    out = str(tmp_path / "subset")
    (path,) = train(dataset, ModelConfig(), settings, out, trajectories=train_ids[:2])
    meta = json.loads((tmp_path / "subset" / "checkpoints" / "epoch-0001" / "config.json").read_text())
    assert meta["trajectories"] == train_ids[:2].tolist()
    assert meta["metrics"]["samples_per_s"] * meta["metrics"]["seconds"] == pytest.approx(2 * (ds.n_times - 1))
    with pytest.raises(InputError, match="other trajectories"):
        train(dataset, ModelConfig(), TrainConfig(epochs=2, batch_size=4, device="cpu"), out,
              trajectories=train_ids[:1])
    with pytest.raises(InputError, match="not in the train split"):
        train(dataset, ModelConfig(), settings, str(tmp_path / "other"),
              trajectories=[int(np.flatnonzero(ds.splits != "train")[0])])
