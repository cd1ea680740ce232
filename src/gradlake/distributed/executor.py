"""One executor for the units of every stage: in this process (serially or in threads), as Ray
tasks, or on Ray actors that hold state (the grads stage's model-holding workers).

A stage gives ``fn(context, unit) -> record``, the context (its frozen spec, shipped once; on
workers built with ``setup``, the state each worker makes once from it: ``fn(state, unit)``)
and its units. One loop submits units while fewer than ``window`` are out (submitted and not
yet handed back), waits for the first to finish (``ray.wait``; ``concurrent.futures.wait`` in
process), retries a failed unit with backoff up to ``retries`` times on any worker (a killed
worker too: Ray restarts an actor), stops at once on InputError (every attempt would fail
alike), counts progress, and hands the records back in unit order (``ordered``) or as they
finish. A unit that fails every attempt raises its error, or, with ``keep_going``, is listed
in :attr:`Run.failures` while the others go on. Which backend ran a unit never changes its
record: the results are the same bits in process, on Ray tasks and on Ray actors.
"""

from __future__ import annotations

import concurrent.futures as cf
import heapq
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from gradlake.errors import GradlakeError, InputError
from gradlake.progress import progress
from gradlake.streaming import OrderedSum, add_results

BACKOFF_S, BACKOFF_MAX_S = 0.5, 30.0


class WorkerDied(GradlakeError):
    """The process running a unit went away (killed, out of memory, node lost)."""


@dataclass(frozen=True)
class Failure:
    """A unit that failed every attempt."""

    index: int
    unit: Any
    error: str


def first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(err).__name__


# --------------------------------------------------------------------------- backends
class InProcess:
    """Units run here: serially (``threads`` 0) or on a pool of ``threads`` threads; with
    ``setup``, each thread makes its state once."""

    def __init__(self, threads: int = 0, setup: Callable[[Any], Any] | None = None):
        self.threads, self.setup = threads, setup
        self.workers = max(1, threads)

    def start(self, fn, context, count: int) -> None:
        self._fn, self._context, self._local = fn, context, threading.local()
        self._pool = cf.ThreadPoolExecutor(self.threads) if self.threads else None

    def _call(self, unit):
        if self.setup is None:
            return self._fn(self._context, unit)
        if not hasattr(self._local, "state"):
            self._local.state = self.setup(self._context)
        return self._fn(self._local.state, unit)

    def slots(self) -> int:
        return 1 << 30

    def submit(self, unit) -> cf.Future:
        if self._pool is not None:
            return self._pool.submit(self._call, unit)
        future: cf.Future = cf.Future()
        try:
            future.set_result(self._call(unit))
        except Exception as err:  # handed back through result(), like a worker's error
            future.set_exception(err)
        return future

    def wait(self, handles: list, timeout: float | None) -> list:
        return list(cf.wait(handles, timeout, cf.FIRST_COMPLETED).done)

    def result(self, handle: cf.Future):
        return handle.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _call(fn, context, unit):
    return fn(context, unit)


class _Holder:
    """A Ray actor's state: made by ``setup(context)`` once per run (and again after a restart),
    given to every unit of that run it is handed."""

    def __init__(self, setup):
        self.setup, self.run_id, self.state = setup, None, None

    def run(self, fn, run_id: int, boxed: list, unit):
        if run_id != self.run_id:  # the context stays boxed (unresolved) until a new run needs it
            import ray

            self.state, self.run_id = self.setup(ray.get(boxed[0])), run_id
        return fn(self.state, unit)


def _ray_result(ref):
    """``ray.get(ref)``: the unit's own error raised as itself, a lost worker as WorkerDied."""
    import ray
    from ray.exceptions import RayError, RayTaskError

    try:
        return ray.get(ref)
    except RayTaskError as err:
        raise (err.cause if isinstance(err.cause, Exception) else err) from None
    except RayError as err:  # the worker or actor died, the node was lost
        raise WorkerDied(first_line(err)) from None


class RayTasks:
    """Each unit a Ray task (``options``: its resources, e.g. num_cpus, num_gpus); the
    context goes to the object store once per run."""

    def __init__(self, **options: Any):
        self.options = options
        self.workers = 1

    def start(self, fn, context, count: int) -> None:
        import ray

        self._fn, self._context = fn, ray.put(context)
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1) // self.options.get("num_cpus", 1)))
        self._remote = ray.remote(_call).options(max_retries=0, **self.options)  # the executor retries

    def slots(self) -> int:
        return 1 << 30

    def submit(self, unit):
        return self._remote.remote(self._fn, self._context, unit)

    def wait(self, handles: list, timeout: float | None) -> list:
        import ray

        return ray.wait(handles, num_returns=1, timeout=timeout, fetch_local=False)[0]

    def result(self, handle):
        return _ray_result(handle)

    def close(self) -> None:
        pass


