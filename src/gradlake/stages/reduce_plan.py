"""The reduce stage's shape (no Ray): its spec, its checks, its plan (which checkpoints are
done, from their completion records) and its finish (the tables across checkpoints, the
summary, written last). Its units of work are in gradlake.stages.reduce_*; the driver that runs
them on the executor is gradlake.distributed.reduce_tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gradlake import __version__, fsio
from gradlake.config import ReduceConfig, recorded, settings_hash
from gradlake.errors import InputError
from gradlake.stages.query import shard_parts
from gradlake.reduce.layers import Layers
from gradlake.reduce.output import SUMMARY, ReduceOutput
from gradlake.stages.records import Records, other_settings
from gradlake.stages.reduce_source import check_complete, matches
from gradlake.store.layout import LEASE

PER_CHECKPOINT = ("lags.parquet", "self_influence.parquet", "lag_stats.parquet", "topk.parquet",
                  "distance_pairs.parquet", "distance_curve.parquet")


@dataclass(frozen=True)
class ReduceSpec:
    """One reduce: the store, its settings, where the store's dataset is now (checked), whether
    results of other settings under the same name may be replaced."""

    store_url: str
    settings: ReduceConfig
    storage_options: dict[str, Any] | None = None
    data_url: str = ""  # "": the URL store.json records
    overwrite: bool = False


def open_checked(spec: ReduceSpec):
    """(store, its checkpoints to reduce, the dataset URL, the output folder): the settings
    checked, and a ``data_url`` checked by the store's dataset fingerprint; nothing written."""
    from gradlake.store import GradientStore

    so = spec.storage_options or None
    store = GradientStore.open(spec.store_url, so)
    names = check_settings(store, spec.settings)
    if spec.data_url:
        from gradlake.data import open_checked as open_dataset

        open_dataset(spec.data_url, store.spec.dataset["fingerprint"], so)
    data_url = spec.data_url or store.spec.dataset.get("url", "")
    out = ReduceOutput(store.reduce_url(spec.settings.name), dict(spec.storage_options or {}), provenance={
        "store": store.url, "reduce": spec.settings.name, "dataset": store.spec.dataset,
        "checkpoints": {name: store.provenance["checkpoints"][name].get("sha256", "") for name in names}})
    return store, names, data_url, out


def records(out: ReduceOutput) -> Records:
    """The completion records: one per checkpoint, ``done/<checkpoint>.json``."""
    return Records(out, "done")


def plan(spec: ReduceSpec, store, out: ReduceOutput) -> dict[str, dict]:
    """Checkpoint -> summary of those finished with these settings (kept). Results of other
    settings under this name are removed whole with ``overwrite``, else refused (InputError);
    summary.json is removed (it is written last)."""
    digest = settings_hash_of(store, spec.settings)
    done = {record["checkpoint"]: record for record in records(out).load().values()}
    replace = other_settings(done, digest)
    if replace and not spec.overwrite:
        raise InputError(f"reduce.name: {out.url} holds the results of a reduce {spec.settings.name!r} with other "
                         "settings; pass --overwrite to replace them, or choose another --name")
    out.remove(SUMMARY)
    if replace:
        for entry in out.ls(""):  # another reduce's results under this name: replace them whole
            if entry != LEASE:
                out.remove(entry)
        done = {}
    return {name: record["summary"] for name, record in done.items()}


def start_unit(out: ReduceOutput, name: str) -> None:
    """Before checkpoint ``name`` is reduced: its record and any part of its outputs go."""
    records(out).remove(name)
    for folder in PER_CHECKPOINT:
        out.remove(f"{folder}/checkpoint={name}")
    out.remove(f"results.zarr/{name}")


def finish_unit(spec: ReduceSpec, store, out: ReduceOutput, name: str, summary: dict) -> None:
    """Checkpoint ``name`` is done: its completion record, last."""
    records(out).write(name, {"checkpoint": name, "settings": settings_hash_of(store, spec.settings),
                              "summary": summary})


def finish(spec: ReduceSpec, store, out: ReduceOutput, checkpoints: dict[str, dict], exact: dict | None,
           seconds: float) -> dict[str, Any]:
    """The summary of the reduce (``checkpoints``: each one's summary; ``exact``: the exact
    mode's), after consolidating results.zarr; the caller writes it last."""
    settings = spec.settings
    out.consolidate()  # after every array of results.zarr (the exact mode's too)
    return {
        "complete": True, "name": settings.name, "store": store.url, "settings_hash": settings_hash_of(store, settings),
        "gradlake_version": __version__, "settings": recorded(settings),
        "checkpoints": checkpoints, "exact": exact,
        "warnings": [{"checkpoint": name, **w} for name, info in checkpoints.items() for w in info.get("warnings", [])],
        "seconds": round(seconds, 2), "url": out.url,
    }


