"""Synthetic gradient stores for the benchmarks, written through gradlake.store (any fsspec URL).

Rows are samples of trajectories of ``steps`` steps in three classes, split by trajectory
(train 80 %, val 10 %, test 10 %). φ is random, generated shard by shard (memory stays
flat in N), shaped like real projected gradients rather than isotropic noise: one of 64
cluster centres per trajectory plus noise with a decaying spectrum (dimension d scaled by
(d + 1)^-0.75), so nearest-neighbour structure exists for the approximate index.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from gradlake.config import GradsConfig
from gradlake.store import GradientStore, ShardWriter, StoreSpec, create_store
from gradlake.store.spec import chunk_rows_for, shard_rows_for

CHECKPOINT = "epoch-0001"
CLASSES = np.array(["rp", "crp", "rpui"])


def spec_for(n_rows: int, k: int, observables=("C", "V"), probes: int = 2, shard_rows: int | None = None,
             chunk_rows: int | None = None) -> StoreSpec:
    """The store's default geometry (GradsConfig's shard rows, else sized by the store, ~256 KB chunks) unless given."""
    widest = k * 2 * (probes if "V" in observables else 1)
    shard_rows = shard_rows or GradsConfig().shard_rows or shard_rows_for(n_rows, widest)
    chunk_rows = chunk_rows or chunk_rows_for(shard_rows, widest)
    return StoreSpec(
        dataset={"url": "synthetic", "fingerprint": "0" * 64}, model={"name": "synthetic"},
        projector={"seed": 0}, observables=tuple(observables), probes=probes, probe_seed=0, k=k,
        dtype="float16", n_rows=n_rows, shard_rows=shard_rows, chunk_rows=chunk_rows,
        splits=("train", "val", "test"), n_samples=n_rows, n_shards=-(-n_rows // shard_rows))


def index_table(rows: np.ndarray, steps: int) -> pa.Table:
    trajectory = rows // steps
    split = np.where(trajectory % 10 == 8, "val", np.where(trajectory % 10 == 9, "test", "train"))
    return pa.table({"row": rows, "trajectory": trajectory, "t": (rows % steps).astype(np.int32),
                     "class": CLASSES[trajectory % 3], "split": split})


def write_store(url: str, spec: StoreSpec, storage_options=None, steps: int = 20, seed: int = 0) -> GradientStore:
    """Create the store and commit every shard of one checkpoint with random φ."""
    create_store(url, spec, {CHECKPOINT: {"sha256": "0" * 64}}, storage_options)
    writer = ShardWriter(url, storage_options)
    scale = (np.arange(spec.k, dtype=np.float32) + 1) ** -0.75
    centres = np.random.default_rng([seed, 2**31]).standard_normal((64, spec.k), dtype=np.float32) * scale
    for shard in range(spec.n_shards):
        lo, hi = spec.shard_range(shard)
        rng = np.random.default_rng([seed, shard])
        centre = centres[(np.arange(lo, hi) // steps) % len(centres)]
        phis = {}
        for obs in spec.observables:
            noise = rng.standard_normal((hi - lo, *spec.row_shape(obs)), dtype=np.float32) * scale
            phis[obs] = noise + (centre[:, None] if noise.ndim == 3 else centre)
        writer.commit(CHECKPOINT, shard, index_table(np.arange(lo, hi, dtype=np.int64), steps),
                      np.ones(hi - lo, np.float32), phis)
    return GradientStore.open(url, storage_options)
