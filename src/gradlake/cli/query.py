"""Query commands: info, query, topk, index — on any store, at any time."""

from __future__ import annotations

import json
from typing import Optional

import typer

from gradlake import fsio
from gradlake.cli.app import Address, EndpointUrl, NumCpus, Profile, Quiet, app, storage_options
from gradlake.errors import GradlakeError, InputError

StoreArg = typer.Argument(..., help="Gradient store URL (local path, s3://..., memory://...).")
AsJson = typer.Option(False, "--json", help="Print the result as one JSON object on stdout (for scripts).")


AllowPartial = typer.Option(False, "--allow-partial", help="Answer from the committed shards of a store whose "
                                                           "`grads` did not finish (recorded in the output).")


def _open(store: str, endpoint_url: str, profile: str, allow_partial: bool = False):
    from gradlake.query import open_store

    return open_store(store, storage_options(endpoint_url, profile) or None, allow_partial)


def _note_partial(about: dict) -> None:
    """Say that an answer comes from some of the shards only (--allow-partial)."""
    if about.get("partial"):
        typer.secho(f"note: partial answer (--allow-partial): from {about['partial']['shards_committed']} of "
                    f"{about['partial']['shards_total']} shards of checkpoint {about['checkpoint']}", err=True,
                    fg="yellow")


@app.command()
def info(store: str = StoreArg, endpoint_url: str = EndpointUrl, profile: str = Profile,
         as_json: bool = AsJson,
         verify: bool = typer.Option(False, "--verify", help="Also read every object of the store whole and check "
                                                             "its checksums; exit 1 naming each damaged one."),
         quiet: bool = Quiet):
    """N, k, dtype, checkpoints, observables, shards done, bytes and provenance of a store."""
    opened = _open(store, endpoint_url, profile)
    summary = opened.summary()
    summary["exact"] = _known_ridges(opened, endpoint_url, profile)
    if verify:
        from gradlake.store.verify import verify as verify_store

        summary["findings"] = [str(f) for f in verify_store(opened)]
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
    else:
        _print_info(summary)
    if summary.get("findings"):
        raise GradlakeError(f"{store}: {len(summary['findings'])} damaged object(s); `gradlake repair {store}` "
                            "drops them, then a resumed `gradlake grads` recomputes their shards")


def _known_ridges(opened, endpoint_url, profile) -> dict[str, dict]:
    """{reduce name: d_eff and μ_k} from every exact run written into the store."""
    from gradlake.reduce.output import ReduceOutput
    from gradlake.stages.exact_ridge import ridge_of_store

    found = {}
    for name in opened.reduce_names():
        out = ReduceOutput(opened.reduce_url(name), storage_options(endpoint_url, profile) or None)
        ridge = ridge_of_store(out, opened.spec.k)
        if ridge is not None:
            found[name] = ridge
    return found


def ridge_line(ridge: dict) -> str:
    """d_eff and μ_k in words: what the projected H of rank k is an influence at."""
    d_eff = f"{ridge['d_eff']:,.0f}" if ridge["d_eff"] is not None else "?"
    mu, beyond = ridge["mu_k"], ridge["mu_k_beyond"]
    at = f"μ_k = {mu:.3g}" if mu is not None else f"μ_k {'>' if beyond > ridge['damping'] else '<'} {beyond:g}"
    return (f"exact H at λ = {ridge['damping']:g} has d_eff = {d_eff} of {ridge['n_outputs']:,} outputs; the "
            f"projected H of k = {ridge['k']:,} is the influence at the effective ridge {at} (d_eff(μ_k) = k)")


