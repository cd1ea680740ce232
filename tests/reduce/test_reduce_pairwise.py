"""Pairwise tiles, running top-k and the distance curve against dense numpy."""

import numpy as np

from gradlake.reduce.metric import Metric
from gradlake.reduce.pairwise import (TopK, distance_curve, input_distance, precondition, sample_pairs, tile,
                                      whiten)


def test_tiles_and_topk_match_dense():
    rng = np.random.default_rng(1)
    k, nq, nt = 5, 7, 40
    g = rng.normal(size=(30, k))
    metric = Metric(g.T @ g)
    lam = 1e-3
    phi_q, phi_t = rng.normal(size=(nq, k)), rng.normal(size=(nt, k))
    phi_t[4] = np.nan
    q_ids = np.array([3, 50, 51, 52, 53, 54, 55])  # query 3 is also a training sample
    t_ids = np.arange(nt)
    H = phi_q @ np.linalg.solve(metric.eta + lam * np.eye(k), phi_t.T)
    w = metric.whitener(lam)
    top = TopK(q_ids, k=4)
    tiles = []
    for cols in np.array_split(np.arange(nt), 5):
        h = tile(precondition(phi_q, metric.inverse(lam), np.float64), phi_t[cols])
        np.testing.assert_allclose(h, tile(whiten(phi_q, w, np.float64), whiten(phi_t[cols], w, np.float64)), rtol=1e-9)
        tiles.append(h)
        top.update(h, t_ids[cols])
    np.testing.assert_allclose(np.concatenate(tiles, 1), H, rtol=1e-10)
    res = top.result()
    for q in range(nq):
        row = H[q].copy()
        row[4] = np.nan
        if q_ids[q] < nt:
            row[q_ids[q]] = np.nan
        ok = np.flatnonzero(np.isfinite(row))
        order = ok[np.argsort(-row[ok])]
        assert res["top_ids"][q].tolist() == order[:4].tolist()
        np.testing.assert_allclose(res["top"][q], row[order[:4]], rtol=1e-10)
        assert res["bottom_ids"][q].tolist() == order[::-1][:4].tolist()
    assert 3 not in res["top_ids"][0] and 4 not in res["top_ids"]


def test_topk_with_fewer_candidates_than_k():
    top = TopK(np.array([0]), k=3, exclude_self=False)
    top.update(np.array([[2.0, 1.0]]), np.array([7, 8]))
    res = top.result()
    assert res["top_ids"].tolist() == [[7, 8, -1]] and res["bottom_ids"].tolist() == [[8, 7, -1]]


def test_distance_curve_and_pairs():
    rng = np.random.default_rng(2)
    i, j = sample_pairs(np.arange(10, 20), np.arange(15, 25), 500, seed=3)
    assert 400 < len(i) < 500 and (i != j).all() and set(i) <= set(range(10, 20)) and set(j) <= set(range(15, 25))
    x = rng.normal(size=(2, 6, 3, 4, 4))
    d = input_distance(x[0], x[1])
    np.testing.assert_allclose(d, [np.sqrt(((x[0, n] - x[1, n]) ** 2).mean()) for n in range(6)])
    dist = rng.random(1000)
    h = 3 - 2 * dist + 0.01 * rng.normal(size=1000)
    curve = distance_curve(h, dist, 4)
    assert curve["pairs"].sum() == 1000 and len(curve["mean"]) == 4
    for b in range(4):
        sel = (dist >= curve["lo"][b]) & ((dist < curve["hi"][b]) | (b == 3))
        np.testing.assert_allclose(curve["mean"][b], h[sel].mean())
        np.testing.assert_allclose(curve["median"][b], np.median(h[sel]))
    assert np.all(np.diff(curve["mean"]) < 0)


def test_topk_merged_from_parts_equals_one_pass():
    rng = np.random.default_rng(3)
    h = rng.normal(size=(6, 50)).astype(np.float32)
    h[2, 10] = np.inf
    q_ids, ids = np.array([1, 7, 20, 33, 60, 61]), np.arange(50)
    whole = TopK(q_ids, k=5)
    whole.update(h, ids)
    merged = TopK(q_ids, k=5)
    for cols in np.array_split(ids, 3):
        part = TopK(q_ids, k=5)
        for sub in np.array_split(cols, 2):
            part.update(h[:, sub], ids[sub])
        merged.merge(part.result())
    a, b = whole.result(), merged.result()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    ref = h.astype(np.float64).copy()
    ref[[0, 1, 2, 3], [1, 7, 20, 33]] = np.nan  # self pairs
    ref[~np.isfinite(ref)] = np.nan
    for q in range(6):
        ok = np.flatnonzero(np.isfinite(ref[q]))
        order = ok[np.argsort(-ref[q, ok])]
        assert a["top_ids"][q].tolist() == order[:5].tolist()
        assert a["bottom_ids"][q].tolist() == order[::-1][:5].tolist()


def test_tile_of_stored_float16_rows_equals_the_float32_product(monkeypatch):
    """Narrow candidate rows are cast slice by slice (several slices here): the same H."""
    import gradlake.reduce.pairwise as pairwise

    rng = np.random.default_rng(3)
    a = rng.standard_normal((5, 12)).astype(np.float32)
    b = rng.standard_normal((50, 12)).astype(np.float16)
    monkeypatch.setattr(pairwise, "CAST_BYTES", 7 * 12 * 4)  # 7 rows a slice: 8 slices, the last short
    expected = a.astype(np.float64) @ b.astype(np.float64).T
    np.testing.assert_allclose(tile(a, b), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tile(a, b), tile(a, b.astype(np.float32)), rtol=1e-6, atol=1e-6)
