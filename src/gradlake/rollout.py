"""Autoregressive rollout of a checkpoint: its error against ground truth versus horizon,
per class (``gradlake rollout``; the report's rollout section reads the table)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from gradlake import fsio, physics
from gradlake.errors import InputError
from gradlake.models.checkpoint import load_checkpoint
from gradlake.progress import progress
from gradlake.provenance import with_description
from gradlake.train import resolve_device


@torch.no_grad()
def rollout(checkpoint: str, dataset_url: str, horizon: int | None = None, split: str = "test",
            device: str = "auto", batch_size: int = 16, out: str | None = None,
            storage_options: dict | None = None) -> pa.Table:
    """Autoregressive rollout error against ground truth versus horizon, per class.

    Every trajectory of ``split`` is rolled out from its first state for ``horizon`` steps
    (default: to its end); the scaled MSE of step h against s_{n,h} is averaged per class (and
    over all classes, class "all"). Writes ``<out>/rollout.parquet`` and ``rollout.json`` when
    ``out`` is given. Columns: class, horizon, trajectories, smse_mean, smse_std.
    """
    from gradlake.data import Dataset

    dataset = Dataset.open(dataset_url, storage_options=storage_options)
    max_horizon = dataset.n_times - 1
    horizon = max_horizon if horizon is None else horizon
    if isinstance(horizon, bool) or not isinstance(horizon, int) or not 1 <= horizon <= max_horizon:
        raise InputError(f"horizon: expected an int in 1..{max_horizon} (the dataset's steps), got {horizon!r}")
    trajectories = np.flatnonzero(dataset.splits == split)
    if len(trajectories) == 0:
        raise InputError(f"{dataset_url}: split {split!r} has no trajectories")
    model, meta = load_checkpoint(checkpoint, storage_options, resolve_device(device))
    if tuple(meta["channels"]) != dataset.channels:
        raise InputError(f"{dataset_url}: channels {list(dataset.channels)} differ from the checkpoint's {meta['channels']}")
    model.eval()
    errors = np.zeros((len(trajectories), horizon))
    bar = progress(total=len(trajectories), desc="rollout", unit="traj")
    for start in range(0, len(trajectories), batch_size):
        ids = trajectories[start:start + batch_size]
        truth = torch.from_numpy(dataset.read(ids)).to(next(model.parameters()).device)
        state = truth[:, 0]
        for h in range(1, horizon + 1):
            state = model(state)
            errors[start:start + len(ids), h - 1] = physics.scaled_mse(state, truth[:, h]).cpu().numpy()
        bar.update(len(ids))
    bar.close()
    classes = dataset.classes[trajectories]
    rows = []
    for name in [*sorted(set(classes)), "all"]:
        block = errors if name == "all" else errors[classes == name]
        for h in range(horizon):
            rows.append({"class": name, "horizon": h + 1, "trajectories": len(block),
                         "smse_mean": float(block[:, h].mean()), "smse_std": float(block[:, h].std())})
    table = pa.Table.from_pylist(rows)
    if out is not None:
        _write_table(table, out, storage_options, {"checkpoint": checkpoint, "dataset": dataset.url,
                                                    "fingerprint": dataset.fingerprint, "split": split})
    return table


def _write_table(table: pa.Table, out: str, storage_options: dict | None, provenance: dict[str, Any]) -> None:
    files = fsio.Folder(out, storage_options)
    buffer = io.BytesIO()
    pq.write_table(with_description(table, {"format": "gradlake-rollout/1", **provenance}), buffer)
    files.write_bytes("rollout.parquet", buffer.getvalue())
    files.write_json("rollout.json", {**provenance, "rows": table.to_pylist()})
