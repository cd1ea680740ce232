"""The writing driver's lease on a folder: one driver writes a store (or one reduce's
output folder) at a time.

``<root>/lease.json`` holds {owner, purpose, expires (unix seconds), acquired, renewed,
write (a fresh id per write)}. A driver takes the lease before it writes anything and renews
it while it runs (a thread); a second driver finds a lease that has not expired and refuses
with InputError instead of racing. An expired lease, or one whose driver process is gone
from this host, is taken over (a killed driver).

Every change of lease.json is a compare-and-swap on the storage's own atomic primitive, so
of two drivers that race exactly one wins, however their requests are delayed or retried:

- S3: conditional PUTs and DELETEs: ``If-None-Match: *`` takes a free lease, ``If-Match:
  <ETag of the lease read>`` takes over a stale one, renews and releases;
- local disk: an exclusive ``flock`` on the folder around read, compare and write (the kernel
  drops it with a dead process), the file replaced by an atomic rename;
- memory://: a process-wide lock around the same (the filesystem lives in one process).

Other filesystems have no primitive gradlake uses, so a lease there is refused. A write whose
response was lost and whose retry then failed its precondition is recognised by its write id.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from gradlake import fsio
from gradlake.errors import GradlakeError, InputError
from gradlake.store import layout

TTL_S = 60.0  # a lease not renewed for this long is stale


class Lease:
    """A held lease; use as a context manager (renewed in the background, released on exit)."""

    def __init__(self, files: fsio.Folder, purpose: str, ttl_s: float = TTL_S):
        self.files, self.purpose, self.ttl_s = files, purpose, ttl_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lost: str | None = None  # why the lease was lost while held
        self._atomic = _atomic_file(files, layout.LEASE)
        self._version: Any = None  # what the storage calls our last write (ETag, or its bytes)
        self._record: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> dict[str, Any] | None:
        """The lease on the folder now (None when there is none)."""
        held = self._atomic.read()
        return None if held is None else _parse(held[0])

    def acquire(self) -> Lease:
        held = self._atomic.read()
        record = None if held is None else _parse(held[0])
        if record is not None and record.get("expires", 0) > time.time() and not _gone(record.get("owner", "")):
            raise self._refusal(record)
        if not self._write(None if held is None else held[1], acquired=True):
            raise self._refusal(self.read() or {"owner": "another driver", "expires": time.time() + self.ttl_s})
        self._thread = threading.Thread(target=self._renew_loop, name="gradlake-lease", daemon=True)
        self._thread.start()
        return self

    def renew(self) -> None:
        """Extend the lease; GradlakeError if another driver has taken it."""
        if not self._write(self._version, acquired=False):
            self.lost = f"the lease on {self.files.url} was taken by {(self.read() or {}).get('owner', 'nobody')}"
            raise GradlakeError(self.lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._version is not None and self.lost is None:
            self._atomic.delete(self._version)  # False: not ours any more, nothing to release

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except GradlakeError:
                return
            except Exception as err:  # noqa: BLE001 -- storage unreachable for a moment: retry next period
                if time.time() > self._record.get("expires", 0):  # stale by now: another may take it
                    self.lost = f"the lease on {self.files.url} expired while it could not be renewed ({err})"
                    return

    def _write(self, version: Any, acquired: bool) -> bool:
        """Replace the lease written as ``version`` (None: no lease) by ours; False if it changed."""
        now = time.time()
        record = {"owner": self.owner, "purpose": self.purpose, "expires": now + self.ttl_s,
                  "acquired": _iso(now) if acquired else self._record.get("acquired"),
                  "renewed": _iso(now), "write": uuid.uuid4().hex}
        data = json.dumps(record, indent=2).encode()
        written = self._atomic.create(data) if version is None else self._atomic.replace(data, version)
        if written is None:  # precondition failed, or a retry of a write that had succeeded
            held = self._atomic.read()
            if held is None or (_parse(held[0]) or {}).get("write") != record["write"]:
                return False
            written = held[1]
        self._version, self._record = written, record
        return True

    def _refusal(self, held: dict[str, Any]) -> InputError:
        left = max(0.0, held.get("expires", 0) - time.time())
        return InputError(
            f"{self.files.url}: being written by {held.get('owner')} "
            f"({held.get('purpose', 'a driver')}; its lease expires in {left:.0f} s unless renewed); "
            f"wait for it to finish, or delete {layout.LEASE} there if that driver is gone")


# --------------------------------------------------------------------------- atomic files
class _AtomicFile:
    """One small file changed only by compare-and-swap. ``read`` gives (bytes, version) or
    None; ``create``, ``replace`` and ``delete`` succeed only if the file is absent, or
    still the version given: they return the new version (True for delete), else None (False)."""

    def read(self) -> tuple[bytes, Any] | None: ...

    def create(self, data: bytes) -> Any: ...

    def replace(self, data: bytes, version: Any) -> Any: ...

    def delete(self, version: Any) -> bool: ...


class _LockedFile(_AtomicFile):
    """Local disk and memory://: read-compare-write under an exclusive lock; the version is the bytes."""

    def __init__(self, files: fsio.Folder, rel: str, lock):
        self.files, self.rel, self.lock = files, rel, lock

    def read(self):
        try:
            data = self.files.read_bytes(self.rel)
        except FileNotFoundError:
            return None
        return data, data

    def create(self, data):
        return self.replace(data, None)

    def replace(self, data, version):
        with self.lock():
            held = self.read()
            if (None if held is None else held[1]) != version:
                return None
            self.files.write_bytes(self.rel, data)  # an atomic rename on local disk
            return data

    def delete(self, version):
        with self.lock():
            held = self.read()
            if held is None or held[1] != version:
                return False
            self.files.fs.rm(self.files.path(self.rel))
            return True


