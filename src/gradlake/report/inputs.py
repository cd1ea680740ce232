"""What the report reads: a reduce's results, training histories and rollout tables.

Readers only; they return numpy arrays and plain dicts for :mod:`gradlake.report.figures`.
The layouts are those documented in gradlake.reduce (results), gradlake.models.checkpoint,
gradlake.train (checkpoints' config.json) and gradlake.rollout (rollout.parquet).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gradlake import fsio
from gradlake.errors import InputError
from gradlake.reduce.output import RESULTS, SUMMARY, ReduceOutput, coordinates

EXACT_JSON = "exact.json"
ROLLOUT, ROLLOUT_JSON = "rollout.parquet", "rollout.json"


class ReduceResults:
    """A complete reduce ``<store>/reduce/<name>/`` opened read-only."""

    def __init__(self, output: ReduceOutput, summary: dict[str, Any]):
        self._out = output
        self.summary = summary
        self._group = None

    @classmethod
    def open(cls, url: str, storage_options: dict[str, Any] | None = None) -> "ReduceResults | None":
        """The results at ``url``; None when there is no complete reduce there (no summary.json)."""
        output = ReduceOutput(url, storage_options)
        if not output.exists(SUMMARY):
            return None
        try:
            summary = output.read_json(SUMMARY)
        except ValueError as err:
            raise InputError(f"{fsio.join(url, SUMMARY)}: not valid JSON ({err})") from None
        if not summary.get("complete"):
            return None
        return cls(output, summary)

    @property
    def url(self) -> str:
        return self._out.url

    @property
    def settings(self) -> dict[str, Any]:
        return self.summary.get("settings", {})

    @property
    def checkpoints(self) -> list[str]:
        return list(self.summary.get("checkpoints", {}))

    @property
    def damping(self) -> float:
        return float(self.settings.get("damping", 0.0))

    def array(self, checkpoint: str, name: str) -> tuple[np.ndarray, dict[str, list]]:
        """(values, labels per dimension) of ``results.zarr/<checkpoint>/<name>``."""
        import zarr

        if self._group is None:
            self._group = zarr.open_group(store=self._out.zarr_store(), mode="r")
        try:
            array = self._group[f"{checkpoint}/{name}"]
        except KeyError:
            where = fsio.join(self.url, RESULTS, checkpoint, name)
            raise InputError(f"{where}: missing from the reduce results") from None
        parent, leaf = posixpath.split(f"{checkpoint}/{name}")
        return np.asarray(array[...]), coordinates(self._group[parent], leaf)

    def has(self, rel: str) -> bool:
        return self._out.exists(rel)

    def table(self, rel: str, where: pc.Expression | None = None, partitioned: bool = True) -> pa.Table:
        """A Parquet table of the results (hive folders become a ``checkpoint`` column)."""
        return self._out.read_tables(rel, filters=where, partitioned=partitioned)

    def exact(self) -> tuple[dict[str, Any], pa.Table | None] | None:
        """(exact.json, exact_agreement table or None) when the exact mode ran, else None."""
        if not self._out.exists(EXACT_JSON):
            return None
        agreement = self.table("exact_agreement.parquet", partitioned=False) \
            if self._out.exists("exact_agreement.parquet") else None
        return self._out.read_json(EXACT_JSON), agreement


def select(table: pa.Table, **equal: Any) -> pa.Table:
    """Rows of ``table`` whose columns equal the given values."""
    mask = None
    for column, value in equal.items():
        cond = pc.equal(table.column(column), pa.scalar(value, table.schema.field(column).type))
        mask = cond if mask is None else pc.and_(mask, cond)
    return table if mask is None else table.filter(mask)


def column(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False)


def band(table: pa.Table, x: str = "lag") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x, median, q25, q75) of a table of binned quantiles, sorted by ``x``."""
    table = table.sort_by(x)
    return column(table, x), column(table, "median"), column(table, "q25"), column(table, "q75")


# --------------------------------------------------------------------------- training
@dataclass
class TrainingRun:
    """One training run: its name, folder, per-epoch metrics and checkpoint paths (oldest first)."""

    name: str
    run_dir: str
    history: list[dict[str, Any]]
    checkpoints: list[str]
    task: str = ""  # import path of the task it was trained with; empty: the paper's scaled MSE


def training_runs(train_dir: str, storage_options: dict[str, Any] | None = None) -> list[TrainingRun]:
    """Runs under ``train_dir``: the directory itself, or its ``seed-<s>/`` subdirectories.

    The metrics come from the last checkpoint's ``history`` (every epoch so far); a
    checkpoint without one contributes its own ``metrics``.
    """
    from gradlake.models.checkpoint import list_checkpoints, read_meta

    fs, root = fsio.filesystem(train_dir, storage_options)
    if not fs.exists(root):
        raise InputError(f"{train_dir}: no such training directory")
    candidates = [("run", train_dir)]
    if not list_checkpoints(train_dir, storage_options):
        seeds = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)
                       if p.rstrip("/").rsplit("/", 1)[-1].startswith("seed-"))
        candidates = [(name, fsio.join(train_dir, name)) for name in seeds]
    runs = []
    for name, run_dir in candidates:
        paths = list_checkpoints(run_dir, storage_options)
        if not paths:
            continue
        metas = [read_meta(p, storage_options) for p in paths]
        history = metas[-1].get("history") or [m["metrics"] for m in metas if m.get("metrics")]
        runs.append(TrainingRun(name, run_dir, sorted(history, key=lambda m: m.get("epoch", 0)), paths,
                                (metas[-1].get("task") or {}).get("path", "")))
    return runs


def rollout_tables(paths: list[str], storage_options: dict[str, Any] | None = None) -> dict[str, pa.Table]:
    """``rollout.parquet`` of each directory that has one (checkpoint dirs, a run dir)."""
    import pyarrow.parquet as pq

    found = {}
    for path in paths:
        files = fsio.Folder(path, storage_options)
        if files.exists(ROLLOUT):
            found[path] = pq.read_table(pa.BufferReader(files.read_bytes(ROLLOUT)))
    return found


def rollout_provenance(path: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """rollout.json next to a rollout table ({} when absent)."""
    files = fsio.Folder(path, storage_options)
    return files.read_json(ROLLOUT_JSON) if files.exists(ROLLOUT_JSON) else {}
