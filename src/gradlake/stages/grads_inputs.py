"""The grads stage's input checks, before anything is written: the settings, the checkpoints
(names, one model config and task, weights that load and are finite, φ that fits a float16
store) and the dataset (its splits, the task's observables on two of its samples)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradlake.config import GradsConfig, TaskConfig
from gradlake.data.index import SPLIT_NAMES
from gradlake.errors import InputError
from gradlake.store.layout import check_name, checkpoint_name


@dataclass
class Inputs:
    """The stage's inputs, checked (nothing written yet)."""

    names: list[str]
    checkpoints: list[str]
    dataset: Any
    held: np.ndarray
    model_config: dict[str, Any]
    provenance: dict[str, Any]
    task: TaskConfig


def check_inputs(data_url: str, checkpoints: Mapping[str, str] | list[str], settings: GradsConfig,
                 storage_options: dict[str, Any], task: TaskConfig | None = None) -> Inputs:
    """Check settings, dataset, checkpoints and task before anything is written."""
    from gradlake.data import Dataset

    _check_settings(settings)
    options = storage_options or None
    names, checkpoints = _checkpoint_names(checkpoints)
    dataset = Dataset.open(data_url, options)
    held = dataset.index().select(splits=settings.splits)
    model_config, provenance, trained_task = _describe_checkpoints(names, checkpoints, dataset, options)
    task = task or TaskConfig(**trained_task)
    _check_dataset(dataset, settings, task, held)
    if len(held) == 0:
        raise InputError(f"grads.splits: {data_url} has no samples in splits {list(settings.splits)}")
    _check_weights(names, checkpoints, dataset, held, settings, task, options)
    return Inputs(names, checkpoints, dataset, held, model_config, provenance, task)

def _checkpoint_names(checkpoints: Mapping[str, str] | list[str]) -> tuple[list[str], list[str]]:
    """(store names, paths): a mapping gives both, a list of paths is named by directory."""
    if not checkpoints:
        raise InputError("grads checkpoints: expected at least one checkpoint path")
    if isinstance(checkpoints, Mapping):  # store name -> path
        names = [check_name(name, "grads checkpoints") for name in checkpoints]
        checkpoints = list(checkpoints.values())
    else:
        names = [checkpoint_name(path) for path in checkpoints]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise InputError(f"grads checkpoints: two checkpoints are named {duplicate!r}; names must be unique")
    return names, list(checkpoints)


def _check_dataset(dataset, settings: GradsConfig, task_config: TaskConfig, held: np.ndarray) -> None:
    """The task's observables exist for the dataset's channels and work on two of its samples."""
    from gradlake.physics import available_observables, check_task, load_task

    task = load_task(task_config.path, task_config.kwargs)
    available = available_observables(dataset.channels, task)
    missing = [o for o in settings.observables if o not in available]
    if missing:
        raise InputError(f"grads.observables: {missing[0]!r} is not defined for channels "
                         f"{list(dataset.channels)} of {dataset.url} by task "
                         f"{task_config.path or 'default'}; available: {', '.join(available)}")
    if len(held):
        inputs, targets = dataset.samples(held[:2])
        check_task(task, dataset.channels, settings.observables, inputs, targets,
                   source=f"task {task_config.path or 'default'}")
    present = set(dataset.splits.tolist())
    unknown = sorted(set(settings.splits) - present - set(SPLIT_NAMES))
    if unknown:  # a standard split may be empty in a small dataset; another name is a typo
        raise InputError(f"grads.splits: {dataset.url} has no split {unknown[0]!r}; it has "
                         f"{', '.join(sorted(present))}")


def _check_weights(names: list[str], paths: list[str], dataset, held: np.ndarray, settings: GradsConfig,
                   task: TaskConfig, options) -> None:
    """Each checkpoint's weights load into its model and are finite, and (a float16 store) the
    φ's of the first held samples fit float16: failures that every attempt of a shard would repeat."""
    from gradlake.stages.grads_unit import Capture
    from gradlake.models.checkpoint import load_checkpoint

    rows = held[:2]
    inputs, targets = dataset.samples(rows)
    capture = Capture(dataclasses.replace(settings, device="cpu", probes=max(settings.probes, 1)), dataset.channels,
                      options, task=task)
    limit = float(np.finfo(settings.storage_dtype).max)
    for name, path in zip(names, paths):
        model, _ = load_checkpoint(path, options, device="cpu")
        if settings.storage_dtype != "float16":
            continue
        phis, _ = capture(model, inputs, targets, rows)
        over = next((obs for obs, phi in phis.items() if np.abs(phi).max(initial=0) > limit), None)
        if over:
            raise InputError(f"checkpoint {name}: phi_{over} of sample rows {rows.tolist()} overflows float16 "
                             f"(|phi| up to {np.abs(phis[over]).max():.3g} > {limit:g}); use --storage-dtype float32 "
                             "(grads.storage_dtype)")


def _describe_checkpoints(names: list[str], paths: list[str], dataset, options
                          ) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, Any]]:
    """(the shared model config, provenance per checkpoint, the task they were trained with:
    {"path", "kwargs"} or {}); InputError if they do not fit."""
    from gradlake.models.checkpoint import checkpoint_sha256, read_meta

    metas = {name: read_meta(path, options) for name, path in zip(names, paths)}
    first = names[0]
    for name, meta in metas.items():
        if list(meta.get("channels", dataset.channels)) != list(dataset.channels):
            raise InputError(f"checkpoint {name}: trained on channels {meta['channels']}, "
                             f"but {dataset.url} has {list(dataset.channels)}")
        if meta["model"] != metas[first]["model"] or meta.get("task", {}) != metas[first].get("task", {}):
            raise InputError(f"checkpoints {first} and {name} have different model configs or tasks; "
                             "one store holds the checkpoints of one training run")
    provenance = {name: {"sha256": checkpoint_sha256(path, options), "path": path,
                         "epoch": metas[name].get("epoch"),
                         "trained_on": (metas[name].get("dataset") or {}).get("fingerprint"),
                         **({"source": metas[name]["source"]} if metas[name].get("source") else {})}
                  for name, path in zip(names, paths)}
    return metas[first]["model"], provenance, dict(metas[first].get("task", {}))


def _check_settings(settings: GradsConfig) -> None:
    import torch

    if not settings.observables or len(set(settings.observables)) != len(settings.observables):
        raise InputError(f"grads.observables: expected distinct observables, got {list(settings.observables)}")
    if not settings.splits:
        raise InputError("grads.splits: expected at least one split")
    if settings.device != "auto":
        try:
            torch.device(settings.device)
        except (RuntimeError, ValueError):
            raise InputError(f"grads.device: expected 'auto', 'cpu' or 'cuda[:n]', got {settings.device!r}") from None