def settings_hash_of(store, settings: ReduceConfig) -> str:
    """The hash every completion record of the reduce carries: settings, store spec, checkpoints."""
    return settings_hash(settings, store.spec.to_json(),
                         {c: store.provenance["checkpoints"][c]["sha256"] for c in store.checkpoints})


def check_settings(store, settings: ReduceConfig) -> list[str]:
    """Everything about the settings that can be checked before work; the checkpoints."""
    if not fsio.is_path_name(settings.name):
        raise InputError(f"reduce.name: expected letters, digits, '.', '_' or '-', got {settings.name!r}")
    held = store.observables
    if settings.metric not in held:
        raise InputError(f"reduce.metric: observable {settings.metric!r} is not in store {store.url} "
                         f"(it holds {', '.join(held)})")
    for pair in settings.pairs:
        if len(pair) != 2 or not set(pair) <= set(held) or "V" in pair:
            raise InputError(f"reduce.pairs: {pair!r} needs two observables of {', '.join(o for o in held if o != 'V')} "
                             f"held by store {store.url}")
    for lam in (settings.damping, *settings.lambdas):
        if not lam > 0:
            raise InputError(f"reduce.lambdas: expected values > 0, got {lam!r}")
    if settings.by_layer:
        try:
            Layers.from_spec(store.spec.projector, store.spec.model, store.k)
        except InputError as err:
            raise InputError(f"reduce.by_layer: {err}") from None
    names = [store.checkpoint(c) for c in settings.checkpoints] or store.checkpoints
    if not names:
        raise InputError(f"{store.url}: the store holds no checkpoint; run `gradlake grads` first")
    for name in names:
        check_complete(store, name)
    first, *rest = shard_parts(store)
    table = store.samples(names[0], shards=first)  # every filter is checked on the first part
    reference = f"split == '{settings.reference_split}'"
    for key in ("response", "perturbation", "topk_queries", "tile_rows", "tile_cols", "reference_split"):
        where = reference if key == "reference_split" else getattr(settings, key)
        try:
            found = matches(table, where).any()
        except InputError as err:
            raise InputError(f"reduce.{key}: {err}") from None
        if key in ("response", "perturbation", "reference_split") and not found \
                and not any(store.samples(names[0], where, shards=p, columns=["row"]).num_rows for p in rest):
            if key == "reference_split":
                raise InputError(f"reduce.reference_split: no sample of split {settings.reference_split!r} in "
                                 f"store {store.url} (it holds splits {', '.join(store.spec.splits)})")
            raise InputError(f"reduce.{key}: {where!r} selects no sample of store {store.url}")
    return names



def checkpoint_lag_table(out: ReduceOutput) -> pa.Table:
    """Median and quartiles over checkpoints of each checkpoint's pooled lag curve: over all
    checkpoints (group "*") and, for seed-prefixed names "seed-<s>-<rest>", over the seeds of
    each <rest> (e.g. one epoch across seeds)."""
    t = out.read_tables("lag_stats.parquet", filters=pc.field("class") == "all")
    keys = ["lambda", "pair", "normalization", "relation", "lag"]
    t = t.sort_by([(k, "ascending") for k in [*keys, "checkpoint"]])
    names = np.asarray(t.column("checkpoint").to_pylist())
    groups = np.array([n.split("-", 2)[2] if n.startswith("seed-") and n.count("-") >= 2 else "*" for n in names])
    values = t.column("pooled_mean").to_numpy(zero_copy_only=False)
    key_cols = {k: t.column(k).to_numpy(zero_copy_only=False) if k in ("lambda", "lag") else
                np.asarray(t.column(k).to_pylist()) for k in keys}
    key_id = np.unique(np.stack([np.unique(v, return_inverse=True)[1] for v in key_cols.values()], 1),
                       axis=0, return_inverse=True)[1].ravel()
    rows = []
    for group in ["*", *sorted(set(groups) - {"*"})]:
        sel_group = np.ones(len(names), bool) if group == "*" else groups == group
        for kid in np.unique(key_id):
            sel = sel_group & (key_id == kid)
            if not sel.any():
                continue
            vals = values[sel]
            finite = vals[np.isfinite(vals)]
            q25, med, q75 = np.percentile(finite, [25, 50, 75]) if len(finite) else (np.nan,) * 3
            first = np.flatnonzero(sel)[0]
            rows.append({"group": group, **{k: key_cols[k][first].item() if hasattr(key_cols[k][first], "item")
                                            else key_cols[k][first] for k in keys},
                         "median": med, "q25": q25, "q75": q75, "checkpoints": int(sel.sum())})
    return pa.Table.from_pylist(rows)
