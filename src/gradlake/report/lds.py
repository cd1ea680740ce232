"""The report's LDS section (gradlake.lds): a table of the scores and two figures.

``add_section`` plans it from ``<out>/lds/lds.json`` and ``lds.parquet`` (a note when the LDS
has not run); the drawing functions take numpy arrays, like gradlake.report.figures.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from gradlake import fsio
from gradlake.report.figures import Out, _figure, _save
from gradlake.report.html import Table

METHOD_NAMES = {"projected": "projected influence φᵀ(η̃ + λI)⁻¹φ", "inner_product": "gradient inner product φᵀφ"}
OBSERVABLE_NAMES = {"C": "loss", "M": "mass", "E": "energy"}


def standardized(values: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """``values`` centred and scaled per test sample (over its subsets); 0 where a sample's spread is 0."""
    out = np.zeros(len(values))
    for sample in np.unique(samples):
        mask = samples == sample
        v = values[mask] - values[mask].mean()
        spread = v.std()
        out[mask] = v / spread if spread > 0 else 0.0
    return out


def lds_scatter(points: dict[str, tuple[np.ndarray, np.ndarray]], out: Out, *, title: str) -> None:
    """Predicted vs actual change, each standardised per test sample, one panel per method."""
    fig = _figure(3.4 * len(points), 3.4)
    axes = np.atleast_1d(fig.subplots(1, len(points), sharey=True))
    for ax, (label, (predicted, actual)) in zip(axes, points.items()):
        ax.scatter(predicted, actual, s=4, alpha=0.3, linewidths=0)
        ax.axhline(0, color="0.6", lw=0.5)
        ax.axvline(0, color="0.6", lw=0.5)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("predicted change (z per test sample)")
    axes[0].set_ylabel("actual change (z per test sample)")
    fig.suptitle(title, fontsize=11)
    _save(fig, out)


def lds_scores(scores: dict[str, dict[str, tuple[float, float]]], out: Out, *, title: str) -> None:
    """LDS (mean ± standard error over test samples) per method, one group of bars per observable."""
    fig = _figure(6.4, 3.6)
    ax = fig.subplots()
    methods = list(scores)
    observables = list(dict.fromkeys(o for m in methods for o in scores[m]))
    width = 0.8 / max(len(methods), 1)
    for k, method in enumerate(methods):
        mean = [scores[method].get(o, (np.nan, np.nan))[0] for o in observables]
        error = [scores[method].get(o, (np.nan, np.nan))[1] for o in observables]
        ax.bar(np.arange(len(observables)) + (k - (len(methods) - 1) / 2) * width, mean, width, yerr=error,
               capsize=3, label=METHOD_NAMES.get(method, method))
    ax.axhline(0, color="0.3", lw=0.8)
    ax.set_xticks(np.arange(len(observables)), [f"{o} ({OBSERVABLE_NAMES.get(o, o)})" for o in observables])
    ax.set_ylabel("LDS (mean Spearman over test samples)")
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    _save(fig, out)


def _per_sample(table, method: str) -> dict[str, tuple[float, float]]:
    """Per observable: mean and standard error over test samples of the per-sample Spearman correlation."""
    from gradlake.lds import lds

    found = {}
    for observable in dict.fromkeys(table.column("observable").to_pylist()):
        part = table.filter(table.column("observable").to_numpy(zero_copy_only=False) == observable)
        subsets = part.column("subset").to_numpy()
        m = len(np.unique(subsets))
        actual = part.column("actual").to_numpy().reshape(m, -1)
        predicted = part.column(f"predicted_{method}").to_numpy().reshape(m, -1)
        _, values = lds(actual, predicted)
        values = values[np.isfinite(values)]
        found[observable] = (float(values.mean()) if len(values) else np.nan,
                             float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else np.nan)
    return found


def add_section(plan, lds_dir: str, storage_options: dict[str, Any] | None) -> None:
    """The LDS section of the report: the score table, the score bars and the loss scatter."""
    section = plan.section("lds", "Counterfactual check: the linear datamodeling score (LDS)")
    folder = fsio.Folder(lds_dir, storage_options)
    if not folder.exists("lds.json"):
        section.notes.append(f"No LDS at {lds_dir} (eval.lds.enabled, `gradlake lds JOB.toml`).")
        return
    info = folder.read_json("lds.json")
    table = pq.read_table(io.BytesIO(folder.read_bytes("lds.parquet")))
    section.intro = (
        f"{info['subsets']} models retrained, each on a random {info['alpha']:g}-subset ({info['subset_size']} of "
        f"{info['training_trajectories']} training trajectories; subset seed {info['subset_seed']}, training seed "
        f"{info['train_seed']}, {info['train_epochs']} epochs). For each of {info['test_samples']} test samples the "
        "actual change of its loss (and observables) against the model trained on every trajectory is rank-correlated "
        "(Spearman, across subsets) with the change the influence predicts, Δ̂(S) = Σ over the left-out trajectories "
        "of H_AC (removing helpful trajectories raises the loss); the LDS is the mean over test samples "
        f"(TRAK's definition: {info['citation']}). 0 means no predictive power, 1 a perfect ranking. Projected "
        f"influence at checkpoint {info['checkpoint']}, k = {info['k']}, λ = {info['damping']:g} (effective ridge "
        f"{info['effective_ridge']:.3g}), metric {info['metric']} on split {info['reference_split']}.")
    methods = info["methods"]
    spread = {method: _per_sample(table, method) for method in methods}
    section.tables.append(Table(
        "LDS per method (rows) and response observable (columns; perturbation: the training loss), mean over "
        "test samples ± its standard error over them (the samples share their subsets, so this understates the "
        "uncertainty: benchmarks/lds_intervals.py gives intervals over subsets and a null); in brackets the test "
        "samples with a defined correlation.",
        ["method", *[f"{o} ({OBSERVABLE_NAMES.get(o, o)})" for o in info["observables"]]],
        [[METHOD_NAMES.get(m, m), *(f"{spread[m][o][0]:.3f} ± {spread[m][o][1]:.3f} "
                                    f"[{info['defined_samples'][m][o]}]" for o in info["observables"])]
         for m in methods] + [["exact minibatch H", *(["skipped (see the note)"] * len(info["observables"]))]]))
    section.notes.append(f"Exact minibatch H: {info['exact']['skipped']}.")
    plan.figure(section, "lds_scores", "LDS per method and observable: bars are the mean over test samples of the "
                "per-sample Spearman correlation, whiskers its standard error.", lds_scores, scores=spread,
                title=f"LDS, M = {info['subsets']} subsets, α = {info['alpha']:g}")
    loss = table.filter(table.column("observable").to_numpy(zero_copy_only=False) == "C")
    samples = loss.column("row").to_numpy()
    actual = standardized(loss.column("actual").to_numpy(), samples)
    points = {METHOD_NAMES.get(m, m): (standardized(loss.column(f"predicted_{m}").to_numpy(), samples), actual)
              for m in methods}
    plan.figure(section, "lds_scatter", "Predicted against actual change of each test sample's loss, one point "
                "per (subset, test sample), both standardised per test sample (the LDS ranks within a sample): a "
                "rising cloud is a predictive attribution.", lds_scatter, points=points,
                title="Change of test loss: predicted vs actual")
