"""`gradlake query` export: writing φ rows to .npy / Parquet vs reading them alone.

    python benchmarks/bench_export.py [--quick] [--dir DIR]

Prints medians over repeats measured in one run, each repeat running the three back to back
(so that load drifting on a shared machine cancels):
  npy_ratio     = export to .npy (streamed, renamed into place) / read of the same rows into memory
  parquet_ratio = export to Parquet (samples columns + phi) / the same read
The read is the floor of any export (the store's float16 -> float32 decode); a ratio near 1
means the write costs little beyond it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile

import numpy as np

from gradlake.query import export, open_store

from bench_store import write_store
from timing import timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="A small smoke run.")
    parser.add_argument("--dir", default=None, help="Folder for the store and the exports (default: a temp dir).")
    args = parser.parse_args()
    n, k, repeats = (4096, 256, 3) if args.quick else (32768, 1024, 5)
    root = tempfile.mkdtemp(dir=args.dir)
    try:
        rng = np.random.default_rng(0)
        url = os.path.join(root, "store")
        write_store(url, rng.standard_normal((n, k)).astype(np.float16), shard_rows=2048)
        store = open_store(url)

        def read():
            for _ in store.iter_blocks(None, "C", None, 4096):
                pass

        npy, parquet = [], []
        for r in range(repeats):
            base = timed(read)
            npy.append(timed(lambda: export(store, os.path.join(root, f"x{r}.npy"), None, "C")) / base)
            parquet.append(timed(lambda: export(store, os.path.join(root, f"x{r}.parquet"), None, "C")) / base)
        mb = n * k * 4 / 1e6
        print(f"export of {n} rows x k = {k} ({mb:.0f} MB as float32), {repeats} repeats")
        print(f"npy_ratio     {statistics.median(npy):.2f}  (runs {', '.join(f'{v:.2f}' for v in npy)})")
        print(f"parquet_ratio {statistics.median(parquet):.2f}  (runs {', '.join(f'{v:.2f}' for v in parquet)})")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
