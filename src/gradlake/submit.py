"""Submitting a job file to a Ray cluster through the Ray Jobs API."""

from __future__ import annotations

import shlex
import shutil
import tempfile
import time
from pathlib import Path

import gradlake
from gradlake import fsio
from gradlake.config import JobConfig
from gradlake.errors import InputError

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_WAIT_S = 60.0  # a head started moments ago may not accept jobs yet


def submit_job(client, job_path: Path, job: JobConfig) -> str:
    """Submit ``gradlake run`` of the job; the runtime env carries the package and the job file."""
    if fsio.is_local(job.out) and not Path(job.out).is_absolute():
        raise InputError(
            f"out: {job.out!r} is relative; a submitted job needs an absolute path or URL "
            "(e.g. --out s3://bucket/runs/x or --out /shared/runs/x)"
        )
    workdir = Path(tempfile.mkdtemp(prefix="gradlake-submit-"))
    try:
        shutil.copy(job_path, workdir / "job.toml")
        package_dir = str(Path(gradlake.__file__).parent)
        runtime_env = {
            "working_dir": str(workdir),
            "py_modules": [package_dir],
            "env_vars": {"GRADLAKE_QUIET": "1"},
        }
        return _retry_while_starting(lambda: client.submit_job(
            entrypoint=f"python -m gradlake run job.toml --out {shlex.quote(job.out)} --quiet",
            runtime_env=runtime_env,
            metadata={"gradlake_job": job.name},
        ))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _retry_while_starting(call, timeout: float = AGENT_WAIT_S):
    """Retry while a freshly started head has no job agent yet (Ray answers 500 then)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def wait_for(client, submission_id: str, timeout: float) -> str:
    """Poll until the job reaches a terminal status or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        status = str(client.get_job_status(submission_id)).rsplit(".", 1)[-1]
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(2.0)
