"""One-step teacher-forced training, its checkpoints and resume (rollout: gradlake.rollout).

Training minimises the mean over a batch of the task's per-sample loss (default: the paper's
scaled MSE, :func:`gradlake.physics.scaled_mse`) of ŷ(s_{n,t}) against s_{n,t+1}, with AdamW.
The metrics keep the names ``train_smse``/``val_smse`` whatever the task's loss is.

Data order and memory: an epoch's order is a pure function of (seed, epoch, the training
trajectories, the window): trajectories are shuffled, cut into windows of trajectories that
fit half of ``window_mb``, and the samples of each window are shuffled. Batches are read
(``Dataset.read``, one chunk per trajectory) through a bounded cache of whole trajectories (at
most two windows), so memory does not grow with the dataset and each trajectory is read about
once per epoch; when the training set fits in one window this is a plain full shuffle.

Resume: a run directory's last complete checkpoint holds the weights, the optimizer state and
the RNG states; since the data order depends only on (seed, epoch), continuing from it gives
the same weights as an uninterrupted run: bitwise on the CPU, and on a GPU with
``TrainConfig.deterministic`` (deterministic cuDNN kernels, the default).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from gradlake import fsio, models, physics
from gradlake.config import ModelConfig, TaskConfig, TrainConfig
from gradlake.errors import InputError
from gradlake.models.checkpoint import (
    check_weights,
    checkpoint_name,
    file_sha256,
    list_checkpoints,
    load_checkpoint,
    load_optimizer_state,
    read_weights,
    save_checkpoint,
)
from gradlake.progress import progress

# Settings that change the trained weights: a resumed run must match them.
RESULT_SETTINGS = ("batch_size", "lr", "weight_decay", "seed", "window_mb")


def resolve_device(device: str) -> torch.device:
    """"auto" -> the GPU when there is one, else the CPU; InputError for an unusable device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"device: expected 'auto', 'cpu' or 'cuda[:n]', got {device!r}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device: {device!r} requested but no CUDA GPU is available")
    return resolved


@contextlib.contextmanager
def kernels(device: torch.device, deterministic: bool):
    """On a GPU, deterministic cuDNN kernels (or autotuned ones) for the duration."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = deterministic, not deterministic
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


class TrajectoryCache:
    """Samples of a dataset read through a bounded cache of whole trajectories (oldest evicted)."""

    def __init__(self, dataset, capacity: int):
        self.dataset, self.capacity = dataset, max(1, capacity)
        self.steps = dataset.n_times - 1
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def samples(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) float32 [n, C, H, W] of these sample rows."""
        trajectory, t = self.dataset.index().locate(rows)
        missing = [int(n) for n in np.unique(trajectory) if int(n) not in self._cache]
        if missing:
            for n, data in zip(missing, self.dataset.read(missing)):
                self._cache[n] = data
        for n in np.unique(trajectory):
            self._cache.move_to_end(int(n))
        while len(self._cache) > max(self.capacity, len(np.unique(trajectory))):
            self._cache.popitem(last=False)
        inputs = np.stack([self._cache[int(n)][s] for n, s in zip(trajectory, t)])
        targets = np.stack([self._cache[int(n)][s + 1] for n, s in zip(trajectory, t)])
        return inputs, targets