@dataclass
class _Slot:
    actor: Any
    deaths: int = 0


class RayActors:
    """A pool of Ray actors (``count``, at most one per unit of the first run), each holding
    ``setup(context)`` and running one unit at a time; a dead actor is restarted by Ray
    (``max_restarts``) and its unit retried. The pool lives from the first run to
    :meth:`shutdown` (``with executor:``), so the runs of a stage share its workers."""

    def __init__(self, setup: Callable[[Any], Any], count: int, max_restarts: int = 3, **options: Any):
        self.setup, self.count, self.max_restarts, self.options = setup, count, max_restarts, options
        self.workers, self._slots, self._runs = count, [], 0

    def start(self, fn, context, count: int) -> None:
        import ray

        if not self._slots:
            self.workers = max(1, min(self.count, count))
            holder = ray.remote(_Holder).options(max_restarts=self.max_restarts, max_task_retries=0, **self.options)
            self._slots = [_Slot(holder.remote(self.setup)) for _ in range(self.workers)]
        self._runs += 1
        self._fn, self._boxed = fn, [ray.put(context)]
        self._idle, self._where = [s for s in self._slots if s.deaths <= self.max_restarts], {}

    def slots(self) -> int:
        return len(self._idle)

    def submit(self, unit):
        slot = self._idle.pop()
        ref = slot.actor.run.remote(self._fn, self._runs, self._boxed, unit)
        self._where[ref] = slot
        return ref

    def wait(self, handles: list, timeout: float | None) -> list:
        import ray

        return ray.wait(handles, num_returns=1, timeout=timeout)[0]

    def result(self, handle):
        slot = self._where.pop(handle)
        try:
            value = _ray_result(handle)
        except WorkerDied:
            slot.deaths += 1
            if slot.deaths <= self.max_restarts:
                self._idle.append(slot)
            raise
        except Exception:
            self._idle.append(slot)
            raise
        self._idle.append(slot)
        return value

    def close(self) -> None:
        pass

    def shutdown(self) -> None:
        """End the pool's actors."""
        import ray

        for slot in self._slots:
            ray.kill(slot.actor)
        self._slots = []


class _Silent:
    """The progress of a run without a description: none."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values: Any) -> None:
        pass

    def write(self, message: str) -> None:
        pass

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- the loop
@dataclass
class Executor:
    """Runs units on ``backend`` (:class:`InProcess`, :class:`RayTasks`, :class:`RayActors`)."""

    backend: Any
    window: int = 0  # units out at once (0: two per worker; a worker: a thread, CPU slot or actor)
    retries: int = 2
    keep_going: bool = False
    backoff_s: float = BACKOFF_S

    def run(self, fn: Callable[[Any, Any], Any], context: Any, units: Sequence, desc: str, unit: str = "units",
            ordered: bool = True, skipped: int = 0, stop: Callable[[], str] | None = None,
            postfix: Callable[[Any], dict[str, Any]] | None = None,
            label: Callable[[Any], str] | None = None) -> Run:
        """The records of ``fn(context, u)`` for every unit, as an iterator of (index, record)
        (see :class:`Run`). ``desc`` names the progress bar ("": none); ``skipped``: units done
        before (the bar counts them); ``stop()``: a reason to stop (e.g. a lost lease), checked
        between units; ``postfix(record)``: what the bar shows of each record; ``label(unit)``:
        a unit's name in messages (default: its index)."""
        return Run(self, fn, context, list(units), desc, unit, ordered, skipped, stop, postfix, label)

    def map(self, fn, context, units: Sequence, desc: str, unit: str = "units") -> list:
        """The records of every unit, in unit order."""
        return [record for _, record in self.run(fn, context, units, desc, unit)]

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """End the backend's workers (an actor pool's); runs until then share them."""
        if hasattr(self.backend, "shutdown"):
            self.backend.shutdown()

    def fold(self, fn, context, units: Sequence, desc: str, unit: str = "blocks", add=add_results):
        """The sum of the units' records over a binary tree fixed by the unit order
        (:class:`streaming.OrderedSum`): the same bits for any window, backend or timing, and
        only O(window + log n) records alive at once."""
        total = OrderedSum(add)
        for _, record in self.run(fn, context, units, desc, unit):
            total.push(record)
        return total.result()


def run_stage(stage, spec: Any, desc: str = "", unit: str = "units") -> Any:
    """A stage module (gradlake.stages: ``plan(spec) -> units``, ``run_unit(spec, unit) -> record``,
    ``finish(spec, units, records)``) run here: its units one at a time in unit order, no retry."""
    units = stage.plan(spec)
    return stage.finish(spec, units, Executor(InProcess(), retries=0).map(stage.run_unit, spec, units, desc, unit))


