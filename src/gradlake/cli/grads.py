"""grads command: projected per-sample gradients of checkpoints into a gradient store."""

from __future__ import annotations

import json
from typing import Optional

import typer

from gradlake import fsio
from gradlake.cli.app import Address, EndpointUrl, NumCpus, Profile, Quiet, app, names, setting, storage_options
from gradlake.config import GradsConfig


def expand_checkpoints(paths: list[str], options: dict[str, str]) -> list[str]:
    """Checkpoint folders; a file in one (model.safetensors, ...) means its folder, and a
    training directory stands for all of its checkpoints."""
    from gradlake.models.checkpoint import checkpoint_dir, list_checkpoints

    expanded = []
    for path in paths:
        folder = checkpoint_dir(path)
        expanded += list_checkpoints(folder, options or None) or [folder]
    return expanded


@app.command()
def grads(
    data: str = typer.Option(..., "--data", help="Dataset URL (local path, s3://..., memory://...)."),
    checkpoint: str = typer.Option(..., "--checkpoint",
                                   help="Checkpoint path(s), comma-separated; a training directory means all of its checkpoints."),
    out: str = typer.Option(..., "--out", help="Gradient store URL; an existing store of the same run is extended or resumed."),
    workers: int = setting(GradsConfig, "workers"),
    observables: str = setting(GradsConfig, "observables"),
    k_in: int = setting(GradsConfig, "k_in"),
    k_out: int = setting(GradsConfig, "k_out"),
    storage_dtype: str = setting(GradsConfig, "storage_dtype", "--storage-dtype", "--dtype"),
    probes: int = setting(GradsConfig, "probes"),
    seed: int = setting(GradsConfig, "seed"),
    probe_seed: Optional[int] = setting(GradsConfig, "probe_seed"),
    splits: str = setting(GradsConfig, "splits"),
    shard_rows: int = setting(GradsConfig, "shard_rows"),
    batch_size: int = setting(GradsConfig, "batch_size"),
    threads: int = setting(GradsConfig, "threads_per_worker", "--threads"),
    device: str = setting(GradsConfig, "device"),
    retries: int = setting(GradsConfig, "retries"),
    projection: str = setting(GradsConfig, "projection"),
    k_dense: int = setting(GradsConfig, "k_dense"),
    precision: str = setting(GradsConfig, "precision"),
    allocation: str = setting(GradsConfig, "allocation"),
    k_total: int = setting(GradsConfig, "k_total"),
    calibration_samples: int = setting(GradsConfig, "calibration_samples"),
    address: str = Address,
    num_cpus: int = NumCpus,
    endpoint_url: str = EndpointUrl,
    profile: str = Profile,
    quiet: bool = Quiet,
):
    """Compute projected per-sample gradients of each checkpoint into a gradient store."""
    from gradlake import config
    from gradlake.distributed.grads_stage import run_grads

    job = config.parse_job({
        "stages": ["grads"], "reduce": {"pairs": []},
        "grads": {"observables": names(observables), "k_in": k_in, "k_out": k_out, "storage_dtype": storage_dtype,
                  "probes": probes, "seed": seed, "probe_seed": probe_seed, "splits": names(splits), "shard_rows": shard_rows,
                  "batch_size": batch_size, "workers": workers, "threads_per_worker": threads,
                  "device": device, "retries": retries, "projection": projection, "k_dense": k_dense,
                  "precision": precision, "allocation": allocation, "k_total": k_total,
                  "calibration_samples": calibration_samples},
        "ray": {"address": address, "num_cpus": num_cpus},
    }, source="gradlake grads")
    options = storage_options(endpoint_url, profile)
    fsio.check_output(out, options or None)
    checkpoints = expand_checkpoints(names(checkpoint), options)
    summary = run_grads(data, checkpoints, out, job.grads, job.ray, storage_options=options)
    typer.echo(json.dumps(summary, indent=2))


@app.command()
def repair(store: str = typer.Argument(..., help="Gradient store URL (local path, s3://..., memory://...)."),
           endpoint_url: str = EndpointUrl, profile: str = Profile, quiet: bool = Quiet):
    """Read every object of a store and drop the damaged shards: the store is left consistent, with
    those shards uncommitted, and a resumed `gradlake grads` recomputes them."""
    from gradlake.store import GradientStore, Lease
    from gradlake.store.layout import StoreFiles
    from gradlake.store.verify import repair as drop, verify

    options = storage_options(endpoint_url, profile) or None
    opened = GradientStore.open(store, options, allow_partial=True)
    with Lease(StoreFiles(opened.url, options), "repair"):
        findings = verify(opened)
        for finding in findings:
            typer.echo(f"damaged   {finding}")
        dropped = drop(opened, findings)
    if not dropped:
        typer.echo(f"{store}: nothing to repair (every object reads whole, its checksums match)")
        return
    for name, shards in dropped.items():
        typer.echo(f"dropped   checkpoint {name}: shard(s) {', '.join(map(str, shards))} (now uncommitted)")
    typer.echo(f"{store}: consistent; resume `gradlake grads ... --out {store}` to recompute the dropped shards")
