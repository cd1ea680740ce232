"""The report's figures: numpy arrays and labels in, one PNG out (no store I/O here).

Every function draws on its own ``Figure`` with the non-interactive Agg canvas (no pyplot
state, safe in any thread or worker) and writes to ``out``: a path or a binary file object.
Signed influence uses a diverging colormap centred at 0; NaN cells are drawn grey.
"""

from __future__ import annotations

import math
import os
from typing import IO, Mapping, Sequence, Union

import numpy as np
from matplotlib import colors, ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Out = Union[str, "os.PathLike[str]", IO[bytes]]
# A curve with its spread: (x, median, lower quartile, upper quartile); quartiles may be None.
Band = tuple[np.ndarray, np.ndarray, "np.ndarray | None", "np.ndarray | None"]

DPI = 110
DIVERGING = "RdBu_r"
T_RESPONSE = "t (response)"
T_PERTURBATION = "t (perturbation)"
LAG = "Δt = t_response − t_perturbation"


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out: Out) -> None:
    if isinstance(out, (str, os.PathLike)):
        folder = os.path.dirname(os.fspath(out))
        if folder:
            os.makedirs(folder, exist_ok=True)
    fig.savefig(out, format="png", dpi=DPI, metadata={"Software": None})


def _symmetric_norm(*arrays: np.ndarray) -> colors.Normalize:
    """Colour limits ±max|value| over the finite entries (±1 when there are none)."""
    finite = [np.abs(a[np.isfinite(a)]) for a in arrays]
    vmax = max((float(f.max()) for f in finite if f.size), default=0.0)
    vmax = vmax if vmax > 0 else 1.0
    return colors.Normalize(vmin=-vmax, vmax=vmax)


def _diverging_cmap():
    from matplotlib import colormaps

    return colormaps[DIVERGING].with_extremes(bad="0.8")


def _axis_values(values: np.ndarray | None, n: int) -> np.ndarray:
    return np.arange(n) if values is None else np.asarray(values)


def _extent(values: np.ndarray) -> tuple[float, float]:
    """Cell edges for integer-spaced (or evenly spaced) coordinates."""
    step = float(values[1] - values[0]) if len(values) > 1 else 1.0
    return float(values[0]) - step / 2, float(values[-1]) + step / 2


def two_time_heatmaps(
    panels: Sequence[tuple[str, np.ndarray]],
    out: Out,
    *,
    title: str,
    colorbar_label: str,
    t_response: np.ndarray | None = None,
    t_perturbation: np.ndarray | None = None,
    ncols: int | None = None,
) -> None:
    """Grid of H[t_response, t_perturbation] heatmaps sharing one colour scale centred at 0.

    ``panels``: (panel title, matrix [T_response, T_perturbation]) in reading order.
    """
    if not panels:
        raise ValueError("two_time_heatmaps: no panels")
    mats = [np.asarray(m, dtype=float) for _, m in panels]
    ncols = ncols or min(len(mats), 4)
    nrows = math.ceil(len(mats) / ncols)
    fig = _figure(0.6 + 2.9 * ncols, 0.7 + 2.6 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    norm, cmap = _symmetric_norm(*mats), _diverging_cmap()
    image = None
    for i, (ax, (label, mat)) in enumerate(zip(axes, zip((p[0] for p in panels), mats))):
        tr = _axis_values(t_response, mat.shape[0])
        tp = _axis_values(t_perturbation, mat.shape[1])
        image = ax.imshow(np.ma.masked_invalid(mat), origin="lower", cmap=cmap, norm=norm,
                          extent=(*_extent(tp), *_extent(tr)), aspect="auto",
                          interpolation="nearest")
        ax.set_title(label, fontsize=10)
        if i % ncols == 0:
            ax.set_ylabel(T_RESPONSE)
        if i >= len(mats) - ncols:
            ax.set_xlabel(T_PERTURBATION)
    for ax in axes[len(mats):]:
        ax.set_visible(False)
    fig.colorbar(image, ax=axes[: len(mats)].tolist(), label=colorbar_label, shrink=0.9)
    fig.suptitle(title, fontsize=11)
    _save(fig, out)


def _bands(ax, curves: Mapping[str, Band]) -> None:
    for label, (x, mid, lo, hi) in curves.items():
        (line,) = ax.plot(x, mid, marker="o", markersize=3, label=label)
        if lo is not None and hi is not None:
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)


def lag_curves(curves: Mapping[str, Band], out: Out, *, title: str, ylabel: str) -> None:
    """Influence versus time lag, one line (median) and shaded IQR per curve."""
    fig = _figure(6.4, 4.0)
    ax = fig.subplots()
    _bands(ax, curves)
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    ax.axvline(0.0, color="0.5", linewidth=0.8, linestyle=":")
    ax.set_xlabel(LAG)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="median, IQR band", title_fontsize=8)
    _save(fig, out)


