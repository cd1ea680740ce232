"""The report: read the gradient store, its reduce and the training run; draw; write index.html.

Planning (reading inputs, deciding figures, captions and notes) is separate from drawing:
every figure is a named call into :mod:`gradlake.report.figures`, drawn in one loop with
progress. A missing input (no reduce, no exact run, no training directory, no rollout)
becomes a note in its section. Output: ``<out>/index.html``, ``<out>/figures/*.png`` and
``<out>/report.json`` (the files this report wrote; a rerun removes those it no longer makes).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import numpy as np

from gradlake import __version__, fsio
from gradlake.errors import InputError
from gradlake.progress import progress
from gradlake.report import figures
from gradlake.report.html import Image, Section, Table, render_index
from gradlake.report.inputs import ReduceResults, column, rollout_provenance, rollout_tables, select, training_runs

MANIFEST = "report.json"
INDEX = "index.html"
FIGURES = "figures"

OBSERVABLE_NAMES = {"C": "loss", "M": "mass", "E": "energy", "V": "probe"}
NORM_LABELS = {"none": "H (unnormalised)", "row-std": "H (row-std normalised)", "cosine": "H (cosine)"}
RELATION_NAMES = {"same_trajectory": "same trajectory", "same_class": "same class, other trajectory",
                  "other_class": "other classes"}
RELATIONS_TEXT = ("Relations of the two samples: 'same trajectory'; 'same class, other trajectory'; 'other "
                  "classes' (the perturbed sample is in any other class).")
HEATMAP_READING = ("In each heatmap x is the time of the perturbed sample, y the time of the responding "
                   "sample; red = positive H (a descent step on the perturbed sample lowers the response "
                   "observable), blue = negative (it raises it), grey = no sample pairs.")


def pair_title(pair: str) -> str:
    """'MC' -> 'H_MC (response mass, perturbation loss)'."""
    return (f"H_{pair} (response {OBSERVABLE_NAMES.get(pair[0], pair[0])}, "
            f"perturbation {OBSERVABLE_NAMES.get(pair[1], pair[1])})")


def norm_label(norm: str) -> str:
    return NORM_LABELS.get(norm, f"H ({norm})")


@dataclass
class Plan:
    """The report's sections and the figures they show (file name -> drawing call)."""

    normalizations: tuple[str, ...] = ()  # of the influence figures
    sections: list[Section] = field(default_factory=list)
    draws: dict[str, Callable[..., None]] = field(default_factory=dict)  # called with out=<file>

    def section(self, anchor: str, title: str, intro: str = "") -> Section:
        section = Section(anchor, title, intro)
        self.sections.append(section)
        return section

    def figure(self, section: Section, name: str, caption: str, draw: Callable[..., None],
               group: str = "", **kwargs: Any) -> None:
        """Add figure ``figures/<name>.png``, drawn by ``draw(out, **kwargs)``."""
        src = f"{FIGURES}/{_safe(name)}.png"
        if src in self.draws:
            raise ValueError(f"report: figure {src} planned twice")  # a bug in this module
        self.draws[src] = partial(draw, **kwargs)
        alt = str(kwargs.get("title", caption)).replace("\n", ", ")
        section.images.append(Image(src, caption, alt=alt, group=group))


def _ours(rel: str) -> bool:
    """A path the report may write: index.html or figures/<safe name>.png."""
    folder, _, name = rel.rpartition("/")
    return rel == INDEX or (folder == FIGURES and name.endswith(".png") and name == _safe(name)
                            and not name.startswith("."))


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)


