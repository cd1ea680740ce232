"""Whole zarr shards of a gradient array: encoded by zarr in a single put, read back in
few large ranged reads.

Each gradlake shard is exactly one zarr shard of every array, written whole by its one
writer. zarr 3.1 reads a shard before writing into it, so instead of writing through the
array, zarr encodes the shard into an in-memory store that holds a one-shard copy of the
array (the array's own metadata: every codec as declared), and that one object is then
uploaded under the array's key for the shard: one write, no read, and no encoding here.
Reads decode the same plain layout directly (:class:`ShardReader`); plain zarr reads it too.

Why by hand, and until when: zarr 3.1 reads a shard before writing into it and reads each
chunk of a partial-shard read with its own request, at several times the CPU per byte, which
bounds a streamed pass on few cores (benchmarks/bench_query.py measures it). Newer zarr
releases coalesce partial-shard reads and write full shards without reading; when the
package index serves one, measure it against :class:`ShardReader` with bench_query.py and drop
whichever loses. Until then pyproject.toml bounds zarr to 3.1.x, the layout this decoder is
tested against (tests/store/test_store_zarr_shard.py).
"""

from __future__ import annotations

import google_crc32c
import numpy as np
import zarr
from zarr.storage import MemoryStore, StorePath

from gradlake.casting import cast_into
from gradlake.errors import GradlakeError


class ShardEncoder:
    """Encodes whole shards (along the first axis) of one sharded zarr v3 array."""

    def __init__(self, array: zarr.Array, where: str):
        shards = array.shards
        if shards is None or tuple(shards[1:]) != tuple(array.shape[1:]):
            raise GradlakeError(f"{where}: expected an array sharded along its first axis only, "
                                f"got shards {shards} for shape {array.shape}")
        self.shard_rows = int(shards[0])
        self._metadata = array.metadata
        self._one_shard = {**array.metadata.to_dict(), "shape": list(shards)}

    def key(self, shard: int) -> str:
        """The array-relative key of shard ``shard`` (the array's chunk key encoding)."""
        return self._metadata.encode_chunk_key((shard,) + (0,) * (len(self._one_shard["shape"]) - 1))

    def encode(self, block: np.ndarray) -> np.ndarray:
        """The bytes (uint8) of one shard holding ``block`` as its first rows; rows past it
        are not stored (the array's edge). Every chunk of ``block`` is stored, fill or not."""
        if not 0 < len(block) <= self.shard_rows:
            raise GradlakeError(f"a shard holds 1..{self.shard_rows} rows, got {len(block)}")
        objects: dict = {}
        shard = zarr.Array.from_dict(StorePath(MemoryStore(objects)), self._one_shard)
        with zarr.config.set({"array.write_empty_chunks": True}):  # no fill scan of every chunk
            shard[:len(block)] = block
        key = self._metadata.encode_chunk_key((0,) * len(self._one_shard["shape"]))
        return objects[key].as_numpy_array()


MISSING = 2**64 - 1  # offset and length of a chunk that a shard does not store