def transfer_matrix(
    matrix: np.ndarray,
    out: Out,
    *,
    response_labels: Sequence[str],
    perturbation_labels: Sequence[str],
    title: str,
    colorbar_label: str,
) -> None:
    """Class-to-class mean influence, annotated with each cell's value."""
    matrix = np.asarray(matrix, dtype=float)
    fig = _figure(1.8 + 0.9 * matrix.shape[1], 1.4 + 0.7 * matrix.shape[0])
    ax = fig.subplots()
    norm = _symmetric_norm(matrix)
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=_diverging_cmap(), norm=norm,
                      aspect="auto", interpolation="nearest")
    for (r, c), value in np.ndenumerate(matrix):
        if np.isfinite(value):
            dark = abs(value) > 0.6 * norm.vmax
            ax.text(c, r, f"{value:.3g}", ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")
    ax.set_xticks(range(len(perturbation_labels)), perturbation_labels)
    ax.set_yticks(range(len(response_labels)), response_labels)
    ax.set_xlabel("perturbed class")
    ax.set_ylabel("responding class")
    ax.set_title(title, fontsize=11)
    fig.colorbar(image, ax=ax, label=colorbar_label)
    _save(fig, out)


def influence_vs_distance(
    distance: np.ndarray,
    influence: np.ndarray,
    out: Out,
    *,
    title: str,
    ylabel: str,
    xlabel: str = "‖x_i − x_j‖ (input distance)",
    groups: Sequence[str] | None = None,
    bins: int = 12,
) -> None:
    """Scatter of H(i, j) against the inputs' distance, per group, with binned medians."""
    distance = np.asarray(distance, dtype=float)
    influence = np.asarray(influence, dtype=float)
    labels = np.asarray(groups) if groups is not None else np.full(distance.shape, "pairs")
    fig = _figure(6.4, 4.2)
    ax = fig.subplots()
    for label in sorted(set(labels.tolist())):
        mask = (labels == label) & np.isfinite(distance) & np.isfinite(influence)
        d, h = distance[mask], influence[mask]
        points = ax.scatter(d, h, s=6, alpha=0.35, linewidths=0, label=label)
        if d.size >= 2 * bins:
            edges = np.quantile(d, np.linspace(0, 1, bins + 1))
            which = np.clip(np.searchsorted(edges, d, side="right") - 1, 0, bins - 1)
            centres = [np.median(d[which == b]) for b in range(bins) if (which == b).any()]
            medians = [np.median(h[which == b]) for b in range(bins) if (which == b).any()]
            ax.plot(centres, medians, color=points.get_facecolor()[0][:3], linewidth=2)
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, markerscale=3, title="points; line = binned median", title_fontsize=8)
    _save(fig, out)


def metric_spectrum(
    spectra: Mapping[str, np.ndarray], out: Out, *, title: str, damping: float | None = None
) -> None:
    """Eigenvalues of the k-space metric, largest first, on a log scale, with λ marked."""
    fig = _figure(6.4, 4.0)
    ax = fig.subplots()
    for label, eigenvalues in spectra.items():
        values = np.sort(np.asarray(eigenvalues, dtype=float))[::-1]
        positive = values > 0
        note = "" if positive.all() else f" ({int((~positive).sum())} ≤ 0 not shown)"
        ax.plot(np.arange(1, values.size + 1)[positive], values[positive], marker=".",
                markersize=3, label=label + note)
    if damping is not None:
        ax.axhline(damping, color="k", linestyle="--", linewidth=1, label=f"λ = {damping:g}")
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue index (largest first)")
    ax.set_ylabel("eigenvalue of η̃ (k-space NTK metric)")
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, out)


def exact_agreement(
    ks: np.ndarray,
    relative_error: Mapping[str, np.ndarray],
    rank_correlation: Mapping[str, np.ndarray],
    out: Out,
    *,
    title: str,
) -> None:
    """Projected vs exact influence against k: relative Frobenius error and rank correlation."""
    ks = np.asarray(ks)
    fig = _figure(9.6, 3.8)
    left, right = fig.subplots(1, 2)
    for label, err in relative_error.items():
        left.plot(ks, err, marker="o", label=label)
    for label, rho in rank_correlation.items():
        right.plot(ks, rho, marker="o", label=label)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(int(k)) for k in ks])
        ax.set_xlabel("k (projected dimension)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    left.set_yscale("log")
    plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
    left.yaxis.set_major_formatter(plain)
    left.yaxis.set_minor_formatter(plain)
    left.set_ylabel("‖H_proj − H_exact‖_F / ‖H_exact‖_F")
    left.set_title("relative Frobenius error (lower is better)", fontsize=10)
    right.set_ylim(-0.05, 1.05)
    right.set_ylabel("Spearman rank correlation")
    right.set_title("rank correlation (higher is better)", fontsize=10)
    fig.suptitle(title, fontsize=11)
    _save(fig, out)


def training_curves(
    series: Mapping[str, tuple[np.ndarray, np.ndarray]], out: Out, *, title: str,
    ylabel: str = "scaled MSE (one-step)",
) -> None:
    """Loss per epoch, one line per (run, split); log scale when every value is positive."""
    fig = _figure(6.4, 4.0)
    ax = fig.subplots()
    everything = []
    for label, (epochs, values) in series.items():
        values = np.asarray(values, dtype=float)
        everything.append(values)
        ax.plot(epochs, values, marker="o", markersize=3, label=label)
    finite = np.concatenate(everything) if everything else np.array([])
    finite = finite[np.isfinite(finite)]
    if finite.size and (finite > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, out)


def rollout_error(curves: Mapping[str, Band], out: Out, *, title: str, ylabel: str) -> None:
    """Autoregressive rollout error versus horizon, per class (median and IQR over trajectories)."""
    fig = _figure(6.4, 4.0)
    ax = fig.subplots()
    _bands(ax, curves)
    lows = [np.asarray(c[1], dtype=float) for c in curves.values()]
    if lows and all((v[np.isfinite(v)] > 0).all() for v in lows):
        ax.set_yscale("log")
    ax.set_xlabel("rollout horizon (autoregressive steps)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, title="median, IQR band", title_fontsize=8)
    _save(fig, out)
