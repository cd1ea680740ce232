"""Built-in trajectory datasets: settings -> simulations -> the dataset format.

Idempotent: the manifest records the settings that determine the content
(``provenance``); the same settings at the same URL return the dataset already there,
different ones raise InputError naming what differs, and nothing is written.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import torch

from gradlake.config import DataConfig
from gradlake.data.format import Dataset, DatasetWriter, read_manifest
from gradlake.data.index import split_counts, split_trajectories
from gradlake.errors import InputError
from gradlake.progress import progress

FAMILIES = {"euler": "gradlake.data.euler", "ns": "gradlake.data.ns"}


def family_module(family: str):
    """The simulator module of a family (CHANNELS, CLASSES, defaults, simulate)."""
    if family not in FAMILIES:
        raise InputError(f"data.family: unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[family])


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"data.device: expected 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}") from None
    return device


def provenance(config: DataConfig) -> dict[str, Any]:
    """The settings that determine a generated dataset's content."""
    sim = family_module(config.family)
    unknown = [c for c in config.classes if c not in sim.CLASSES]
    if unknown or not config.classes:
        raise InputError(f"data.classes: {unknown[0] if unknown else 'no class'!r} is not a "
                         f"{config.family} class; expected some of {', '.join(sim.CLASSES)}")
    if len(set(config.classes)) != len(config.classes):
        raise InputError(f"data.classes: each class once, got {list(config.classes)}")
    record = {
        "kind": "generate", "family": config.family, "classes": list(config.classes),
        "trajectories": config.trajectories, "steps": config.steps,
        "resolution": config.resolution, "seed": config.seed, "splits": list(config.split_fractions),
        "output_dt": config.output_dt or sim.DEFAULT_OUTPUT_DT,
        "cfl": config.cfl or sim.DEFAULT_CFL,
    }
    if config.family == "ns":
        record["viscosity"] = config.viscosity
    return record


def differences(expected: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """'key: found -> expected' for each setting that differs."""
    keys = sorted(set(expected) | set(found))
    return [f"{k}: {found.get(k)!r} there, {expected.get(k)!r} asked" for k in keys
            if expected.get(k) != found.get(k)]


def existing_or_none(out_url: str, wanted: dict[str, Any], storage_options) -> Dataset | None:
    """The dataset at ``out_url`` if it was made from ``wanted``; None if there is none;
    InputError naming the differences if a different one is there."""
    manifest = read_manifest(out_url, storage_options)
    if manifest is None:
        return None
    diff = differences(wanted, manifest.get("provenance", {}))
    if diff:
        raise InputError(f"{out_url}: already holds a different dataset ({'; '.join(diff)}); "
                         "choose another output location or remove it")
    return Dataset.open(out_url, storage_options)


def generate(config: DataConfig, out_url: str, storage_options: dict[str, Any] | None = None) -> Dataset:
    """Simulate ``config.trajectories`` trajectories of each class and write them to ``out_url``."""
    record = provenance(config)
    sim = family_module(config.family)
    device = resolve_device(config.device)
    split_counts(config.trajectories, config.split_fractions)  # validates the fractions before any work
    done = existing_or_none(out_url, record, storage_options)
    if done is not None:
        return done
    times = np.arange(config.steps) * record["output_dt"]
    extra = {"cfl": record["cfl"], "viscosity": config.viscosity} if config.family == "ns" else {"cfl": record["cfl"]}
    classes = [c for c in config.classes for _ in range(config.trajectories)]
    writer = DatasetWriter(out_url, n_trajectories=len(classes), times=times, channels=sim.CHANNELS,
                           resolution=(config.resolution, config.resolution), family=config.family,
                           attributes={"generator": record}, storage_options=storage_options)
    all_params: list[dict] = []
    bar = progress(len(classes), f"generate {config.family}", "traj")
    start = 0
    for class_name in config.classes:
        for first in range(0, config.trajectories, config.batch):
            indices = list(range(first, min(first + config.batch, config.trajectories)))
            block, params = sim.simulate(class_name, indices, config.resolution, times,
                                         seed=config.seed, device=device, **extra)
            writer.write(start, block)
            all_params.extend(params)
            start += len(indices)
            bar.update(len(indices))
    bar.close()
    splits = split_trajectories(classes, config.split_fractions, config.seed)
    sources = [f"gradlake.{config.family}/{c}" for c in classes]
    return writer.finish(classes, splits, sources, all_params, record)
