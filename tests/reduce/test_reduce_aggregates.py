"""Aggregates in O(N k²) against a dense numpy H on small random data (float64, rel ≤ 1e-6)."""

import numpy as np
import pytest
from reduce_helpers import dense_h, eta_from_probes

from gradlake.reduce.aggregates import (AggregateReducer, RELATIONS, TrajectoryBlock, complete,
                                        finalize, lag_values)
from gradlake.reduce.layers import Layers
from gradlake.reduce.metric import Metric, Moments, tree_merge

LAM = 1e-2
RTOL = 1e-6


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    C, per_class, T, k, probes = 3, 3, 5, 6, 2
    n_traj = C * per_class
    traj = np.repeat(np.arange(n_traj), T)
    t = np.tile(np.arange(T), n_traj)
    cls = traj // per_class
    N = len(traj)
    # Some samples absent from the store, one with a non-finite gradient.
    present = rng.random(N) > 0.1
    phi = {o: rng.normal(size=(N, k)) * rng.uniform(0.5, 2, size=k) for o in "CME"}
    phi["C"] += 0.7  # a non-zero mean, so row-std differs from a plain norm
    phi["V"] = rng.normal(size=(N, probes, k))
    phi["M"][np.flatnonzero(present)[3]] = np.nan
    reference = rng.random(N) < 0.6
    response = rng.random(N) < 0.8
    perturbation = rng.random(N) < 0.7
    return dict(C=C, T=T, k=k, N=N, traj=traj, t=t, cls=cls, present=present, phi=phi,
                reference=reference & present, response=response & present,
                perturbation=perturbation & present)


def _dense(d, pair, norm):
    """Full H by a direct solve, normalised densely."""
    phi = d["phi"]
    eta = eta_from_probes(phi["V"][d["reference"]])
    return dense_h(phi[pair[0]], phi[pair[1]], eta, LAM, norm, reference=np.flatnonzero(d["reference"]))


def _reduce(d, norms, blocks=2, layers=None):
    phi = d["phi"]
    ref = d["reference"]
    metric = Metric.from_moments(tree_merge([Moments(d["k"]).add(phi["V"][ref][:7]),
                                             Moments(d["k"]).add(phi["V"][ref][7:])]))
    reference = {"C": Moments(d["k"]).add(phi["C"][ref])}
    reducer = AggregateReducer({LAM: metric.whitener(LAM)}, reference, ("CC", "MC"), norms, d["C"], layers)
    rows = np.flatnonzero(d["present"])
    split = np.array_split(np.unique(d["traj"][rows]), blocks)
    made = []
    for trajs in split:
        r = rows[np.isin(d["traj"][rows], trajs)][::-1]  # any order within a block
        block = TrajectoryBlock.build(r, d["traj"][r], d["t"][r], d["cls"][r], d["response"][r],
                                      d["perturbation"][r], d["T"])
        made.append((block, {o: phi[o][r] for o in "CM"}))
    pert = [reducer.perturbation(b, p) for b, p in made]
    pert = {key: tuple(sum(x[key][i] for x in pert) for i in range(2)) for key in pert[0]}
    resp = [reducer.response(b, p, pert) for b, p in made]
    return reducer, made, pert, resp


def _relation_masks(d):
    same_traj = d["traj"][:, None] == d["traj"][None, :]
    same_cls = d["cls"][:, None] == d["cls"][None, :]
    return {"same_trajectory": same_traj, "same_class": same_cls & ~same_traj, "other_class": ~same_cls}


@pytest.mark.parametrize("norm", ["none", "row-std", "cosine"])
@pytest.mark.parametrize("pair", ["CC", "MC"])
def test_aggregates_match_dense(data, pair, norm):
    d = data
    reducer, made, pert, resp = _reduce(d, (norm,))
    total = complete([r[0][LAM, pair, norm][0] for r in resp], pert[LAM, pair, norm])
    got = finalize(total)
    H = _dense(d, pair, norm)
    ok_a = d["response"] & np.isfinite(d["phi"][pair[0]]).all(1)
    ok_b = d["perturbation"] & np.isfinite(d["phi"][pair[1]]).all(1)
    valid = ok_a[:, None] & ok_b[None, :]
    masks = _relation_masks(d)
    T, C = d["T"], d["C"]
    want = np.full((3, C, T, T), np.nan)
    want_class = np.full((C, C, T, T), np.nan)
    for r, rel in enumerate(RELATIONS):
        for c in range(C):
            for t in range(T):
                for u in range(T):
                    sel = valid & masks[rel] & (d["cls"] == c)[:, None] & (d["t"] == t)[:, None] & (d["t"] == u)[None, :]
                    if sel.any():
                        want[r, c, t, u] = H[sel].mean()
    for c in range(C):
        for e in range(C):
            for t in range(T):
                for u in range(T):
                    sel = (valid & ~masks["same_trajectory"] & (d["cls"] == c)[:, None] & (d["cls"] == e)[None, :]
                           & (d["t"] == t)[:, None] & (d["t"] == u)[None, :])
                    if sel.any():
                        want_class[c, e, t, u] = H[sel].mean()
    want_transfer = np.array([[H[valid & ~masks["same_trajectory"] & (d["cls"] == c)[:, None]
                                 & (d["cls"] == e)[None, :]].mean() for e in range(C)] for c in range(C)])
    np.testing.assert_allclose(got["twotime"], want, rtol=RTOL, atol=0)
    assert np.array_equal(np.isnan(got["twotime"]), np.isnan(want))
    np.testing.assert_allclose(got["class_twotime"], want_class, rtol=RTOL, atol=0)
    np.testing.assert_allclose(got["transfer"], want_transfer, rtol=RTOL, atol=0)

    # Per-trajectory lag curves: mean over the pairs at each lag, by relation.
    lag = d["t"][:, None] - d["t"][None, :]
    for (block, _), part in zip(made, resp):
        _, lag_s, lag_n, shares = part[0][LAM, pair, norm]
        assert shares is None
        values = lag_values(lag_s, lag_n)
        for pos, n in enumerate(block.trajectories):
            for r, rel in enumerate(RELATIONS):
                for li, delta in enumerate(range(-(T - 1), T)):
                    sel = valid & masks[rel] & (d["traj"] == n)[:, None] & (lag == delta)
                    expected = H[sel].mean() if sel.any() else np.nan
                    np.testing.assert_allclose(values[pos, r, li], expected, rtol=RTOL, atol=0)


