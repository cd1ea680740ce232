"""Shards encoded through zarr's in-memory store are zarr's own bytes, for any codecs."""

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ShardingCodec, BytesCodec, ZstdCodec

from gradlake.errors import GradlakeError
from gradlake.store.zarr_shard import ShardEncoder


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
