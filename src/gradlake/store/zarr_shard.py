"""One whole zarr shard of a gradient array, encoded by zarr and written in a single put.

Each gradlake shard is exactly one zarr shard of every array, written whole by its one
writer. zarr 3.1 reads a shard before writing into it, so instead of writing through the
array, zarr encodes the shard into an in-memory store that holds a one-shard copy of the
array (the array's own metadata: every codec as declared), and that one object is then
uploaded under the array's key for the shard: one write, no read, and no encoding here.
"""

from __future__ import annotations

import numpy as np
import zarr
from zarr.storage import MemoryStore, StorePath

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
