"""The report's sections of the projected influence: the metric spectrum, two-time heatmaps
within and across classes, class transfer matrices and influence versus input distance (the
lag curves: gradlake.report.lag_section)."""

from __future__ import annotations

from typing import Any

import numpy as np

from gradlake.report import figures
from gradlake.report.inputs import ReduceResults, band, column, select
from gradlake.report.plan import HEATMAP_READING, RELATION_NAMES, RELATIONS_TEXT, Plan, norm_label, pair_title


def add_missing_reduce(plan: Plan, reduce_name: str, reduce_url: str) -> None:
    """The sections of a reduce, each with a note that there is none."""
    for anchor, title in (("spectrum", "Metric spectrum"), ("intra", "Two-time influence within classes"),
                          ("inter", "Two-time influence across classes"), ("lags", "Lag curves"),
                          ("transfer", "Class transfer matrices"), ("distance", "Influence versus input distance"),
                          ("exact", "Exact versus projected influence")):
        plan.section(anchor, title).notes.append(
            f"No complete reduce named {reduce_name!r} at {reduce_url} (no summary.json); run `gradlake reduce`.")


def add_spectrum(plan: Plan, results: ReduceResults) -> None:
    """The eigenvalues of the metric, per checkpoint, and the reduce's warnings about it."""
    section = plan.section("spectrum", "Metric spectrum")
    spectra = {c: results.array(c, "metric_eigenvalues")[0] for c in results.checkpoints}
    metric = results.settings.get("metric", "V")
    plan.figure(section, "metric-spectrum",
                f"Eigenvalues of the k-space NTK metric η̃ (from φ_{metric} over the reference split), largest "
                "first on a log scale, per checkpoint; directions with eigenvalues below the dashed damping λ "
                "are regularised away in (η̃ + λI)⁻¹.",
                figures.metric_spectrum, spectra=spectra, damping=results.damping,
                title="Spectrum of η̃ (k-space NTK metric)")
    section.notes.extend(metric_notes(results.summary))


def metric_notes(summary: dict[str, Any]) -> list[str]:
    """One note per checkpoint with warnings the reduce recorded about its metric (gradlake.reduce.metric)."""
    by_checkpoint: dict[str, list[dict]] = {}
    for w in summary.get("warnings", []):
        by_checkpoint.setdefault(w.get("checkpoint", "?"), []).append(w)
    return [f"Warning, checkpoint {name}: {'; '.join(w['message'] for w in found)}. The projected H of this "
            "reduce is then not the influence under the k-space NTK metric. Remedy: "
            f"{'; '.join(dict.fromkeys(w['remedy'] for w in found))}."
            for name, found in by_checkpoint.items()]


def add_twotime(plan: Plan, results: ReduceResults) -> None:
    """Two-time heatmaps within classes (by relation) and across classes."""
    intra = plan.section("intra", "Two-time influence within classes",
                         "Mean H over sample pairs grouped by class and by (t_response, t_perturbation), "
                         f"at λ = {results.damping:g}. {RELATIONS_TEXT} {HEATMAP_READING}")
    inter = plan.section("inter", "Two-time influence across classes",
                         "Mean H over pairs of samples in different trajectories, for every (responding class, "
                         f"perturbed class), at λ = {results.damping:g}. {HEATMAP_READING}")
    for ckpt in results.checkpoints:
        twotime, coords = results.array(ckpt, "twotime")
        class_twotime, ccoords = results.array(ckpt, "class_twotime")
        classes, relations, t = coords["class"], coords["relation"], np.asarray(coords["t_response"])
        for p, pair, n, norm in plan.variants(coords):
            panels = [(f"{cls} · {RELATION_NAMES.get(rel, rel)}", twotime[0, p, n, r, c])
                      for r, rel in enumerate(relations) for c, cls in enumerate(classes)]
            plan.figure(intra, f"intra-{ckpt}-{pair}-{norm}",
                        f"{pair_title(pair)}, {norm}, checkpoint {ckpt}: columns are the responding sample's "
                        "class, rows how the two samples are related, and each cell is the mean H of perturbing "
                        "at t (perturbation, x) on the response at t (response, y).",
                        figures.two_time_heatmaps, group=f"checkpoint {ckpt}", panels=panels,
                        ncols=len(classes), t_response=t, t_perturbation=t, colorbar_label=norm_label(norm),
                        title=f"{pair_title(pair)} per class\n{norm_label(norm)}, checkpoint {ckpt}, "
                              f"λ = {results.damping:g}")
            panels = [(f"{rc} ← {pc_}", class_twotime[0, p, n, i, j])
                      for i, rc in enumerate(ccoords["response_class"])
                      for j, pc_ in enumerate(ccoords["perturbation_class"])]
            plan.figure(inter, f"inter-{ckpt}-{pair}-{norm}",
                        f"{pair_title(pair)}, {norm}, checkpoint {ckpt}: panel 'r ← c' (row r, column c) shows how "
                        "perturbing samples of class c moves the responding class r, so off-diagonal panels "
                        "show transfer between classes.",
                        figures.two_time_heatmaps, group=f"checkpoint {ckpt}", panels=panels,
                        ncols=len(ccoords["perturbation_class"]), t_response=t, t_perturbation=t,
                        colorbar_label=norm_label(norm),
                        title=f"{pair_title(pair)} across classes (responding ← perturbed)\n"
                              f"{norm_label(norm)}, checkpoint {ckpt}, λ = {results.damping:g}")


