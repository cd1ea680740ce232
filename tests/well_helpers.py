"""Files in The Well's HDF5 layout, written by the tests themselves (no downloads)."""

import h5py
import numpy as np

DIMS = {1: ["x"], 2: ["x", "y"], 3: ["x", "y", "z"]}


def write_well(path, d=2, n=3, steps=4, grid=None, tensor=False, constant=False, seed=0):
    """A file in The Well's layout: scalars density, energy; vector momentum (+ tensor stress)."""
    grid = grid or {1: (10,), 2: (6, 5), 3: (4, 3, 5)}[d]
    rng = np.random.default_rng(seed)
    fields = {"t0_fields/density": rng.uniform(0.5, 1.5, (n, steps, *grid)),
              "t0_fields/energy": rng.uniform(1, 3, (n, steps, *grid)),
              "t1_fields/momentum": rng.uniform(-1, 1, (n, steps, *grid, d))}
    if tensor:
        fields["t2_fields/stress"] = rng.uniform(-1, 1, (n, steps, *grid, d, d))
    if constant:
        fields["t0_fields/obstacle"] = rng.uniform(0, 1, grid)  # neither time- nor sample-varying
    with h5py.File(path, "w") as f:
        f.attrs.update({"dataset_name": "toy", "n_spatial_dims": d, "n_trajectories": n,
                        "simulation_parameters": ["gamma"], "gamma": 1.4})
        dims = f.create_group("dimensions")
        dims.attrs["spatial_dims"] = DIMS[d]
        dims.create_dataset("time", data=np.linspace(0, 1, steps).astype(np.float32))
        for group in ("t0_fields", "t1_fields", "t2_fields"):
            g = f.create_group(group)
            names = [k.split("/")[1] for k in fields if k.startswith(group)]
            g.attrs["field_names"] = names
            for name in names:
                data = g.create_dataset(name, data=fields[f"{group}/{name}"].astype(np.float32))
                varying = name != "obstacle"
                data.attrs.update({"time_varying": varying, "sample_varying": varying, "dim_varying": [True] * d})
        f.create_group("boundary_conditions")
    return str(path), fields
