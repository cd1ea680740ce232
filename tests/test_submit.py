"""`gradlake submit` against a real Ray head started on 127.0.0.1 with token authentication."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gradlake(*args, env, timeout=60):
    return subprocess.run([str(BIN / "gradlake"), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head` on 127.0.0.1; yields (dashboard URL, environment for clients)."""
    token = secrets.token_hex(16)  # this head's own token, shared with the clients below
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash, agent, agent_grpc, runtime_env, metrics = (_free_port() for _ in range(6))
    temp = tmp_path_factory.mktemp("ray")
    # Every port of its own: the test session's Ray holds the default agent ports, and a
    # second agent on them never comes up ("No available agent to submit job").
    start = [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}",
             "--node-ip-address=127.0.0.1", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
             f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
             f"--metrics-export-port={metrics}", "--num-cpus=2", f"--temp-dir={temp}",
             "--disable-usage-stats"]
    # --block keeps the head in one process group that we stop alone: `ray stop` would stop
    # every Ray on the machine, the test session's own included.
    head = subprocess.Popen(start, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_dashboard(address, env, head)
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def _wait_for_dashboard(address, env, head, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start --head exited with {head.returncode}")
        if _gradlake("jobs", "list", "--dashboard-url", address, env=env).returncode == 0:
            return
        time.sleep(1.0)
    raise TimeoutError(f"the Ray dashboard at {address} did not answer within {timeout} s")


@pytest.mark.slow
def test_submit_quickstart_succeeds(ray_head, tmp_path):
    address, env = ray_head
    out = tmp_path / "run"
    submitted = _gradlake("submit", str(ROOT / "jobs" / "quickstart.toml"), "--dashboard-url", address,
                          "--out", str(out), "--wait", "--timeout", "900", env=env, timeout=960)
    submission_id = submitted.stdout.split()[0] if submitted.stdout else ""
    logs = _gradlake("jobs", "logs", submission_id, "--dashboard-url", address, env=env).stdout
    assert submitted.returncode == 0, f"{submitted.stdout}\n{submitted.stderr}\n{logs[-4000:]}"
    assert "SUCCEEDED" in submitted.stdout
    listed = _gradlake("jobs", "list", "--dashboard-url", address, env=env)
    assert submission_id in listed.stdout
    assert (out / "report" / "index.html").is_file()
    assert (out / "store" / "store.json").is_file()


def test_a_client_without_the_token_is_refused(ray_head):
    address, env = ray_head
    assert _gradlake("jobs", "list", "--dashboard-url", address, env=env).returncode == 0
    result = _gradlake("jobs", "list", "--dashboard-url", address,
                       env={**env, "RAY_AUTH_TOKEN": "not-the-token"})
    assert result.returncode != 0


def test_submit_refuses_a_relative_output_root(ray_head):
    address, env = ray_head
    result = _gradlake("submit", str(ROOT / "jobs" / "quickstart.toml"), "--dashboard-url", address,
                       "--out", "runs/relative", env=env)
    assert result.returncode == 2
    assert "relative" in result.stderr


def test_jobs_without_an_address_is_a_usage_error():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    result = _gradlake("jobs", "list", env=env)
    assert result.returncode == 2 and "--dashboard-url" in result.stderr