class Run:
    """One pass of an executor over units: iterate for (index, record); afterwards
    :attr:`failures` (with ``keep_going``), :attr:`retries` and :attr:`workers` say how it went.
    :attr:`bar` is the progress bar, for the caller's postfix."""

    def __init__(self, executor: Executor, fn, context, units: list, desc: str, unit: str, ordered: bool,
                 skipped: int, stop, postfix, label):
        self.executor, self.fn, self.context, self.units = executor, fn, context, units
        self.desc, self.unit, self.ordered, self.skipped = desc, unit, ordered, skipped
        self.stop, self.postfix, self.label = stop, postfix, label
        self.failures: list[Failure] = []
        self.retries = 0
        self.workers = 0
        self.bar = None

    def _name(self, index: int) -> str:
        return self.label(self.units[index]) if self.label else f"{self.unit} {index}"

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        ex, backend, units = self.executor, self.executor.backend, self.units
        self.bar = bar = progress(len(units) + self.skipped, self.desc, self.unit) if self.desc else _Silent()
        if self.skipped:
            bar.set_postfix(skipped=self.skipped)
            bar.update(self.skipped)
        if not units:
            bar.close()
            return
        backend.start(self.fn, self.context, len(units))
        self.workers = backend.workers
        window = ex.window or 2 * self.workers
        fresh = 0  # next unit never submitted
        later: list[tuple[float, int, int]] = []  # retries: (ready at, index, attempt)
        inflight: dict[Any, tuple[int, int]] = {}  # handle -> (index, attempt)
        held: dict[int, Any] = {}  # ordered: records waiting for an earlier one
        settled: set[int] = set()  # failed for good (ordered: skipped over)
        following = 0  # ordered: the next index to hand back

        def retry(index: int, attempt: int, error: str) -> None:
            if attempt < ex.retries:
                delay = min(BACKOFF_MAX_S, ex.backoff_s * 2 ** attempt)
                bar.write(f"{self.desc}: {self._name(index)} failed (attempt {attempt + 1}): {error}; "
                          f"retrying in {delay:.1f} s")
                self.retries += 1
                heapq.heappush(later, (time.monotonic() + delay, index, attempt + 1))
            else:
                self.failures.append(Failure(index, units[index], error))
                settled.add(index)

        try:
            while fresh < len(units) or later or inflight:
                reason = self.stop() if self.stop else ""
                if reason:
                    raise GradlakeError(f"{self.desc}: {reason}; stopping")
                now = time.monotonic()
                while later and later[0][0] <= now and backend.slots():
                    _, index, attempt = heapq.heappop(later)
                    inflight[backend.submit(units[index])] = (index, attempt)
                while fresh < len(units) and backend.slots() and len(inflight) + len(held) + len(later) < window:
                    inflight[backend.submit(units[fresh])] = (fresh, 0)
                    fresh += 1
                if not inflight:
                    if not backend.slots():  # every worker is gone
                        for index in [i for _, i, _ in later] + list(range(fresh, len(units))):
                            self.failures.append(Failure(index, units[index], "no worker left (every one died)"))
                        later.clear()
                        fresh = len(units)
                        break
                    time.sleep(max(0.0, later[0][0] - now) if later else 0.0)
                    continue
                timeout = max(0.0, later[0][0] - now) if later and backend.slots() else None
                for handle in backend.wait(list(inflight), timeout):
                    index, attempt = inflight.pop(handle)
                    try:
                        record = backend.result(handle)
                    except InputError:
                        raise
                    except WorkerDied as err:
                        retry(index, attempt, f"worker died ({err})")
                    except Exception as err:
                        if attempt >= ex.retries and not ex.keep_going:
                            raise
                        retry(index, attempt, first_line(err))
                    else:
                        if self.postfix:
                            bar.set_postfix(**self.postfix(record))
                        if not self.ordered:
                            yield index, record  # the caller may set the bar's postfix first
                        else:
                            held[index] = record
                        bar.update(1)
                    if self.failures and not ex.keep_going:
                        raise GradlakeError(f"{self.desc}: {self._name(self.failures[0].index)} failed "
                                            f"{ex.retries + 1} times: {self.failures[0].error}")
                while self.ordered and (following in held or following in settled):
                    if following in held:
                        yield following, held.pop(following)
                    following += 1
            if self.ordered:  # units that no worker was left for
                for index in sorted(held):
                    yield index, held.pop(index)
        finally:
            bar.close()
            backend.close()
