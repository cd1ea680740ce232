"""reduce and exact commands: influence quantities from a gradient store; the exact minibatch mode."""

from __future__ import annotations

import json

import typer

from gradlake.cli.app import Address, EndpointUrl, NumCpus, Profile, Quiet, app, names, numbers, setting, storage_options
from gradlake.config import ReduceConfig


@app.command()
def reduce(
    store: str = typer.Argument(..., help="Gradient store URL (local path, s3://..., memory://...)."),
    name: str = setting(ReduceConfig, "name"),
    metric: str = setting(ReduceConfig, "metric"),
    metric_estimator: str = setting(ReduceConfig, "metric_estimator"),
    damping: float = setting(ReduceConfig, "damping", "--lambda"),
    lambdas: str = setting(ReduceConfig, "lambdas"),
    normalize: str = setting(ReduceConfig, "normalize"),
    pairs: str = setting(ReduceConfig, "pairs"),
    reference_split: str = setting(ReduceConfig, "reference_split"),
    checkpoints: str = setting(ReduceConfig, "checkpoints"),
    response: str = setting(ReduceConfig, "response"),
    perturbation: str = setting(ReduceConfig, "perturbation"),
    topk: int = setting(ReduceConfig, "topk"),
    topk_queries: str = setting(ReduceConfig, "topk_queries"),
    tile_rows: str = setting(ReduceConfig, "tile_rows"),
    tile_cols: str = setting(ReduceConfig, "tile_cols"),
    tile_max: int = setting(ReduceConfig, "tile_max"),
    tile_size: int = setting(ReduceConfig, "tile_size"),
    distance_pairs: int = setting(ReduceConfig, "distance_pairs"),
    distance_bins: int = setting(ReduceConfig, "distance_bins"),
    seed: int = setting(ReduceConfig, "seed"),
    block_rows: int = setting(ReduceConfig, "block_rows"),
    exact: bool = typer.Option(False, "--exact", help="Also run the exact minibatch mode (last checkpoint)."),
    by_layer: bool = setting(ReduceConfig, "by_layer"),
    data: str = typer.Option("", "--data", help="Where the store's dataset lives now, if it moved (checked by "
                                                "its fingerprint); default: the URL the store records."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Replace results of the same --name made with other settings (else refused)."),
    address: str = Address,
    num_cpus: int = NumCpus,
    endpoint_url: str = EndpointUrl,
    profile: str = Profile,
    quiet: bool = Quiet,
):
    """Reduce stored projected gradients to the paper's influence quantities."""
    from gradlake import config
    from gradlake.distributed.reduce_tasks import run_reduce

    job = config.parse_job({
        "stages": ["reduce"],
        "reduce": {"name": name, "metric": metric, "damping": damping,
                   "lambdas": [float(x) for x in names(lambdas)], "normalize": names(normalize),
                   "pairs": names(pairs), "reference_split": reference_split,
                   "checkpoints": names(checkpoints), "response": response, "perturbation": perturbation,
                   "topk": topk, "topk_queries": topk_queries, "tile_rows": tile_rows, "tile_cols": tile_cols,
                   "tile_max": tile_max, "distance_pairs": distance_pairs, "block_rows": block_rows,
                   "metric_estimator": metric_estimator, "tile_size": tile_size, "distance_bins": distance_bins,
                   "seed": seed, "by_layer": by_layer, "exact": {"enabled": exact}},
        "ray": {"address": address, "num_cpus": num_cpus},
    }, source="gradlake reduce")
    summary = run_reduce(store, job.reduce, job.ray, storage_options(endpoint_url, profile), overwrite=overwrite,
                         data_url=data)
    typer.echo(json.dumps(summary, indent=2, default=str))


@app.command()
def exact(
    checkpoint: str = typer.Option(..., "--checkpoint", help="Checkpoint path."),
    data: str = typer.Option(..., "--data", help="Dataset URL."),
    out: str = typer.Option("", "--out", help="A gradient store (results go to STORE/reduce/NAME/) or a folder; default ./exact-<checkpoint>."),
    name: str = typer.Option("exact", "--name", help="Results name inside a gradient store."),
    damping: float = typer.Option(1e-4, "--lambda", help="Damping λ."),
    lambdas: str = typer.Option("", "--lambdas", help="Further λ values, comma-separated: H at each from the same solve (dense, lanczos)."),
    htol: float = typer.Option(1e-3, "--htol", help="lanczos: stop when the proven bound on H's error (units of every normalisation) is at most this."),
    rtol: float = typer.Option(1e-6, "--rtol", help="pcg: relative residual per right-hand side (bounds every entry's error by rtol ‖r_A,i‖‖r_B,j‖)."),
    per_class: int = typer.Option(16, "--per-class", help="Transitions of the trajectory of each class."),
    minibatches: int = typer.Option(1, "--minibatches", help="Minibatches of the split (0 = every one); minibatch 0 is the paper's."),
    method: str = typer.Option("auto", "--method", help="auto (dense when it fits, else lanczos), dense, lanczos (block Krylov: every λ from one solve), pcg (one λ) or paper (the PDEHats solve)."),
    paper_check: int = typer.Option(0, "--paper-check", help="Minibatches (the first ones) also solved the paper's way and compared with the converged H."),
    krylov_gb: float = typer.Option(4.0, "--krylov-gb", help="lanczos: memory of the Krylov basis."),
    space: str = typer.Option("auto", "--space", help="auto, output or parameter."),
    agreement: int = typer.Option(1, "--agreement", help="Minibatches (the first ones) with the projected-vs-exact report."),
    cpus: int = typer.Option(1, "--cpus", help="CPUs (torch threads) per minibatch task."),
    classes: int = typer.Option(3, "--num-classes", help="How many classes a minibatch takes (the first, sorted by name)."),
    split: str = typer.Option("test", "--split", help="Split the batch's trajectories come from."),
    ks: str = typer.Option("4,8,16", "--ks", help="k_in = k_out values of the agreement report, comma-separated."),
    probes: int = typer.Option(0, "--probes", help="V probes of the projected estimate's metric (0: batch × probes >= 2k)."),
    pairs: str = typer.Option("CC,MC,EC", "--pairs", help="Observable pairs, comma-separated."),
    normalize: str = typer.Option("none,row-std,cosine", "--normalize", help="Normalisations of the agreement report."),
    max_iter: int = typer.Option(2000, "--max-iter", help="pcg and paper iterations; lanczos block steps."),
    block: int = typer.Option(8, "--block", help="Vectors per vmapped JVP/VJP (memory vs speed)."),
    compute_dtype: str = typer.Option("float64", "--compute-dtype", "--dtype",
                                      help="Precision of the model's products (J, JVP, VJP): float64 or float32."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    address: str = Address,
    num_cpus: int = NumCpus,
    endpoint_url: str = EndpointUrl,
    profile: str = Profile,
    quiet: bool = Quiet,
):
    """The paper's exact minibatch influence on many minibatches (Ray tasks), its statistics, and its
    agreement with projections."""
    from gradlake import config, fsio
    from gradlake.distributed.cluster import ensure_ray
    from gradlake.distributed.exact_tasks import run_exact

    job = config.parse_job({
        "stages": ["reduce"],
        "reduce": {"damping": damping, "lambdas": numbers(lambdas, "--lambdas"), "pairs": names(pairs),
                   "normalize": names(normalize),
                   "exact": {"enabled": True, "htol": htol, "rtol": rtol, "per_class": per_class, "classes": classes,
                             "paper_check": paper_check, "krylov_gb": krylov_gb,
                             "minibatches": minibatches, "method": method, "space": space, "agreement": agreement,
                             "cpus": cpus, "split": split, "ks": [int(k) for k in names(ks)], "probes": probes,
                             "max_iter": max_iter, "block": block, "compute_dtype": compute_dtype,
                             "device": device}},
        "ray": {"address": address, "num_cpus": num_cpus},
    }, source="gradlake exact")
    options = storage_options(endpoint_url, profile)
    from gradlake.models.checkpoint import checkpoint_dir

    target = out or "exact-" + checkpoint_dir(checkpoint).rsplit("/", 1)[-1]
    fs, path = fsio.filesystem(target, options)
    if fs.exists(path.rstrip("/") + "/store.json"):
        from gradlake.store import GradientStore

        target = GradientStore.open(target, options or None).reduce_url(name)
    from gradlake.reduce.output import ReduceOutput
    from gradlake.store import Lease

    ensure_ray(job.ray.address, job.ray.num_cpus)
    with Lease(ReduceOutput(target, options or None), f"exact {name!r}"):  # one writer per folder
        summary = run_exact(checkpoint, data, target, job.reduce.exact, job.reduce.damping, job.reduce.lambdas,
                            job.reduce.pairs,
                            job.reduce.normalize, options or None)
    typer.echo(json.dumps({**summary, "out": target}, indent=2, default=str))
