"""The writer lease excludes: of drivers racing for it, exactly one holds it, on every storage,
also when their requests are failed and retried (the fault-injecting S3 proxy)."""

import json
import threading
import time
import uuid

import pytest

from gradlake.errors import GradlakeError, InputError
from gradlake.store import Lease
from gradlake.store.layout import StoreFiles

ROUNDS, DRIVERS = 6, 4


def race(files, stale=None):
    """DRIVERS threads acquire at once; returns the leases that think they hold it."""
    if stale is not None:
        files.write_json("lease.json", stale)
    start = threading.Barrier(DRIVERS)
    winners, errors = [], []

    def drive(i):
        lease = Lease(files, f"driver {i}")
        start.wait()
        try:
            winners.append(lease.acquire())
        except InputError:
            pass
        except Exception as err:  # noqa: BLE001 -- reported below
            errors.append(err)

    threads = [threading.Thread(target=drive, args=(i,)) for i in range(DRIVERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return winners


def check_rounds(files):
    for round_ in range(ROUNDS):
        stale = None if round_ % 2 == 0 else {"owner": "elsewhere:1:x", "purpose": "old", "expires": time.time() - 1}
        winners = race(files, stale)
        assert len(winners) == 1, f"round {round_}: {len(winners)} drivers hold the lease"
        (winner,) = winners
        assert json.loads(files.read_bytes("lease.json"))["owner"] == winner.owner
        winner.renew()
        winner.release()
        assert not files.exists("lease.json")


@pytest.fixture(params=["local", "memory"])
def folder(request, tmp_path):
    if request.param == "local":
        return StoreFiles(str(tmp_path / "store"))
    return StoreFiles(f"memory://lease-{uuid.uuid4().hex[:8]}/store")


def test_racing_drivers_one_wins_every_round(folder):
    write = folder.write_bytes

    def slow_write(rel, data):  # a slow storage: every racer reads before any write lands
        time.sleep(0.02)
        write(rel, data)

    folder.write_bytes = slow_write
    check_rounds(folder)


@pytest.mark.s3
@pytest.mark.slow  # ~15 s: the retried requests back off
def test_racing_drivers_one_wins_every_round_on_s3_through_faults(s3_server, faulty_s3):
    import boto3

    bucket = f"lease-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    files = StoreFiles(f"s3://{bucket}/store", {"endpoint_url": faulty_s3.endpoint})
    check_rounds(files)
    assert faulty_s3.injected > 0  # requests did fail and were retried


@pytest.mark.s3
def test_s3_renew_and_release_are_conditional(s3_bucket):
    files = StoreFiles(s3_bucket[0] + "/store", s3_bucket[1])
    with Lease(files, "first") as first:
        with pytest.raises(InputError, match=r"being written by .*first.*lease expires in"):
            Lease(files, "second").acquire()
        first.renew()
        files.write_json("lease.json", {"owner": "other:2:y", "expires": time.time() + 60})
        with pytest.raises(GradlakeError, match="was taken by other:2:y"):
            first.renew()
    assert files.read_json("lease.json")["owner"] == "other:2:y"  # not released: it was not ours


def test_a_write_whose_retry_failed_its_precondition_is_recognised(tmp_path):
    """A PUT that succeeded, its response lost, retried, and refused (412): the lease is ours."""
    files = StoreFiles(str(tmp_path / "store"))
    lease = Lease(files, "driver")
    atomic = lease._atomic
    real = atomic.create

    def create_then_lose_the_response(data):
        real(data)
        return real(data)  # the retry: the file exists now -> None

    atomic.create = create_then_lose_the_response
    with lease:
        assert files.read_json("lease.json")["owner"] == lease.owner
    assert not files.exists("lease.json")


def test_an_unknown_filesystem_is_refused():
    with pytest.raises(InputError, match=r"needs atomic conditional writes.*not http://"):
        Lease(StoreFiles("http://127.0.0.1:9/store"), "driver")
