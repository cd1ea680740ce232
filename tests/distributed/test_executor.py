"""The one executor (gradlake.distributed.executor): in process, Ray tasks and Ray actors give
the same records in unit order; a failed or killed worker's unit is retried; InputError stops."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from gradlake.distributed.executor import Executor, InProcess, RayActors, RayTasks
from gradlake.errors import GradlakeError, InputError

ray = pytest.importorskip("ray")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reduce"))  # reduce_helpers
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import a test module


def _square_sum(context, unit):
    """A unit of a toy stage: a float64 reduction whose bits depend on the order of its terms."""
    rng = np.random.default_rng([context["seed"], unit])
    x = rng.standard_normal(1000) * 10.0 ** rng.integers(-8, 8, 1000)
    return {"sum": np.array([np.sum(x * x)]), "unit": unit}


def _offset(seed):  # an actor's state, made once per actor
    return {"seed": seed}


def _die_once(context, unit):
    """Ends its worker process on its first attempt at unit 1 (a marker file remembers)."""
    marker = Path(context) / f"died-{unit}"
    if unit == 1 and not marker.exists():
        marker.write_text("")
        os._exit(1)
    return unit * 10


def _fail_once(context, unit):
    marker = Path(context) / f"failed-{unit}"
    if unit == 2 and not marker.exists():
        marker.write_text("")
        raise RuntimeError("flaky")
    return unit * 10


def _always_fails(context, unit):
    if unit == 1:
        raise RuntimeError("broken unit")
    return unit


def _bad_input(context, unit):
    raise InputError("bad setting")


BACKENDS = {
    "serial": lambda: InProcess(),
    "threads": lambda: InProcess(threads=3),
    "tasks": lambda: RayTasks(num_cpus=1),
    "actors": lambda: RayActors(_offset, count=2),
}


def _records(backend, **kw):
    context = 7 if isinstance(backend, RayActors) else {"seed": 7}
    with Executor(backend, backoff_s=0.01, **kw) as ex:
        return ex.map(_square_sum, context, list(range(12)), "toy")


@pytest.mark.parametrize("kind", ["threads", "tasks", "actors"])
def test_every_backend_gives_the_same_records_in_unit_order(ray_session, kind):
    serial = _records(BACKENDS["serial"]())
    other = _records(BACKENDS[kind](), window=5)
    assert [r["unit"] for r in other] == list(range(12))
    assert all(a["sum"].tobytes() == b["sum"].tobytes() for a, b in zip(serial, other))


@pytest.mark.parametrize("kind", ["serial", "threads", "tasks", "actors"])
def test_a_fold_is_the_same_bits_whatever_the_backend_or_window(ray_session, kind):
    context = 7 if kind == "actors" else {"seed": 7}
    with Executor(BACKENDS[kind](), window=3) as ex:
        total = ex.fold(lambda c, u: _square_sum(c, u)["sum"], context, list(range(13)), "toy")
    reference = Executor(InProcess(), window=1).fold(lambda c, u: _square_sum(c, u)["sum"], {"seed": 7},
                                                     list(range(13)), "toy")
    assert total.tobytes() == reference.tobytes()


@pytest.mark.parametrize("kind", ["tasks", "actors"])
def test_a_killed_worker_s_unit_is_retried(ray_session, kind, tmp_path):
    backend = RayTasks() if kind == "tasks" else RayActors(lambda context: context, count=2)
    with Executor(backend, backoff_s=0.01) as ex:
        run = ex.run(_die_once, str(tmp_path), list(range(4)), "toy")
        assert list(run) == [(u, u * 10) for u in range(4)]
    assert (tmp_path / "died-1").exists() and run.retries == 1


@pytest.mark.parametrize("kind", ["serial", "threads", "tasks"])
def test_a_failed_unit_is_retried_and_unordered_records_all_come(ray_session, kind, tmp_path):
    run = Executor(BACKENDS[kind](), backoff_s=0.01).run(_fail_once, str(tmp_path), list(range(5)), "toy",
                                                         ordered=False)
    assert sorted(run) == [(u, u * 10) for u in range(5)] and run.retries == 1


def test_a_unit_that_keeps_failing_raises_its_error_or_is_listed(ray_session):
    with pytest.raises(RuntimeError, match="broken unit"):
        Executor(RayTasks(), retries=1, backoff_s=0.01).map(_always_fails, None, [0, 1, 2], "toy")
    run = Executor(RayTasks(), retries=1, backoff_s=0.01, keep_going=True).run(_always_fails, None, [0, 1, 2], "toy")
    assert list(run) == [(0, 0), (2, 2)]
    assert [(f.index, f.error) for f in run.failures] == [(1, "broken unit")] and run.retries == 1


@pytest.mark.parametrize("kind", ["serial", "tasks", "actors"])
def test_input_error_stops_at_once_without_retries(ray_session, kind):
    backend = RayActors(lambda c: c, count=1) if kind == "actors" else BACKENDS[kind]()
    with Executor(backend, retries=5, backoff_s=10) as ex, pytest.raises(InputError, match="bad setting"):
        run = ex.run(_bad_input, None, [0, 1], "toy")
        list(run)
    assert run.retries == 0


def test_stop_ends_the_run(ray_session):
    with pytest.raises(GradlakeError, match="lease lost"):
        list(Executor(InProcess()).run(_always_fails, None, [0], "toy", stop=lambda: "lease lost"))


def _hash_outputs():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "hash_outputs.py"
    spec = importlib.util.spec_from_file_location("hash_outputs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.hashes


@pytest.mark.slow
def test_the_reduce_is_bit_identical_in_process_on_ray_tasks_and_on_ray_actors(ray_session, tmp_path):
    import dataclasses

    from gradlake.config import RayConfig, ReduceConfig
    from gradlake.distributed.reduce_tasks import run_reduce
    from reduce_helpers import make_dataset, make_store

    ds = make_dataset(str(tmp_path / "data"), per_class=4, n_times=6)
    store = make_store(str(tmp_path / "store"), ds, checkpoints=("epoch-0001",), k=8)
    settings = ReduceConfig(damping=1e-3, pairs=("CC", "EC"), normalize=("none", "row-std"), block_rows=8,
                            topk=3, distance_pairs=20, tile_max=16, tile_size=8)
    backends = {"serial": InProcess(), "tasks": RayTasks(), "actors": RayActors(lambda context: context, count=2)}
    hashes = _hash_outputs()
    found = {}
    for name, backend in backends.items():
        with Executor(backend, window=3) as ex:  # window 3: units finish out of order
            run_reduce(store.url, dataclasses.replace(settings, name=name), RayConfig(), executor=ex)
        found[name] = {path: h for path, h in hashes(Path(store.reduce_url(name))).items()
                       if not path.endswith(".json")}
    assert any("twotime" in path for path in found["serial"]) and any("topk" in path for path in found["serial"])
    assert any("distance_curve" in path for path in found["serial"]) and any("tiles" in path for path in found["serial"])
    assert found["serial"] == found["tasks"] == found["actors"]


def _made(context):
    return {"pid": os.getpid(), "token": np.random.default_rng().integers(1 << 62)}


def _state_of(state, unit):
    return state["pid"], int(state["token"])


def test_actors_make_their_state_once_per_run_and_keep_their_processes_across_runs(ray_session):
    with Executor(RayActors(_made, count=2), window=2) as ex:
        first = ex.map(_state_of, None, list(range(8)), "toy")
        second = ex.map(_state_of, None, list(range(8)), "toy")
    for records in (first, second):
        tokens = {}
        for pid, token in records:
            tokens.setdefault(pid, set()).add(token)
        assert all(len(t) == 1 for t in tokens.values())  # one state per actor and run
    assert {pid for pid, _ in first} == {pid for pid, _ in second}  # the same actors
    assert {t for _, t in first}.isdisjoint({t for _, t in second})  # a state made anew for each run
