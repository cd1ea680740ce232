"""Damage to a store, found and dropped: what ``gradlake info --verify`` reports and
``gradlake repair`` (and a resumed ``grads``) removes.

A finding names one object (relative to the store root), the committed shards it damages and
what is wrong. :func:`check_parquet` reads the sample files (commits/ and the compacted
samples.parquet files store.json lists): their footers, or with ``deep`` every page;
:func:`check_missing` names committed shards' gradient objects that are absent (a listing);
:func:`verify` does both and reads every committed shard's gradient objects whole, their crc32c
checksums verified. :func:`repair` drops the shards of findings, so that they are no longer
committed and a resumed ``grads`` recomputes them: store.json first (a compacted file then
holds rows it does not list, which readers ignore), then the files, then compaction of what is
left in commits/. A resumed ``grads`` repairs what the footers and the listing find.
"""

from __future__ import annotations

import io
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gradlake.errors import GradlakeError
from gradlake.store import layout
from gradlake.store.footers import Finding, check_parquet, first_line  # noqa: F401 (check_parquet: public here too)
from gradlake.store.layout import compacted_shards, read_metadata, shard_ranges

if TYPE_CHECKING:
    from gradlake.store.store import GradientStore

def check_missing(store: GradientStore) -> list[Finding]:
    """A finding per committed shard's gradient object that is not there (one listing per array)."""
    findings = []
    for name in store.checkpoints:
        for obs, shards in store.missing_data(name).items():
            findings += [Finding(_data_path(store, name, obs, s), name, (s,),
                                 f"missing: the data of committed shard {s} of {obs}") for s in shards]
    return findings


def verify(store: GradientStore) -> list[Finding]:
    """Every finding of the store: its Parquet files read whole, and every committed shard's
    gradient objects present and read whole, their checksums verified."""
    findings = check_parquet(store, deep=True) + check_missing(store)
    for name in store.checkpoints:
        for obs in store.observables:
            reader = store._reader(name, obs)

            def check(shard, reader=reader, obs=obs):
                start, stop = store.spec.shard_range(shard)
                try:
                    reader.read(np.arange(start, min(stop, store.n_rows)), store.spec.dtype)
                except (GradlakeError, ValueError) as err:
                    return Finding(_data_path(store, name, obs, shard), name, (shard,), first_line(err))
                return None

            present = sorted(store.committed_shards(name) & store.stored_shards(name, obs))
            with ThreadPoolExecutor(4) as pool:  # whole shards: a few at a time
                findings += [f for f in pool.map(check, present) if f is not None]
    return findings


def _data_path(store: GradientStore, checkpoint: str, observable: str, shard: int) -> str:
    """The store-relative path of a shard's gradient object."""
    return store._reader(checkpoint, observable).path(shard)[len(store._files.root) + 1:]


def repair(store: GradientStore, findings: list[Finding]) -> dict[str, list[int]]:
    """Drop the shards of ``findings`` (the caller holds the store's lease); returns
    {checkpoint: shards dropped}. Compacted files keep the rows of their other shards."""
    from gradlake.store.compaction import ROW_GROUP_ROWS, compact

    files = store._files
    dropped: dict[str, set[int]] = defaultdict(set)
    for f in findings:
        dropped[f.checkpoint].update(f.shards)
    if not dropped:
        return {}
    damaged = {f.path for f in findings}
    meta = read_metadata(files)
    rewrite, remove = [], []  # (compacted file, shards it keeps); files to delete
    for name, shards in dropped.items():
        groups = compacted_shards(meta, name)
        for group, held in list(groups.items()):
            path = layout.samples_file(name, group)
            if path in damaged or held <= shards:
                del groups[group]
                remove.append(path)
            elif held & shards:
                groups[group] = held - shards
                rewrite.append((path, groups[group]))
        meta["checkpoints"][name]["compacted"] = {str(g): shard_ranges(s) for g, s in sorted(groups.items())}
        remove += [layout.commit_part(name, s) for s in sorted(shards)]
    meta.setdefault("stages", {})["repair"] = {"dropped": {n: shard_ranges(s) for n, s in dropped.items()},
                                                "findings": [str(f) for f in findings]}
    files.write_json(layout.STORE_JSON, meta)
    for path, keep in rewrite:
        table = pq.read_table(files.path(path), filesystem=files.fs, filters=pc.field("shard").isin(sorted(keep)))
        buffer = io.BytesIO()
        pq.write_table(table.replace_schema_metadata(None), buffer, row_group_size=ROW_GROUP_ROWS)
        files.write_bytes(path, buffer.getvalue())
    for path in remove:
        files.remove(path)
    for name in dropped:
        files.forget_listing(layout.commit_dir(name))
    store.refresh()
    compact(store)
    return {name: sorted(shards) for name, shards in dropped.items()}
