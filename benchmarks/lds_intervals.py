"""How much an LDS says: intervals and a null for the scores of an LDS run (its lds.parquet).

Per response observable and method: the LDS (gradlake.lds), a 95% bootstrap interval over
subsets (resampled with replacement; the per-sample correlations share their subsets, so an
error over test samples would understate the spread), and a null — the same predictions with
the subsets shuffled, one permutation for every test sample — as its 95th percentile and the
fraction of shuffles scoring at least as high (p).

    python benchmarks/lds_intervals.py runs/lds-mini-ce/lds [--draws 300] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pyarrow.parquet as pq

from gradlake import fsio, lds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("lds_dir", help="an LDS output folder (<out>/lds)")
    parser.add_argument("--draws", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    folder = fsio.Folder(args.lds_dir)
    info = json.loads(folder.read_bytes("lds.json"))
    table = pq.read_table(folder.path("lds.parquet"), filesystem=None if folder.local else folder.fs)
    rng, m = np.random.default_rng(args.seed), info["subsets"]
    print(f"M = {m}, alpha = {info['alpha']}, {info['test_samples']} test samples, {args.draws} draws")
    for observable in info["observables"]:
        part = table.filter(table.column("observable").to_numpy(zero_copy_only=False) == observable)
        actual = part.column("actual").to_numpy().reshape(m, -1)
        for method in info["methods"]:
            predicted = part.column(f"predicted_{method}").to_numpy().reshape(m, -1)
            score = lds.lds(actual, predicted)[0]
            boot = [lds.lds(actual[pick], predicted[pick])[0] for pick in rng.integers(0, m, (args.draws, m))]
            null = np.array([lds.lds(actual, predicted[rng.permutation(m)])[0] for _ in range(args.draws)])
            print(f"{observable} {method:14s} LDS {score:+.3f}  95% [{np.nanpercentile(boot, 2.5):+.3f}, "
                  f"{np.nanpercentile(boot, 97.5):+.3f}]  null 95th percentile {np.percentile(null, 95):+.3f}  "
                  f"p = {np.mean(null >= score):.3f}")


if __name__ == "__main__":
    os.environ.setdefault("GRADLAKE_QUIET", "1")
    main()