def add_transfer(plan: Plan, results: ReduceResults) -> None:
    """The class transfer matrix of each checkpoint, pair and normalisation."""
    section = plan.section("transfer", "Class transfer matrices",
                           "Mean H over all pairs of samples in different trajectories, by responding and "
                           f"perturbed class, at λ = {results.damping:g}.")
    for ckpt in results.checkpoints:
        transfer, coords = results.array(ckpt, "transfer")
        for p, pair, n, norm in plan.variants(coords):
            plan.figure(section, f"transfer-{ckpt}-{pair}-{norm}",
                        f"{pair_title(pair)}, {norm}, checkpoint {ckpt}: cell (r, c) is how much perturbing "
                        "samples of class c moves the response of class r, averaged over time; a strong "
                        "diagonal with a weak off-diagonal means little transfer between classes.",
                        figures.transfer_matrix, group=f"checkpoint {ckpt}", matrix=transfer[0, p, n],
                        response_labels=coords["response_class"], perturbation_labels=coords["perturbation_class"],
                        colorbar_label=norm_label(norm),
                        title=f"Class transfer {pair_title(pair)}\n{norm_label(norm)}, checkpoint {ckpt}")


def add_distance(plan: Plan, results: ReduceResults) -> None:
    """H of sampled pairs against the distance of their inputs, with its binned median."""
    section = plan.section("distance", "Influence versus input distance",
                           f"Randomly sampled pairs of samples, H(i, j) at λ = {results.damping:g} against the "
                           "RMS distance of their inputs.")
    pairs = results.table("distance_pairs.parquet") if results.has("distance_pairs.parquet") else None
    curve = results.table("distance_curve.parquet") if results.has("distance_curve.parquet") else None
    for ckpt in results.checkpoints:
        info = results.summary["checkpoints"][ckpt].get("distance", {})
        if pairs is None or "skipped" in info or not select(pairs, checkpoint=ckpt).num_rows:
            section.notes.append(f"Checkpoint {ckpt}: no influence-versus-distance pairs "
                                 f"({info.get('skipped', 'none were sampled')}).")
            continue
        coords = results.array(ckpt, "transfer")[1]
        for _, pair, _, norm in plan.variants(coords):
            points = select(pairs, checkpoint=ckpt, pair=pair, normalization=norm)
            binned = None
            if curve is not None:
                bins = select(curve, checkpoint=ckpt, pair=pair, normalization=norm)
                binned = band(bins, "distance") if bins.num_rows else None
            plan.figure(section, f"distance-{ckpt}-{pair}-{norm}",
                        f"{pair_title(pair)}, {norm}, checkpoint {ckpt}: each dot is one sampled pair, the line "
                        "the median per equal-count distance bin with its IQR; influence that falls with "
                        "distance means the model generalises locally in input space.",
                        figures.influence_vs_distance, group=f"checkpoint {ckpt}",
                        distance=column(points, "distance"), influence=column(points, "h"), binned=binned,
                        ylabel=norm_label(norm),
                        title=f"{pair_title(pair)} vs input distance\n{norm_label(norm)}, checkpoint {ckpt}")

