"""Shards encoded through zarr's in-memory store are zarr's own bytes, for any codecs; the
direct reader returns exactly what zarr reads from them."""

import os

import fsspec
import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ShardingCodec, BytesCodec, ZstdCodec

from gradlake.errors import GradlakeError
from gradlake.store.zarr_shard import ShardEncoder, ShardReader


def _array(path, n_rows, row_shape, **codecs):
    return zarr.create_array(str(path), shape=(n_rows, *row_shape), dtype="float16",
                             chunks=(4, *row_shape), shards=(16, *row_shape), fill_value=np.nan, **codecs)


@pytest.mark.parametrize("row_shape, n_rows, shard", [((6,), 40, 1), ((3, 5), 40, 0), ((6,), 37, 2), ((6,), 33, 2)])
@pytest.mark.parametrize("codecs", [{"compressors": [Crc32cCodec()]}, {},  # the store's; zarr's default
                                    {"compressors": [ZstdCodec(level=3), Crc32cCodec()]}])
def test_encoded_shard_equals_zarrs_bytes(tmp_path, row_shape, n_rows, shard, codecs):
    reference = _array(tmp_path / "by-zarr", n_rows, row_shape, **codecs)
    start, stop = shard * 16, min((shard + 1) * 16, n_rows)
    block = np.random.default_rng(shard).standard_normal((stop - start, *row_shape)).astype(np.float16)
    reference[start:stop] = block
    encoder = ShardEncoder(reference, "by-zarr")
    key = encoder.key(shard)
    assert (tmp_path / "by-zarr" / key).read_bytes() == encoder.encode(block).tobytes()

    mine = _array(tmp_path / "by-gradlake", n_rows, row_shape, **codecs)
    (tmp_path / "by-gradlake" / key).parent.mkdir(parents=True)
    (tmp_path / "by-gradlake" / key).write_bytes(ShardEncoder(mine, "by-gradlake").encode(block))
    np.testing.assert_array_equal(mine[start:stop], block)


def test_another_shard_layout_is_read_by_zarr(tmp_path):
    """Index at the start, blosc inside: written from the array's metadata, read by zarr."""
    sharding = ShardingCodec(chunk_shape=(4, 6), codecs=[BytesCodec(), BloscCodec(cname="lz4")],
                             index_location="start")
    array = zarr.create_array(str(tmp_path / "a"), shape=(40, 6), dtype="float32", chunks=(16, 6),
                              serializer=sharding, compressors=None, fill_value=np.nan)
    block = np.arange(16 * 6, dtype=np.float32).reshape(16, 6)
    encoder = ShardEncoder(array, "a")
    (tmp_path / "a" / "c" / "1").mkdir(parents=True)
    (tmp_path / "a" / encoder.key(1)).write_bytes(encoder.encode(block))
    np.testing.assert_array_equal(array[16:32], block)
    assert np.isnan(array[:16]).all()


def test_unsharded_or_column_sharded_arrays_are_refused(tmp_path):
    plain = zarr.create_array(str(tmp_path / "p"), shape=(8, 4), dtype="float16", chunks=(2, 4))
    with pytest.raises(GradlakeError, match="sharded along its first axis"):
        ShardEncoder(plain, "p")
    columns = zarr.create_array(str(tmp_path / "c"), shape=(8, 4), dtype="float16", chunks=(2, 2), shards=(4, 2))
    with pytest.raises(GradlakeError, match="sharded along its first axis"):
        ShardEncoder(columns, "c")


def _reader(path, array):
    return ShardReader(array, fsspec.filesystem("file"), str(path), "a")


@pytest.mark.parametrize("index_location", ["end", "start"])
@pytest.mark.parametrize("checksum", [True, False])
@pytest.mark.parametrize("row_shape", [(6,), (2, 3)])
def test_reader_equals_zarr(tmp_path, index_location, checksum, row_shape):
    """Any rows (runs, gathers, across shards, the edge shard, a shard not written) as zarr reads them."""
    sharding = ShardingCodec(chunk_shape=(4, *row_shape), index_location=index_location,
                             codecs=[BytesCodec(), *([Crc32cCodec()] if checksum else [])])
    array = zarr.create_array(str(tmp_path / "a"), shape=(45, *row_shape), dtype="float16",
                              chunks=(16, *row_shape), serializer=sharding, compressors=None, fill_value=np.nan)
    values = np.random.default_rng(0).standard_normal((45, *row_shape)).astype(np.float16)
    array[:32] = values[:32]
    array[40:] = values[40:]  # the edge shard: rows 32..39 never written (chunks absent)
    reader = _reader(tmp_path / "a", array)
    expected = array[...].astype(np.float32)
    for rows in (np.arange(45), np.arange(3, 29), np.array([0, 5, 6, 7, 17, 30, 41, 44]), np.array([44])):
        np.testing.assert_array_equal(reader.read(rows), expected[rows])
    assert np.isnan(reader.read(np.arange(32, 40))).all()
    os.remove(reader.path(1))  # a shard object not there: fill, as zarr reads it
    assert np.isnan(_reader(tmp_path / "a", array).read(np.arange(16, 32))).all()


def _store_like(path):
    """An array with the store's codecs (crc32c inside, index at the end), every shard written."""
    array = zarr.create_array(str(path), shape=(32, 6), dtype="float16", chunks=(4, 6), shards=(16, 6),
                              compressors=[Crc32cCodec()], fill_value=np.nan)
    array[...] = np.arange(32 * 6, dtype=np.float16).reshape(32, 6)
    return array, path / "c" / "1" / "0"


def test_reader_names_a_corrupt_chunk_index_or_truncated_shard(tmp_path):
    array, shard = _store_like(tmp_path / "a")
    good = shard.read_bytes()
    chunk_bytes = 4 * 6 * 2 + 4
    for flip, match in ((2 * chunk_bytes + 3, r"chunk 6 \(rows 24\.\.27, shard 1\) is corrupt"),
                        (len(good) - 10, "the chunk index of shard 1 is corrupt")):
        data = bytearray(good)
        data[flip] ^= 0x10
        shard.write_bytes(bytes(data))
        with pytest.raises(GradlakeError, match=match):
            _reader(tmp_path / "a", array).read(np.arange(32))
        np.testing.assert_array_equal(_reader(tmp_path / "a", array).read(np.arange(16)), array[:16])
    shard.write_bytes(good[-20:])
    with pytest.raises(GradlakeError, match="shard 1 is truncated"):
        _reader(tmp_path / "a", array).read(np.arange(32))


def test_reader_refuses_codecs_it_does_not_decode(tmp_path):
    compressed = zarr.create_array(str(tmp_path / "z"), shape=(32, 6), dtype="float16", chunks=(4, 6),
                                   shards=(16, 6), compressors=[ZstdCodec(level=3)])
    with pytest.raises(GradlakeError, match="not the plain sharded layout"):
        _reader(tmp_path / "z", compressed)
    plain = zarr.create_array(str(tmp_path / "p"), shape=(8, 4), dtype="float16", chunks=(2, 4))
    with pytest.raises(GradlakeError, match="not the plain sharded layout"):
        _reader(tmp_path / "p", plain)
