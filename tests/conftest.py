"""Shared test fixtures: one Ray per test session, one moto S3 server, small datasets."""

from __future__ import annotations

import os
import uuid

import pytest

# Dummy credentials for the local moto server, set before anything starts a process that
# inherits the environment (Ray workers). Never real secrets.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray cluster, started once for the whole test session."""
    import ray

    from gradlake.distributed.cluster import ensure_ray

    ensure_ray(num_cpus=4)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint: moto in server mode on 127.0.0.1. Yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture()
def s3_bucket(s3_server):
    """A fresh bucket; yields (url_prefix, storage_options)."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    yield f"s3://{name}", {"endpoint_url": s3_server}


@pytest.fixture()
def faulty_s3(s3_server):
    """A proxy on 127.0.0.1 in front of moto that fails every 5th request with 503 SlowDown or
    500 InternalError (bounded); use ``faulty_s3.endpoint`` as the endpoint_url (tests/s3_faults.py)."""
    from s3_faults import FaultyS3

    with FaultyS3(s3_server) as proxy:
        yield proxy


@pytest.fixture()
def cli(capsys):
    """Run the gradlake command line in process: ``cli(argv)`` -> (exit code, stdout, stderr)."""
    from gradlake.cli import main

    def run(argv):
        try:
            main(argv)
            code = 0
        except SystemExit as exit_:
            code = exit_.code or 0
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
