"""Compaction: committed shards' sample rows from commits/ into a few files of samples.parquet.

Shards are grouped by number (``layout.group_shards`` per group, about ``GROUP_ROWS``
rows); group g's rows live in ``samples.parquet/checkpoint=<c>/part-<g>.parquet``, and
store.json records which shards each file holds. One pass, per checkpoint:

1. every group with new commit files gets its file rewritten whole (what store.json says
   it holds, plus the new shards), replacing the old one in one atomic write;
2. store.json records the new contents (one write);
3. the compacted commit files are deleted.

Killed anywhere, nothing is lost or duplicated: a plain reader of samples.parquet sees whole
files of committed rows, each row in one file; gradlake reads from a group file only the
shards store.json lists and takes the others from commits/; the next pass finishes the job.
Only the driver that holds the store's lease compacts: a group as soon as its shards are all
committed, and whatever is left when the stage ends.
"""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gradlake.progress import progress
from gradlake.provenance import with_description
from gradlake.store import layout
from gradlake.store.store import GradientStore, compacted_shards, read_metadata, shard_ranges

SAMPLES_FORMAT = "gradlake-samples/1"
ROW_GROUP_ROWS = 1 << 16  # rows of one row group: a scan of some shards or rows (a part of a
# query, a block of the reduce) decodes only the row groups their statistics can hold


def compact(store: GradientStore, groups: dict[str, set[int]] | None = None,
            after_files: Callable[[], None] | None = None) -> dict[str, Any]:
    """Compact every checkpoint of ``store`` (only the given groups per checkpoint when
    ``groups`` is set); returns {checkpoint: shards compacted}.

    ``after_files`` (for the crash tests) runs after the group files are written, before
    store.json records them.
    """
    files = store._files
    meta = read_metadata(files)
    per_group = layout.group_shards(store.spec.shard_rows)
    done: dict[str, Any] = {}
    for name in meta["checkpoints"] if groups is None else list(groups):
        wanted = None if groups is None else groups[name]
        compacted = compacted_shards(meta, name)
        held = set().union(*compacted.values())
        parts = files.committed_parts(name)
        new: dict[int, list[int]] = defaultdict(list)
        for shard in sorted(parts - held):
            if wanted is None or shard // per_group in wanted:
                new[shard // per_group].append(shard)
        bar = progress(len(new), f"compact {name}", unit="file") if new else None
        about = {"format": SAMPLES_FORMAT, "store": store.url, "checkpoint": name,
                 "checkpoint_sha256": meta["checkpoints"][name].get("sha256", ""), "dataset": store.spec.dataset}
        for group, shards in sorted(new.items()):
            tables = []
            if compacted.get(group):
                old = pq.read_table(files.path(layout.samples_file(name, group)), filesystem=files.fs,
                                    filters=pc.field("shard").isin(sorted(compacted[group])))
                tables.append(old)
            tables.append(pq.read_table([files.path(layout.commit_part(name, s)) for s in shards],
                                        filesystem=files.fs))
            table = with_description(pa.concat_tables(tables).sort_by("row"), about)
            buffer = io.BytesIO()
            pq.write_table(table, buffer, row_group_size=ROW_GROUP_ROWS)
            files.write_bytes(layout.samples_file(name, group), buffer.getvalue())
            compacted[group] = compacted.get(group, set()) | set(shards)
            bar.update(1)
        if bar is not None:
            bar.close()
        if after_files is not None:
            after_files()
        if new:
            meta = read_metadata(files)
            meta["checkpoints"][name]["compacted"] = {
                str(g): shard_ranges(shards) for g, shards in sorted(compacted.items())}
            files.write_json(layout.STORE_JSON, meta)
        leftover = sorted(parts & set().union(*compacted.values()))
        if leftover:
            files.fs.rm([files.path(layout.commit_part(name, s)) for s in leftover])
            files.forget_listing(layout.commit_dir(name))
        done[name] = sum(len(s) for s in new.values())
    store.refresh()
    return done