def _print_info(summary: dict) -> None:
    typer.echo(f"store        {summary['url']}")
    typer.echo(f"samples      {summary['n_samples']} of {summary['n_rows']} rows (splits: {', '.join(summary['splits'])})")
    typer.echo(f"k            {summary['k']}  ({summary['dtype']}; observables {', '.join(summary['observables'])}; "
               f"{summary['probes']} probe(s) for V)")
    typer.echo(f"bytes        {summary['bytes']:,}")
    for name, ck in summary["checkpoints"].items():
        state = "complete" if ck["complete"] else "INCOMPLETE"
        typer.echo(f"checkpoint   {name}: shards {ck['shards_done']}/{ck['shards_total']} {state}  sha256 {ck['sha256'][:12]}")
        for obs, shards in ck["missing_data"].items():
            typer.echo(f"             DAMAGED: grads.zarr/{name}/{obs} has no data for committed shard(s) "
                       f"{', '.join(map(str, shards[:10]))}{' ...' if len(shards) > 10 else ''}")
        for finding in ck["damaged"]:
            typer.echo(f"             DAMAGED: {finding}")
    prov = summary["provenance"]
    typer.echo(f"dataset      {prov['dataset']}")
    typer.echo(f"model        {json.dumps(prov['model'], default=str)[:200]}")
    typer.echo(f"gradlake     {prov.get('gradlake_version', '?')}, created {prov.get('created', '?')}")
    for name, ridge in summary["exact"].items():
        typer.echo(f"exact        {name}: {ridge_line(ridge)}")
    if "findings" in summary:
        typer.echo(f"verified     every object read: {len(summary['findings'])} damaged")
        for finding in summary["findings"]:
            typer.echo(f"FINDING      {finding}")


@app.command()
def query(
    store: str = StoreArg,
    where: Optional[str] = typer.Option(None, help="Filter on the samples table, e.g. \"class == 'rp' and t < 4\"."),
    observable: str = typer.Option("C", help="Observable whose φ rows to export."),
    checkpoint: Optional[str] = typer.Option(None, help="Checkpoint name (default: the latest)."),
    out: str = typer.Option(..., help="Output file, any fsspec URL: .parquet (samples + phi; what they are in "
                                      "the schema metadata) or .npy (phi; rows in .rows.npy, what they are in .meta.json)."),
    allow_partial: bool = AllowPartial, as_json: bool = AsJson, endpoint_url: str = EndpointUrl, profile: str = Profile,
    quiet: bool = Quiet,
):
    """Selected samples with their φ rows, streamed to a Parquet or npy file."""
    from gradlake.query import describe, export, known_values

    opened = _open(store, endpoint_url, profile, allow_partial)
    n = export(opened, out, where, observable, checkpoint,
               storage_options=storage_options(endpoint_url, profile) or None)
    about = describe(opened, checkpoint)
    if as_json:
        typer.echo(json.dumps({"samples": n, "checkpoint": opened.checkpoint(checkpoint), "observable": observable,
                               "where": where, "out": out, **({"partial": about["partial"]} if "partial" in about
                                                              else {})}, indent=2))
    else:
        typer.echo(f"{n} samples (checkpoint {opened.checkpoint(checkpoint)}, observable {observable}) -> {out}")
    _note_partial(about)
    if n == 0:
        typer.secho(f"note: 0 rows match {where!r}; {known_values(opened, checkpoint)}", err=True, fg="yellow")


