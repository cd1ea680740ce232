"""Model commands: models (preset sizes), train, rollout."""

from __future__ import annotations

import json
from typing import Any, Optional

import typer

from gradlake import fsio
from gradlake.cli.app import EndpointUrl, Profile, Quiet, app, setting, storage_options
from gradlake.config import ModelConfig, TrainConfig, _build
from gradlake.errors import InputError

def _overrides(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InputError(f"--set: expected KEY=VALUE (VALUE as JSON, e.g. width=8 or kernels=[3,3]), got {pair!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            raise InputError(f"--set {key}: expected a JSON value, got {value!r}") from None
    return out


def _table(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


@app.command()
def models(
    channels: int = typer.Option(4, help="Input/output channels (4: compressible Euler, 2: Navier–Stokes)."),
    resolution: int = typer.Option(128, help="Grid size R of the R x R input."),
    quiet: bool = Quiet,
):
    """Every preset's parameter count, and the paper presets' check against the paper's sizes."""
    from gradlake import models as registry

    rows = registry.preset_table(channels, resolution)
    for row in rows:
        row["parameters"] = f"{row['parameters']:,}"
        if "paper" in row:
            row["paper"] = f"{row['paper']:,} ±{registry.PAPER_TOLERANCE:.0%}"
            row["check"] = "ok" if row.pop("within_tolerance") else "OUTSIDE"
    typer.echo(_table(rows))


@app.command()
def train(
    data: str = typer.Option(..., help="Dataset URL (local path or fsspec URL)."),
    out: str = typer.Option(..., help="Run directory: checkpoints go to OUT/checkpoints/epoch-NNNN; resumes."),
    model: str = typer.Option("unet", help="Model: unet or vit."),
    preset: str = typer.Option("tiny", help="Preset: tiny (tests), small (laptop), paper (GPU)."),
    set_: list[str] = typer.Option([], "--set", help="Model hyper-parameter override KEY=VALUE (JSON value); repeatable."),
    epochs: int = setting(TrainConfig, "epochs"),
    batch_size: int = setting(TrainConfig, "batch_size"),
    lr: float = setting(TrainConfig, "lr"),
    weight_decay: float = setting(TrainConfig, "weight_decay"),
    checkpoint_every: int = setting(TrainConfig, "checkpoint_every"),
    patience: int = setting(TrainConfig, "patience"),
    seed: int = setting(TrainConfig, "seed"),
    device: str = setting(TrainConfig, "device"),
    window_mb: int = setting(TrainConfig, "window_mb"),
    deterministic: bool = setting(TrainConfig, "deterministic", "--deterministic/--autotune"),
    endpoint_url: str = EndpointUrl,
    profile: str = Profile,
    quiet: bool = Quiet,
):
    """One-step teacher-forced training on the train split (AdamW, scaled MSE)."""
    from gradlake.models.checkpoint import read_meta
    from gradlake.distributed.executor import run_stage
    from gradlake.stages import train as stage
    from gradlake.train import describe

    model_settings = _build(ModelConfig, {"name": model, "preset": preset, "overrides": _overrides(set_)}, "model")
    settings = _build(TrainConfig, {"epochs": epochs, "batch_size": batch_size, "lr": lr,
                                    "weight_decay": weight_decay, "checkpoint_every": checkpoint_every,
                                    "patience": patience, "seed": seed, "device": device, "window_mb": window_mb,
                                    "deterministic": deterministic}, "train")
    options = storage_options(endpoint_url, profile) or None
    fsio.check_output(out, options)
    runs = run_stage(stage, stage.TrainSpec(data, model_settings, settings, ((settings.seed, out),), options))
    for path in runs["checkpoints"]:
        typer.echo(f"{path}: {describe(read_meta(path, options)['metrics'])}")


@app.command()
def rollout(
    checkpoint: str = typer.Option(..., help="Checkpoint directory (…/checkpoints/epoch-NNNN)."),
    data: str = typer.Option(..., help="Dataset URL."),
    horizon: Optional[int] = typer.Option(None, help="Steps to roll out (default: to the end of each trajectory)."),
    split: str = typer.Option("test", help="Split whose trajectories are rolled out."),
    out: Optional[str] = typer.Option(None, help="Directory for rollout.parquet and rollout.json (default: the checkpoint's)."),
    device: str = typer.Option("auto", help="auto (GPU if there is one), cpu, or cuda[:n]."),
    endpoint_url: str = EndpointUrl,
    profile: str = Profile,
    quiet: bool = Quiet,
):
    """Autoregressive rollout error against ground truth versus horizon, per class."""
    from gradlake.rollout import rollout as run_rollout

    fsio.check_output(out or checkpoint, storage_options(endpoint_url, profile) or None)
    table = run_rollout(checkpoint, data, horizon=horizon, split=split, device=device,
                        out=out or checkpoint, storage_options=storage_options(endpoint_url, profile) or None)
    rows = table.to_pylist()
    for row in rows:
        row["smse_mean"], row["smse_std"] = f"{row['smse_mean']:.5g}", f"{row['smse_std']:.5g}"
    typer.echo(_table(rows))
    typer.echo(f"written: {(out or checkpoint).rstrip('/')}/rollout.parquet, rollout.json")
