"""Hash every output of a run folder, to show that a change leaves results bit-identical.

    python benchmarks/hash_outputs.py RUN                 # one line per output: hash  path
    python benchmarks/hash_outputs.py RUN --compare OTHER  # exit 1 and list what differs

Zarr arrays are hashed by dtype, shape and data (not their metadata files); Parquet files by
schema and values (not their file metadata); JSON files by their content without the fields
that record when, how long or with which version (see VOLATILE); every other file by its bytes.
The run folder's own path is replaced by ``<run>`` in JSON and text files, so two runs into
different folders compare equal there (figures may still show a path: for bit identity, write
both runs at one path, move the first aside, and compare with --keep-paths).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import zarr

# JSON keys whose values change from run to run with the same inputs and code.
VOLATILE = ("seconds", "elapsed", "time", "started", "created", "added", "updated", "finished", "date",
            "version", "host", "pid", "duration", "wall", "_s", "throughput", "rate", "rss")


def _volatile(key: str) -> bool:
    key = key.lower()
    return any(word in key for word in VOLATILE)


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if not _volatile(k)}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:16]


def hash_array(array) -> str:
    data = np.ascontiguousarray(array[...])
    return _digest(str(data.dtype).encode(), repr(data.shape).encode(), data.tobytes())


def hash_parquet(path: Path) -> str:
    table = pq.read_table(path, partitioning=None).replace_schema_metadata(None)
    parts = [str(table.schema).encode()]
    for name in table.column_names:
        parts.append(repr(table.column(name).to_pylist()).encode())
    return _digest(*parts)


def _zarr_arrays(root: Path):
    """(path of the array's folder, array) of every array under a zarr v3 hierarchy at ``root``."""
    for meta in sorted(root.rglob("zarr.json")):
        node = json.loads(meta.read_text())
        if node.get("node_type") == "array":
            yield meta.parent, zarr.open_array(str(meta.parent), mode="r")


def hashes(run: Path, keep_paths: bool = False) -> dict[str, str]:
    """Relative path -> hash of every output under ``run`` (its own path replaced by ``<run>``
    in JSON and text files unless ``keep_paths``)."""
    own_path = "\0" if keep_paths else str(run)
    out: dict[str, str] = {}
    zarr_roots = sorted({p.parent for p in run.rglob("zarr.json") if p.parent.name.endswith(".zarr")})
    covered: list[Path] = []
    for root in zarr_roots:
        if any(parent in covered for parent in root.parents):
            continue
        covered.append(root)
        for folder, array in _zarr_arrays(root):
            out[str(folder.relative_to(run))] = hash_array(array)
    for path in sorted(run.rglob("*")):
        if not path.is_file() or any(root in path.parents for root in covered):
            continue
        rel = str(path.relative_to(run))
        if path.suffix == ".parquet":
            out[rel] = hash_parquet(path)
        elif path.suffix == ".json":
            try:
                content = _strip(json.loads(path.read_text().replace(own_path, "<run>")))
            except ValueError:
                out[rel] = _digest(path.read_bytes())
            else:
                out[rel] = _digest(json.dumps(content, sort_keys=True).encode())
        elif path.suffix in (".html", ".txt", ".md", ".csv"):
            out[rel] = _digest(path.read_text().replace(own_path, "<run>").encode())
        else:
            out[rel] = _digest(path.read_bytes())
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--compare", type=Path, help="another run folder: report what differs")
    parser.add_argument("--keep-paths", action="store_true",
                        help="do not replace the run folders' paths (runs written at one path, one moved aside)")
    parser.add_argument("--ignore", action="append", default=[],
                        help="skip outputs whose path contains this (repeatable)")
    args = parser.parse_args(argv)
    mine = {k: v for k, v in hashes(args.run, args.keep_paths).items() if not any(s in k for s in args.ignore)}
    if args.compare is None:
        for path, digest in mine.items():
            print(f"{digest}  {path}")
        return 0
    other = {k: v for k, v in hashes(args.compare, args.keep_paths).items() if not any(s in k for s in args.ignore)}
    differ = sorted(k for k in mine.keys() | other.keys() if mine.get(k) != other.get(k))
    for path in differ:
        print(f"differs: {path}  {mine.get(path, '-')} vs {other.get(path, '-')}")
    print(f"{len(mine.keys() & other.keys()) - len([k for k in differ if k in mine and k in other])} "
          f"outputs identical, {len(differ)} differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
