"""The report's lag curves: H against Δt per class and relation, by layer group, over
training and across seeds."""

from __future__ import annotations

import numpy as np

from gradlake.report import figures
from gradlake.report.html import Section
from gradlake.report.inputs import ReduceResults, band, column, select
from gradlake.report.plan import RELATION_NAMES, RELATIONS_TEXT, Plan, norm_label, pair_title


def _lambda_rows(table, damping: float):
    """The rows of ``table`` at λ = ``damping`` (not the sweep's other λ)."""
    lam = column(table, "lambda")
    return table.filter(np.isclose(lam, damping, rtol=1e-12, atol=0))


def add_lags(plan: Plan, results: ReduceResults) -> None:
    """Lag curves per checkpoint (and by layer group), then over training and across seeds."""
    section = plan.section("lags", "Lag curves",
                           "H as a function of Δt = t_response − t_perturbation, per trajectory, then the median "
                           f"and interquartile range over trajectories, at λ = {results.damping:g}. {RELATIONS_TEXT}")
    stats = _lambda_rows(results.table("lag_stats.parquet"), results.damping)
    relations = list(RELATION_NAMES)
    for ckpt in results.checkpoints:
        coords = results.array(ckpt, "transfer")[1]
        for _, pair, _, norm in plan.variants(coords):
            part = select(stats, checkpoint=ckpt, pair=pair, normalization=norm)
            classes = sorted(set(part.column("class").to_pylist()) - {"all"}) + ["all"]
            panels = [(RELATION_NAMES[rel], {cls: band(select(part, relation=rel, **{"class": cls}))
                                             for cls in classes
                                             if select(part, relation=rel, **{"class": cls}).num_rows})
                      for rel in relations]
            plan.figure(section, f"lags-{ckpt}-{pair}-{norm}",
                        f"{pair_title(pair)}, {norm}, checkpoint {ckpt}: each line is the median over "
                        "trajectories (of the responding class; black 'all' pools every class) of the mean H at "
                        "each lag with its interquartile band, so a faster fall-off away from Δt = 0 means a "
                        "faster temporal decay of gradient coherence.",
                        figures.lag_curves, group=f"checkpoint {ckpt}", panels=panels,
                        ylabel=norm_label(norm),
                        title=f"{pair_title(pair)} versus lag\n{norm_label(norm)}, checkpoint {ckpt}")
            _layer_shares(plan, section, part, ckpt, pair, norm)
    if len(results.checkpoints) > 1:
        _lags_over_training(plan, section, results, stats)


def _layer_shares(plan: Plan, section: Section, part, ckpt: str, pair: str, norm: str) -> None:
    """With ``[reduce] by_layer``: each layer group's pooled share of the lag curve."""
    shares = [c for c in part.column_names if c.startswith("pooled_share:")]
    if not shares:
        return
    every = select(part, **{"class": "all"})

    def curves(rel):
        rows = select(every, relation=rel).sort_by("lag")
        lag = column(rows, "lag")
        return {**{c.split(":", 1)[1]: (lag, column(rows, c), None, None) for c in shares},
                "all": (lag, column(rows, "pooled_mean"), None, None)}

    panels = [(RELATION_NAMES[rel], curves(rel)) for rel in RELATION_NAMES if select(every, relation=rel).num_rows]
    plan.figure(section, f"lags-layers-{ckpt}-{pair}-{norm}",
                f"{pair_title(pair)}, {norm}, checkpoint {ckpt}: the pooled lag curve (black, all classes) "
                "split into the share of each layer group, φ_A[g] · ((η̃ + λI)⁻¹ φ_B)[g] averaged over the "
                "same pairs; the shares sum to the black curve, so they show which part of the network "
                "carries the influence at each Δt.",
                figures.lag_curves, group=f"checkpoint {ckpt}", panels=panels, ylabel=norm_label(norm),
                legend="layer group (pooled mean); all: their sum",
                title=f"{pair_title(pair)} by layer group versus lag\n{norm_label(norm)}, checkpoint {ckpt}")


def _lags_over_training(plan: Plan, section: Section, results: ReduceResults, stats) -> None:
    """Pooled lag curves of every checkpoint in one figure, and across seeds when there are."""
    coords = results.array(results.checkpoints[0], "transfer")[1]
    across = _lambda_rows(results.table("lag_checkpoints.parquet", partitioned=False), results.damping) \
        if results.has("lag_checkpoints.parquet") else None
    for _, pair, _, norm in plan.variants(coords):
        part = select(stats, pair=pair, normalization=norm, **{"class": "all"})
        panels = _relation_panels(part, "checkpoint", results.checkpoints, str)
        plan.figure(section, f"lags-training-{pair}-{norm}",
                    f"{pair_title(pair)}, {norm}: the lag curve (all classes, median and IQR over "
                    "trajectories) of each checkpoint; how the curves change shows how training changes "
                    "the temporal reach of each sample's influence.",
                    figures.lag_curves, group="over training", panels=panels, ylabel=norm_label(norm),
                    ordered=True,
                    title=f"{pair_title(pair)} versus lag over training\n{norm_label(norm)}, all classes")
        if across is None:
            continue
        seeds = select(across, pair=pair, normalization=norm)
        groups = sorted(set(seeds.column("group").to_pylist()) - {"*"})
        if not groups:
            continue
        panels = _relation_panels(seeds, "group", groups, lambda g: f"{g} (over seeds)")
        plan.figure(section, f"lags-seeds-{pair}-{norm}",
                    f"{pair_title(pair)}, {norm}: for each checkpoint name shared by several seeds, the median "
                    "and IQR over seeds of the pooled lag curve; narrow bands mean the decay does not depend "
                    "on the training seed.",
                    figures.lag_curves, group="across seeds", panels=panels, ylabel=norm_label(norm),
                    title=f"{pair_title(pair)} versus lag across seeds\n{norm_label(norm)}, all classes")


def _relation_panels(table, column: str, values, label) -> list:
    """One panel per relation: {label(value): band of the rows with ``column`` == value}, values without rows left out."""
    panels = []
    for rel in RELATION_NAMES:
        rows = {label(v): select(table, relation=rel, **{column: v}) for v in values}
        panels.append((RELATION_NAMES[rel], {name: band(part) for name, part in rows.items() if part.num_rows}))
    return panels
