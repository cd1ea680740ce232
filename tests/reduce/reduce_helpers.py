"""Small datasets and gradient stores with random φ, and dense references for the reduce tests."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

EULER = ("rho", "rho_vx", "rho_vy", "E")


def make_dataset(url, classes=("a", "b", "c"), per_class=3, n_times=5, resolution=8, seed=0,
                 splits=("train", "train", "test")):
    """Random positive fields; per class the trajectories get ``splits`` in order."""
    from gradlake.data.format import DatasetWriter

    rng = np.random.default_rng(seed)
    n = len(classes) * per_class
    writer = DatasetWriter(url, n_trajectories=n, times=np.arange(n_times), channels=EULER,
                           resolution=(resolution, resolution), family="euler")
    writer.write(0, 1 + 0.2 * rng.random((n, n_times, 4, resolution, resolution)))
    cls = [c for c in classes for _ in range(per_class)]
    spl = [splits[i % len(splits)] for i in range(n)]
    return writer.finish(cls, spl, ["random"] * n, [{}] * n, {"test": True})


def make_store(url, ds, checkpoints=("epoch-0001", "epoch-0002"), k=6, probes=2, shard_rows=8,
               seed=0, paths=None, projector=None):
    """A complete store over every sample of ``ds`` with random φ (C with a non-zero mean);
    ``projector``: its spec (default: one without parameter blocks)."""
    from gradlake.store import ShardWriter, StoreSpec, create_store

    index = ds.index().table
    n_rows = index.num_rows
    spec = StoreSpec(dataset={"url": ds.url, "fingerprint": ds.fingerprint, "family": ds.family,
                              "channels": list(ds.channels), "n_trajectories": ds.n_trajectories,
                              "n_times": ds.n_times},
                     model={"name": "random"}, projector=projector or {"seed": 0}, observables=("C", "M", "E", "V"),
                     probes=probes, probe_seed=0, k=k, dtype="float32", n_rows=n_rows,
                     shard_rows=shard_rows, chunk_rows=shard_rows, splits=("train", "val", "test"),
                     n_samples=n_rows, n_shards=-(-n_rows // shard_rows))
    info = {c: {"sha256": f"{i:064x}", "path": (paths or {}).get(c, ""), "epoch": i}
            for i, c in enumerate(checkpoints)}
    store = create_store(url, spec, info)
    writer = ShardWriter(url)
    rng = np.random.default_rng(seed)
    for c in checkpoints:
        for s in range(spec.n_shards):
            part = index.slice(s * shard_rows, shard_rows)
            n = part.num_rows
            phis = {o: (rng.normal(size=(n, k)) * np.linspace(0.5, 2, k)).astype(np.float32) for o in "CME"}
            phis["C"] += 0.5
            phis["V"] = rng.normal(size=(n, probes, k)).astype(np.float32)
            writer.commit(c, s, part, rng.random(n), phis)
    store.refresh()
    return store


def dense_h(phi_a, phi_b, eta, lam, norm="none", reference=None, phi_a_self=None, phi_b_self=None):
    """Full H by a direct solve, then normalised densely (row-std over ``reference`` columns)."""
    A = np.linalg.inv(eta + lam * np.eye(len(eta)))
    H = phi_a @ A @ phi_b.T
    if norm == "row-std":
        H = H / H[:, reference].std(axis=1)[:, None]
    elif norm == "cosine":
        haa = np.einsum("ik,kl,il->i", phi_a, A, phi_a)
        hbb = np.einsum("ik,kl,il->i", phi_b, A, phi_b)
        H = H / np.sqrt(np.outer(haa, hbb))
    return H


def eta_from_probes(v):
    """η̃ = (1/probes) Σ_i Σ_v φφᵀ by a plain loop."""
    return sum(np.outer(p, p) for sample in v for p in sample) / v.shape[1]


def samples_columns(table: pa.Table):
    return {c: np.asarray(table.column(c).to_pylist()) for c in ("row", "trajectory", "t", "class", "split")}
