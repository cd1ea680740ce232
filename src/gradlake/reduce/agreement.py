"""How close two influence matrices are: rank correlation, relative error, batch normalisations."""

from __future__ import annotations

import numpy as np

from gradlake.errors import InputError


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 with ties given their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    if (counts > 1).any():
        sums = np.bincount(inverse, weights=ranks)
        ranks = sums[inverse] / counts[inverse]
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of the finite entry pairs of two arrays."""
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 2:
        return float("nan")
    ra, rb = _ranks(a[ok]), _ranks(b[ok])
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def relative_frobenius(estimate: np.ndarray, exact: np.ndarray) -> float:
    """‖estimate − exact‖_F / ‖exact‖_F."""
    return float(np.linalg.norm(estimate - exact) / np.linalg.norm(exact))


def normalize_matrix(h: np.ndarray, norm: str, h_aa_diag=None, h_bb_diag=None) -> np.ndarray:
    """A dense H [B, B] under a normalisation; the reference set of row-std is the batch's
    columns, cosine needs the diagonals of H_AA and H_BB."""
    if norm == "none":
        return h
    if norm == "row-std":
        std = h.std(axis=1)
        return np.divide(h, std[:, None], out=np.zeros_like(h), where=std[:, None] > 0)
    if norm == "cosine":
        denom = np.sqrt(np.outer(h_aa_diag, h_bb_diag))
        return np.divide(h, denom, out=np.zeros_like(h), where=denom > 0)
    raise InputError(f"normalisation {norm!r}: expected none, row-std or cosine")