@pytest.mark.parametrize("norm", ["none", "row-std", "cosine"])
def test_lag_curves_split_into_layer_shares(data, norm):
    """share_g(i, j) = φ_A,i[g] · (W φ_B,j)[g] (times the row's normalisation), averaged like H."""
    d, pair = data, "MC"
    params = [("blocks.0.w", 2), ("blocks.1.w", 1), ("head.w", 3)]
    offsets = np.cumsum([0] + [k for _, k in params])
    layers = Layers.from_spec({"parameters": [{"name": n, "offset": int(o), "k": k}
                                              for (n, k), o in zip(params, offsets)]}, {"name": "vit"}, d["k"])
    assert layers.groups == ("blocks.0", "blocks.1", "head")
    _, made, _, resp = _reduce(d, (norm,), layers=layers)
    H = _dense(d, pair, norm)
    raw = _dense(d, pair, "none")
    phi_a, phi_b = (np.nan_to_num(d["phi"][o]) for o in pair)
    inverse = np.linalg.inv(eta_from_probes(d["phi"]["V"][d["reference"]]) + LAM * np.eye(d["k"]))
    scale = np.divide(H, raw, out=np.zeros_like(H), where=raw != 0)  # the normalisation's factor per pair
    dense = [(phi_a * (np.arange(d["k"]) >= lo) * (np.arange(d["k"]) < hi)) @ inverse @ phi_b.T * scale
             for lo, hi in ((0, 2), (2, 3), (3, 6))]
    valid = (d["response"] & np.isfinite(d["phi"][pair[0]]).all(1))[:, None] & \
        (d["perturbation"] & np.isfinite(d["phi"][pair[1]]).all(1))[None, :]
    masks = _relation_masks(d)
    lag = d["t"][:, None] - d["t"][None, :]
    T = d["T"]
    for (block, _), part in zip(made, resp):
        _, lag_s, lag_n, shares = part[0][LAM, pair, norm]
        np.testing.assert_allclose(shares.sum(0), lag_s, rtol=1e-9, atol=1e-12)  # shares sum to the curve
        for g in range(3):
            values = lag_values(shares[g], lag_n)
            for pos, n in enumerate(block.trajectories):
                for r, rel in enumerate(RELATIONS):
                    for li, delta in enumerate(range(-(T - 1), T)):
                        sel = valid & masks[rel] & (d["traj"] == n)[:, None] & (lag == delta)
                        expected = dense[g][sel].mean() if sel.any() else np.nan
                        np.testing.assert_allclose(values[pos, r, li], expected, rtol=RTOL, atol=1e-12)


def test_diagonal_and_row_std_match_dense(data):
    d = data
    _, made, _, resp = _reduce(d, ("none",), blocks=1)
    block = made[0][0]
    h_self, sigma = resp[0][1][LAM, "MC"]
    H = _dense(d, "MC", "none")
    ref = np.flatnonzero(d["reference"])
    slots = block.slots
    rows = block.rows
    got_self = h_self.ravel()[slots]
    got_sigma = sigma.ravel()[slots]
    finite = np.isfinite(d["phi"]["M"][rows]).all(1)
    np.testing.assert_allclose(got_self[finite], np.diag(H)[rows][finite], rtol=RTOL)
    np.testing.assert_allclose(got_sigma[finite], H[rows][:, ref].std(1)[finite], rtol=RTOL)
    assert np.isnan(got_self[~finite]).all() and (~finite).sum() == 1


def test_metric_guards():
    from gradlake.errors import GradlakeError, InputError

    m = Moments(3).add(np.array([[1.0, 0, 0], [np.inf, 0, 0]]))
    assert m.count == 1 and m.skipped == 1
    metric = Metric(np.diag([-1e-18, 2.0, 1.0]))
    assert metric.clipped == 1 and metric.eigenvalues.tolist() == [2.0, 1.0, 0.0]
    np.testing.assert_allclose(metric.inverse(0.5), np.diag([1 / 0.5, 1 / 2.5, 1 / 1.5]), atol=1e-15)
    with pytest.raises(GradlakeError, match="non-finite"):
        Metric(np.array([[np.nan]]))
    with pytest.raises(InputError, match="damping"):
        metric.whitener(0.0)
