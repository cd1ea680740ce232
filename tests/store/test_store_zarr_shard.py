"""Shards encoded by gradlake are byte-identical to zarr's own, and zarr reads them."""

import numpy as np
import pytest
import zarr
from zarr.codecs import Crc32cCodec

from gradlake.errors import GradlakeError
from gradlake.store.zarr_shard import check_array, encode_shard, shard_key


@pytest.mark.parametrize("row_shape, n_rows, shard", [((6,), 40, 1), ((3, 5), 40, 0), ((6,), 37, 2), ((6,), 33, 2)])
def test_encoded_shard_equals_zarrs_bytes(tmp_path, row_shape, n_rows, shard):
    shard_rows, chunk_rows = 16, 4
    make = lambda name: zarr.create_array(  # noqa: E731 -- the store's array settings
        str(tmp_path / name), shape=(n_rows, *row_shape), dtype="float16",
        chunks=(chunk_rows, *row_shape), shards=(shard_rows, *row_shape),
        compressors=[Crc32cCodec()], fill_value=np.nan)
    reference = make("by-zarr")
    start, stop = shard * shard_rows, min((shard + 1) * shard_rows, n_rows)
    block = np.random.default_rng(shard).standard_normal((stop - start, *row_shape)).astype(np.float16)
    reference[start:stop] = block
    key = shard_key(shard, 1 + len(row_shape))
    expected = (tmp_path / "by-zarr" / key).read_bytes()
    ours = b"".join(encode_shard(block, chunk_rows, shard_rows))
    assert ours == expected
    mine = make("by-gradlake")
    (tmp_path / "by-gradlake" / key).parent.mkdir(parents=True)
    (tmp_path / "by-gradlake" / key).write_bytes(ours)
    np.testing.assert_array_equal(mine[start:stop], block)
    check_array(mine.metadata.to_dict(), (chunk_rows, *row_shape), "by-gradlake")


def test_an_array_with_another_encoding_is_refused(tmp_path):
    other = zarr.create_array(str(tmp_path / "a"), shape=(8, 4), dtype="float16", chunks=(2, 4),
                              shards=(4, 4))  # zarr's default compressor, no checksum
    with pytest.raises(GradlakeError, match="not the store's"):
        check_array(other.metadata.to_dict(), (2, 4), "a")
