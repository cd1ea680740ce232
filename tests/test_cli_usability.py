"""What a new user reads: the help's install line, shell completion, machine-readable output,
and the fix for a top-k on a store without V."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq

from test_query import store_url  # noqa: F401  (a module-scoped fixture)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from synthetic_store import spec_for, write_store  # noqa: E402


def test_help_shows_the_index_install_line_and_shell_completion(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    for argv in (["--help"], ["index", "--help"]):
        code, stdout, _ = cli(argv)
        assert code == 0 and "pip install 'gradlake[index]'" in stdout, stdout
    assert "--install-completion" in cli(["--help"])[1]


def test_topk_without_v_says_how_to_choose_the_metric(tmp_path, cli, capsys):
    url = str(tmp_path / "store")
    write_store(url, spec_for(40, 4, observables=("C",), shard_rows=8))
    capsys.readouterr()  # not the writer's progress lines
    code, _, stderr = cli(["topk", url, "--query-where", "t == 1"])
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert "--metric V: store" in stderr and "holds no φ of V" in stderr and "--metric C" in stderr
    code, stdout, stderr = cli(["topk", url, "--query-where", "t == 1", "--metric", "C", "--k", "2"])
    assert code == 0 and "metric C" in stdout, stderr


def test_query_and_topk_print_json(store_url, tmp_path, cli):  # noqa: F811
    out = tmp_path / "top.parquet"
    code, stdout, stderr = cli(["topk", store_url, "--query-where", "split == 'test' and t == 1", "--k", "2",
                                "--out", str(out), "--json", "--quiet"])
    assert code == 0, stderr
    printed = json.loads(stdout)
    table = pq.read_table(out)
    assert printed["rows"] == table.to_pylist() and printed["pair"] == "CC" and printed["checkpoint"] == "epoch-0001"
    code, stdout, stderr = cli(["query", store_url, "--where", "t >= 2", "--out", str(tmp_path / "q.parquet"),
                                "--json", "--quiet"])
    assert code == 0, stderr
    assert json.loads(stdout) == {"samples": pq.read_table(tmp_path / "q.parquet").num_rows,
                                  "checkpoint": "epoch-0001", "observable": "C", "where": "t >= 2",
                                  "out": str(tmp_path / "q.parquet")}
