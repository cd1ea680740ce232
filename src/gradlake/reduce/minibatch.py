"""The paper's minibatches and the statistics of their exact H (pure numpy).

A minibatch (the paper's shape): one trajectory of each of the first ``classes`` classes
(sorted by name), transitions t = w·per_class .. (w+1)·per_class − 1 of a window w. Minibatch
m = j·W + w takes the j-th trajectory (by id) of ``split`` in every class and window w of
W = ⌈(T − 1)/per_class⌉; minibatch 0 is the paper's (the first trajectory of each class,
t = 0 .. per_class − 1). Asking for 0 minibatches means every one of the split.

Statistics of H over minibatches, under the batch normalisations of exact.normalize_matrix
(row-std over the batch's columns is the paper's):
- two-time means [relation, class, t_response, t_perturbation] (relation: same_trajectory,
  other_class; within a minibatch a class has one trajectory), NaN where no pair;
- lag curves per (minibatch, class): mean over same-trajectory pairs at lag t_r − t_p;
- the paper's headline numbers per class and over all classes: mean H at Δt = 0, |Δt| = 1,
  |Δt| ≥ 3 (the tail) on the same trajectory, and across classes.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from gradlake.errors import InputError

RELATIONS = ("same_trajectory", "other_class")
HEADLINE = ("dt0", "dt1", "tail", "other_class")  # Δt = 0, |Δt| = 1, |Δt| ≥ 3, other classes
# Amarel et al. (arXiv 2509.00024), UNet on CE, row-std H: the values gradlake's report
# sets its exact numbers beside (the tail is 0.7-0.9 there; its middle is shown).
PAPER_CE_UNET = {"dt0": 5.0, "dt1": 2.3, "tail": 0.8, "other_class": 0.05}


def plan(trajectories: pa.Table, n_times: int, split: str, classes: int, per_class: int,
         minibatches: int) -> list[pa.Table]:
    """The minibatches (see the module docstring), each a table: position, row, trajectory, t, class."""
    names = np.asarray(trajectories.column("class").to_pylist(), dtype=str)
    splits = np.asarray(trajectories.column("split").to_pylist(), dtype=str)
    ids = np.asarray(trajectories.column("trajectory").to_numpy(), dtype=np.int64)
    members = {}
    for name in sorted(set(names.tolist())):
        found = np.sort(ids[(names == name) & (splits == split)])
        if len(found):
            members[name] = found
        if len(members) == classes:
            break
    if not members:
        raise InputError(f"exact.split: no trajectory of split {split!r} in the dataset "
                         f"(it has splits {sorted(set(splits.tolist()))})")
    transitions = n_times - 1
    steps = min(per_class, transitions)
    windows = transitions // steps
    depth = min(len(m) for m in members.values())
    total = depth * windows
    count = total if minibatches == 0 else min(minibatches, total)
    out = []
    for m in range(count):
        j, w = divmod(m, windows)
        t = np.tile(np.arange(w * steps, (w + 1) * steps, dtype=np.int64), len(members))
        trajectory = np.repeat([int(members[c][j]) for c in members], steps)
        out.append(pa.table({"position": np.arange(len(t)), "row": trajectory * transitions + t,
                             "trajectory": trajectory, "t": t.astype(np.int32),
                             "class": np.repeat(list(members), steps)}))
    return out


def _relation_masks(batch: pa.Table):
    traj = batch.column("trajectory").to_numpy()
    cls = np.asarray(batch.column("class").to_pylist(), dtype=str)
    same_traj = traj[:, None] == traj[None, :]
    other = cls[:, None] != cls[None, :]
    return {"same_trajectory": same_traj, "other_class": other}, cls


def lag_rows(h: np.ndarray, batch: pa.Table, minibatch: int) -> list[dict]:
    """Per class of the minibatch: mean H over same-trajectory pairs at each lag t_r − t_p."""
    masks, cls = _relation_masks(batch)
    t = batch.column("t").to_numpy().astype(np.int64)
    lag = t[:, None] - t[None, :]
    rows = []
    for name in sorted(set(cls.tolist())):
        mask = masks["same_trajectory"] & (cls[:, None] == name)
        for value in np.unique(lag[mask]):
            sel = mask & (lag == value)
            rows.append({"minibatch": minibatch, "class": name, "lag": int(value),
                         "value": float(h[sel].mean()), "pairs": int(sel.sum())})
    return rows


def headline(h: np.ndarray, batch: pa.Table) -> dict[str, dict[str, float]]:
    """{class or "all": {dt0, dt1, tail, other_class: (sum, count)}} for one minibatch's H."""
    masks, cls = _relation_masks(batch)
    t = batch.column("t").to_numpy().astype(np.int64)
    dist = np.abs(t[:, None] - t[None, :])
    cells = {"dt0": masks["same_trajectory"] & (dist == 0), "dt1": masks["same_trajectory"] & (dist == 1),
             "tail": masks["same_trajectory"] & (dist >= 3), "other_class": masks["other_class"]}
    out = {}
    for name in ["all", *sorted(set(cls.tolist()))]:
        rows = np.ones(len(cls), bool) if name == "all" else cls == name
        out[name] = {key: (float(h[rows][mask[rows]].sum()), int(mask[rows].sum()))
                     for key, mask in cells.items()}
    return out


def merge_headlines(parts: list[dict]) -> dict[str, dict[str, float | None]]:
    """Pair-weighted means of the per-minibatch sums of :func:`headline`."""
    total: dict[str, dict[str, list[float]]] = {}
    for part in parts:
        for name, cells in part.items():
            for key, (s, c) in cells.items():
                acc = total.setdefault(name, {}).setdefault(key, [0.0, 0])
                acc[0] += s
                acc[1] += c
    return {name: {key: (s / c if c else None) for key, (s, c) in cells.items()} for name, cells in total.items()}


def twotime(hs: list[np.ndarray], batches: list[pa.Table], classes: list[str], n_t: int) -> np.ndarray:
    """Mean H [relation, class, t_response, t_perturbation] over minibatches (NaN: no pair)."""
    sums = np.zeros((len(RELATIONS), len(classes), n_t, n_t))
    counts = np.zeros_like(sums)
    index = {c: i for i, c in enumerate(classes)}
    for h, batch in zip(hs, batches):
        masks, cls = _relation_masks(batch)
        t = batch.column("t").to_numpy().astype(np.int64)
        ci = np.array([index[c] for c in cls])
        for r, relation in enumerate(RELATIONS):
            i, j = np.nonzero(masks[relation])
            np.add.at(sums[r], (ci[i], t[i], t[j]), h[i, j])
            np.add.at(counts[r], (ci[i], t[i], t[j]), 1)
    with np.errstate(invalid="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
