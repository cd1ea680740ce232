"""The data stage (no Ray): the job's dataset, generated or opened.

One unit, the dataset at the job's URL: a generated dataset is simulated in batches of
trajectories written one after another by one DatasetWriter (gradlake.data.generate), and a
dataset given by URL is only opened. Resume is the generator's own: the same settings at the
same URL return the dataset already there (its manifest records them), other settings are
refused. External files become a dataset with ``gradlake ingest`` (gradlake.data.ingest), which
a job then reads with ``data.source = "url"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gradlake.config import DataConfig


@dataclass(frozen=True)
class DataSpec:
    """The job's [data] settings and the dataset's URL."""

    settings: DataConfig
    url: str
    storage_options: dict[str, Any] | None = None


def plan(spec: DataSpec) -> list[str]:
    """The one unit: the dataset's URL."""
    return [spec.url]


def run_unit(spec: DataSpec, url: str) -> dict[str, Any]:
    """Generate the dataset at ``url`` (or reuse the one there), or open the given one."""
    from gradlake.data import Dataset, generate

    if spec.settings.source == "url":
        ds = Dataset.open(url, storage_options=spec.storage_options)
    else:
        ds = generate(spec.settings, url, storage_options=spec.storage_options)
    return {"url": ds.url, "trajectories": ds.n_trajectories, "fingerprint": ds.fingerprint}


def finish(spec: DataSpec, units: list[str], records: list[dict[str, Any]]) -> dict[str, Any]:
    """The dataset's summary: URL, trajectories, fingerprint."""
    return records[0]
