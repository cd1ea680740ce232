"""Running a job: its stages in order, each skipped when already done with the same settings.

A stage is done when its record in ``<out>/job.json`` says so for the same settings; the
stages themselves are idempotent and resumable (the dataset is reused, training resumes from
its last checkpoint, the gradient stage skips committed shards, a reduce is replaced whole),
so a record only saves time, never decides correctness.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

from gradlake import fsio
from gradlake.config import JobConfig, settings_hash
from gradlake.errors import InputError

log = logging.getLogger(__name__)
JOB_JSON = "job.json"


class JobRecord:
    """``<out>/job.json``: per-stage status, written after each stage finishes."""

    def __init__(self, job: JobConfig):
        self.out = fsio.Folder(job.out, job.store.storage_options)
        self.stages: dict[str, dict[str, Any]] = {}
        if self.out.exists(JOB_JSON):
            self.stages = self.out.read_json(JOB_JSON).get("stages", {})

    def is_done(self, stage: str, settings_hash: str) -> bool:
        rec = self.stages.get(stage, {})
        return rec.get("status") == "done" and rec.get("settings") == settings_hash

    def mark(self, stage: str, settings_hash: str, summary: dict[str, Any], seconds: float) -> None:
        self.stages[stage] = {"status": "done", "settings": settings_hash,
                              "seconds": round(seconds, 2), "summary": summary}
        self.out.write_json(JOB_JSON, {"stages": self.stages})


def training_runs(job: JobConfig) -> list[tuple[int, str]]:
    """(seed, run directory) of each independent training run of the job."""
    if not job.train.seeds:
        return [(job.train.seed, job.train_dir)]
    return [(seed, fsio.join(job.train_dir, f"seed-{seed}")) for seed in job.train.seeds]


def checkpoints(job: JobConfig) -> dict[str, str]:
    """The checkpoints the gradient stage analyses: store name -> checkpoint path.

    Names are the checkpoint directory names (``epoch-0002``), prefixed by ``seed-<s>-``
    when the job trains several seeds; ``grads.checkpoints`` selects among them.
    """
    from gradlake.models.checkpoint import list_checkpoints

    found = {}
    for seed, run_dir in training_runs(job):
        prefix = f"seed-{seed}-" if job.train.seeds else ""
        for path in list_checkpoints(run_dir):
            found[prefix + path.rstrip("/").rsplit("/", 1)[-1]] = path
    if job.grads.checkpoints:
        missing = [c for c in job.grads.checkpoints if c not in found]
        if missing:
            raise InputError(f"grads.checkpoints: {missing[0]!r} not found; the runs have {sorted(found)}")
        found = {name: found[name] for name in job.grads.checkpoints}
    return found


def _settings(section: Any, added: tuple[str, ...]) -> dict[str, Any]:
    """A section's settings for a hash; fields added later count only when set, so the
    hashes of jobs that do not use them stay what they were."""
    values = dataclasses.asdict(section)
    default = type(section)()
    for name in added:
        if getattr(section, name) == getattr(default, name):
            values.pop(name)
    return values


def _stage_plan(job: JobConfig) -> dict[str, tuple[str, Callable[[], dict[str, Any]]]]:
    """Each stage: (hash of everything its output depends on, the call that runs it)."""
    so = job.store.storage_options or None

    def data():
        from gradlake.data import generate

        if job.data.source == "url":
            from gradlake.data import Dataset

            ds = Dataset.open(job.data_url, storage_options=so)
        else:
            ds = generate(job.data, job.data_url, storage_options=so)
        return {"url": ds.url, "trajectories": ds.n_trajectories, "fingerprint": ds.fingerprint}

    def train():
        from gradlake.train import train as run_train

        paths = []
        for seed, run_dir in training_runs(job):
            settings = dataclasses.replace(job.train, seed=seed)
            paths += run_train(job.data_url, job.model, settings, run_dir, storage_options=so, task=job.task)
        return {"checkpoints": paths}

    def grads():
        from gradlake.distributed.grads_stage import run_grads

        return run_grads(job.data_url, checkpoints(job), job.store_url, job.grads, job.ray,
                         storage_options=so, task=job.task, python_path=job.python_path)

    def reduce():
        from gradlake.reduce import run_reduce

        return run_reduce(job.store_url, job.reduce, job.ray, storage_options=so)

    def lds():
        from gradlake.distributed.cluster import ensure_ray
        from gradlake.distributed.lds_tasks import run_lds

        ensure_ray(job.ray.address, job.ray.num_cpus)
        summary = run_lds(job)
        return {"lds": summary["lds"], "subsets": summary["subsets"], "alpha": summary["alpha"]}

    def report():
        from gradlake.report import build_report

        index = build_report(job.store_url, job.report_dir, reduce_name=job.reduce.name,
                             train_dir=job.train_dir, storage_options=so,
                             lds_dir=job.lds_dir if job.eval.lds.enabled else None)
        return {"index": index}

    data_h = settings_hash(job.data, job.data_url)
    train_h = settings_hash(data_h, _settings(job.model, ("path", "kwargs", "checkpoint")), job.train,
                            *([job.task] if job.task != type(job.task)() else []))
    grads_h = settings_hash(train_h, job.grads, job.store_url)
    reduce_h = settings_hash(grads_h, job.reduce)
    lds_h = settings_hash(grads_h, job.eval.lds, job.reduce.metric, job.reduce.metric_estimator,
                          job.reduce.damping, job.reduce.reference_split, job.reduce.name)
    report_h = settings_hash(reduce_h, job.report, *([lds_h] if job.eval.lds.enabled else []))
    return {
        "data": (data_h, data),
        "train": (train_h, train),
        "grads": (grads_h, grads),
        "reduce": (reduce_h, reduce),
        "lds": (lds_h, lds),
        "report": (report_h, report),
    }


def run_job(job: JobConfig, force: bool = False, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the job's stages in order; returns each stage's summary."""
    from gradlake.physics import load_task
    from gradlake.plugins import import_object, use_paths

    use_paths(job.python_path)
    load_task(job.task.path, job.task.kwargs)  # user code is found before any stage runs
    if job.model.path:
        import_object(job.model.path, "model.path")
    record = JobRecord(job)
    plan = _stage_plan(job)
    results: dict[str, Any] = {}
    for stage in job.stages:
        settings_hash, call = plan[stage]
        if stage == "lds" and not job.eval.lds.enabled:
            continue
        if not force and record.is_done(stage, settings_hash):
            echo(f"[{stage}] skipped: done with the same settings")
            results[stage] = record.stages[stage]["summary"]
            continue
        echo(f"[{stage}] running")
        start = time.monotonic()
        summary = call()
        seconds = time.monotonic() - start
        record.mark(stage, settings_hash, summary, seconds)
        echo(f"[{stage}] done in {seconds:.1f} s")
        results[stage] = summary
    return results
