"""Job commands: validate (run, submit and jobs come with the job runner)."""

from __future__ import annotations

from pathlib import Path

import typer

from gradlake import config
from gradlake.cli.app import app


@app.command()
def validate(job: Path = typer.Argument(..., help="Job file (TOML).")):
    """Check a job file and print its resolved settings."""
    settings = config.load_job(job)
    typer.echo(config.dumps(settings))