def window_trajectories(dataset, window_mb: int) -> int:
    """Trajectories per shuffle window: as many as fit half of ``window_mb``."""
    per_trajectory = dataset.n_times * len(dataset.channels) * np.prod(dataset.resolution) * 4
    return max(1, int(window_mb * 2**20 // 2 // per_trajectory))


def epoch_order(trajectories: np.ndarray, steps: int, seed: int, epoch: int, window: int) -> np.ndarray:
    """Sample rows of one epoch: shuffled trajectories, samples shuffled within windows."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch)])
    shuffled = rng.permutation(np.asarray(trajectories, dtype=np.int64))
    order = []
    for start in range(0, len(shuffled), window):
        rows = (shuffled[start:start + window, None] * steps + np.arange(steps)[None, :]).reshape(-1)
        order.append(rows[rng.permutation(len(rows))])
    return np.concatenate(order) if order else np.zeros(0, dtype=np.int64)


def batches(rows: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(rows), batch_size):
        yield rows[start:start + batch_size]


def _tensors(cache: TrajectoryCache, rows: np.ndarray, device: torch.device, where: str
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples' (inputs, targets); InputError naming those that hold NaN or inf."""
    inputs, targets = cache.samples(rows)
    bad = ~(np.isfinite(inputs).reshape(len(rows), -1).all(1) & np.isfinite(targets).reshape(len(rows), -1).all(1))
    if bad.any():
        raise InputError(f"{cache.dataset.url}: {where}: NaN or inf in the states of "
                         f"{_named(cache, rows[bad])}; fix or remove these trajectories")
    return torch.from_numpy(inputs).to(device), torch.from_numpy(targets).to(device)


def _named(cache: TrajectoryCache, rows: np.ndarray, shown: int = 4) -> str:
    """'trajectory 3 t 2, trajectory 5 t 0 (and 7 more)' for these sample rows."""
    trajectory, t = cache.dataset.index().locate(rows[:shown])
    more = f" (and {len(rows) - shown} more)" if len(rows) > shown else ""
    return ", ".join(f"trajectory {n} t {s}" for n, s in zip(trajectory, t)) + more


def _diverged(cache: TrajectoryCache, rows: np.ndarray, what: str, where: str, lr: float) -> InputError:
    return InputError(f"{cache.dataset.url}: {where}: non-finite {what} on {_named(cache, rows)}; the training "
                      f"diverged (lower train.lr, now {lr:g}); no checkpoint is written for this epoch")


@torch.no_grad()
def evaluate(model: nn.Module, cache: TrajectoryCache, rows: np.ndarray, batch_size: int,
             device: torch.device, task: physics.Task | None = None, label: str = "validation") -> float:
    """Mean per-sample loss (default: scaled MSE) of one-step predictions over ``rows`` (in row order);
    InputError naming the samples (``label`` batch n) whose states or loss are not finite."""
    task = task or physics.PDETask()
    model.eval()
    total = 0.0
    for number, batch in enumerate(batches(np.sort(rows), batch_size), 1):
        where = f"{label} batch {number}"
        inputs, targets = _tensors(cache, batch, device, where)
        losses = task.loss(model(inputs), inputs, targets)
        finite = torch.isfinite(losses).cpu().numpy()
        if not finite.all():
            raise InputError(f"{cache.dataset.url}: {where}: non-finite loss on {_named(cache, batch[~finite])}")
        total += losses.sum().item()
    return total / max(len(rows), 1)


def train_epoch(net: nn.Module, optimizer: torch.optim.Optimizer, cache: TrajectoryCache, order: np.ndarray,
                batch_size: int, device: torch.device, bar, epoch: int,
                task: physics.Task | None = None) -> tuple[float, float]:
    """One pass over ``order`` in batches; returns (mean training loss, seconds).

    InputError at the first batch whose samples, loss or gradient hold NaN or inf, naming the
    epoch, the batch and its offending samples, before the optimizer takes the step."""
    task = task or physics.PDETask()
    net.train()
    lr = optimizer.param_groups[0]["lr"]
    began, loss_sum, done = time.perf_counter(), 0.0, 0
    for number, rows in enumerate(batches(order, batch_size), 1):
        where = f"epoch {epoch}, batch {number}"
        inputs, targets = _tensors(cache, rows, device, where)
        losses = task.loss(net(inputs), inputs, targets)
        loss = losses.mean()
        if not torch.isfinite(loss):
            bad = ~torch.isfinite(losses).cpu().numpy()
            raise _diverged(cache, rows[bad] if bad.any() else rows, "loss", where, lr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        if grads and not torch.isfinite(nn.utils.get_total_norm(grads)):
            raise _diverged(cache, rows, "gradient", where, lr)
        optimizer.step()
        loss_sum += loss.item() * len(rows)
        done += len(rows)
        bar.update(len(rows))
        bar.set_postfix(epoch=epoch, loss=f"{loss.item():.4g}",
                        samples_per_s=round(done / (time.perf_counter() - began), 1))
    return loss_sum / max(done, 1), time.perf_counter() - began


def describe(metrics: dict[str, Any]) -> str:
    """One line of an epoch's metrics."""
    held_out = f", {metrics['val_split']} smse {metrics['val_smse']:.5g}" if metrics["val_split"] else ""
    return f"train smse {metrics['train_smse']:.5g}{held_out}, {metrics['samples_per_s']:.1f} samples/s"


def _model_config(model: ModelConfig, dataset) -> dict[str, Any]:
    if model.path:
        return models.import_config(model.path, model.kwargs)
    grid = tuple(dataset.resolution)
    if len(grid) != 2 or grid[0] != grid[1]:
        raise InputError(f"{dataset.url}: the preset surrogates expect a square 2-D grid, got "
                         f"{'x'.join(map(str, grid))}; name your own model with model.path")
    return models.config(model.name, model.preset, channels=len(dataset.channels), resolution=grid[0],
                         **model.overrides)


def _import_weights(url: str, cfg: dict[str, Any], meta: dict[str, Any], out_dir: str,
                    storage_options: dict | None) -> str:
    """Checkpoint epoch-0000 of a run: the weights at ``url`` (model.checkpoint), checked against ``cfg``."""
    net = models.from_config(cfg)
    weights = read_weights(url, storage_options)
    check_weights(weights, net, url)
    net.load_state_dict(weights)
    meta = {**meta, "epoch": 0, "metrics": None, "history": [],
            "source": {"url": url, "sha256": file_sha256(url, storage_options)}}
    return save_checkpoint(fsio.join(out_dir, "checkpoints", checkpoint_name(0)), net, cfg, meta,
                           storage_options=storage_options)


def _check_resume(meta: dict[str, Any], path: str, cfg: dict[str, Any], dataset, settings: TrainConfig,
                  task: dict[str, Any], source_sha256: str | None) -> None:
    where = fsio.join(path, "config.json")
    if (meta.get("source") or {}).get("sha256") != source_sha256:
        raise InputError(f"{where}: the run started from other weights than model.checkpoint "
                         f"(sha256 {str((meta.get('source') or {}).get('sha256'))[:12]}, "
                         f"this one {str(source_sha256)[:12]}); choose another output directory")
    if meta.get("task", {}) != task:
        raise InputError(f"{where}: the run was trained with task {meta.get('task') or 'default'}, not "
                         f"{task or 'default'}; choose another output directory")
    if meta["model"] != cfg:
        raise InputError(f"{where}: the run was trained with model {meta['model']}, not the requested {cfg}; "
                         "choose another output directory")
    if meta["dataset"]["fingerprint"] != dataset.fingerprint:
        raise InputError(f"{where}: the run was trained on another dataset (fingerprint "
                         f"{meta['dataset']['fingerprint'][:12]}, this one {dataset.fingerprint[:12]})")
    for name in RESULT_SETTINGS:
        if meta["train"].get(name) != getattr(settings, name):
            raise InputError(f"{where}: the run was trained with train.{name} = {meta['train'].get(name)!r}, "
                             f"not {getattr(settings, name)!r}; choose another output directory")


def _open_dataset(url: str, storage_options: dict | None):
    from gradlake.data import Dataset

    return Dataset.open(url, storage_options=storage_options)


def train(dataset_url: str, model: ModelConfig, settings: TrainConfig, out_dir: str,
          storage_options: dict | None = None, task: TaskConfig | None = None,
          trajectories: np.ndarray | None = None) -> list[str]:
    """Train (or resume) a run in ``out_dir``; returns every checkpoint path of the run, oldest first.

    ``task`` names the loss (default: the paper's scaled MSE); ``trajectories``, ids of training
    trajectories, trains on those only (the retrainings of gradlake.lds)."""
    task_config = task or TaskConfig()
    task_meta = {"path": task_config.path, "kwargs": dict(task_config.kwargs)} if task_config.path else {}
    loss_task = physics.load_task(task_config.path, task_config.kwargs)
    dataset = _open_dataset(dataset_url, storage_options)
    cfg = _model_config(model, dataset)
    device = resolve_device(settings.device)
    index = dataset.index()
    train_rows = index.select(splits=["train"])
    if trajectories is not None:
        subset = np.unique(np.asarray(trajectories, dtype=np.int64))
        outside = np.setdiff1d(subset, index.locate(train_rows)[0])
        if len(outside):
            raise InputError(f"{dataset_url}: trajectory {int(outside[0])} is not in the train split")
        train_rows = train_rows[np.isin(index.locate(train_rows)[0], subset)]
    if len(train_rows) == 0:
        raise InputError(f"{dataset_url}: the train split has no samples")
    physics.check_task(loss_task, dataset.channels, (physics.LOSS,), *dataset.samples(train_rows[:2]),
                       source=f"task {task_config.path or 'default'}")
    val_split = next((split for split in ("val", "test") if len(index.select(splits=[split]))), None)
    val_rows = index.select(splits=[val_split]) if val_split else np.zeros(0, dtype=np.int64)
    train_trajectories = np.unique(index.locate(train_rows)[0])
    window = window_trajectories(dataset, settings.window_mb)
    cache = TrajectoryCache(dataset, 2 * window)

    meta = {"dataset": {"url": dataset.url, "fingerprint": dataset.fingerprint},
            "channels": list(dataset.channels), "train": dataclasses.asdict(settings),
            **({"task": task_meta} if task_meta else {}),
            **({"trajectories": subset.tolist()} if trajectories is not None else {})}
    source = model.checkpoint and file_sha256(model.checkpoint, storage_options)
    existing = list_checkpoints(out_dir, storage_options)
    if not existing and model.checkpoint:
        existing = [_import_weights(model.checkpoint, cfg, meta, out_dir, storage_options)]
    if existing:
        net, last = load_checkpoint(existing[-1], storage_options, device)
        _check_resume(last, existing[-1], cfg, dataset, settings, task_meta, source or None)
        if last.get("trajectories") != meta.get("trajectories"):
            raise InputError(f"{fsio.join(existing[-1], 'config.json')}: the run was trained on other "
                             "trajectories; choose another output directory")
        start, history = int(last["epoch"]), list(last["history"])
    else:
        torch.manual_seed(settings.seed)
        net, start, history = models.from_config(cfg).to(device), 0, []
    models.check_output(net, dataset.samples(train_rows[:1])[0], f"model {model.path or model.name}")
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    if start > 0:
        load_optimizer_state(existing[-1], optimizer, storage_options)
    elif existing:  # from imported weights: the RNG as a fresh run's
        torch.manual_seed(settings.seed)
    if start >= settings.epochs or stalled(history, settings.patience):
        return existing

    bar = progress(total=(settings.epochs - start) * len(train_rows), desc="train", unit="sample")
    if val_split != "val":
        bar.write(f"{dataset_url}: no validation trajectories; validating on "
                  + ("the test split" if val_split else "nothing (no held-out trajectories)"))
    with kernels(device, settings.deterministic):
        for epoch in range(start + 1, settings.epochs + 1):
            order = epoch_order(train_trajectories, index.steps, settings.seed, epoch, window)
            train_smse, seconds = train_epoch(net, optimizer, cache, order, settings.batch_size, device, bar, epoch,
                                              loss_task)
            metrics = {"epoch": epoch, "train_smse": train_smse,
                       "val_smse": evaluate(net, cache, val_rows, settings.batch_size, device, loss_task,
                                            f"epoch {epoch}, validation") if val_split else None,
                       "val_split": val_split, "samples_per_s": len(train_rows) / seconds, "seconds": seconds}
            history.append(metrics)
            bar.write(f"epoch {epoch}: {describe(metrics)}")
            stop = stalled(history, settings.patience)
            if epoch % settings.checkpoint_every == 0 or epoch == settings.epochs or stop:
                save_checkpoint(fsio.join(out_dir, "checkpoints", checkpoint_name(epoch)), net, cfg,
                                {**meta, "epoch": epoch, "metrics": metrics, "history": history,
                                 **({"source": last["source"]} if existing and "source" in last else {})},
                                optimizer, storage_options)
            if stop:
                bar.write(f"epoch {epoch}: validation SMSE has not improved for {settings.patience} epochs; stopping")
                break
    bar.close()
    return list_checkpoints(out_dir, storage_options)


def stalled(history: list[dict[str, Any]], patience: int) -> bool:
    """The validation SMSE has not improved on its best for the last ``patience`` epochs."""
    values = [h["val_smse"] for h in history if h.get("val_smse") is not None]
    return patience > 0 and len(values) > patience and len(values) - 1 - int(np.argmin(values)) >= patience
