"""lds command: the linear datamodeling score of a job's influence (gradlake.lds)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import typer

from gradlake.cli.app import Quiet, app
from gradlake.cli.jobs import JobFile, _check_access, _load

PREREQUISITES = ("data", "train", "grads")


@app.command()
def lds(
    job: Path = JobFile,
    out: Optional[str] = typer.Option(None, help="Output root (local path or URL); overrides the job's `out`."),
    quiet: bool = Quiet,
):
    """Retrain on random α-subsets of the training trajectories ([eval.lds], as Ray tasks; resumes) and
    score the influence by its linear datamodeling score. Runs the job's data, train and grads stages
    first (skipped when done); results under OUT/lds/."""
    from gradlake.pipeline import run_job

    settings = _load(job, out)
    settings = dataclasses.replace(
        settings, stages=(*[s for s in settings.stages if s in PREREQUISITES], "lds"),
        eval=dataclasses.replace(settings.eval, lds=dataclasses.replace(settings.eval.lds, enabled=True)))
    _check_access(settings)
    results = run_job(settings, echo=typer.echo)
    typer.echo(json.dumps(results["lds"], indent=2))
    typer.echo(f"outputs under {settings.lds_dir}")
