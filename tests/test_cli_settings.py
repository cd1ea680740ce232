"""The stage commands' options against the job-file settings they stand for: one name, one
default, for every setting of the section (or a stated reason it is job-file only)."""

from __future__ import annotations

import dataclasses

import click
import pytest
import typer

from gradlake.cli import app
from gradlake.config import GradsConfig, ReduceConfig, TrainConfig, help_of

# Options of every command that are no setting of its section.
COMMON = {"address", "num_cpus", "endpoint_url", "profile", "quiet"}

# command -> (section, {option parameter: field} where they differ, {field: its flag} where it
# is not --field-name, options that are no setting, {field: why it is job-file only}).
COMMANDS = {
    "grads": (GradsConfig, {"threads": "threads_per_worker"}, {"threads_per_worker": "--threads"},
              {"data", "checkpoint", "out"},
              {"checkpoints": "the command takes checkpoint paths (--checkpoint), not names of a run"}),
    "reduce": (ReduceConfig, {}, {"damping": "--lambda"}, {"store", "exact", "overwrite", "data"},
               {"exact": "a section of its own (gradlake exact); --exact turns it on"}),
    "train": (TrainConfig, {}, {"deterministic": "--deterministic"}, {"data", "out", "model", "preset", "set_"},
              {"seeds": "a job trains several seeds; the command one run"}),
}


def _command(name: str) -> click.Command:
    return typer.main.get_command(app).commands[name]


def _cli_default(value):
    """A setting's default as the command line spells it (lists comma-separated)."""
    return ",".join(str(v) for v in value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_stage_options_match_their_settings(name):
    section, renamed, flags, not_settings, job_file_only = COMMANDS[name]
    fields = {f.name: f for f in dataclasses.fields(section)}
    exposed = set()
    for param in _command(name).params:
        if param.name in COMMON | not_settings:
            continue
        field_name = renamed.get(param.name, param.name)
        assert field_name in fields, f"gradlake {name} {param.opts[0]}: no setting {section.__name__}.{field_name}"
        field = fields[field_name]
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        assert param.opts[0] == flags.get(field_name, "--" + field_name.replace("_", "-")), \
            f"gradlake {name} {param.opts[0]}: the setting is {field_name}"
        assert param.default == _cli_default(default), \
            f"gradlake {name} {param.opts[0]}: default {param.default!r}, the setting's {default!r}"
        exposed.add(field_name)
    missing = set(fields) - exposed - set(job_file_only)
    assert not missing, f"gradlake {name} has no option for {sorted(missing)}; add one or say why not"
    assert not exposed & set(job_file_only), f"{sorted(exposed & set(job_file_only))}: exposed, yet listed"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_options_carry_the_settings_help(name):
    """The stage commands take their options' help from the section (one text per setting), and
    every setting of it has one."""
    section, renamed, _, not_settings, job_file_only = COMMANDS[name]
    fields = {f.name for f in dataclasses.fields(section)}
    for param in _command(name).params:
        field_name = renamed.get(param.name, param.name)
        if field_name in fields and param.name not in not_settings:
            assert param.help and param.help == help_of(section, field_name)
    assert all(help_of(section, f) for f in fields - set(job_file_only))


def test_grads_options_reach_the_settings(monkeypatch, tmp_path):
    """The options the command gained (allocation, precision, projection, k_dense, ...) arrive in
    the settings the stage runs with."""
    import gradlake.distributed.grads_stage as stage
    from gradlake.cli import main

    seen = {}
    monkeypatch.setattr(stage, "run_grads", lambda data, checkpoints, out, settings, *a, **k: seen.update(
        settings=settings) or {})
    monkeypatch.setattr("gradlake.cli.grads.expand_checkpoints", lambda paths, options: paths)
    with pytest.raises(SystemExit) as exit_info:
        main(["grads", "--data", "d", "--checkpoint", "c", "--out", str(tmp_path), "--allocation", "energy",
              "--precision", "bfloat16", "--projection", "gaussian", "--k-dense", "7", "--k-total", "99",
              "--calibration-samples", "3", "--threads", "2", "--probe-seed", "5", "--quiet"])
    assert exit_info.value.code in (0, None)
    s = seen["settings"]
    assert (s.allocation, s.precision, s.projection, s.k_dense, s.k_total, s.calibration_samples,
            s.threads_per_worker, s.probe_seed, s.seed) == ("energy", "bfloat16", "gaussian", 7, 99, 3, 2, 5, 0)
