"""Command-line behaviour on plausible mistakes: one line and exit 2, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gradlake.cli.grads import expand_checkpoints

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "distributed"))
from grads_fixtures import write_checkpoints  # noqa: E402


def test_a_file_in_a_checkpoint_folder_means_the_folder(tmp_path):
    first, second = write_checkpoints(str(tmp_path / "train"))
    got = expand_checkpoints([f"{first}/model.safetensors", f"{second}/optimizer.safetensors",
                              f"{first}/config.json", f"{second}/", str(tmp_path / "train")], {})
    assert got == [first, second, first, second, first, second]


@pytest.mark.s3
def test_run_to_s3_without_credentials_is_one_line_before_any_work(tmp_path, s3_server):
    job = tmp_path / "job.toml"
    job.write_text(f'out = "s3://bucket/runs/x"\n[store]\nstorage_options = {{ endpoint_url = "{s3_server}" }}\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    result = subprocess.run([sys.executable, "-m", "gradlake", "run", str(job), "--quiet"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "out s3://bucket/runs/x: no S3 credentials" in result.stderr
    assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in result.stderr
    assert "[data] running" not in result.stdout  # detected before any stage started
    # Any other command meeting the same: one line too (translated wherever it surfaces).
    result = subprocess.run([sys.executable, "-m", "gradlake", "info", "s3://bucket/store", "--endpoint-url",
                             s3_server], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "no S3 credentials" in result.stderr


def _commands():
    """(path, click command) of every leaf command."""
    import typer

    from gradlake.cli import app

    def walk(command, path):
        if hasattr(command, "commands"):  # a group (typer vendors its own click)
            for name, sub in command.commands.items():
                yield from walk(sub, [*path, name])
        else:
            yield " ".join(path), command

    return list(walk(typer.main.get_command(app), []))


def _options(command):
    return {name: param for param in command.params if param.param_type_name == "option" for name in param.opts}


def test_every_command_takes_quiet_and_out_is_any_url():
    import typing

    commands = _commands()
    assert len(commands) >= 20
    for path, command in commands:
        options = _options(command)
        assert "--quiet" in options, path
        if "--out" in options:  # a string, not a Path: s3://... stays a URL
            assert typing.get_type_hints(command.callback)["out"] in (str, typing.Optional[str]), path


def test_one_meaning_per_flag():
    having = {}
    for path, command in _commands():
        for name in _options(command):
            having.setdefault(name, set()).add(path)
    assert having["--splits"] == {"grads"}  # split names; generate/ingest take --split-fractions
    assert having["--split-fractions"] == {"generate euler", "generate ns", "ingest pdegym", "ingest well"}
    assert having["--classes"] == {"generate euler", "generate ns"}  # a list; exact takes --num-classes
    assert having["--num-classes"] == {"exact"}
    assert having["--address"] == {"grads", "reduce", "exact", "topk"}  # the Ray cluster; submit/jobs take --dashboard-url
    assert having["--dashboard-url"] == {"submit", "jobs list", "jobs status", "jobs logs", "jobs stop"}


def test_validate_prints_resolved_settings_and_warns_about_an_empty_split(tmp_path, cli):
    import json

    root = os.path.dirname(os.path.dirname(__file__))
    code, out, err = cli(["validate", os.path.join(root, "jobs", "quickstart.toml")])
    settings = json.loads(out)
    assert code == 0 and settings["paths"]["store"] == "runs/quickstart/store"
    assert settings["paths"]["report"] == "runs/quickstart/report"
    assert settings["grads"]["k_dense"] == 8 * 8 and settings["data"]["output_dt"] == 0.025
    assert settings["data"]["trajectories_per_split"] == {"train": 12, "val": 3, "test": 9}
    assert "warning" not in err
    small = tmp_path / "small.toml"
    small.write_text('[data]\ntrajectories = 4\n')
    code, out, err = cli(["validate", str(small)])
    assert code == 0 and json.loads(out)["data"]["trajectories_per_split"] == {"train": 9, "val": 0, "test": 3}
    assert "warning: split 'val' will be empty" in err and "grads.splits holds it" in err
    job = tmp_path / "job.toml"
    job.write_text('out = "s3://bucket/x"\n[data]\ntrajectories = 20\n[grads]\nk_dense = 5\n')
    code, out, err = cli(["validate", str(job)])
    settings = json.loads(out)
    assert code == 0 and err == "" and settings["paths"]["data"] == "s3://bucket/x/data"
    assert settings["grads"]["k_dense"] == 5
