"""Outputs that cannot be written, and storage that cannot be reached: one line, exit 2, before any work."""

from __future__ import annotations

import os
import socket
import time

import pytest

from gradlake import fsio
from gradlake.errors import InputError
from test_query import store_url  # noqa: F401  (a module-scoped fixture)

# Root may write into a read-only folder; no one may create files in /proc or /sys.
UNWRITABLE = {"proc": ("/proc/gradlake-out", "cannot write in /proc"),
              "sys": ("/sys/gradlake-out/x", "cannot write in /sys (Permission denied)")}


def _bad_outs(tmp_path):
    """(out, what the line says) for each kind of unwritable output folder."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    return [*UNWRITABLE.values(), (str(blocker), f"{blocker} is a file, not a folder"),
            (f"{blocker}/run", f"{blocker} is a file, not a folder")]


def _commands(out, store):
    return {
        "generate": ["generate", "euler", "--out", out, "--trajectories", "1", "--steps", "2", "--resolution", "8"],
        "train": ["train", "--data", "no-such-data", "--out", out],
        "grads": ["grads", "--data", "no-such-data", "--checkpoint", "no-such-checkpoint", "--out", out],
        "query": ["query", store, "--out", f"{out}/q.parquet"],
        "topk": ["topk", store, "--query-where", "t == 1", "--out", f"{out}/t.parquet"],
    }


def test_unwritable_out_is_one_line_before_any_work(tmp_path, cli, store_url):  # noqa: F811
    for out, says in _bad_outs(tmp_path):
        for name, argv in _commands(out, store_url).items():
            before = sorted(os.listdir(tmp_path))
            code, stdout, stderr = cli(argv)
            assert code == 2, (name, out, stderr)
            assert len(stderr.strip().splitlines()) == 1 and says in stderr, (name, stderr)
            assert "credentials" not in stderr and stdout == "", (name, stderr)
            assert sorted(os.listdir(tmp_path)) == before, name  # nothing created


def test_run_checks_the_output_of_every_stage_first(tmp_path, cli):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for section, says in (("", "out /proc/gradlake-run: cannot write in /proc"),
                          ('[store]\nurl = "/proc/gradlake-store"\n', "store.url /proc/gradlake-store"),
                          (f'[report]\nout = "{blocker}/report"\n', f"{blocker} is a file, not a folder")):
        out = "/proc/gradlake-run" if not section else str(tmp_path / "run")
        job = tmp_path / "job.toml"
        job.write_text(f'out = "{out}"\n{section}')
        code, stdout, stderr = cli(["run", str(job), "--quiet"])
        assert code == 2 and says in stderr and len(stderr.strip().splitlines()) == 1, stderr
        assert "[data] running" not in stdout and not (tmp_path / "run").exists()


def test_check_output_accepts_what_can_be_written(tmp_path):
    fsio.check_output(str(tmp_path / "new" / "deeper"))  # created later by the stage
    (tmp_path / "existing").mkdir()
    fsio.check_output(str(tmp_path / "existing"))  # an existing folder (a resumed run)
    fsio.check_output(str(tmp_path / "new" / "x.parquet"), folder=False)
    with pytest.raises(InputError, match="is a folder, not a file"):
        fsio.check_output(str(tmp_path / "existing"), folder=False)
    assert sorted(os.listdir(tmp_path)) == ["existing"] and os.listdir(tmp_path / "existing") == []


def test_a_local_permission_error_names_the_path_not_credentials():
    err = fsio.storage_access_error(PermissionError(13, "Permission denied", "/data/run/x.json"))
    assert str(err) == "/data/run/x.json: Permission denied"


@pytest.mark.s3
def test_unreachable_endpoint_is_one_line_naming_it(store_url, tmp_path, cli, monkeypatch):  # noqa: F811
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    started = time.monotonic()
    code, _, stderr = cli(["query", store_url, "--out", "s3://bucket/q.parquet", "--endpoint-url", endpoint])
    assert time.monotonic() - started < 10
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr, stderr
    assert f"--out s3://bucket/q.parquet: cannot reach the storage endpoint {endpoint}" in stderr
