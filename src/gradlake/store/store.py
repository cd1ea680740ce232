"""Reading a gradient store: the base of every query and reduce."""

from __future__ import annotations

import copy
import posixpath
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from gradlake.errors import GradlakeError, InputError
from gradlake.store import filters, layout
from gradlake.store.layout import compacted_shards, read_metadata, shard_ranges  # noqa: F401 (public here too)
from gradlake.store.spec import StoreSpec
from gradlake.store.zarr_shard import ShardReader, distinct

INDEX_COLUMNS = ("row", "trajectory", "t", "class", "split")
COMMIT_KEY = b"gradlake.commit"  # Parquet key-value metadata of a commit file: its record (JSON)


def samples_schema(observables) -> pa.Schema:
    """Columns of the sample Parquet files (``checkpoint`` is the hive partition key of
    samples.parquet/)."""
    return pa.schema(
        [("row", pa.int64()), ("trajectory", pa.int64()), ("t", pa.int32()),
         ("class", pa.string()), ("split", pa.string()), ("shard", pa.int32()), ("loss", pa.float32())]
        + [(f"norm_{obs}", pa.float32()) for obs in observables]
    )


class GradientStore:
    """A gradient store opened read-only. Only committed shards are ever read, and a selection
    of a checkpoint whose shards are not all committed is refused unless ``allow_partial``."""

    def __init__(self, files: layout.StoreFiles, meta: dict[str, Any], allow_partial: bool = False):
        self._files = files
        self._meta = meta
        self.allow_partial = allow_partial
        self.spec = StoreSpec.from_json(meta["spec"])
        self._parts: dict[str, set[int]] = {}  # checkpoint -> shards in commits/ (one listing)
        self._stored: dict[tuple[str, str], set[int]] = {}  # (checkpoint, obs) -> shards with data
        self._readers: dict[tuple[str, str], ShardReader] = {}  # (checkpoint, obs) -> its array's reader

    @classmethod
    def open(cls, url: str, storage_options: dict[str, Any] | None = None,
             allow_partial: bool = False) -> GradientStore:
        files = layout.StoreFiles(url, storage_options)
        meta = read_metadata(files)
        if meta is None:
            raise InputError(f"{url}: no gradient store here (no {layout.STORE_JSON}); "
                             "run `gradlake grads` first")
        return cls(files, meta, allow_partial)

    def refresh(self) -> None:
        """Forget cached shard listings and reread store.json (after other writers)."""
        meta = read_metadata(self._files)
        self._meta = meta if meta is not None else self._meta
        self._parts.clear()
        self._stored.clear()
        self._readers.clear()

    # Description.
    @property
    def url(self) -> str:
        return self._files.url

    @property
    def storage_options(self) -> dict[str, Any]:
        """The fsspec options it was opened with (to open it again elsewhere)."""
        return self._files.storage_options

    @property
    def provenance(self) -> dict[str, Any]:
        return copy.deepcopy(self._meta)

    @property
    def checkpoints(self) -> list[str]:
        """Checkpoint names in the order they were added (the last is the latest)."""
        return list(self._meta["checkpoints"])

    @property
    def observables(self) -> list[str]:
        return list(self.spec.observables)

    @property
    def k(self) -> int:
        return self.spec.k

    @property
    def n_rows(self) -> int:
        return self.spec.n_rows

    @property
    def probes(self) -> int:
        return self.spec.probes

    def reduce_url(self, name: str) -> str:
        return self._files.join_url(f"{layout.REDUCE}/{name}")

    def reduce_names(self) -> list[str]:
        """The reduces (and exact runs) written into this store, by name."""
        return sorted(self._files.ls(layout.REDUCE))

    def checkpoint(self, checkpoint: str | None = None) -> str:
        """A checkpoint's name in this store (None -> the latest); InputError if absent."""
        names = self.checkpoints
        if not names:
            raise InputError(f"{self.url}: the store holds no checkpoint yet")
        if checkpoint is None:
            return names[-1]
        name = checkpoint.rstrip("/").rsplit("/", 1)[-1]
        if name not in names:
            raise InputError(f"checkpoint {checkpoint!r} is not in store {self.url}; "
                             f"it holds: {', '.join(names)}")
        return name

    def check_observable(self, observable: str) -> str:
        """``observable``, or InputError naming the ones the store holds."""
        if observable not in self.spec.observables:
            raise InputError(f"observable {observable!r} is not in store {self.url}; "
                             f"it holds: {', '.join(self.spec.observables)}")
        return observable

    def committed_shards(self, checkpoint: str | None = None) -> set[int]:
        """Shards whose rows are committed: compacted into samples.parquet or in commits/."""
        name = self.checkpoint(checkpoint)
        return self._uncompacted(name) | set().union(*compacted_shards(self._meta, name).values())

    def _uncompacted(self, name: str) -> set[int]:
        """Committed shards still in commits/ (listed once per open or refresh)."""
        if name not in self._parts:
            compacted = set().union(*compacted_shards(self._meta, name).values())
            self._parts[name] = self._files.committed_parts(name) - compacted
        return set(self._parts[name])

    def stored_shards(self, checkpoint: str | None, observable: str) -> set[int]:
        """Shards of an array whose zarr shard object exists (listed once per open or refresh)."""
        name, obs = self.checkpoint(checkpoint), self.check_observable(observable)
        if (name, obs) not in self._stored:
            chunks = f"{layout.GRADS}/{layout.array_path(name, obs)}/c"  # default chunk key encoding
            self._files.forget_listing(chunks)
            try:
                keys = self._files.fs.find(self._files.path(chunks))
            except FileNotFoundError:
                keys = []
            base = self._files.path(chunks) + "/"
            self._stored[(name, obs)] = {
                int(rel.split("/", 1)[0]) for rel in (k[len(base):] for k in keys if k.startswith(base))
                if rel.split("/", 1)[0].isdigit() and not posixpath.basename(rel).startswith(".")}
        return set(self._stored[(name, obs)])

    def missing_data(self, checkpoint: str | None = None) -> dict[str, list[int]]:
        """Observable -> committed shards whose gradient data is not in grads.zarr (deleted)."""
        name = self.checkpoint(checkpoint)
        committed = self.committed_shards(name)
        missing = {obs: sorted(committed - self.stored_shards(name, obs)) for obs in self.observables}
        return {obs: shards for obs, shards in missing.items() if shards}

    def partial(self, checkpoint: str | None = None) -> dict[str, int] | None:
        """{"shards_committed", "shards_total"} while not every shard of the checkpoint is
        committed, else None."""
        done = len(self.committed_shards(checkpoint))
        return None if done >= self.spec.n_shards else {"shards_committed": done, "shards_total": self.spec.n_shards}

    def check_complete(self, checkpoint: str | None = None) -> None:
        """InputError (how many shards are committed, how to resume) while the checkpoint's
        shards are not all committed, unless the store was opened with ``allow_partial``."""
        name = self.checkpoint(checkpoint)
        partial = None if self.allow_partial else self.partial(name)
        if partial is not None:
            path = self._meta["checkpoints"][name].get("path", name)
            raise InputError(
                f"store {self.url}, checkpoint {name}: only {partial['shards_committed']} of "
                f"{partial['shards_total']} shards are committed (its `gradlake grads` did not finish); resume "
                f"it with the same command (`gradlake grads --data {self.spec.dataset.get('url', '...')} "
                f"--checkpoint {path} --out {self.url} ...`; committed shards are kept), or answer from the "
                f"committed shards with `query`/`topk --allow-partial`")

    def is_complete(self, checkpoint: str | None = None) -> bool:
        """Every shard committed, and its data in every array (see :meth:`missing_data`)."""
        return len(self.committed_shards(checkpoint)) == self.spec.n_shards and not self.missing_data(checkpoint)

    # The samples table.
    def samples(self, checkpoint: str | None = None, where: str | pc.Expression | None = None,
                *, classes=None, splits=None, trajectories=None, t_min=None, t_max=None,
                shards: tuple[int, int] | None = None, columns: list[str] | None = None) -> pa.Table:
        """Committed samples of one checkpoint, sorted by row, filtered.

        Columns: row, trajectory, t, class, split, shard, loss, norm_<obs>..., checkpoint.
        ``where`` is a pyarrow expression or a string in the language of store.filters.
        ``shards`` = [first, stop) reads only the files holding those shards (a part of a
        large store costs the part, not a look at every file). Refused on a checkpoint whose
        shards are not all committed (:meth:`check_complete`).
        """
        name = self.checkpoint(checkpoint)
        self.check_complete(name)
        schema = self._samples_dataset_schema()
        if isinstance(where, str):
            where = filters.parse_where(where, schema)
        expr = filters.combine(
            where, filters.select(classes, splits, trajectories, t_min, t_max)
        )
        groups = compacted_shards(self._meta, name)
        parts = sorted(self._uncompacted(name))
        if shards is not None:
            first, stop = shards
            expr = filters.combine(expr, (pc.field("shard") >= first) & (pc.field("shard") < stop))
            groups = {g: held for g, held in groups.items() if any(first <= s < stop for s in held)}
            parts = [s for s in parts if first <= s < stop]
        compacted = set().union(*groups.values())
        tables = []
        if groups:  # a file may hold shards its record does not list yet (compaction cut short)
            paths = [layout.samples_file(name, g) for g in sorted(groups)]
            tables.append(self._scan(paths, name, filters.combine(expr, pc.field("shard").isin(sorted(compacted)))))
        if parts:
            tables.append(self._scan([layout.commit_part(name, s) for s in parts], name, expr))
        table = pa.concat_tables(tables).sort_by("row") if tables else schema.empty_table()
        if not tables and expr is not None:
            table = table.filter(expr)
        return table.select(columns or schema.names)

    def _scan(self, rel_paths: list[str], checkpoint: str, expr: pc.Expression | None) -> pa.Table:
        """The rows of Parquet files matching ``expr``; GradlakeError naming a damaged file."""
        try:
            return self._parquet(rel_paths, checkpoint).to_table(filter=expr)
        except (pa.ArrowException, OSError):
            from gradlake.store.footers import parquet_problem

            for path in rel_paths:
                problem = parquet_problem(self, path, ())
                if problem is not None:
                    raise GradlakeError(
                        f"store {self.url}: {path} {problem}; the store is damaged: `gradlake repair {self.url}` "
                        "drops it, then a resumed `gradlake grads` recomputes its shards") from None
            raise

    def _parquet(self, rel_paths: list[str], checkpoint: str) -> pads.Dataset:
        """Parquet files of one checkpoint as a dataset with its ``checkpoint`` column."""
        return pads.FileSystemDataset.from_paths(
            [self._files.path(p) for p in rel_paths], schema=self._samples_dataset_schema(),
            format=pads.ParquetFileFormat(), filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(self._files.fs)),
            partitions=[pc.field("checkpoint") == checkpoint] * len(rel_paths))

    def _samples_dataset_schema(self) -> pa.Schema:
        return samples_schema(self.spec.observables).append(pa.field("checkpoint", pa.string()))

    def rows(self, checkpoint: str | None = None, where: str | pc.Expression | None = None,
             **selection) -> np.ndarray:
        """Sorted rows of the committed samples matching the filter."""
        table = self.samples(checkpoint, where, columns=["row"], **selection)
        return table.column("row").to_numpy().astype(np.int64)

    # The gradients.
    def read(self, checkpoint: str | None, observable: str, rows=None, as_torch: bool = False,
             dtype=np.float32):
        """φ rows of one checkpoint/observable as float32 [n, k] ([n, probes, k] for V).

        ``rows`` are sample rows in any order (None -> every committed sample, sorted).
        ``dtype`` = the store's dtype (float16) returns the stored values, not cast.
        """
        name, rows = self._prepare(checkpoint, observable, rows)
        return _as(self._read_rows(name, observable, rows, dtype), as_torch)

    def iter_blocks(self, checkpoint: str | None, observable: str, rows=None,
                    block_rows: int = 4096, as_torch: bool = False) -> Iterator[tuple[np.ndarray, Any]]:
        """(rows, φ) in blocks of at most ``block_rows`` rows, in the order of ``rows``."""
        if block_rows <= 0:
            raise InputError(f"block_rows: expected an int > 0, got {block_rows}")
        name, rows = self._prepare(checkpoint, observable, rows)
        self._load_indices(name, observable, rows)
        for start in range(0, len(rows), block_rows):
            block = rows[start:start + block_rows]
            yield block, _as(self._read_rows(name, observable, block), as_torch)

    def load_indices(self, checkpoint: str | None, observable: str, rows) -> None:
        """Fetch the chunk indices of the shards holding ``rows`` at once (concurrent reads on
        object stores), so reads of them that follow make one request per run of chunks."""
        name, rows = self._prepare(checkpoint, observable, rows)
        self._load_indices(name, observable, rows)

    def _load_indices(self, name: str, observable: str, rows: np.ndarray) -> None:
        self._reader(name, observable).load_indices(distinct(self.spec.shard_of(rows)))

    def _prepare(self, checkpoint, observable, rows):
        name = self.checkpoint(checkpoint)
        self.check_observable(observable)
        if rows is None:
            rows = self.rows(name)
        else:
            rows = np.asarray(rows, dtype=np.int64).reshape(-1)
            self._check_rows(name, rows)
        return name, rows

    def _reader(self, name: str, observable: str) -> ShardReader:
        if (name, observable) not in self._readers:
            rel = f"{layout.GRADS}/{layout.array_path(name, observable)}"
            self._readers[name, observable] = ShardReader(
                self._files.open_array(name, observable), self._files.fs, self._files.path(rel),
                self._files.join_url(rel))
        return self._readers[name, observable]

    def _check_rows(self, name: str, rows: np.ndarray) -> None:
        if len(rows) == 0:
            return
        if rows.min() < 0 or rows.max() >= self.spec.n_rows:
            bad = rows[(rows < 0) | (rows >= self.spec.n_rows)][0]
            raise InputError(f"row {bad}: out of range; store {self.url} has rows 0..{self.spec.n_rows - 1}")
        shards = distinct(self.spec.shard_of(rows))
        missing = np.setdiff1d(shards, sorted(self.committed_shards(name)))
        if len(missing):
            raise GradlakeError(
                f"store {self.url}, checkpoint {name}: shard {missing[0]} (rows "
                f"{'..'.join(map(str, self.spec.shard_range(int(missing[0]))))}) is not committed; "
                f"{len(missing)} shard(s) of the requested rows are missing; re-run `gradlake grads`"
            )

    def _unwritten(self, name: str, observable: str, rows: np.ndarray) -> GradlakeError:
        """The error for rows read as fill (NaN): their shard's data object is missing
        (GradlakeError naming it), or they are not held by the store (InputError)."""
        lost = np.setdiff1d(np.unique(self.spec.shard_of(rows)), sorted(self.stored_shards(name, observable)))
        if len(lost):
            shard = int(lost[0])
            start, stop = self.spec.shard_range(shard)
            return GradlakeError(
                f"store {self.url}, checkpoint {name}, array {layout.GRADS}/"
                f"{layout.array_path(name, observable)}: the data of committed shard {shard} (rows "
                f"{start}..{stop - 1}) is missing from storage ({len(lost)} shard(s) of the requested "
                f"rows); the store is damaged, recompute it into a new store URL"
            )
        return InputError(
            f"rows {rows[:5].tolist()}{'...' if len(rows) > 5 else ''}: not held by store "
            f"{self.url} (it holds splits {', '.join(self.spec.splits)})"
        )

    def _read_rows(self, name: str, observable: str, rows: np.ndarray, dtype=np.float32) -> np.ndarray:
        if len(rows) == 0:
            return np.zeros((0, *self.spec.row_shape(observable)), dtype=dtype)
        increasing = bool(np.all(rows[1:] > rows[:-1]))
        unique, inverse = (rows, None) if increasing else np.unique(rows, return_inverse=True)
        data = self._reader(name, observable).read(unique, dtype)
        if inverse is not None:
            data = data[inverse]
        # Written rows are finite (the writer refuses others), unwritten ones all fill (NaN):
        # one value per row tells them apart.
        unwritten = np.isnan(data.reshape(len(rows), -1)[:, 0])
        if unwritten.any():
            raise self._unwritten(name, observable, rows[unwritten]) from None
        return data

    def summary(self) -> dict[str, Any]:
        """N, k, dtype, shards done / total per checkpoint (complete only when every sample
        file's footer reads and every data object is there), bytes on storage, provenance."""
        from gradlake.store.footers import check_parquet

        checkpoints = {}
        unreadable = check_parquet(self)  # footers: the commits counted are readable
        for name, info in self._meta["checkpoints"].items():
            done = len(self.committed_shards(name))
            missing = self.missing_data(name)
            damaged = [str(f) for f in unreadable if f.checkpoint == name]
            checkpoints[name] = {"shards_done": done, "shards_total": self.spec.n_shards,
                                 "complete": done == self.spec.n_shards and not missing and not damaged,
                                 "missing_data": missing, "damaged": damaged, "sha256": info["sha256"]}
        return {
            "url": self.url,
            "n_rows": self.spec.n_rows,
            "n_samples": self.spec.n_samples,
            "k": self.spec.k,
            "dtype": self.spec.dtype,
            "observables": self.observables,
            "probes": self.spec.probes,
            "splits": list(self.spec.splits),
            "checkpoints": checkpoints,
            "bytes": int(self._files.fs.du(self._files.root)),
            "stages": copy.deepcopy(self._meta.get("stages", {})),
            "provenance": {key: copy.deepcopy(self._meta[key]) for key in
                           ("gradlake_version", "created") if key in self._meta}
            | {"dataset": self.spec.dataset, "model": self.spec.model,
               "projector": self.spec.projector},
        }


def _as(array: np.ndarray, as_torch: bool):
    if not as_torch:
        return array
    import torch

    return torch.from_numpy(array)
