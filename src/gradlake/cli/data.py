"""Data commands: `generate euler|ns` and `ingest pdegym|well`."""

from __future__ import annotations

import time
from typing import Optional

import typer

from gradlake import fsio
from gradlake.cli.app import EndpointUrl, Profile, Quiet, app, storage_options
from gradlake.config import DataConfig, _build
from gradlake.errors import InputError

generate_app = typer.Typer(help="Simulate a trajectory dataset with a built-in generator.", no_args_is_help=True)
ingest_app = typer.Typer(help="Convert external trajectory files into a gradlake dataset.", no_args_is_help=True)
app.add_typer(generate_app, name="generate")
app.add_typer(ingest_app, name="ingest")

Out = typer.Option(..., "--out", help="Dataset URL to write (local path, s3://..., memory://...).")
Seed = typer.Option(0, "--seed", help="Seed of the initial conditions and of the trajectory splits.")
SplitFractions = typer.Option("0.65,0.05,0.30", "--split-fractions",
                              help="Train, val, test fractions (by trajectory, per class).")


def _split_fractions(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise InputError(f"--split-fractions: expected three comma-separated fractions like 0.65,0.05,0.30, got {text!r}")
    return values  # type: ignore[return-value]


def _summary(ds, verb: str, seconds: float) -> str:
    classes = ", ".join(f"{c} {n}" for c, n in ds.manifest["classes"].items())
    splits = ", ".join(f"{s} {n}" for s, n in sorted(ds.manifest["splits"].items()))
    grid = "x".join(str(n) for n in ds.resolution)
    return (f"{verb} {ds.family} dataset {ds.url}: {ds.n_trajectories} trajectories x {ds.n_times} steps "
            f"x {len(ds.channels)} channels at {grid} ({classes}; {splits}); "
            f"fingerprint {ds.fingerprint[:12]} in {seconds:.1f} s")


def _generate(family: str, classes: str, trajectories: int, steps: int, resolution: int, seed: int,
              out: str, output_dt: float, cfl: float, batch: int, device: str, splits: str,
              options: dict[str, str], viscosity: float | None = None) -> None:
    from gradlake.data import Dataset
    from gradlake.distributed.executor import run_stage
    from gradlake.stages import data as stage

    values = {"family": family, "classes": [c.strip() for c in classes.split(",") if c.strip()],
              "trajectories": trajectories, "steps": steps, "resolution": resolution, "seed": seed,
              "output_dt": output_dt, "cfl": cfl, "batch": batch, "device": device,
              "split_fractions": list(_split_fractions(splits))}
    if viscosity is not None:
        values["viscosity"] = viscosity
    config = _build(DataConfig, values, "")
    fsio.check_output(out, options or None)
    start = time.monotonic()
    record = run_stage(stage, stage.DataSpec(config, out, options or None))
    ds = Dataset.open(record["url"], storage_options=options or None)
    typer.echo(_summary(ds, "generated", time.monotonic() - start))


@generate_app.command("euler")
def generate_euler(
    classes: str = typer.Option("rp,crp,rpui", "--classes", help="Comma-separated classes: rp, crp, rpui."),
    trajectories: int = typer.Option(6, "--trajectories", help="Trajectories per class."),
    steps: int = typer.Option(9, "--steps", help="Snapshots per trajectory (including t = 0)."),
    resolution: int = typer.Option(64, "--resolution", help="Grid cells per side."),
    seed: int = Seed,
    out: str = Out,
    output_dt: float = typer.Option(0.0, "--output-dt", help="Time between snapshots; 0 -> 0.025."),
    cfl: float = typer.Option(0.0, "--cfl", help="CFL number; 0 -> 0.4."),
    batch: int = typer.Option(16, "--batch", help="Trajectories simulated at once."),
    device: str = typer.Option("cpu", "--device", help="Torch device: cpu, cuda, cuda:N or auto."),
    splits: str = SplitFractions,
    endpoint_url: str = EndpointUrl,
    profile: str = Profile,
    quiet: bool = Quiet,
):
    """2D compressible Euler four-quadrant Riemann problems (straight, curved, uncertain interfaces)."""
    _generate("euler", classes, trajectories, steps, resolution, seed, out, output_dt, cfl, batch, device,
              splits, storage_options(endpoint_url, profile))


@generate_app.command("ns")
def generate_ns(
    classes: str = typer.Option("bb,gauss,sines", "--classes", help="Comma-separated classes: bb, gauss, sines."),
    trajectories: int = typer.Option(6, "--trajectories", help="Trajectories per class."),
    steps: int = typer.Option(9, "--steps", help="Snapshots per trajectory (including t = 0)."),
    resolution: int = typer.Option(64, "--resolution", help="Grid cells per side."),
    seed: int = Seed,
    out: str = Out,
    output_dt: float = typer.Option(0.0, "--output-dt", help="Time between snapshots; 0 -> 0.1."),
    cfl: float = typer.Option(0.0, "--cfl", help="CFL number; 0 -> 0.5."),
    viscosity: float = typer.Option(1e-3, "--viscosity", help="Kinematic viscosity."),
    batch: int = typer.Option(16, "--batch", help="Trajectories simulated at once."),
    device: str = typer.Option("cpu", "--device", help="Torch device: cpu, cuda, cuda:N or auto."),
    splits: str = SplitFractions,
    endpoint_url: str = EndpointUrl,
    profile: str = Profile,
    quiet: bool = Quiet,
):
    """2D incompressible Navier–Stokes (random smooth, Gaussian-vortex and sinusoidal initial data)."""
    _generate("ns", classes, trajectories, steps, resolution, seed, out, output_dt, cfl, batch, device,
              splits, storage_options(endpoint_url, profile), viscosity)


def _ingest(kind: str, paths: list[str], out: str, class_name: Optional[str], seed: int, splits: str,
            options: dict[str, str]) -> None:
    from gradlake.data.ingest import ingest_pdegym, ingest_well

    reader = ingest_pdegym if kind == "pdegym" else ingest_well
    fsio.check_output(out, options or None)
    start = time.monotonic()
    ds = reader(paths, out, class_name, splits=_split_fractions(splits), seed=seed,
                storage_options=options or None, input_options=options or None)
    typer.echo(_summary(ds, "ingested", time.monotonic() - start))


@ingest_app.command("pdegym")
def ingest_pdegym_command(
    paths: list[str] = typer.Argument(..., help="PDEGym netCDF files (CE-RP, CE-CRP, CE-RPUI, NS-BB, NS-Gauss, NS-Sines)."),
    out: str = Out,
    class_name: Optional[str] = typer.Option(None, "--class", help="Class of every file; default: from the file name."),
    seed: int = typer.Option(0, "--seed", help="Seed of the trajectory splits."),
    splits: str = SplitFractions,
    endpoint_url: str = EndpointUrl,
    profile: str = Profile,
    quiet: bool = Quiet,
):
    """PDEGym netCDF files -> a gradlake dataset (Euler data stored as conserved variables)."""
    _ingest("pdegym", paths, out, class_name, seed, splits, storage_options(endpoint_url, profile))


@ingest_app.command("well")
def ingest_well_command(
    paths: list[str] = typer.Argument(..., help="The Well HDF5 files (e.g. euler_multi_quadrants)."),
    out: str = Out,
    class_name: Optional[str] = typer.Option(None, "--class", help="Class of every file; default: its dataset_name."),
    seed: int = typer.Option(0, "--seed", help="Seed of the trajectory splits."),
    splits: str = SplitFractions,
    endpoint_url: str = EndpointUrl,
    profile: str = Profile,
    quiet: bool = Quiet,
):
    """The Well HDF5 files -> a gradlake dataset."""
    _ingest("well", paths, out, class_name, seed, splits, storage_options(endpoint_url, profile))
