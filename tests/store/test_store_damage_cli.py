"""A damaged store through the CLI: one line naming what is wrong, never a wrong answer."""

import os

import numpy as np
import pytest

from gradlake.cli import main
from gradlake.store import create_store
from test_store_io import CKPT, SPLITS, STEPS, fill, make_spec


@pytest.fixture()
def store(tmp_path):
    url = str(tmp_path / "store")
    spec, held = make_spec(shard_rows=16)
    create_store(url, spec, CKPT)
    fill(url, spec, held)
    return url


def run(capsys, *argv):
    """(exit code, stdout, stderr) of one in-process CLI call."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


COMMANDS = {
    "info": lambda url, tmp: ["info", url],
    "query": lambda url, tmp: ["query", url, "--observable", "V", "--out", str(tmp / "q.npy")],
    "topk": lambda url, tmp: ["topk", url, "--query-where", "split == 'test'", "--k", "2", "--pair", "CC",
                              "--lambda", "0.1"],
    "reduce": lambda url, tmp: ["reduce", url, "--pairs", "CC"],
}


@pytest.mark.parametrize("command", ["query", "topk", "reduce"])
def test_a_deleted_grads_shard_is_named_not_read_as_nan(store, tmp_path, capsys, command):
    os.remove(os.path.join(store, "grads.zarr", "epoch-1", "V", "c", "1", "0", "0"))
    code, out, err = run(capsys, *COMMANDS[command](store, tmp_path))
    assert code == 1 and not out.strip() and len(err.strip().splitlines()) == 1, (out, err)
    assert "checkpoint epoch-1, array grads.zarr/epoch-1/V: the data of committed shard 1 (rows 16..31)" in err
    assert not (tmp_path / "q.npy").exists()


def test_info_does_not_call_a_damaged_store_complete(store, tmp_path, capsys):
    code, out, _ = run(capsys, "info", store)
    assert code == 0 and "epoch-1: shards 4/4 complete" in out
    os.remove(os.path.join(store, "grads.zarr", "epoch-1", "C", "c", "3", "0"))
    code, out, _ = run(capsys, "info", store)
    assert code == 0 and "epoch-1: shards 4/4 INCOMPLETE" in out
    assert "DAMAGED: grads.zarr/epoch-1/C has no data for committed shard(s) 3" in out


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("content", [b"", b'{"format": "gradlake-store", "spec": {"k"'])
def test_an_empty_or_truncated_store_json_is_one_line_exit_2(store, tmp_path, capsys, command, content):
    with open(os.path.join(store, "store.json"), "wb") as f:
        f.write(content)
    code, out, err = run(capsys, *COMMANDS[command](store, tmp_path))
    assert code == 2 and len(err.strip().splitlines()) == 1, (out, err)
    assert "store.json: not valid JSON (empty or truncated?)" in err and "Traceback" not in err


def test_topk_of_the_undamaged_store_runs(store, tmp_path, capsys):
    code, out, _ = run(capsys, *COMMANDS["topk"](store, tmp_path))
    queries = np.sum(SPLITS == 'test') * STEPS
    lines = out.strip().splitlines()
    assert lines[0].startswith("checkpoint ")  # what the listing is: checkpoint, pair, normalisation
    assert code == 0 and len(lines) - 1 == queries * 2 * 2  # top and bottom 2 each
