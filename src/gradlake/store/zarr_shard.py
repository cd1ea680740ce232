"""Encoding one whole zarr v3 shard of a gradient array, written in a single put.

Each gradlake shard is exactly one zarr shard, written whole by its one writer, so the
shard's bytes are built here directly instead of through zarr's read-modify-write path
(zarr 3.1 reads a shard before writing it). The encoding is the one the arrays declare
(see :data:`CODECS`): ``sharding_indexed`` with inner codecs ``bytes`` (little endian) +
``crc32c``, the chunk index at the end with ``bytes`` + ``crc32c``. Plain zarr reads it;
tests compare these bytes with zarr's own.
"""

from __future__ import annotations

import struct

import google_crc32c
import numpy as np

from gradlake.errors import GradlakeError
from gradlake.store.spec import json_normal

EMPTY = 2**64 - 1  # index entry of a chunk that is not stored

_INNER = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]


def expected_codecs(chunk_shape: tuple[int, ...]) -> list[dict]:
    """The codec chain (as zarr.json holds it) that :func:`encode_shard` writes."""
    return [{"name": "sharding_indexed",
             "configuration": {"chunk_shape": list(chunk_shape), "codecs": _INNER,
                               "index_codecs": _INNER, "index_location": "end"}}]


def check_array(metadata: dict, chunk_shape: tuple[int, ...], where: str) -> None:
    """GradlakeError unless an array's zarr.json declares exactly the encoding written here."""
    codecs = json_normal(metadata.get("codecs"))
    key = json_normal(metadata.get("chunk_key_encoding"))
    if codecs != expected_codecs(chunk_shape) or key != {"name": "default", "configuration": {"separator": "/"}}:
        raise GradlakeError(f"{where}: array encoding {codecs} / {key} is not the store's; "
                            "this store was not written by a compatible gradlake")


def shard_key(shard: int, ndim: int) -> str:
    """Key of shard ``shard`` (along rows) inside its array, default chunk-key encoding."""
    return "c/" + "/".join([str(shard)] + ["0"] * (ndim - 1))


def encode_shard(block: np.ndarray, chunk_rows: int, shard_rows: int) -> list:
    """The bytes of one shard holding ``block`` (its first rows; rows past it are not stored),
    as a list of buffers to write one after the other (no joined copy)."""
    valid = block.shape[0]
    data = np.ascontiguousarray(block, dtype=block.dtype.newbyteorder("<"))
    n_chunks = shard_rows // chunk_rows
    index = np.full((n_chunks, *([1] * (block.ndim - 1)), 2), EMPTY, dtype="<u8")
    parts: list = []
    offset = 0
    for chunk in range(n_chunks):
        start = chunk * chunk_rows
        if start >= valid:
            break
        piece = data[start:start + chunk_rows]
        if len(piece) < chunk_rows:  # the array's edge: zarr stores whole chunks, fill-padded
            pad = np.full((chunk_rows - len(piece), *piece.shape[1:]), np.nan, dtype=piece.dtype)
            piece = np.concatenate([piece, pad])
        raw = piece.reshape(-1).view(np.uint8)
        parts += [raw, struct.pack("<I", google_crc32c.value(raw))]
        index[chunk, ...] = (offset, len(raw) + 4)
        offset += len(raw) + 4
    index_bytes = index.tobytes()
    parts += [index_bytes, struct.pack("<I", google_crc32c.value(index_bytes))]
    return parts

