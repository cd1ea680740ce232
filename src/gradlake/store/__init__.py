"""The gradient store: projected per-sample gradients at any fsspec URL.

Layout (plain zarr and pyarrow can read it; no gradlake needed)::

    <root>/store.json        provenance: format, gradlake version, "spec" (dataset URL and
                             fingerprint, model config, projector spec, observables, probes,
                             dtype, k, n_rows, shard_rows, chunk_rows, splits, n_samples,
                             n_shards), "checkpoints" (name -> sha256, path, epoch; in the
                             order added), "stages" (status of the grads stage)
    <root>/samples.parquet/checkpoint=<name>/shard=<s>/part-0.parquet
                             one row per sample: row, trajectory, t, class, split, loss,
                             norm_<obs> (the L2 norm of phi per observable, from float32).
                             ``checkpoint`` (string) and ``shard`` (int32) are hive
                             partition keys only: read with
                             ``pyarrow.dataset.dataset(..., partitioning="hive")``.
    <root>/grads.zarr/<name>/<obs>
                             zarr v3 array [n_rows, k] ([n_rows, probes, k] for V),
                             dimension names ("sample", "proj") / ("sample", "probe", "proj"),
                             float16 by default, chunks of whole rows inside zarr shards of
                             ``shard_rows`` rows, crc32c checksum per chunk and on the
                             shard index. Array row i is dataset sample row i
                             (row = trajectory * (T - 1) + t); rows of splits the store does
                             not hold are never written (NaN).
    <root>/commits/<name>/shard-<s>.json
                             completion record of gradlake shard s = rows
                             [s * shard_rows, (s + 1) * shard_rows), written last.
    <root>/reduce/<name>/    reduce outputs.

A shard is committed by writing its gradient rows (one zarr shard per array, one writer),
then its Parquet partition (replacing an earlier attempt), then its completion record.
Readers only ever see committed shards.
"""

from gradlake.store.filters import parse_where, select
from gradlake.store.spec import StoreSpec
from gradlake.store.store import GradientStore
from gradlake.store.writer import ShardWriter, create_store

__all__ = ["GradientStore", "ShardWriter", "StoreSpec", "create_store", "parse_where", "select"]