class ShardReader:
    """Reads whole rows of one sharded zarr v3 array straight from its shard objects.

    It decodes the codec chain gradlake writes (sharding_indexed along the first axis; inner
    chunks ``bytes`` (little endian) with an optional ``crc32c``; the index ``bytes`` +
    ``crc32c`` at either end). A read fetches each shard's index once, then every run of
    adjacent chunks it needs with one ranged read (all of a call's reads together: concurrent
    on object stores), verifies the checksums and casts to the dtype asked for in one pass. zarr's
    generic path makes one request per chunk and costs several times more CPU per byte,
    which bounds a streamed pass on few cores. Chunks or shards not stored read as NaN.
    """

    def __init__(self, array: zarr.Array, fs, root: str, where: str):
        codecs = array.metadata.to_dict()["codecs"]
        config = codecs[0]["configuration"] if len(codecs) == 1 else {}
        inner = [c["name"] for c in config.get("codecs", ())]
        index = [c["name"] for c in config.get("index_codecs", ())]
        little = all(c.get("configuration", {}).get("endian", "little") == "little"
                     for c in (*config.get("codecs", ()), *config.get("index_codecs", ())) if c["name"] == "bytes")
        shards, chunks = array.shards, tuple(config.get("chunk_shape", ()))
        if (codecs[0]["name"] != "sharding_indexed" or inner not in (["bytes"], ["bytes", "crc32c"])
                or index not in (["bytes"], ["bytes", "crc32c"]) or not little or shards is None
                or tuple(shards[1:]) != tuple(array.shape[1:]) or chunks[1:] != tuple(array.shape[1:])):
            raise GradlakeError(f"{where}: codecs {codecs} are not the plain sharded layout gradlake "
                                "writes; recompute the store with this gradlake")
        self.where, self.fs, self.root = where, fs, root.rstrip("/")
        self._metadata = array.metadata
        self.dtype = np.dtype(array.dtype).newbyteorder("<")
        self.row_shape = tuple(array.shape[1:])
        self.n_rows, self.shard_rows, self.chunk_rows = int(array.shape[0]), int(shards[0]), int(chunks[0])
        self.chunks_per_shard = self.shard_rows // self.chunk_rows
        self._chunk_crc = inner[-1] == "crc32c"
        self._index_crc = index[-1] == "crc32c"
        self._index_at_end = config.get("index_location", "end") == "end"
        self._chunk_bytes = self.chunk_rows * int(np.prod(self.row_shape)) * self.dtype.itemsize
        self._index: dict[int, np.ndarray | None] = {}  # shard -> [chunks, 2] (offset, nbytes); None: absent

    def path(self, shard: int) -> str:
        key = self._metadata.encode_chunk_key((shard,) + (0,) * len(self.row_shape))
        return f"{self.root}/{key}"

    def read(self, rows: np.ndarray, dtype=np.float32) -> np.ndarray:
        """[len(rows), *row_shape] of sorted, unique ``rows`` in ``dtype`` (NaN where not stored)."""
        out = np.empty((len(rows), *self.row_shape), dtype=dtype)
        chunks = distinct(rows // self.chunk_rows)
        data = self._fetch(chunks)
        starts = np.searchsorted(rows, np.append(chunks, chunks[-1] + 1) * self.chunk_rows) if len(chunks) else []
        for chunk, lo, hi in zip(chunks, starts[:-1], starts[1:]):
            if (values := data.get(int(chunk))) is None:
                out[lo:hi] = np.nan
                continue
            local = rows[lo:hi] - int(chunk) * self.chunk_rows
            if local[-1] - local[0] == hi - lo - 1:  # a run of rows: a slice, no gather
                cast_into(out[lo:hi], values[local[0]:local[-1] + 1])
            else:
                cast_into(out[lo:hi], values[local])
        return out

    def _fetch(self, chunks: np.ndarray) -> dict[int, np.ndarray]:
        """Chunk -> its values (float16 view of the fetched bytes), checksums verified."""
        self.load_indices(distinct(chunks // self.chunks_per_shard))
        runs = []  # (shard, first byte, end byte, [(chunk, offset, nbytes)])
        for chunk in map(int, chunks):
            shard, within = divmod(chunk, self.chunks_per_shard)
            index = self._index[shard]
            if index is None or index[within, 0] == MISSING:
                continue
            offset, nbytes = map(int, index[within])
            if runs and runs[-1][0] == shard and runs[-1][2] == offset:
                runs[-1][2] = offset + nbytes
                runs[-1][3].append((chunk, offset, nbytes))
            else:
                runs.append([shard, offset, offset + nbytes, [(chunk, offset, nbytes)]])
        blobs = self._cat([(self.path(s), a, b) for s, a, b, _ in runs])
        out = {}
        for (shard, first, _, members), blob in zip(runs, blobs):
            for chunk, offset, nbytes in members:
                raw = np.frombuffer(blob, np.uint8, nbytes, offset - first)
                if self._chunk_crc:
                    raw = self._verified(raw, lambda: self._chunk_error(chunk))
                if len(raw) != self._chunk_bytes:
                    raise self._chunk_error(chunk, f"{len(raw)} bytes, expected {self._chunk_bytes}")
                out[chunk] = raw.view(self.dtype).reshape(self.chunk_rows, *self.row_shape)
        return out

    def load_indices(self, shards) -> None:
        """Fetch the chunk indices of ``shards`` not yet known, in one batch of reads."""
        shards = [int(s) for s in shards if int(s) not in self._index]
        entries = self.chunks_per_shard * 2 * 8
        size = entries + 4 * self._index_crc
        blobs = self._cat([(self.path(s), -size if self._index_at_end else 0, None if self._index_at_end else size)
                           for s in shards], missing_ok=True)
        for shard, blob in zip(shards, blobs):
            if blob is None:
                self._index[shard] = None
                continue
            if len(blob) != size:
                raise GradlakeError(f"{self.where}: shard {shard} is truncated ({len(blob)} bytes of index, "
                                    f"expected {size}); the store is damaged, recompute it into a new store URL")
            raw = np.frombuffer(blob, np.uint8)
            if self._index_crc:
                raw = self._verified(raw, lambda: GradlakeError(
                    f"checksum error in {self.where}: the chunk index of shard {shard} is corrupt"))
            self._index[shard] = raw.view("<u8").reshape(self.chunks_per_shard, 2)

    def _cat(self, reads: list[tuple[str, int, int | None]], missing_ok: bool = False) -> list:
        """Bytes of each (path, start, end) read, all in one call; None for absent objects."""
        if not reads:
            return []
        paths, starts, ends = zip(*reads)
        results = self.fs.cat_ranges(list(paths), list(starts), list(ends), on_error="return")
        for i, result in enumerate(results):
            if isinstance(result, FileNotFoundError) and missing_ok:
                results[i] = None
            elif isinstance(result, BaseException):
                raise result
        return results

    @staticmethod
    def _verified(raw: np.ndarray, error) -> np.ndarray:
        """``raw`` without its trailing crc32c, or ``error()`` raised when it does not match."""
        body = raw[:-4]
        if google_crc32c.value(body) != int.from_bytes(raw[-4:].tobytes(), "little"):
            raise error()
        return body

    def _chunk_error(self, chunk: int, why: str = "its crc32c does not match") -> GradlakeError:
        start = chunk * self.chunk_rows
        stop = min(start + self.chunk_rows, self.n_rows)
        return GradlakeError(f"checksum error in {self.where}: chunk {chunk} (rows {start}..{stop - 1}, "
                             f"shard {chunk // self.chunks_per_shard}) is corrupt: {why}")


def distinct(values: np.ndarray) -> np.ndarray:
    """np.unique(values); on sorted input (every read of a pass) without hashing or sorting."""
    values = np.asarray(values)
    if len(values) and bool(np.all(values[1:] >= values[:-1])):
        return values[np.r_[True, values[1:] != values[:-1]]]
    return np.unique(values)
