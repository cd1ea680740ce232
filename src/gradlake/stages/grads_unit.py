"""The grads stage's unit: the work of one shard (no Ray). Each grads actor of the executor
(gradlake.distributed.executor) holds a :class:`ShardWorker` (:func:`open_worker`) and runs shards
on it (:func:`run_shard`); :class:`Capture` computes one batch's projected gradients.

A :class:`ShardWorker` opens the dataset and the store once, loads each checkpoint's model
once, and for each shard reads its samples straight from the dataset URL, computes φ in
batches and commits the shard. Running a shard twice is harmless (delivery is at least
once): a committed shard is skipped, an uncommitted one is rewritten whole.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradlake.config import GradsConfig, TaskConfig
from gradlake.errors import InputError
from gradlake.store import ShardWriter

FAULT_ENV = "GRADLAKE_TEST_FAULT"  # test hook, see Fault
VALUES = {"nan": np.nan, "big": 1e6}  # the value a fault puts into φ


@dataclass(frozen=True)
class ShardTask:
    """One unit of work: the held rows of one shard, for one checkpoint."""

    checkpoint: str  # name in the store
    checkpoint_path: str
    shard: int
    rows: np.ndarray  # sorted dataset rows inside the shard's range

    def __repr__(self) -> str:
        return f"ShardTask({self.checkpoint}, shard {self.shard}, {len(self.rows)} rows)"


@dataclass(frozen=True)
class Fault:
    """A fault to inject, for the fault tests: ``<action>:<checkpoint>:<shard>[:<marker>]``.

    action ``die`` ends the worker process (os._exit) after the shard's gradient rows and
    Parquet part are written but before its completion record; ``hang`` sleeps there
    instead; ``nan`` puts a NaN into the shard's φ, ``big`` a value beyond float16's range.
    With a marker file the fault happens once (the first attempt creates the file); without
    one, on every attempt.
    """

    action: str
    checkpoint: str
    shard: int
    marker: str = ""

    @classmethod
    def parse(cls, text: str) -> Fault | None:
        if not text:
            return None
        parts = text.split(":", 3)
        if len(parts) < 3 or parts[0] not in ("die", "hang", *VALUES) or not parts[2].isdigit():
            raise InputError(f"{FAULT_ENV}: expected <die|hang|nan|big>:<checkpoint>:<shard>[:<marker>], "
                             f"got {text!r}")
        return cls(parts[0], parts[1], int(parts[2]), parts[3] if len(parts) > 3 else "")

    def fires(self, task: ShardTask, action: str) -> bool:
        if (action, task.checkpoint, task.shard) != (self.action, self.checkpoint, self.shard):
            return False
        if not self.marker:
            return True
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        return True


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker needs, sent once when the worker starts."""

    data_url: str
    store_url: str
    grads: GradsConfig
    storage_options: dict[str, Any] = field(default_factory=dict)
    fault: str = ""
    projector: dict[str, Any] | None = None  # the store's projector spec (default: from ``grads``)
    task: TaskConfig = field(default_factory=TaskConfig)
    python_path: tuple[str, ...] = ()  # folders of user models and tasks


