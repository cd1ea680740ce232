"""The report's figures: numpy arrays and labels in, one PNG out (no store I/O here).

Every function draws on its own ``Figure`` with the non-interactive Agg canvas (no pyplot
state, safe in any thread or worker) and writes to ``out``: a path or a binary file object.
Signed influence uses a diverging colormap centred at 0; NaN cells are drawn grey.
"""

from __future__ import annotations

import math
import os
from typing import IO, Any, Mapping, Sequence, Union

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

# Fixed geometry of heatmap grids, in inches (a computed layout engine costs 2-3x the drawing).
PANEL_W, PANEL_H, HGAP, VGAP = 2.3, 1.9, 0.2, 0.4
LEFT, RIGHT, BOTTOM = 0.75, 1.1, 0.6
TITLE_CHAR_W, TITLE_LINE_H = 0.085, 0.22  # 11 pt


def _title_width(title: str) -> float:
    """Inches an 11 pt title needs (its longest line)."""
    return 0.4 + TITLE_CHAR_W * max(len(line) for line in title.split("\n"))


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


def _plain_log_ticks(axis) -> None:
    """Tick labels like 0.2, 1, 30 on a log axis (not 2×10⁻¹)."""
    plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_formatter(plain)
    axis.set_minor_formatter(plain)


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
    lines = title.split("\n")
    top = 0.45 + TITLE_LINE_H * len(lines)
    grid_w = ncols * PANEL_W + (ncols - 1) * HGAP
    width = max(LEFT + grid_w + RIGHT, _title_width(title))
    left = (width - grid_w - RIGHT + LEFT) / 2
    height = BOTTOM + nrows * PANEL_H + (nrows - 1) * VGAP + top
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    norm, cmap = _symmetric_norm(*mats), _diverging_cmap()
    first, image = None, None
    for i, ((label, _), mat) in enumerate(zip(panels, mats)):
        row, col = divmod(i, ncols)
        x0 = left + col * (PANEL_W + HGAP)
        y0 = BOTTOM + (nrows - 1 - row) * (PANEL_H + VGAP)
        ax = fig.add_axes((x0 / width, y0 / height, PANEL_W / width, PANEL_H / height),
                          sharex=first, sharey=first)
        first = first or ax
        tr = _axis_values(t_response, mat.shape[0])
        tp = _axis_values(t_perturbation, mat.shape[1])
        image = ax.imshow(np.ma.masked_invalid(mat), origin="lower", cmap=cmap, norm=norm,
                          extent=(*_extent(tp), *_extent(tr)), aspect="auto", interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        first_column, bottom = col == 0, i >= len(mats) - ncols  # no panel below
        ax.tick_params(labelleft=first_column, labelbottom=bottom, labelsize=8)
        if first_column:
            ax.set_ylabel(T_RESPONSE)
        if bottom:
            ax.set_xlabel(T_PERTURBATION)
    grid_h = height - BOTTOM - top
    cax = fig.add_axes(((left + grid_w + 0.2) / width, BOTTOM / height, 0.15 / width, grid_h / height))
    fig.colorbar(image, cax=cax, label=colorbar_label)
    fig.suptitle(title, y=1 - 0.12 / height, va="top", fontsize=11)
    _save(fig, out)


def _colors(labels, ordered: bool = False) -> dict[str, Any]:
    """One colour per label, the same in every panel; the pooled curve "all" in black.
    ``ordered``: the labels are a progression (checkpoints), coloured along viridis."""
    from matplotlib import colormaps

    names = [label for label in dict.fromkeys(labels) if label != "all"]
    if ordered:
        ramp = colormaps["viridis"](np.linspace(0.0, 0.9, max(len(names), 1)))
        found = {label: ramp[i] for i, label in enumerate(names)}
    else:
        found = {label: f"C{i % 10}" for i, label in enumerate(names)}
    return found | {"all": "black"}


def _bands(ax, curves: Mapping[str, Band], colors: dict[str, Any] | None = None) -> None:
    """A line per curve with its band; the pooled curve, labelled "all", black and thicker."""
    colors = colors or _colors(curves)
    for label, (x, mid, lo, hi) in curves.items():
        width = 2.2 if label == "all" else 1.5
        (line,) = ax.plot(x, mid, marker="o", markersize=3, label=label, color=colors[label],
                          linewidth=width, zorder=3 if label == "all" else 2)
        if lo is not None and hi is not None:
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)


