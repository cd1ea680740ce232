"""The exact minibatch mode's shape: the paper's H on many minibatches, their statistics, the agreement.

Minibatches come from :func:`gradlake.reduce.minibatch.plan` (minibatch 0 is the paper's
batch). Each is solved by :func:`gradlake.stages.exact_unit.run_unit`, which writes its own
chunk of ``results.zarr/exact/H`` and then its record ``exact/done/mb-<m>.json`` (at-least-once
delivery is harmless: a rerun writes the same bytes; a chunk without a record is solved
again). :func:`gradlake.stages.exact_finish.finish` then aggregates every minibatch
(reduce.minibatch) and writes ``exact.json`` last. Here: :class:`ExactSpec`, :func:`plan` (the
minibatches), :func:`resume` (the finished ones), the output's names and the batch
normalisations; the driver that runs the units on the executor is gradlake.distributed.exact_tasks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from gradlake import physics
from gradlake.config import ExactConfig, settings_hash
from gradlake.errors import InputError
from gradlake.reduce import minibatch
from gradlake.reduce.agreement import normalize_matrix
from gradlake.reduce.output import RESULTS, ReduceOutput
from gradlake.stages.records import Records, other_settings

EXACT_JSON = "exact.json"
H_ARRAY = "exact/H"
SWEEP_ARRAY = "exact/H_sweep"
PROJECTED_ARRAY = "exact/projected"
DONE = "exact/done"  # the minibatches' completion records, mb-<m>.json (gradlake.stages.records)
ALLOCATIONS = ("uniform", "energy")  # the agreement's projections (an axis of PROJECTED_ARRAY)


@dataclass(frozen=True)
class ExactSpec:
    """One exact run: what its units and its finish read (``pairs``: of the dataset's channels,
    see :func:`check_pairs`; ``lambdas``: the sweep's other λ)."""

    checkpoint: str
    data_url: str
    out_url: str
    settings: ExactConfig
    damping: float
    lambdas: tuple[float, ...] = ()
    pairs: tuple[str, ...] = ("CC", "MC", "EC")
    normalize: tuple[str, ...] = ("none", "row-std", "cosine")
    storage_options: dict[str, Any] | None = None
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def record(self) -> dict[str, Any]:
        """What every minibatch's record carries: the hash of the run's settings."""
        return {"settings": settings_hash(self.settings, {
            "damping": self.damping, "lambdas": list(self.lambdas), "pairs": list(self.pairs),
            "normalize": list(self.normalize), **self.identity})}

    def output(self) -> ReduceOutput:
        return ReduceOutput(self.out_url, self.storage_options, provenance=self.identity)

    def records(self) -> Records:
        return Records(self.output(), DONE, "mb-")


@dataclass(frozen=True)
class Minibatch:
    """One unit: minibatch ``index`` and its samples (position, row, trajectory, t, class)."""

    index: int
    rows: pa.Table


def plan(spec: ExactSpec) -> list[Minibatch]:
    """Every minibatch of the run (gradlake.reduce.minibatch.plan; minibatch 0 is the paper's)."""
    from gradlake.data import Dataset

    ds = Dataset.open(spec.data_url, storage_options=spec.storage_options)
    s = spec.settings
    return [Minibatch(m, batch) for m, batch in
            enumerate(minibatch.plan(ds.trajectories, ds.n_times, s.split, s.classes, s.per_class, s.minibatches))]


def solve_pairs(pairs, normalize) -> tuple[str, ...]:
    """The pairs to solve: the asked ones, plus the self-pairs cosine needs."""
    extra = {o + o for pair in pairs for o in pair} if "cosine" in normalize else set()
    return tuple(dict.fromkeys([*pairs, *sorted(extra)]))


def normalized(h: dict[str, np.ndarray], pair: str, norm: str) -> np.ndarray:
    """H of ``pair`` under a batch normalisation (cosine reads the self-pairs' diagonals)."""
    diag = (lambda o: np.diag(h[o + o])) if norm == "cosine" else (lambda o: None)
    return normalize_matrix(h[pair], norm, diag(pair[0]), diag(pair[1]))


def check_pairs(channels, pairs) -> tuple[str, ...]:
    available = physics.available_observables(channels)
    kept = tuple(p for p in pairs if set(p) <= set(available))
    if not kept:
        raise InputError(f"reduce.pairs: none is available for channels {list(channels)} "
                         f"(observables {', '.join(available)})")
    return kept


def completed(spec: ExactSpec) -> dict[int, dict[str, Any]]:
    """Minibatch -> its completion record, of every minibatch with one (of any settings)."""
    return {int(name): record for name, record in spec.records().load().items()}


def resume(spec: ExactSpec, units: list[Minibatch]) -> set[int]:
    """Arrays and the batch table for the planned minibatches; returns the finished minibatches.

    A previous run with other settings (different hash in its records) is removed first.
    """
    out, batches, settings, lambdas = spec.output(), [u.rows for u in units], spec.settings, spec.lambdas
    solved = solve_pairs(spec.pairs, spec.normalize)
    record = spec.record
    out.remove(EXACT_JSON)
    done = completed(spec)
    size = batches[0].num_rows
    if other_settings(done, record["settings"]) or not out.exists(f"{RESULTS}/{H_ARRAY}/zarr.json"):
        for rel in ("exact", "results.zarr/exact", "exact_batches.parquet", "exact_agreement.parquet",
                    "exact_lags.parquet", "exact_sweep.parquet", "exact_spectrum.parquet"):
            out.remove(rel)
        done = {}
        out.create_array(H_ARRAY, (len(batches), len(solved), size, size), (1, len(solved), size, size), "float64",
                         ("minibatch", "solved_pair", "response", "perturbation"),
                         coords={"minibatch": np.arange(len(batches)), "solved_pair": list(solved)},
                         description="exact H_AB(i, j) per minibatch (rows of exact_batches.parquet)")
        if lambdas:
            out.create_array(SWEEP_ARRAY, (len(batches), len(lambdas), len(solved), size, size),
                             (1, len(lambdas), len(solved), size, size), "float64",
                             ("minibatch", "lambda", "solved_pair", "response", "perturbation"),
                             coords={"minibatch": np.arange(len(batches)), "lambda": list(lambdas),
                                     "solved_pair": list(solved)},
                             description="exact H_AB(i, j) per minibatch at each λ of the sweep (from the same solve)")
        agreement = min(settings.agreement, len(batches))
        if agreement:
            shape = (len(ALLOCATIONS), len(settings.ks), len(solved), size, size)
            out.create_array(PROJECTED_ARRAY, (agreement, *shape), (1, *shape), "float64",
                             ("agreement_minibatch", "allocation", "k", "solved_pair", "response", "perturbation"),
                             coords={"k": list(settings.ks), "allocation": list(ALLOCATIONS)},
                             description="projected estimate of H_AB per agreement minibatch, allocation of the "
                                         "projection (uniform k_in = k_out = k, or energy at the same total k)")
        table = pa.concat_tables([b.append_column("minibatch", pa.array(np.full(b.num_rows, m, np.int32)))
                                  for m, b in enumerate(batches)])
        out.write_table("exact_batches.parquet", table)
    return {m for m in done if m < len(batches)}