class Capture:
    """Projected per-sample gradients and losses of a batch (the real components)."""

    def __init__(self, grads: GradsConfig, channels: tuple[str, ...], storage_options: dict[str, Any],
                 projector: dict[str, Any] | None = None, task: TaskConfig | None = None):
        from gradlake.grads import Projector
        from gradlake.physics import load_task
        from gradlake.train import resolve_device

        self.grads, self.channels, self.storage_options = grads, channels, storage_options
        task = task or TaskConfig()
        self.task = load_task(task.path, task.kwargs)
        self.projector = Projector.from_spec(projector) if projector else Projector.from_config(grads)
        self.device = resolve_device(grads.device)

    def load(self, checkpoint_path: str):
        from gradlake.models.checkpoint import load_checkpoint

        model, _ = load_checkpoint(checkpoint_path, self.storage_options, device=self.device)
        return model

    def __call__(self, model, inputs: np.ndarray, targets: np.ndarray, rows: np.ndarray
                 ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        from gradlake.grads import compute

        g = self.grads
        phis, loss = compute(model, inputs, targets, observables=g.observables, projector=self.projector,
                             channels=self.channels, sample_ids=rows, probes=g.probes,
                             probe_seed=g.effective_probe_seed, return_loss=True, precision=g.precision, task=self.task)
        return ({obs: phi.detach().float().cpu().numpy() for obs, phi in phis.items()},
                loss.detach().float().cpu().numpy())


class ShardWorker:
    """Computes and commits shards; ``capture`` defaults to the real :class:`Capture`."""

    def __init__(self, settings: WorkerSettings, capture: Capture | None = None):
        from gradlake.data import open_checked
        from gradlake.plugins import use_paths

        use_paths(settings.python_path)
        self.settings = settings
        self.writer = ShardWriter(settings.store_url, settings.storage_options or None)
        self.dataset = open_checked(settings.data_url, self.writer.spec.dataset["fingerprint"],
                                    settings.storage_options or None)
        self.index = self.dataset.index().table
        self.capture = capture or Capture(settings.grads, self.dataset.channels,
                                          settings.storage_options or None, settings.projector, settings.task)
        self.fault = Fault.parse(settings.fault)
        self._model_path: str | None = None
        self._model = None

    def model(self, checkpoint_path: str):
        """The checkpoint's model, loaded once and kept until another checkpoint is asked for."""
        if checkpoint_path != self._model_path:
            self._model = None  # free the previous model first
            self._model = self.capture.load(checkpoint_path)
            self._model_path = checkpoint_path
        return self._model

    def run(self, task: ShardTask) -> dict[str, Any]:
        """Compute and commit one shard; returns its completion record and worker stats."""
        if self.writer.is_committed(task.checkpoint, task.shard):
            return {"checkpoint": task.checkpoint, "shard": task.shard, "samples": 0,
                    "bytes": 0, "skipped": True, **_stats()}
        started = time.monotonic()
        model = self.model(task.checkpoint_path)
        inputs, targets = self.dataset.samples(task.rows)
        batch = self.settings.grads.batch_size
        parts, losses = [], []
        for start in range(0, len(task.rows), batch):
            stop = start + batch
            phis, loss = self.capture(model, inputs[start:stop], targets[start:stop], task.rows[start:stop])
            parts.append(phis)
            losses.append(loss)
        phis = {obs: np.concatenate([p[obs] for p in parts]) for obs in parts[0]}
        if self.fault and self.fault.action in VALUES and self.fault.fires(task, self.fault.action):
            phis[next(iter(phis))][0] = VALUES[self.fault.action]
        record = self.writer.commit(task.checkpoint, task.shard, self.index.take(task.rows),
                                    np.concatenate(losses), phis, before_record=self._fault_hook(task))
        return {**record, "skipped": False, "compute_seconds": round(time.monotonic() - started, 3),
                **_stats()}

    def _fault_hook(self, task: ShardTask) -> Callable[[], None] | None:
        if self.fault is None or self.fault.action not in ("die", "hang"):
            return None

        def hook() -> None:
            if self.fault.fires(task, "die"):
                os._exit(17)
            if self.fault.fires(task, "hang"):
                time.sleep(3600)

        return hook


def open_worker(context: tuple[WorkerSettings, int]) -> ShardWorker:
    """A worker's state: (settings, torch threads) -> its ShardWorker."""
    import torch

    settings, threads = context
    torch.set_num_threads(threads)
    return ShardWorker(settings)


def run_shard(worker: ShardWorker, task: ShardTask) -> dict[str, Any]:
    """One unit of the grads stage on a worker's ShardWorker."""
    return worker.run(task)


def _stats() -> dict[str, Any]:
    return {"pid": os.getpid(),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