def lag_curves(
    panels: Sequence[tuple[str, Mapping[str, Band]]], out: Out, *, title: str, ylabel: str,
    ordered: bool = False, legend: str = "median, IQR band",
) -> None:
    """Influence versus time lag: one panel per (title, curves), a median line and shaded
    IQR per curve (or any curves, named by ``legend``), panels sharing the y axis;
    ``ordered`` curves (e.g. checkpoints in training order) get a sequential colour ramp."""
    if not panels:
        raise ValueError("lag_curves: no panels")
    fig = _figure(0.8 + 4.2 * len(panels), 3.9)
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True, squeeze=False)).ravel()
    colors = _colors((label for _, curves in panels for label in curves), ordered)
    for i, (ax, (label, curves)) in enumerate(zip(axes, panels)):
        _bands(ax, curves, colors)
        ax.axhline(0.0, color="0.5", linewidth=0.8)
        ax.axvline(0.0, color="0.5", linewidth=0.8, linestyle=":")
        ax.set_xlabel(LAG)
        if i == 0:
            ax.set_ylabel(ylabel)
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    handles = {}
    for ax in axes:  # one legend with every curve of any panel
        handles |= dict(zip(*reversed(ax.get_legend_handles_labels())))
    if handles:
        axes[0].legend(list(handles.values()), list(handles), fontsize=7, title=legend, title_fontsize=7)
    fig.suptitle(title, fontsize=11)
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
    fig = _figure(max(1.8 + 0.9 * matrix.shape[1], _title_width(title)), 1.6 + 0.7 * matrix.shape[0])
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
    binned: Band | None = None,
    xlabel: str = "RMS(x_i − x_j) (input distance)",
) -> None:
    """Scatter of sampled pairs' H(i, j) against their inputs' distance, with the binned
    median and IQR when given."""
    distance = np.asarray(distance, dtype=float)
    influence = np.asarray(influence, dtype=float)
    fig = _figure(6.4, 4.2)
    ax = fig.subplots()
    ax.scatter(distance, influence, s=6, alpha=0.35, linewidths=0, color="tab:blue",
               label=f"sampled pairs (n = {distance.size})")
    if binned is not None:
        x, mid, lo, hi = binned
        ax.plot(x, mid, color="tab:red", marker="o", markersize=3, linewidth=2,
                label="median per distance bin")
        if lo is not None and hi is not None:
            ax.fill_between(x, lo, hi, color="tab:red", alpha=0.2, linewidth=0, label="IQR per bin")
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, markerscale=2)
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
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
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
    _plain_log_ticks(left.yaxis)
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
        _plain_log_ticks(ax.yaxis)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, out)


def rollout_error(
    curves: Mapping[str, Band], out: Out, *, title: str, ylabel: str, band_label: str = "mean ± 1 std"
) -> None:
    """Autoregressive rollout error versus horizon, one line and band per class."""
    fig = _figure(6.4, 4.0)
    ax = fig.subplots()
    _bands(ax, curves)
    lows = [np.asarray(c[1], dtype=float) for c in curves.values()]
    if lows and all((v[np.isfinite(v)] > 0).all() for v in lows):
        ax.set_yscale("log")
        _plain_log_ticks(ax.yaxis)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_xlabel("rollout horizon (autoregressive steps)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, title=band_label, title_fontsize=8)
    _save(fig, out)