@app.command()
def topk(
    store: str = StoreArg,
    query_where: str = typer.Option(..., help="Query samples (responses), e.g. \"split == 'test' and t == 3\"."),
    train_where: Optional[str] = typer.Option(None, help="Candidate training samples (perturbations); default "
                                                         "\"split == 'train'\", with --index the index's."),
    k: int = typer.Option(10, min=1, help="How many most (and least) influential samples per query."),
    pair: str = typer.Option("CC", help="Response and perturbation observables, e.g. CC, MC, EC."),
    checkpoint: Optional[str] = typer.Option(None, help="Checkpoint name (default: the latest)."),
    metric: Optional[str] = typer.Option(None, help="Observable whose φ's build the metric (V: NTK, C: empirical "
                                                    "Fisher); default V, with --index the index's."),
    damping: Optional[float] = typer.Option(None, "--lambda", help="Damping λ of (η̃ + λI)⁻¹; default 1e-4, "
                                                                  "with --index the index's."),
    out: Optional[str] = typer.Option(None, help="Also write the table to this Parquet file (any fsspec URL; "
                                                 "checkpoint, pair and settings in its schema metadata)."),
    use_ray: bool = typer.Option(False, "--ray", help="Run the parts of the pass as Ray tasks (--address implies it)."),
    address: str = Address,
    num_cpus: int = NumCpus,
    parts: int = typer.Option(0, "--parts", min=0, help="Parts of the pass, each a whole number of shards; 0 = "
                                                        "automatic (parts of a bounded number of rows; on Ray "
                                                        "at least two per CPU of the cluster)."),
    index: Optional[str] = typer.Option(None, "--index", help="Approximate: search the index of this name beside "
                                                              "the store (`gradlake index build`); the candidates "
                                                              "it finds are re-scored exactly."),
    nprobe: int = typer.Option(16, "--nprobe", min=1, help="With --index: IVF lists searched per query."),
    refine: int = typer.Option(16, "--refine", min=1, help="With --index: refine × k candidates per query (each "
                                                           "of the top and bottom searches) re-scored exactly."),
    group_by: Optional[str] = typer.Option(None, "--group-by", help="Score query groups, not samples: the "
                                                                    "queries of each trajectory, class or t."),
    aggregate: Optional[str] = typer.Option(None, "--aggregate", help="A group's φ: the mean (default) or sum of "
                                                                      "its members'; alone: one group of all queries."),
    by_layer: bool = typer.Option(False, "--by-layer", help="Add each listed pair's share of H per layer group and "
                                                            "parameter block."),
    allow_partial: bool = AllowPartial, as_json: bool = AsJson, endpoint_url: str = EndpointUrl, profile: str = Profile,
    quiet: bool = Quiet,
):
    """The most and least influential training samples for each query sample (raw H, no normalisation).

    One streamed pass over the candidates for all queries: in this process, or as Ray tasks with
    --ray / --address; or, with --index, an approximate search of a prebuilt index."""
    from gradlake.query import description_of, write_table

    options = storage_options(endpoint_url, profile) or None
    use_ray = use_ray or bool(address)
    if out:
        fsio.check_output(out, options, folder=False)
    if index is not None:
        if use_ray or parts or group_by or aggregate or by_layer:
            raise InputError("--index searches the index in this process; --ray, --address, --parts, --group-by, "
                             "--aggregate and --by-layer are for the exact pass")
        table = _approximate_topk(store, index, query_where, train_where, k, pair, checkpoint, metric, damping,
                                  nprobe, refine, options)
    else:
        settings = dict(query_where=query_where, train_where="split == 'train'" if train_where is None else train_where,
                        k=k, pair=pair, checkpoint=checkpoint, metric=metric or "V",
                        damping=1e-4 if damping is None else damping, group_by=group_by, aggregate=aggregate,
                        by_layer=by_layer)
        opened = _open(store, endpoint_url, profile, allow_partial)
        if use_ray:
            from gradlake.distributed.query_tasks import topk as ray_topk

            table = ray_topk(opened.url, **settings, storage_options=options, parts=parts, address=address,
                             num_cpus=num_cpus, allow_partial=allow_partial)
        else:
            from gradlake.query import topk as run_topk

            table = run_topk(opened, **settings, parts=parts or None)
    if out:
        write_table(table, out, options)
    about = description_of(table)
    if as_json:
        typer.echo(json.dumps({**about, "rows": table.to_pylist()}, indent=2, default=str))
        return
    typer.echo(f"checkpoint {about['checkpoint']} (sha256 {about['checkpoint_sha256'][:12]}), pair {about['pair']} "
               f"(response {about['response']} on the query, perturbation {about['perturbation']} on the "
               f"training sample), normalisation {about['normalization']}, metric {about['metric']}, "
               f"λ = {about['damping']:g}")
    _note_partial(about)
    if about.get("approximate"):
        approx = about["approximate"]
        typer.echo(f"approximate: index {approx['index']} ({approx['factory']} over {approx['rows']} samples of "
                   f"{about['train_where']!r}), nprobe {approx['nprobe']}, {approx['refine']} × k candidates "
                   f"re-scored exactly")
    if about.get("groups"):
        groups = about["groups"]
        typer.echo(f"query groups: {groups['aggregate']} of {groups['of']} per {groups['by']} "
                   f"({groups['groups']} groups)")
    shares = [c for c in table.column_names if c.startswith("share:")]
    for row in table.to_pylist():
        query = (f"group {row['group']} ({row['group_size']})" if "group" in row else
                 f"traj {row['query_trajectory']:>4} t {row['query_t']:>3} {row['query_class']:<6}")
        typer.echo(f"query {query} {row['kind']:<6} #{row['rank']:<3} traj {row['trajectory']:>4} t {row['t']:>3} "
                   f"{row['class']:<6} H = {row['influence']:+.4e}"
                   + "".join(f" {c[6:]} {row[c]:+.3e}" for c in shares))


