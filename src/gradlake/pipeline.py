"""Running a job: its stages in order, each skipped when already done with the same settings.

A stage is done when its record in ``<out>/job.json`` says so for the same settings; the
stages themselves are idempotent and resumable (the dataset is reused, training resumes from
its last checkpoint, the gradient stage skips committed shards, a reduce is replaced whole),
so a record only saves time, never decides correctness.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

from gradlake import fsio
from gradlake.config import JobConfig, recorded, settings_hash
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


def checkpoints(job: JobConfig) -> dict[str, str]:
    """The checkpoints the gradient stage analyses: store name -> checkpoint path.

    Names are the checkpoint directory names (``epoch-0002``), prefixed by ``seed-<s>-``
    when the job trains several seeds; ``grads.checkpoints`` selects among them.
    """
    from gradlake.models.checkpoint import list_checkpoints

    found = {}
    for seed, run_dir in job.training_runs():
        prefix = f"seed-{seed}-" if job.train.seeds else ""
        for path in list_checkpoints(run_dir):
            found[prefix + path.rstrip("/").rsplit("/", 1)[-1]] = path
    if job.grads.checkpoints:
        missing = [c for c in job.grads.checkpoints if c not in found]
        if missing:
            raise InputError(f"grads.checkpoints: {missing[0]!r} not found; the runs have {sorted(found)}")
        found = {name: found[name] for name in job.grads.checkpoints}
    return found


# --------------------------------------------------------------------------- settings as run
# What a job will run with, resolved against files (the generator's defaults, a dataset's
# manifest): `gradlake validate` prints it. gradlake.config only parses and checks.
def resolved(job: JobConfig) -> dict[str, Any]:
    """The settings as the job will run them, every default filled in: the output paths,
    grads.k_dense and grads.probe_seed, the generator's time step and CFL, trajectories per split,
    the Ray address."""
    settings = job.to_dict()
    values = {"name": settings.pop("name"), "out": settings.pop("out"),
              "paths": {"data": job.data_url, "train": job.train_dir, "store": job.store_url,
                        "report": job.report_dir}, **settings}
    values["grads"]["k_dense"] = job.grads.k_dense or job.grads.k_in * job.grads.k_out
    values["grads"]["probe_seed"] = job.grads.effective_probe_seed
    values["ray"]["address"] = job.ray.address or os.environ.get("RAY_ADDRESS", "") or "embedded local Ray"
    values["reduce"]["exact"]["checkpoint"] = job.reduce.exact.checkpoint or "the last checkpoint"
    if job.data.source == "generate":
        from gradlake.data.generate import provenance

        record = provenance(job.data)
        values["data"]["output_dt"], values["data"]["cfl"] = record["output_dt"], record["cfl"]
    counts = trajectories_per_split(job)
    if counts is not None:
        values["data"]["trajectories_per_split"] = counts
    ridge = known_ridge(job)
    if ridge is not None:
        values["reduce"]["exact"]["spectrum"] = ridge
    return values


def known_ridge(job: JobConfig) -> dict[str, Any] | None:
    """d_eff and the store's μ_k once the job's exact run has written a spectrum (else None). Local
    stores only: validating a job stays offline (`gradlake info` reads remote stores)."""
    if "://" in job.store_url and not job.store_url.startswith("file://"):
        return None
    from gradlake.reduce.output import ReduceOutput
    from gradlake.stages.exact_ridge import ridge_of_store
    from gradlake.store import GradientStore

    options = job.store.storage_options or None
    try:
        store = GradientStore.open(job.store_url, options)
    except (InputError, OSError):
        return None
    return ridge_of_store(ReduceOutput(store.reduce_url(job.reduce.name), options), store.spec.k)


def trajectories_per_split(job: JobConfig) -> dict[str, int] | None:
    """Trajectories per split: computed for generated data, read from the manifest of an
    existing dataset; None when that dataset cannot be read now."""
    from gradlake.data.index import SPLIT_NAMES, split_counts

    if job.data.source == "generate":
        per_class = split_counts(job.data.trajectories, job.data.split_fractions)
        return {name: n * len(job.data.classes) for name, n in zip(SPLIT_NAMES, per_class)}
    from gradlake.data.format import read_manifest

    try:
        manifest = read_manifest(job.data_url, job.store.storage_options or None)
    except Exception:  # noqa: BLE001 -- unreachable now (credentials, network): nothing to say
        return None
    if not manifest:
        return None
    return {name: int(manifest.get("splits", {}).get(name, 0)) for name in SPLIT_NAMES}


def setting_warnings(job: JobConfig) -> list[str]:
    """Settings that are valid but probably not what was meant: a split that will be empty."""
    counts = trajectories_per_split(job)
    if counts is None:
        return []
    out = []
    how = (f"{job.data.trajectories} trajectories per class split {'/'.join(f'{f:g}' for f in job.data.split_fractions)}"
           if job.data.source == "generate" else f"dataset {job.data_url}")
    for name, n in counts.items():
        if n:
            continue
        uses = []
        if name in job.grads.splits and "grads" in job.stages:
            uses.append("grads.splits holds it")
        if "reduce" in job.stages:
            if job.reduce.reference_split == name:
                uses.append("reduce.reference_split needs it (the metric and row-std)")
            for key in ("response", "perturbation", "topk_queries", "tile_rows", "tile_cols"):
                if f"'{name}'" in getattr(job.reduce, key) or f'"{name}"' in getattr(job.reduce, key):
                    uses.append(f"reduce.{key} selects from it")
        if name == "val" and "train" in job.stages:
            uses.append("training validates on the test split instead")
        out.append(f"split {name!r} will be empty ({how}: "
                   f"{', '.join(f'{s} {c}' for s, c in counts.items())})"
                   + (f"; {'; '.join(uses)}" if uses else ""))
    return out


def _settings(section: Any, added: tuple[str, ...] = ()) -> dict[str, Any]:
    """A section's settings for a hash (renamed ones under their old names: config.recorded); fields
    added later count only when set, so the hashes of jobs stay what they were."""
    values = recorded(section)
    default = type(section)()
    for name in added:
        if getattr(section, name) == getattr(default, name):
            values.pop(name)
    return values


def build_report(store_url: str, out_dir: str, reduce_name: str = "default", train_dir: str | None = None,
                 storage_options: dict[str, Any] | None = None, normalizations=None,
                 lds_dir: str | None = None) -> str:
    """Write the report of a gradient store (and its reduce ``reduce_name``) to ``out_dir``
    (gradlake.stages.report, run here one figure at a time); returns the path of index.html.
    Deterministic; rerunning overwrites the report's own files."""
    from gradlake.distributed.executor import run_stage
    from gradlake.stages import report as stage

    spec = stage.ReportSpec(store_url, out_dir, reduce_name, train_dir, storage_options,
                            tuple(normalizations) if normalizations else None, lds_dir)
    return run_stage(stage, spec, "report: figures", "figure")


