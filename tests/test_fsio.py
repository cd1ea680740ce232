"""fsio.Folder: files in a folder at any fsspec URL (local disk, memory://, S3 through moto)."""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest
import zarr
from zarr.storage import FsspecStore, LocalStore

from gradlake import fsio


@pytest.fixture(params=["local", "memory", "s3"])
def url_and_options(request, tmp_path):
    """(folder URL, storage options) on each kind of filesystem."""
    if request.param == "local":
        return str(tmp_path / "folder"), None
    if request.param == "memory":
        return f"memory://fsio-test-{uuid.uuid4().hex[:8]}/folder", None
    bucket, options = request.getfixturevalue("s3_bucket")
    return f"{bucket}/runs/folder", options


def test_reads_writes_lists_and_removes(url_and_options):
    url, options = url_and_options
    folder = fsio.Folder(url + "/", options)
    assert folder.url == url and folder.join_url("a/b.json") == f"{url}/a/b.json"
    assert not folder.exists("a/b.json") and folder.ls() == [] and folder.ls("a") == []

    folder.write_json("a/b.json", {"x": 1, "when": np.float32(0.5)})  # str() of what JSON lacks
    folder.write_bytes("a/c.bin", [b"one", b"", b"two"])
    folder.write_bytes("top.bin", b"top")
    assert folder.read_json("a/b.json") == {"x": 1, "when": "0.5"}
    assert folder.read_bytes("a/b.json") == b'{\n  "x": 1,\n  "when": "0.5"\n}'
    assert folder.read_bytes("a/c.bin") == b"onetwo"
    assert sorted(folder.ls()) == ["a", "top.bin"] and sorted(folder.ls("a")) == ["b.json", "c.bin"]

    folder.write_bytes("a/c.bin", b"replaced")
    assert folder.read_bytes("a/c.bin") == b"replaced"
    other = fsio.Folder(url, options)
    assert other.exists("a/c.bin") and other.read_bytes("a/c.bin") == b"replaced"

    folder.remove("top.bin")
    folder.remove("missing.bin")  # nothing there: nothing to do
    assert not folder.exists("top.bin")
    folder.remove("a")
    assert not folder.exists("a/b.json") and folder.ls("a") == []


def test_local_writes_replace_atomically(tmp_path):
    folder = fsio.Folder(f"file://{tmp_path}")
    assert folder.local and folder.path("x/f.bin") == f"{tmp_path}/x/f.bin"
    folder.write_bytes("x/f.bin", b"old")
    folder.write_bytes("x/f.bin", [b"new", b"er"])
    with pytest.raises(TypeError):
        folder.write_bytes("x/f.bin", [b"half", None])  # fails after writing part of the data
    assert (tmp_path / "x" / "f.bin").read_bytes() == b"newer"
    assert os.listdir(tmp_path / "x") == ["f.bin"]  # no temporary files left behind

    (tmp_path / "plain").write_bytes(b"")  # permissions as for any new file (the umask's)
    assert os.stat(tmp_path / "x" / "f.bin").st_mode == os.stat(tmp_path / "plain").st_mode


def test_s3_sees_what_another_instance_wrote(s3_bucket):
    bucket, options = s3_bucket
    url = f"{bucket}/shared"
    reader = fsio.Folder(url, options)
    writer = fsio.Folder(url, {**options, "skip_instance_cache": True})  # its own listing cache
    assert reader.fs is not writer.fs
    writer.write_bytes("sub/a.json", b"{}")
    assert reader.ls("sub") == ["a.json"]  # now cached by the reader's filesystem

    writer.write_bytes("sub/b.json", b"{}")
    assert not reader.fs.exists(reader.path("sub/b.json"))  # the stale listing hides it
    assert reader.exists("sub/b.json")
    assert sorted(reader.ls("sub")) == ["a.json", "b.json"]  # cached again
    writer.write_bytes("sub/c.json", b"{}")
    assert reader.fs.ls(reader.path("sub"), detail=False) == [reader.path("sub/a.json"), reader.path("sub/b.json")]
    assert sorted(reader.ls("sub")) == ["a.json", "b.json", "c.json"]


def test_zarr_store_round_trip(url_and_options):
    url, options = url_and_options
    folder = fsio.Folder(url, options)
    store = folder.zarr_store("data.zarr")
    assert isinstance(store, LocalStore if folder.local else FsspecStore)
    assert folder.zarr_store("data.zarr") is store
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    zarr.open_group(store=store, mode="a").create_array("v", shape=values.shape, dtype=values.dtype)[...] = values

    reading = fsio.Folder(url, options).zarr_store("data.zarr", read_only=True)
    array = zarr.open_array(store=reading, path="v", mode="r")
    np.testing.assert_array_equal(array[...], values)
    with pytest.raises(ValueError):
        array[0, 0] = 1.0
    assert folder.exists("data.zarr/v/zarr.json")


def test_open_output_appears_whole_or_not_at_all(url_and_options):
    url, options = url_and_options
    folder = fsio.Folder(url, options)
    with pytest.raises(RuntimeError):
        with fsio.open_output(folder.join_url("out.bin"), options) as f:
            f.write(b"half")
            raise RuntimeError("interrupted")
    assert not folder.exists("out.bin") and folder.ls() in ([], ["."])
    big = os.urandom(6 << 20)  # more than one S3 multipart part
    with fsio.open_output(folder.join_url("out.bin"), options) as f:
        f.write(big[:1000])
        assert not folder.exists("out.bin")
        f.write(big[1000:])
    assert folder.read_bytes("out.bin") == big and folder.ls() == ["out.bin"]
