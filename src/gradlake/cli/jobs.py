"""Job commands: validate, run, submit, and jobs list|status|logs|stop on a Ray cluster."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from gradlake import config, fsio
from gradlake.cli.app import Quiet, app
from gradlake.errors import InputError

JobFile = typer.Argument(..., help="Job file (TOML).", exists=False)


def _load(job: Path, out: Optional[str]) -> config.JobConfig:
    return config.load_job(job, {"out": out} if out else None)


@app.command()
def validate(job: Path = JobFile, quiet: bool = Quiet):
    """Check a job file; print the settings as the job will run them (paths, k_dense, ... resolved)
    and warn about valid but probably unmeant ones (a split that will be empty)."""
    import json

    from gradlake import pipeline

    from gradlake.cli.query import ridge_line

    settings = config.load_job(job)
    values = pipeline.resolved(settings)
    typer.echo(json.dumps(values, indent=2, default=list))
    if "spectrum" in values["reduce"]["exact"]:
        typer.secho(f"{settings.reduce.name}: {ridge_line(values['reduce']['exact']['spectrum'])}", err=True)
    for warning in pipeline.setting_warnings(settings):
        typer.secho(f"warning: {warning}", err=True, fg="yellow")


@app.command()
def run(
    job: Path = JobFile,
    out: Optional[str] = typer.Option(None, help="Output root (local path or URL); overrides the job's `out`."),
    force: bool = typer.Option(False, help="Run every stage even if recorded as done."),
    quiet: bool = Quiet,
):
    """Run all stages of a job in order on the embedded local Ray (or RAY_ADDRESS); resumes."""
    from gradlake.pipeline import run_job

    settings = _load(job, out)
    _check_access(settings)
    results = run_job(settings, force=force, echo=typer.echo)
    if "report" in results:
        typer.echo(f"report: {results['report'].get('index')}")
    typer.echo(f"outputs under {settings.out}")


def _check_access(job: config.JobConfig) -> None:
    """Before any work: the job's input is reachable (credentials, bucket) and the output of
    every stage it runs can be written."""
    options = job.store.storage_options or None
    if job.data.source == "url":
        fsio.check_access(job.data_url, options, "data.url")
    outputs = {"out": job.out, "data.url": job.data_url if job.data.source != "url" else "",
               "train": job.train_dir, "store.url": job.store_url, "report.out": job.report_dir}
    writers = {"out": job.stages, "data.url": ("data",), "train": ("train",), "store.url": ("grads", "reduce"),
               "report.out": ("report",)}
    for what, url in outputs.items():
        if url and set(writers[what]) & set(job.stages):
            fsio.check_output(url, options, what)


def _client(dashboard_url: Optional[str]):
    """A Ray Jobs API client; token authentication is used whenever the cluster has it."""
    address = (dashboard_url or os.environ.get("RAY_API_SERVER_ADDRESS", "")
               or os.environ.get("RAY_ADDRESS", ""))
    if not address:
        raise InputError("--dashboard-url: expected the Ray dashboard URL (http://HOST:8265), "
                         "or RAY_API_SERVER_ADDRESS or RAY_ADDRESS")
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # before ray reads its configuration
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except ConnectionError as err:
        raise InputError(f"--dashboard-url {address}: cannot reach the Ray dashboard ({err})") from None


# Not --address: that flag is the Ray cluster (GCS) address of grads and reduce.
DashboardUrl = typer.Option(None, "--dashboard-url",
                            help="Ray dashboard URL, e.g. http://127.0.0.1:8265 (default: RAY_API_SERVER_ADDRESS, "
                                 "else RAY_ADDRESS).")


@app.command()
def submit(
    job: Path = JobFile,
    dashboard_url: Optional[str] = DashboardUrl,
    out: Optional[str] = typer.Option(None, help="Output root on the cluster: an absolute path or URL (s3://...)."),
    wait: bool = typer.Option(False, help="Wait for the job to finish and exit non-zero unless it succeeded."),
    timeout: float = typer.Option(3600.0, help="Seconds to wait with --wait."),
    quiet: bool = Quiet,
):
    """Submit a job to a Ray cluster through the Ray Jobs API; prints the submission id."""
    from gradlake.submit import submit_job, wait_for

    settings = _load(job, out)
    client = _client(dashboard_url)
    submission_id = submit_job(client, job, settings)
    typer.echo(submission_id)
    if wait:
        status = wait_for(client, submission_id, timeout)
        typer.echo(f"{submission_id}: {status}")
        if status != "SUCCEEDED":
            raise typer.Exit(1)


jobs_app = typer.Typer(help="Jobs on a Ray cluster: list, status, logs, stop.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")


@jobs_app.command("list")
def jobs_list(dashboard_url: Optional[str] = DashboardUrl, quiet: bool = Quiet):
    """List submitted jobs."""
    for info in _client(dashboard_url).list_jobs():
        typer.echo(f"{info.submission_id}\t{info.status}\t{info.entrypoint}")


@jobs_app.command("status")
def jobs_status(submission_id: str, dashboard_url: Optional[str] = DashboardUrl, quiet: bool = Quiet):
    """Print a job's status."""
    typer.echo(str(_client(dashboard_url).get_job_status(submission_id)))


@jobs_app.command("logs")
def jobs_logs(submission_id: str, dashboard_url: Optional[str] = DashboardUrl, quiet: bool = Quiet):
    """Print a job's logs."""
    typer.echo(_client(dashboard_url).get_job_logs(submission_id))


@jobs_app.command("stop")
def jobs_stop(submission_id: str, dashboard_url: Optional[str] = DashboardUrl, quiet: bool = Quiet):
    """Stop a running job."""
    stopped = _client(dashboard_url).stop_job(submission_id)
    typer.echo(f"{submission_id}: {'stop requested' if stopped else 'not running'}")
