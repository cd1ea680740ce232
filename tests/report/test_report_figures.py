"""Each figure function writes a valid, sensibly sized, deterministic PNG."""

from __future__ import annotations

import io

import numpy as np
import pytest
from matplotlib import image as mpimg

from gradlake.report import figures as F

CLASSES = ("rp", "crp", "rpui")


def png_shape(path) -> tuple[int, int, int]:
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return mpimg.imread(path).shape


def assert_sensible_png(path, min_px=300, max_px=2500):
    h, w, channels = png_shape(path)
    assert min_px <= w <= max_px and min_px <= h <= max_px, (w, h)
    assert channels in (3, 4)
    pixels = mpimg.imread(path)[..., :3]
    assert pixels.std() > 0.02  # something was drawn


def _two_time(T=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((T, T))


DRAWERS = {
    "heatmaps": lambda out: F.two_time_heatmaps(
        [(f"class {c}", _two_time(seed=i)) for i, c in enumerate(CLASSES)], out,
        title="H_CC intra-class (row-std)", colorbar_label="H (row-std normalised)"),
    "lag": lambda out: F.lag_curves(
        [(relation, {c: (np.arange(-3, 4), np.linspace(0, 1, 7), np.linspace(-.1, .9, 7), np.linspace(.1, 1.1, 7))
                     for c in CLASSES}) for relation in ("same trajectory", "other classes")],
        out, title="lag", ylabel="H"),
    "transfer": lambda out: F.transfer_matrix(
        _two_time(3), out, response_labels=CLASSES, perturbation_labels=CLASSES, title="transfer",
        colorbar_label="mean H"),
    "distance": lambda out: F.influence_vs_distance(
        np.linspace(0, 2, 200), np.cos(np.linspace(0, 2, 200)), out, title="distance", ylabel="H",
        binned=(np.linspace(0.1, 1.9, 5), np.cos(np.linspace(0.1, 1.9, 5)), None, None)),
    "spectrum": lambda out: F.metric_spectrum(
        {"epoch-0001": np.r_[np.logspace(2, -6, 30), 0.0, -1e-9]}, out, title="spectrum", damping=1e-4),
    "exact": lambda out: F.exact_agreement(
        np.array([4, 8, 16]), {"CC": np.array([.5, .2, .1])}, {"CC": np.array([.6, .8, .9])}, out,
        title="exact"),
    "training": lambda out: F.training_curves(
        {"train": (np.arange(1, 4), np.array([1.0, .5, .2])), "val": (np.arange(1, 4), np.array([1.2, .7, .4]))},
        out, title="training"),
    "rollout": lambda out: F.rollout_error(
        {c: (np.arange(1, 6), np.arange(1, 6) * .1, None, None) for c in CLASSES}, out, title="rollout",
        ylabel="scaled MSE"),
}


@pytest.mark.parametrize("name", sorted(DRAWERS))
def test_figure_is_a_sensible_png(tmp_path, name):
    path = tmp_path / "sub" / f"{name}.png"
    DRAWERS[name](str(path))
    assert_sensible_png(path)


def test_figures_are_deterministic_and_overwrite(tmp_path):
    path = tmp_path / "h.png"
    path.write_bytes(b"stale")
    DRAWERS["heatmaps"](str(path))
    first = path.read_bytes()
    DRAWERS["heatmaps"](str(path))
    assert path.read_bytes() == first
    buffer = io.BytesIO()
    DRAWERS["heatmaps"](buffer)  # a binary file object works too
    assert buffer.getvalue() == first


def test_diverging_scale_is_centred_at_zero():
    norm = F._symmetric_norm(np.array([0.2, 0.5]), np.array([[np.nan, -0.1]]))
    assert (norm.vmin, norm.vmax) == (-0.5, 0.5)
    assert norm(0.0) == pytest.approx(0.5)
    all_nan = F._symmetric_norm(np.full((2, 2), np.nan))
    assert (all_nan.vmin, all_nan.vmax) == (-1.0, 1.0)


def test_heatmap_with_empty_groups_draws(tmp_path):
    matrix = _two_time()
    matrix[:, 3:] = np.nan  # groups without pairs
    F.two_time_heatmaps([("a", matrix), ("b", np.full((6, 6), np.nan))], tmp_path / "n.png",
                        title="t", colorbar_label="H", ncols=1)
    assert_sensible_png(tmp_path / "n.png")


def _red_blue_centres(path):
    """Mean (x, y) pixel of the red and of the blue cells in the left 60 % (colorbar excluded)."""
    rgb = mpimg.imread(path)[..., :3]
    rgb = rgb[:, : int(rgb.shape[1] * 0.6)]
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    red, blue = (r > b + 0.2) & (r > g + 0.2), (b > r + 0.2)
    assert red.sum() > 100 and blue.sum() > 100
    return [np.array(np.nonzero(mask)[::-1]).mean(axis=1) for mask in (red, blue)]


def test_heatmap_axes_and_sign(tmp_path):
    """Positive cells red, negative blue; t_perturbation runs right, t_response runs up."""
    T = 8
    t = np.arange(T)
    late_perturbation = np.where(t[None, :] >= T // 2, 1.0, -1.0) * np.ones((T, 1))
    F.two_time_heatmaps([("x", late_perturbation)], tmp_path / "x.png", title="x", colorbar_label="H")
    red, blue = _red_blue_centres(tmp_path / "x.png")
    assert red[0] > blue[0] + 20  # positive cells on the right
    late_response = late_perturbation.T
    F.two_time_heatmaps([("y", late_response)], tmp_path / "y.png", title="y", colorbar_label="H")
    red, blue = _red_blue_centres(tmp_path / "y.png")
    assert red[1] < blue[1] - 20  # positive cells at the top (smaller pixel row)
