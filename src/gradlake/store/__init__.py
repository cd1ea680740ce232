"""The gradient store: projected per-sample gradients at any fsspec URL.

Layout (plain zarr, pyarrow, DuckDB and xarray read it; no gradlake needed)::

    <root>/store.json        provenance: format, gradlake version, "spec" (dataset URL and
                             fingerprint, model config, projector spec, observables, probes,
                             dtype, k, n_rows, shard_rows, chunk_rows, splits, n_samples,
                             n_shards), "checkpoints" (name -> sha256, path, epoch, and
                             "compacted": compaction group -> shard runs [first, last] its
                             samples.parquet file holds; in the order added), "stages"
    <root>/lease.json        the lease of the driver writing the store (see store.lease)
    <root>/samples.parquet/checkpoint=<name>/part-<g>.parquet
                             one row per committed sample: row, trajectory, t, class, split,
                             shard, loss, norm_<obs> (the L2 norm of phi per observable, from
                             float32); one file per group of shards (about 4M rows), written
                             by compaction (a group once its shards all committed, the rest
                             at the end of each grads run). ``checkpoint`` (string) is a
                             hive partition key: ``pyarrow.dataset.dataset(..., partitioning=
                             "hive")``, DuckDB ``read_parquet('.../*/*.parquet', hive_partitioning=true)``.
    <root>/commits/<name>/shard-<s>.parquet
                             the sample rows (same columns) of shard s = rows
                             [s * shard_rows, (s + 1) * shard_rows), written last: its commit.
                             Compaction moves them into samples.parquet.
    <root>/grads.zarr/       zarr v3 group, metadata consolidated in its zarr.json
      <name>/<obs>           array [n_rows, k] ([n_rows, probes, k] for V), dimension names
                             ("sample", "proj") / ("sample", "probe", "proj"), float16 by
                             default, chunks of whole rows inside zarr shards of ``shard_rows``
                             rows (64-128 MiB when sized by the store), crc32c checksum per
                             chunk and on the shard index. Array row i is dataset sample row i
                             (row = trajectory * (T - 1) + t); rows of splits the store does not
                             hold, and of shards not committed, are NaN or stale.
      <name>/trajectory, t, class, split
                             [n_rows] coordinates of dimension "sample" (the arrays' attribute
                             "coordinates" names them): ``xarray.open_zarr(<root>/grads.zarr,
                             group=<name>)`` gives a Dataset with these as coordinates.
    <root>/reduce/<name>/    reduce outputs.

A shard is committed by writing its gradient rows (one zarr shard object per array, one
writer, written whole), then its commit file. Readers only ever see committed shards:
gradlake through store.json and one listing of commits/ per open, plain Parquet readers
through samples.parquet (the shards compacted so far). One driver writes a store at a time
(the lease); only it compacts.
"""

from gradlake.store.filters import parse_where, select
from gradlake.store.spec import StoreSpec
from gradlake.store.store import GradientStore
from gradlake.store.writer import ShardWriter, create_store
from gradlake.store.compaction import compact
from gradlake.store.lease import Lease

__all__ = ["GradientStore", "Lease", "ShardWriter", "StoreSpec", "compact", "create_store", "parse_where",
           "select"]
