"""The writing driver's lease on a folder: one driver writes a store (or one reduce's
output folder) at a time.

``<root>/lease.json`` holds {owner, expires (unix seconds), acquired, renewed}. A driver
takes the lease before it writes anything and renews it while it runs (a thread); a second
driver finds a lease that has not expired and refuses with InputError instead of racing.
An expired lease, or one whose driver process is gone from this host, is taken over
(a killed driver). Object stores have no atomic
create-if-absent everywhere, so a taker writes its lease, waits ``settle_s`` and reads it
back: of two drivers that raced, only the last writer keeps it.
"""

from __future__ import annotations

import datetime
import os
import socket
import threading
import time
import uuid
from typing import Any

from gradlake import fsio
from gradlake.errors import GradlakeError, InputError
from gradlake.store import layout

TTL_S = 60.0  # a lease not renewed for this long is stale
SETTLE_S = 0.5


class Lease:
    """A held lease; use as a context manager (renewed in the background, released on exit)."""

    def __init__(self, files: fsio.Folder, purpose: str, ttl_s: float = TTL_S,
                 settle_s: float = SETTLE_S):
        self.files, self.purpose, self.ttl_s, self.settle_s = files, purpose, ttl_s, settle_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lost: str | None = None  # why the lease was lost while held
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> dict[str, Any] | None:
        """The lease on the store now (None when there is none or it is unreadable)."""
        if not self.files.exists(layout.LEASE):
            return None
        try:
            value = self.files.read_json(layout.LEASE)
        except (ValueError, FileNotFoundError):
            return None  # half-written by a killed driver, or released meanwhile: no lease
        return value if isinstance(value, dict) else None

    def acquire(self) -> Lease:
        held = self.read()
        if held is not None and held.get("owner") != self.owner and held.get("expires", 0) > time.time() \
                and not _gone(held.get("owner", "")):
            raise self._refusal(held)
        self._write(acquired=True)
        if self.settle_s:
            time.sleep(self.settle_s)
        held = self.read()
        if held is None or held.get("owner") != self.owner:
            raise self._refusal(held or {"owner": "another driver", "expires": time.time() + self.ttl_s})
        self._thread = threading.Thread(target=self._renew_loop, name="gradlake-lease", daemon=True)
        self._thread.start()
        return self

    def renew(self) -> None:
        """Extend the lease; GradlakeError if another driver has taken it."""
        held = self.read()
        if held is None or held.get("owner") != self.owner:
            self.lost = f"the lease on {self.files.url} was taken by {(held or {}).get('owner', 'nobody')}"
            raise GradlakeError(self.lost)
        self._write(acquired=False, previous=held)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        held = self.read()
        if held is not None and held.get("owner") == self.owner:
            self.files.remove(layout.LEASE)

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
            except Exception:  # noqa: BLE001 -- storage unreachable for a moment: retry next period
                continue

    def _write(self, acquired: bool, previous: dict[str, Any] | None = None) -> None:
        now = time.time()
        self.files.write_json(layout.LEASE, {
            "owner": self.owner, "purpose": self.purpose, "expires": now + self.ttl_s,
            "acquired": _iso(now) if acquired else (previous or {}).get("acquired"),
            "renewed": _iso(now)})

    def _refusal(self, held: dict[str, Any]) -> InputError:
        left = max(0.0, held.get("expires", 0) - time.time())
        return InputError(
            f"{self.files.url}: being written by {held.get('owner')} "
            f"({held.get('purpose', 'a driver')}; its lease expires in {left:.0f} s unless renewed); "
            f"wait for it to finish, or delete {layout.LEASE} there if that driver is gone")


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