def _stage_plan(job: JobConfig) -> dict[str, tuple[str, Callable[[], dict[str, Any]]]]:
    """Each stage: (hash of everything its output depends on, the call that runs it: the
    Ray-free stages in this process, gradlake.distributed.executor.run_stage)."""
    from gradlake.distributed.executor import run_stage

    so = job.store.storage_options or None

    def data():
        from gradlake.stages import data as stage

        return run_stage(stage, stage.DataSpec(job.data, job.data_url, so))

    def train():
        from gradlake.stages import train as stage

        return run_stage(stage, stage.TrainSpec.of(job))

    def grads():
        from gradlake.distributed.grads_stage import run_grads

        return run_grads(job.data_url, checkpoints(job), job.store_url, job.grads, job.ray,
                         storage_options=so, task=job.task, python_path=job.python_path)

    def reduce():
        from gradlake.distributed.reduce_tasks import run_reduce

        # The job's own results: a rerun with other [reduce] settings replaces them (job.json).
        return run_reduce(job.store_url, job.reduce, job.ray, storage_options=so, overwrite=True)

    def lds():
        from gradlake.distributed.cluster import ensure_ray
        from gradlake.distributed.lds_tasks import run_lds

        ensure_ray(job.ray.address, job.ray.num_cpus)
        summary = run_lds(job)
        return {"lds": summary["lds"], "subsets": summary["subsets"], "alpha": summary["alpha"]}

    def report():
        return {"index": build_report(job.store_url, job.report_dir, job.reduce.name, job.train_dir, so,
                                      lds_dir=job.lds_dir if job.eval.lds.enabled else None)}

    data_h = settings_hash(_settings(job.data), job.data_url)
    train_h = settings_hash(data_h, _settings(job.model, ("path", "kwargs", "checkpoint")), job.train,
                            *([job.task] if job.task != type(job.task)() else []))
    grads_h = settings_hash(train_h, _settings(job.grads, ("probe_seed",)), job.store_url)
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
