"""report command: PNG figures and an index.html from a gradient store and its reduce."""

from __future__ import annotations

from typing import Optional

import typer

from gradlake.cli.app import EndpointUrl, Profile, Quiet, app, names, storage_options


@app.command()
def report(
    store: str = typer.Argument(..., help="Gradient store URL (local path, s3://..., memory://...)."),
    out: str = typer.Option(..., "--out", help="Folder for index.html and figures/ (overwritten by a rerun)."),
    reduce: str = typer.Option("default", "--reduce", help="Name of the reduce whose results to show."),
    normalize: str = typer.Option("", "--normalize",
                                  help="Normalisations of the influence figures, comma-separated (none, row-std, "
                                       "cosine); default row-std, the paper's, when the reduce has it."),
    train: Optional[str] = typer.Option(
        None, "--train", help="Training directory (training curves; rollout tables next to checkpoints)."),
    endpoint_url: str = EndpointUrl,
    profile: str = Profile,
    quiet: bool = Quiet,
):
    """Draw the report of a store's reduce (heatmaps, lags, transfer, spectrum...); print index.html's path."""
    from gradlake import fsio
    from gradlake.errors import InputError
    from gradlake.pipeline import build_report

    options = storage_options(endpoint_url, profile)
    if train:
        fs, path = fsio.filesystem(train, options or None)
        if not fs.exists(path):
            raise InputError(f"--train {train}: no such training directory")
    index = build_report(store, out, reduce_name=reduce, train_dir=train, storage_options=options or None,
                         normalizations=names(normalize) or None)
    typer.echo(index)