def _approximate_topk(store: str, name: str, query_where: str, train_where: Optional[str], k: int, pair: str,
                      checkpoint: Optional[str], metric: Optional[str], damping: Optional[float], nprobe: int,
                      refine: int, options):
    """Top-k from the index ``name``, once it is known to answer for these settings."""
    from gradlake.approximate_index import ApproximateIndex

    if len(pair) != 2:
        raise InputError(f"--pair: expected two observable letters like 'CC', got {pair!r}")
    index = ApproximateIndex(store, name, options)
    index.check(checkpoint, pair[1], train_where, metric, damping)
    return index.topk(query_where, k, pair[0], nprobe, refine)


index_app = typer.Typer(help="The approximate top-k index beside a store (faiss-cpu: pip install 'gradlake\\[index]').",
                        no_args_is_help=True)
app.add_typer(index_app, name="index")


@index_app.command("build")
def index_build(
    store: str = StoreArg,
    name: str = typer.Option("default", "--name", help="The index goes to STORE/index/NAME/ (replaced if there)."),
    where: str = typer.Option("split == 'train'", "--where", help="Samples it indexes: the candidates of its queries."),
    observable: str = typer.Option("C", "--observable", help="Perturbation observable whose φ's it indexes."),
    metric: str = typer.Option("V", "--metric", help="Observable whose φ's (of the indexed samples) build η̃."),
    damping: float = typer.Option(1e-4, "--lambda", help="Damping λ of (η̃ + λI)⁻¹, fixed in the index."),
    factory: str = typer.Option("", "--factory", help="faiss index_factory string, e.g. IVF1024,Flat or "
                                                      "IVF4096,PQ64x4fs; \"\" = IVF with √n lists, exact vectors "
                                                      "below 10,000 rows, else 4-bit PQ of k/4 sub-vectors."),
    train_rows: int = typer.Option(32_768, "--train-rows", min=1, help="Samples the index's lists are trained on."),
    seed: int = typer.Option(0, "--seed", help="Seed of the choice of training samples."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Checkpoint name (default: the latest)."),
    endpoint_url: str = EndpointUrl, profile: str = Profile, quiet: bool = Quiet,
):
    """Build the approximate index of the whitened φ's of a selection, beside the store."""
    from gradlake.approximate_index import INDEX_DIR, build_index

    record = build_index(store, name, where, observable, metric, checkpoint, factory or None, damping, train_rows,
                         seed, storage_options(endpoint_url, profile) or None)
    typer.echo(json.dumps({**record, "url": fsio.join(store, INDEX_DIR, name)}, indent=2))


@index_app.command("list")
def index_list(store: str = StoreArg, endpoint_url: str = EndpointUrl, profile: str = Profile, quiet: bool = Quiet):
    """The indexes beside a store and what each was built from."""
    from gradlake.approximate_index import index_records

    records = index_records(_open(store, endpoint_url, profile).url, storage_options(endpoint_url, profile) or None)
    for name, r in records.items():
        typer.echo(f"{name:<12} {r['factory']} over {r['rows']} samples ({r['where']!r}) of checkpoint "
                   f"{r['checkpoint']}: observable {r['observable']}, metric {r['metric']}, λ = {r['damping']:g}, "
                   f"built {r['built']}")
    if not records:
        typer.echo("no index (build one with `gradlake index build`)")