class _S3File(_AtomicFile):
    """S3: conditional requests; the version is the object's ETag."""

    def __init__(self, files: fsio.Folder, rel: str):
        self.fs = files.fs
        self.bucket, self.key, _ = self.fs.split_path(files.path(rel))

    def read(self):
        async def get():
            response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            async with response["Body"] as body:
                return await body.read(), response["ETag"]

        try:
            return _sync(self.fs, get)
        except FileNotFoundError:
            return None

    def create(self, data):
        return self._put(data, IfNoneMatch="*")

    def replace(self, data, version):
        return self._put(data, IfMatch=version)

    def delete(self, version):
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=version)
        except (FileNotFoundError, OSError) as err:
            if isinstance(err, FileNotFoundError) or _conflict(err):
                return False
            raise
        return True

    def _put(self, data, **condition):
        try:
            return self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, **condition)["ETag"]
        except OSError as err:  # FileExistsError, or an OSError from 412 / 409
            if isinstance(err, (FileExistsError, FileNotFoundError)) or _conflict(err):
                return None
            raise


def _conflict(err: BaseException) -> bool:
    """A failed precondition (412) or a conflicting conditional write in flight (409)."""
    cause = getattr(err, "__cause__", None)
    code = (getattr(cause, "response", None) or {}).get("Error", {}).get("Code")
    return code in ("PreconditionFailed", "ConditionalRequestConflict")


def _sync(fs, coroutine):
    from fsspec.asyn import sync

    return sync(fs.loop, coroutine)


_MEMORY_LOCK = threading.Lock()


@contextlib.contextmanager
def _flock(folder: str) -> Iterator[None]:
    """An exclusive lock on a local folder, held by this open file description."""
    import fcntl

    os.makedirs(folder, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _atomic_file(files: fsio.Folder, rel: str) -> _AtomicFile:
    """``rel`` in ``files`` as an atomic file on its storage; InputError if it has none."""
    protocol = files.fs.protocol if isinstance(files.fs.protocol, str) else files.fs.protocol[0]
    if files.local:
        return _LockedFile(files, rel, lambda: _flock(files.root))
    if protocol == "memory":
        return _LockedFile(files, rel, lambda: _MEMORY_LOCK)
    if protocol in ("s3", "s3a"):
        return _S3File(files, rel)
    raise InputError(f"{files.url}: gradlake's writer lease needs atomic conditional writes, which it "
                     f"knows on local disk, memory:// and s3:// only (not {protocol}://)")


def _parse(data: bytes) -> dict[str, Any] | None:
    """A lease record; None for anything else (a stale lease, takeable)."""
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _gone(owner: str) -> bool:
    """True when ``owner`` (host:pid:tag) is a process of this host that no longer runs."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="seconds")
