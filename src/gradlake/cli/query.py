"""Query commands: info, query, topk — on any store, at any time."""

from __future__ import annotations

import json
from typing import Optional

import typer

from gradlake import fsio
from gradlake.cli.app import EndpointUrl, Profile, Quiet, app, storage_options

StoreArg = typer.Argument(..., help="Gradient store URL (local path, s3://..., memory://...).")


def _open(store: str, endpoint_url: str, profile: str):
    from gradlake.query import open_store

    return open_store(store, storage_options(endpoint_url, profile) or None)


@app.command()
def info(store: str = StoreArg, endpoint_url: str = EndpointUrl, profile: str = Profile,
         as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."), quiet: bool = Quiet):
    """N, k, dtype, checkpoints, observables, shards done, bytes and provenance of a store."""
    summary = _open(store, endpoint_url, profile).summary()
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
        return
    typer.echo(f"store        {summary['url']}")
    typer.echo(f"samples      {summary['n_samples']} of {summary['n_rows']} rows (splits: {', '.join(summary['splits'])})")
    typer.echo(f"k            {summary['k']}  ({summary['dtype']}; observables {', '.join(summary['observables'])}; "
               f"{summary['probes']} probe(s) for V)")
    typer.echo(f"bytes        {summary['bytes']:,}")
    for name, ck in summary["checkpoints"].items():
        state = "complete" if ck["complete"] else "INCOMPLETE"
        typer.echo(f"checkpoint   {name}: shards {ck['shards_done']}/{ck['shards_total']} {state}  sha256 {ck['sha256'][:12]}")
    prov = summary["provenance"]
    typer.echo(f"dataset      {prov['dataset']}")
    typer.echo(f"model        {json.dumps(prov['model'], default=str)[:200]}")
    typer.echo(f"gradlake     {prov.get('gradlake_version', '?')}, created {prov.get('created', '?')}")


@app.command()
def query(
    store: str = StoreArg,
    where: Optional[str] = typer.Option(None, help="Filter on the samples table, e.g. \"class == 'rp' and t < 4\"."),
    observable: str = typer.Option("C", help="Observable whose φ rows to export."),
    checkpoint: Optional[str] = typer.Option(None, help="Checkpoint name (default: the latest)."),
    out: str = typer.Option(..., help="Output file, any fsspec URL: .parquet (samples + phi; what they are in "
                                      "the schema metadata) or .npy (phi; rows in .rows.npy, what they are in .meta.json)."),
    endpoint_url: str = EndpointUrl, profile: str = Profile, quiet: bool = Quiet,
):
    """Selected samples with their φ rows, streamed to a Parquet or npy file."""
    from gradlake.query import export, known_values

    opened = _open(store, endpoint_url, profile)
    n = export(opened, out, where, observable, checkpoint,
               storage_options=storage_options(endpoint_url, profile) or None)
    typer.echo(f"{n} samples (checkpoint {opened.checkpoint(checkpoint)}, observable {observable}) -> {out}")
    if n == 0:
        typer.secho(f"note: 0 rows match {where!r}; {known_values(opened, checkpoint)}", err=True, fg="yellow")


@app.command()
def topk(
    store: str = StoreArg,
    query_where: str = typer.Option(..., help="Query samples (responses), e.g. \"split == 'test' and t == 3\"."),
    train_where: str = typer.Option("split == 'train'", help="Candidate training samples (perturbations)."),
    k: int = typer.Option(10, min=1, help="How many most (and least) influential samples per query."),
    pair: str = typer.Option("CC", help="Response and perturbation observables, e.g. CC, MC, EC."),
    checkpoint: Optional[str] = typer.Option(None, help="Checkpoint name (default: the latest)."),
    metric: str = typer.Option("V", help="Observable whose φ's build the metric (V: NTK, C: empirical Fisher)."),
    damping: float = typer.Option(1e-4, "--lambda", help="Damping λ of (η̃ + λI)⁻¹."),
    out: Optional[str] = typer.Option(None, help="Also write the table to this Parquet file (any fsspec URL; "
                                                 "checkpoint, pair and settings in its schema metadata)."),
    endpoint_url: str = EndpointUrl, profile: str = Profile, quiet: bool = Quiet,
):
    """The most and least influential training samples for each query sample (raw H, no normalisation)."""
    from gradlake.query import description_of, write_table
    from gradlake.query import topk as run_topk

    options = storage_options(endpoint_url, profile) or None
    if out:
        fsio.check_access(out, options, "--out")
    table = run_topk(_open(store, endpoint_url, profile), query_where, train_where, k, pair, checkpoint,
                     metric, damping)
    if out:
        write_table(table, out, options)
    about = description_of(table)
    typer.echo(f"checkpoint {about['checkpoint']} (sha256 {about['checkpoint_sha256'][:12]}), pair {pair} "
               f"(response {about['response']} on the query, perturbation {about['perturbation']} on the "
               f"training sample), normalisation {about['normalization']}, metric {metric}, λ = {damping:g}")
    rows = table.to_pylist()
    for row in rows:
        typer.echo(f"query traj {row['query_trajectory']:>4} t {row['query_t']:>3} {row['query_class']:<6} "
                   f"{row['kind']:<6} #{row['rank']:<3} traj {row['trajectory']:>4} t {row['t']:>3} "
                   f"{row['class']:<6} H = {row['influence']:+.4e}")
