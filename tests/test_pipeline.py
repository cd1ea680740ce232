"""A whole job, every stage, in-process on the session's Ray; a re-run resumes."""

import json

import pytest

from gradlake.config import parse_job
from gradlake.pipeline import run_job

TINY_JOB = {
    "name": "tiny",
    "data": {"classes": ["rp", "crp", "rpui"], "trajectories": 2, "steps": 4, "resolution": 16},
    "model": {"name": "unet", "preset": "tiny"},
    "train": {"epochs": 2, "batch_size": 8},
    "grads": {"k_in": 4, "k_out": 4, "shard_rows": 8, "workers": 2, "probes": 2},
    "reduce": {"distance_pairs": 50, "topk": 3},
    "ray": {"num_cpus": 2},
}


@pytest.mark.slow
def test_job_runs_every_stage_then_resumes(tmp_path, ray_session):
    job = parse_job({**TINY_JOB, "out": str(tmp_path / "run")})
    lines = []
    results = run_job(job, echo=lines.append)
    assert list(results) == ["data", "train", "grads", "reduce", "report"]
    assert results["grads"]["shards_failed"] == 0
    index = tmp_path / "run" / "report" / "index.html"
    assert index.is_file() and str(index) == results["report"]["index"]
    record = json.loads((tmp_path / "run" / "job.json").read_text())
    assert all(record["stages"][s]["status"] == "done" for s in results)

    lines.clear()
    run_job(job, echo=lines.append)
    assert lines == [f"[{s}] skipped: done with the same settings" for s in results]


def test_changed_settings_rerun_only_what_depends_on_them(tmp_path, monkeypatch):
    import gradlake.pipeline as pipeline

    calls = []
    plan = pipeline._stage_plan

    def fake_plan(job):
        return {stage: (h, lambda stage=stage: calls.append(stage) or {}) for stage, (h, _) in plan(job).items()}

    monkeypatch.setattr(pipeline, "_stage_plan", fake_plan)
    job = parse_job({**TINY_JOB, "out": str(tmp_path / "run")})
    run_job(job, echo=lambda _: None)
    assert calls == ["data", "train", "grads", "reduce", "report"]
    calls.clear()
    changed = parse_job({**TINY_JOB, "out": str(tmp_path / "run"),
                         "reduce": {**TINY_JOB["reduce"], "damping": 1e-3}})
    run_job(changed, echo=lambda _: None)
    assert calls == ["reduce", "report"]
