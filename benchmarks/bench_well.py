"""Reading The Well's HDF5 in place: trajectories per second against two references.

A 2-D Euler-like file in The Well's layout (density, energy, pressure; momentum) is written to a
temporary folder and also ingested into the project's format. Each round reads the same random
trajectories three ways: (1) ``Dataset.open(<file>)`` in place (``WellDataset.read``), (2) the
ingested copy (``Dataset.read``, zarr), (3) plain h5py reads of the same fields, kept in memory, with no
reshaping (the floor). Rounds interleave the three; medians are reported, and the ratios
in-place ÷ floor and in-place ÷ copy (as speeds: > 1 means in place is faster).

    python benchmarks/bench_well.py [--quick] [--resolution 128] [--trajectories 8] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from gradlake.data import Dataset
from gradlake.data.ingest import ingest_well
from timing import timed


def write_file(path: Path, n: int, steps: int, resolution: int) -> None:
    rng = np.random.default_rng(0)
    shape = (n, steps, resolution, resolution)
    with h5py.File(path, "w") as f:
        f.attrs.update({"dataset_name": "bench", "n_spatial_dims": 2, "n_trajectories": n})
        dims = f.create_group("dimensions")
        dims.attrs["spatial_dims"] = ["x", "y"]
        dims.create_dataset("time", data=np.linspace(0, 1, steps).astype(np.float32))
        t0, t1 = f.create_group("t0_fields"), f.create_group("t1_fields")
        f.create_group("t2_fields")
        t0.attrs["field_names"] = ["density", "energy", "pressure"]
        for name in ("density", "energy", "pressure"):
            t0.create_dataset(name, data=rng.uniform(0.5, 1.5, shape).astype(np.float32))
        t1.attrs["field_names"] = ["momentum"]
        t1.create_dataset("momentum", data=rng.uniform(-1, 1, (*shape, 2)).astype(np.float32))


def floor_read(f: h5py.File, ids: list[int]) -> float:
    """Plain h5py reads of the same fields, kept in memory as a reader must (no reshaping)."""
    start = time.perf_counter()
    kept = [f[name][i] for i in ids
            for name in ("t0_fields/density", "t0_fields/energy", "t0_fields/pressure", "t1_fields/momentum")]
    seconds = time.perf_counter() - start
    del kept
    return seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: small file, few repeats")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--trajectories", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    if args.quick:
        args.resolution, args.trajectories, args.steps, args.repeats = 32, 4, 5, 3
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.hdf5"
        write_file(path, args.trajectories, args.steps, args.resolution)
        in_place = Dataset.open(str(path))
        copy = ingest_well([str(path)], str(Path(tmp) / "copy"))
        rng = np.random.default_rng(1)
        times: dict[str, list[float]] = {"in_place": [], "copy": [], "floor": []}
        with h5py.File(path, "r") as f:
            for round_ in range(args.repeats + 1):  # the first round warms up
                ids = rng.permutation(args.trajectories).tolist()
                measured = {"in_place": timed(lambda: in_place.read(ids)),
                            "copy": timed(lambda: copy.read(ids)),
                            "floor": floor_read(f, ids)}
                if round_:
                    for key, seconds in measured.items():
                        times[key].append(seconds)
    median = {key: statistics.median(values) for key, values in times.items()}
    result = {
        "grid": f"{args.resolution}x{args.resolution}", "trajectories": args.trajectories, "steps": args.steps,
        "trajectories_per_s": {k: round(args.trajectories / v, 1) for k, v in median.items()},
        "in_place_speed_vs_floor": round(median["floor"] / median["in_place"], 3),
        "in_place_speed_vs_copy": round(median["copy"] / median["in_place"], 3),
    }
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return result


if __name__ == "__main__":
    main()