class ReportFiles(fsio.Folder):
    """The report's folder (any fsspec URL); remembers what it wrote in report.json."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        super().__init__(url, storage_options)
        self.written: list[str] = []

    def write(self, rel: str, data: bytes) -> None:
        self.write_bytes(rel, data)
        self.written.append(rel)

    def finish(self, numbers: dict[str, Any]) -> None:
        """Remove files an earlier report wrote and this one did not, then write report.json
        (with the report's headline ``numbers``)."""
        previous = self.read_json(MANIFEST).get("files", []) if self.exists(MANIFEST) else []
        for rel in sorted(set(previous) - set(self.written)):
            if _ours(rel):  # never follow a manifest outside the report's own files
                self.remove(rel)
        self.write_json(MANIFEST, {"format": "gradlake-report", "gradlake_version": __version__,
                                   "files": sorted(self.written), **numbers})


# --------------------------------------------------------------------------- provenance
def _short_json(value: Any, limit: int = 160) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def provenance_rows(summary: dict[str, Any], results: ReduceResults | None, reduce_name: str,
                    normalizations: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """(field, value) rows of the provenance table, from the store summary and the reduce's."""
    prov = summary.get("provenance", {})
    ds, model, proj = prov.get("dataset", {}), prov.get("model", {}), prov.get("projector", {})
    rows = [("gradient store", f"{summary.get('url', '')} (written by gradlake {prov.get('gradlake_version', '?')}, "
                               f"created {prov.get('created', '?')})")]
    rows.append(("dataset", f"{ds.get('family', '?')}: {ds.get('n_trajectories', '?')} trajectories × "
                            f"{ds.get('n_times', '?')} times, channels {', '.join(ds.get('channels', []))}; "
                            f"{ds.get('url', '')}"))
    rows.append(("dataset fingerprint", str(ds.get("fingerprint", "?"))))
    model_text = f"{model.get('name', '?')}"
    if "preset" in model:
        model_text += (f" ({model['preset']}, {model.get('resolution', '?')}², "
                       f"{model.get('channels', '?')} channels)")
    rows.append(("model", model_text))
    rows.append(("model parameters", _short_json(model.get("params", model))))
    for name, info in summary.get("checkpoints", {}).items():
        state = ("complete" if info.get("complete")
                 else f"{info.get('shards_done')}/{info.get('shards_total')} shards")
        rows.append((f"checkpoint {name}", f"sha256 {info.get('sha256', '?')} ({state})"))
    proj_keys = [k for k in ("kind", "seed", "allocation", "k_total") if k in proj]
    if proj.get("allocation", "uniform") == "uniform":
        proj_keys += [k for k in ("k_in", "k_out", "k_dense") if k in proj]
    rows.append(("projector", f"k = {summary.get('k')}" + "".join(f", {k} = {proj[k]}" for k in proj_keys)))
    rows.append(("observables", f"{', '.join(summary.get('observables', []))} (probes for V: "
                                f"{summary.get('probes', '?')}; stored as {summary.get('dtype', '?')})"))
    rows.append(("samples", f"{summary.get('n_samples', '?')} of {summary.get('n_rows', '?')} "
                            f"(splits {', '.join(summary.get('splits', []))})"))
    if results is None:
        rows.append((f"reduce {reduce_name}", "not found"))
    else:
        s = results.settings
        rows.append(("reduce", f"{reduce_name} ({results.url})"))
        rows.append(("lambda (damping)", f"{results.damping:g}" + (
            f"; sweep {', '.join(f'{x:g}' for x in s.get('lambdas', []))}" if s.get("lambdas") else "")))
        estimator = s.get("metric_estimator", "probes")
        rows.append(("metric", f"η̃ from φ_{s.get('metric', '?')} over the {s.get('reference_split', '?')} split"
                               + ("" if estimator == "probes" else f" ({estimator} estimator)")))
        rows.append(("pairs, normalisations", f"{', '.join(s.get('pairs', []))}; "
                                              f"{', '.join(s.get('normalize', []))}"))
        rows.append(("reduced checkpoints", ", ".join(results.checkpoints)))
        rows.append(("normalisations drawn", ", ".join(normalizations)))
    rows.append(("report", f"gradlake {__version__}"))
    return rows


# --------------------------------------------------------------------------- sections
def _training(plan: Plan, train_dir: str | None, storage_options) -> list:
    section = plan.section("training", "Training curves")
    if not train_dir:
        section.notes.append("No training directory was given (--train DIR), so there are no training curves.")
        return []
    fs, root = fsio.filesystem(train_dir, storage_options)
    runs = training_runs(train_dir, storage_options) if fs.exists(root) else []
    if not runs:
        section.notes.append(f"No complete checkpoint under {train_dir}, so there are no training curves.")
        return []
    series = {}
    for run in runs:
        prefix = "" if len(runs) == 1 else f"{run.name}: "
        epochs = np.array([m["epoch"] for m in run.history])
        series[prefix + "train"] = (epochs, np.array([m.get("train_smse", np.nan) for m in run.history], float))
        val_split = run.history[-1].get("val_split", "val") if run.history else "val"
        series[prefix + val_split] = (epochs, np.array([m.get("val_smse", np.nan) for m in run.history], float))
    tasks = sorted({run.task for run in runs if run.task})
    loss = f"The loss of task {', '.join(tasks)}" if tasks else "Scaled MSE"
    plan.figure(section, "training-curves",
                f"{loss} of one-step predictions per epoch, on the training split and on the held-out "
                "split; a widening gap between the lines means the model starts to memorise.",
                figures.training_curves, series=series, title=f"Training curves ({train_dir})")
    return runs


def _rollout(plan: Plan, runs, summary: dict[str, Any], store_prov: dict[str, Any], storage_options) -> None:
    section = plan.section("rollout", "Rollout error versus horizon")
    places = [p for run in runs for p in (*run.checkpoints, run.run_dir)]
    places += [info.get("path", "") for info in store_prov.get("checkpoints", {}).values()]
    places = list(dict.fromkeys(p for p in places if p))
    tables = rollout_tables(places, storage_options)
    if not tables:
        section.notes.append("No rollout table (rollout.parquet from `gradlake rollout`) next to any checkpoint, "
                             "so there is no rollout error.")
        return
    for path, table in tables.items():
        name = path.rstrip("/").rsplit("/", 1)[-1]
        split = rollout_provenance(path, storage_options).get("split", "?")
        curves = {}
        for cls in sorted(set(table.column("class").to_pylist()) - {"all"}) + ["all"]:
            part = select(table, **{"class": cls}).sort_by("horizon")
            if part.num_rows:
                mean, std = column(part, "smse_mean"), column(part, "smse_std")
                curves[cls] = (column(part, "horizon"), mean, mean - std, mean + std)
        plan.figure(section, f"rollout-{name}",
                    f"Checkpoint {name}, {split} split: scaled MSE of the model's own autoregressive "
                    "prediction at each horizon against the true state, mean over each class's trajectories "
                    "with a ±1 standard deviation band, so steeper growth means errors compound faster.",
                    figures.rollout_error, curves=curves, title=f"Rollout error, checkpoint {name} ({split})",
                    ylabel="scaled MSE vs ground truth")


def _missing_reduce(plan: Plan, reduce_name: str, reduce_url: str) -> None:
    for anchor, title in (("spectrum", "Metric spectrum"), ("intra", "Two-time influence within classes"),
                          ("inter", "Two-time influence across classes"), ("lags", "Lag curves"),
                          ("transfer", "Class transfer matrices"), ("distance", "Influence versus input distance"),
                          ("exact", "Exact versus projected influence")):
        plan.section(anchor, title).notes.append(
            f"No complete reduce named {reduce_name!r} at {reduce_url} (no summary.json); run `gradlake reduce`.")


def _spectrum(plan: Plan, results: ReduceResults) -> None:
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


def _variants(plan: Plan, coords: dict[str, list]) -> list[tuple[int, str, int, str]]:
    """(pair index, pair, normalisation index, normalisation) of the figures to draw."""
    return [(p, pair, coords["normalization"].index(norm), norm) for p, pair in enumerate(coords["pair"])
            for norm in plan.normalizations]


def choose_normalizations(available: list[str], wanted=None) -> tuple[str, ...]:
    """The normalisations to draw: ``wanted`` (checked), else row-std (the paper's) when the
    reduce has it, else its first."""
    if wanted:
        unknown = [n for n in wanted if n not in available]
        if unknown:
            raise InputError(f"normalizations: {unknown[0]!r} is not in the reduce's results "
                             f"(it has {', '.join(available)})")
        return tuple(wanted)
    return ("row-std",) if "row-std" in available else tuple(available[:1])


def _twotime(plan: Plan, results: ReduceResults) -> None:
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
        for p, pair, n, norm in _variants(plan, coords):
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


def _lambda_rows(table, damping: float):
    lam = column(table, "lambda")
    return table.filter(np.isclose(lam, damping, rtol=1e-12, atol=0))


def _band(table, x: str = "lag"):
    table = table.sort_by(x)
    return column(table, x), column(table, "median"), column(table, "q25"), column(table, "q75")


def _lags(plan: Plan, results: ReduceResults) -> None:
    section = plan.section("lags", "Lag curves",
                           "H as a function of Δt = t_response − t_perturbation, per trajectory, then the median "
                           f"and interquartile range over trajectories, at λ = {results.damping:g}. {RELATIONS_TEXT}")
    stats = _lambda_rows(results.table("lag_stats.parquet"), results.damping)
    relations = list(RELATION_NAMES)
    for ckpt in results.checkpoints:
        coords = results.array(ckpt, "transfer")[1]
        for _, pair, _, norm in _variants(plan, coords):
            part = select(stats, checkpoint=ckpt, pair=pair, normalization=norm)
            classes = sorted(set(part.column("class").to_pylist()) - {"all"}) + ["all"]
            panels = [(RELATION_NAMES[rel], {cls: _band(select(part, relation=rel, **{"class": cls}))
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
    for _, pair, _, norm in _variants(plan, coords):
        part = select(stats, pair=pair, normalization=norm, **{"class": "all"})
        panels = [(RELATION_NAMES[rel], {ckpt: _band(select(part, relation=rel, checkpoint=ckpt))
                                         for ckpt in results.checkpoints
                                         if select(part, relation=rel, checkpoint=ckpt).num_rows})
                  for rel in RELATION_NAMES]
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
        panels = [(RELATION_NAMES[rel], {f"{g} (over seeds)": _band(select(seeds, relation=rel, group=g))
                                         for g in groups if select(seeds, relation=rel, group=g).num_rows})
                  for rel in RELATION_NAMES]
        plan.figure(section, f"lags-seeds-{pair}-{norm}",
                    f"{pair_title(pair)}, {norm}: for each checkpoint name shared by several seeds, the median "
                    "and IQR over seeds of the pooled lag curve; narrow bands mean the decay does not depend "
                    "on the training seed.",
                    figures.lag_curves, group="across seeds", panels=panels, ylabel=norm_label(norm),
                    title=f"{pair_title(pair)} versus lag across seeds\n{norm_label(norm)}, all classes")


def _transfer(plan: Plan, results: ReduceResults) -> None:
    section = plan.section("transfer", "Class transfer matrices",
                           "Mean H over all pairs of samples in different trajectories, by responding and "
                           f"perturbed class, at λ = {results.damping:g}.")
    for ckpt in results.checkpoints:
        transfer, coords = results.array(ckpt, "transfer")
        for p, pair, n, norm in _variants(plan, coords):
            plan.figure(section, f"transfer-{ckpt}-{pair}-{norm}",
                        f"{pair_title(pair)}, {norm}, checkpoint {ckpt}: cell (r, c) is how much perturbing "
                        "samples of class c moves the response of class r, averaged over time; a strong "
                        "diagonal with a weak off-diagonal means little transfer between classes.",
                        figures.transfer_matrix, group=f"checkpoint {ckpt}", matrix=transfer[0, p, n],
                        response_labels=coords["response_class"], perturbation_labels=coords["perturbation_class"],
                        colorbar_label=norm_label(norm),
                        title=f"Class transfer {pair_title(pair)}\n{norm_label(norm)}, checkpoint {ckpt}")


def _distance(plan: Plan, results: ReduceResults) -> None:
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
        for _, pair, _, norm in _variants(plan, coords):
            points = select(pairs, checkpoint=ckpt, pair=pair, normalization=norm)
            binned = None
            if curve is not None:
                bins = select(curve, checkpoint=ckpt, pair=pair, normalization=norm)
                binned = _band(bins, "distance") if bins.num_rows else None
            plan.figure(section, f"distance-{ckpt}-{pair}-{norm}",
                        f"{pair_title(pair)}, {norm}, checkpoint {ckpt}: each dot is one sampled pair, the line "
                        "the median per equal-count distance bin with its IQR; influence that falls with "
                        "distance means the model generalises locally in input space.",
                        figures.influence_vs_distance, group=f"checkpoint {ckpt}",
                        distance=column(points, "distance"), influence=column(points, "h"), binned=binned,
                        ylabel=norm_label(norm),
                        title=f"{pair_title(pair)} vs input distance\n{norm_label(norm)}, checkpoint {ckpt}")


HEADLINE_LABELS = {"dt0": "Δt = 0", "dt1": "|Δt| = 1", "tail": "|Δt| ≥ 3", "other_class": "other classes"}


def _number(value) -> str:
    return "—" if value is None else f"{value:.3g}"


def exact_findings(head: dict[str, Any]) -> list[str]:
    """Plain-words checks of the paper's two findings on the exact row-std H_CC (all classes)."""
    dt0, dt1, tail, other = (head.get(k) for k in ("dt0", "dt1", "tail", "other_class"))
    found = []
    if None not in (dt0, dt1):
        decays = dt0 > dt1 and (tail is None or dt1 > tail)
        found.append(("Reproduced" if decays else "NOT reproduced") + ": the diagonal decays with |Δt| "
                     f"(Δt = 0: {dt0:.3g}, |Δt| = 1: {dt1:.3g}, tail: {_number(tail)}).")
    if None not in (dt0, other):
        local = other < (dt1 if dt1 is not None else dt0)
        found.append(("Reproduced" if local else "NOT reproduced") + ": influence across classes stays below "
                     f"influence within a trajectory (other classes: {other:.3g}).")
    return found


def _exact(plan: Plan, results: ReduceResults) -> dict[str, Any] | None:
    """The exact minibatch H (the paper's quantity) and the projected-vs-exact agreement."""
    section = plan.section("exact", "Exact minibatch influence (the paper's H) and the projected estimate")
    found = results.exact()
    if found is None:
        section.notes.append("The exact minibatch mode was not run for this reduce (reduce.exact.enabled = "
                             "false), so there is no exact H and no exact-versus-projected comparison.")
        return None
    info, table = found
    solver = info.get("solver", {})
    bound = solver.get("max_h_error_bound")
    accuracy = (f"every entry within the proven bound, at most {_number(bound)} in the units of each normalisation "
                f"(htol {info.get('htol', '?')}), after a median of {_number(solver.get('median_products'))} K·v "
                "products" if bound is not None else
                f"worst relative residual {_number(solver.get('max_relative_residual'))} (rtol {info.get('rtol', '?')})")
    spectrum = (f" K's effective dimension at λ is d_eff(λ) = Σ μ/(μ + λ) ≈ {_number(info['d_eff'])} of "
                f"N·d = {info.get('n_outputs', '?')} outputs (top eigenvalue {_number(info.get('top_eigenvalue'))})."
                if info.get("d_eff") else "")
    section.intro = (
        f"This section shows the EXACT minibatch influence H = Rᵀ J (JᵀJ + λI)⁻¹ Jᵀ R, the paper's quantity, "
        f"solved on {info.get('minibatches', 1)} minibatch(es) of {info.get('batch_size', '?')} samples "
        f"(per class one trajectory of split {info.get('split', 'test')}, consecutive transitions) from checkpoint "
        f"{str(info.get('checkpoint', '?')).rstrip('/').rsplit('/', 1)[-1]}, λ = {info.get('damping', '?')}, "
        f"{', '.join(solver.get('method', []))} solver in {', '.join(solver.get('space', []))} space, {accuracy}."
        f"{spectrum} The other sections show the PROJECTED estimate from the gradient store; the tables below say "
        "how far it is from the exact H, at λ and at the sketch's effective ridge μ_k.")
    ridge = info.get("effective_ridge") or []
    if ridge and info.get("d_eff"):
        section.intro += (
            " What the projected H is: a rank-k projection answers at an effective ridge μ_k with d_eff(μ_k) = k, "
            "not at the run's λ — " + "; ".join(f"k = {int(k)}: μ_k = {_number(mu)}" for k, mu in ridge) +
            f". The projected figures show influence at that larger damping; at the run's λ = {info.get('damping')} "
            f"they would need k ≈ d_eff(λ) ≈ {_number(info['d_eff'])}.")
    if results.has("exact_sweep.parquet"):
        sweep = select(results.table("exact_sweep.parquet", partitioned=False), pair="CC", normalization="row-std",
                       **{"class": "all"})
        section.tables.append(Table(
            "Exact row-std H_CC (all classes) at every λ of the sweep, from the same solve: the diagonal's dominance "
            "(Δt = 0 ÷ |Δt| = 1) and the effective dimension d_eff(λ); 'no' where the solve's bound did not reach "
            "htol at that λ.",
            ["λ", *HEADLINE_LABELS.values(), "dominance", "d_eff", "within htol"],
            [[f"{row['lambda']:g}", *(_number(row.get(k)) for k in HEADLINE_LABELS),
              _number(row["dt0"] / row["dt1"]) if row.get("dt0") is not None and row.get("dt1") else "–",
              _number(row.get("d_eff")), "yes" if row["converged"] else "no"] for row in sweep.to_pylist()]))
    for row in info.get("paper_solver", []):
        if row["pair"] == "CC" and row["normalization"] == "row-std":
            section.intro += (
                f" The paper's own solve (float32 MINRES on the stacked right-hand sides, restarted every "
                f"{row['restart']}, stopped at a stacked residual of {row['stop']:g}) on minibatch {row['minibatch']}: "
                f"row-std H_CC {_number(row['relative_frobenius'])} from the converged H (relative Frobenius; "
                f"Spearman {_number(row['spearman'])}) after {row['products']} products, "
                f"{'reaching' if row['reached_stop'] else 'not reaching'} its stop.")
    head = info.get("headline", {})
    paper = info.get("paper", {}).get("CC", {}).get("row-std", {}).get("all", {})
    for pair in info.get("pairs", []):
        for norm in ("row-std", "none"):
            cells = head.get(pair, {}).get(norm)
            if not cells:
                continue
            rows = [[name, *(_number(cells[name].get(k)) for k in HEADLINE_LABELS)]
                    for name in sorted(cells, key=lambda c: (c == "all", c))]
            if pair == "CC" and norm == "row-std" and paper:
                rows.append(["paper (UNet, CE)", *(_number(paper.get(k)) for k in HEADLINE_LABELS)])
            section.tables.append(Table(
                f"Exact {pair_title(pair)}, {norm_label(norm)}: mean over same-trajectory pairs at each |Δt| and "
                "over pairs of different classes, pooled over minibatches.",
                ["class", *HEADLINE_LABELS.values()], rows))
            if pair == "CC" and norm == "row-std":
                section.notes += exact_findings(cells.get("all", {}))
    values, coords = results.array("exact", "twotime")
    t = np.asarray(coords["t_response"])
    for p, pair in enumerate(coords["pair"]):
        for n, norm in enumerate(coords["normalization"]):
            if norm not in plan.normalizations:
                continue
            panels = [(f"{cls}: {relation.replace('_', ' ')}", values[p, n, r, c])
                      for r, relation in enumerate(coords["relation"]) for c, cls in enumerate(coords["class"])]
            plan.figure(section, f"exact-twotime-{pair}-{norm}",
                        f"EXACT {pair_title(pair)}, {norm}: mean over minibatches of perturbing at t (x) on the "
                        "response at t (y); top row within a trajectory, bottom row across classes, one column per "
                        "class.", figures.two_time_heatmaps, panels=panels, ncols=len(coords["class"]),
                        t_response=t, t_perturbation=t, colorbar_label=norm_label(norm),
                        title=f"Exact {pair_title(pair)}\n{norm_label(norm)}, λ = {info.get('damping')}")
    if table is None:
        section.notes.append("No projected-vs-exact agreement was computed (reduce.exact.agreement = 0).")
        return info
    rows = []
    allocations = list(dict.fromkeys(table.column("allocation").to_pylist()))
    for norm in dict.fromkeys(table.column("normalization").to_pylist()):
        for pair in dict.fromkeys(table.column("pair").to_pylist()):
            for allocation in allocations:
                part = select(table, normalization=norm, pair=pair, allocation=allocation)
                for k in np.unique(column(part, "k")):
                    at = select(part, k=int(k))
                    mu = [v for v in at.column("mu_k").to_pylist() if v is not None] \
                        if "mu_k" in at.column_names else []
                    at_mu = [v for v in at.column("relative_frobenius_mu_k").to_pylist() if v is not None] \
                        if mu else []
                    rows.append([pair, norm, allocation, str(int(k)), str(int(column(at, "k_total")[0])),
                                 f"{np.mean(column(at, 'relative_frobenius')):.3g}",
                                 f"{np.mean(column(at, 'spearman')):.3f}",
                                 _number(float(np.median(mu))) if mu else "–",
                                 f"{np.mean(at_mu):.3g}" if at_mu else "–", str(at.num_rows)])
    section.tables.append(Table(
        "Projected vs exact H on the agreement minibatches (the projected H from projected gradients — uniform "
        "k_in = k_out = k, or the energy allocation of the same total k — with the batch's probe metric): relative "
        "Frobenius error and Spearman rank correlation, means over minibatches.",
        ["pair", "normalisation", "allocation", "k", "k total", "rel. Frobenius error at λ", "Spearman", "μ_k",
         "rel. Frobenius error at μ_k", "minibatches"],
        rows))
    table = select(table, allocation=allocations[-1])  # the figures: the energy allocation
    for norm in dict.fromkeys(table.column("normalization").to_pylist()):  # in the reduce's order
        part = select(table, normalization=norm)
        error, rank = {}, {}
        ks = np.unique(column(part, "k"))
        for pair in dict.fromkeys(part.column("pair").to_pylist()):
            sel = select(part, pair=pair)
            error[pair] = np.array([np.mean(column(select(sel, k=int(k)), "relative_frobenius")) for k in ks])
            rank[pair] = np.array([np.mean(column(select(sel, k=int(k)), "spearman")) for k in ks])
        k_total = sorted(set(column(part, "k_total").tolist()))
        plan.figure(section, f"exact-{norm}",
                    f"{norm}: the relative Frobenius error (left) and Spearman rank correlation (right) of the "
                    "projected H against the exact H on the agreement minibatches, against k = k_in = k_out (total "
                    f"projected dimensions {', '.join(map(str, k_total))}), so falling error and rising correlation "
                    "with k mean the projection preserves the influence.",
                    figures.exact_agreement, ks=ks, relative_error=error, rank_correlation=rank,
                    title=f"Projected vs exact influence, {norm_label(norm)}")
    return info


# --------------------------------------------------------------------------- entry point
def build_report(store_url: str, out_dir: str, reduce_name: str = "default", train_dir: str | None = None,
                 storage_options: dict[str, Any] | None = None, normalizations=None,
                 lds_dir: str | None = None) -> str:
    """Write the report of a gradient store (and its reduce ``reduce_name``) to ``out_dir``;
    returns the path of index.html. Deterministic; rerunning overwrites the report's own files.

    ``normalizations``: those of the influence figures (default: row-std, the paper's, when
    the reduce computed it); the exact-versus-projected section shows every one. ``lds_dir``:
    a job's LDS output (its section, gradlake.report.lds).
    """
    from gradlake.store import GradientStore

    store = GradientStore.open(store_url, storage_options)
    summary = store.summary()
    reduce_url = store.reduce_url(reduce_name)
    results = ReduceResults.open(reduce_url, storage_options)

    plan, exact = Plan(), None
    if results is not None:
        plan.normalizations = choose_normalizations(list(results.settings.get("normalize", [])), normalizations)
    runs = _training(plan, train_dir, storage_options)
    _rollout(plan, runs, summary, store.provenance, storage_options)
    if results is None:
        _missing_reduce(plan, reduce_name, reduce_url)
    else:
        exact = _exact(plan, results)
        for add in (_spectrum, _twotime, _lags, _transfer, _distance):
            add(plan, results)
    if lds_dir is not None:
        from gradlake.report.lds import add_section

        add_section(plan, lds_dir, storage_options)

    files = ReportFiles(out_dir, storage_options)
    bar = progress(len(plan.draws), "report: figures", "figure")
    for src, draw in plan.draws.items():
        buffer = io.BytesIO()
        draw(out=buffer)
        files.write(src, buffer.getvalue())
        bar.update(1)
    bar.close()
    page = render_index(f"gradlake report: {summary.get('url', store_url)}",
                        provenance_rows(summary, results, reduce_name, plan.normalizations), plan.sections)
    files.write(INDEX, page.encode())
    files.finish({"exact": {key: exact.get(key) for key in ("checkpoint", "minibatches", "batch_size", "damping",
                                                              "headline", "paper", "solver")}} if exact else {})
    return fsio.join(out_dir, INDEX)
