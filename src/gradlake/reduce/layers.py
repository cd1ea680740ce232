"""Influence per layer: the share of H(i, j) carried by each parameter block of φ.

The projector spec (store.json ``projector.parameters``) gives each parameter block its
slice [offset, offset + k) of φ. The metric W = (η̃ + λI)⁻¹ couples blocks (it is not
block-diagonal), so H(i, j) = φ_A,iᵀ W φ_B,j is not a sum of per-block forms; the share
of block b is instead its part of the bilinear form,

    share_b(i, j) = φ_A,i[b] · (W φ_B,j)[b],        Σ_b share_b(i, j) = H(i, j) exactly,

linear in φ_A,i, so a mean of H over pairs splits into the same means of shares. With
W = w wᵀ (ψ = φ w whitened) it is a_i^(b) · ψ_B,j for the response's block-b-only
whitened row a_i^(b) = (φ_A,i restricted to b) w, which is how the aggregates split it.

Layer groups are named from the parameter names: for the UNet (model name ``unet``) the
encoder (``proj_in.*``, ``down.*``), the bottleneck (``across.*``) and the decoder
(``up.*``, ``proj_out.*``); for any other model (or names outside these) the first component of the name, with the
second when it is one of several indices under it (a list of repeated blocks:
``blocks.3.attn.qkv.weight`` -> ``blocks.3``, one group per transformer block of the ViT,
beside ``embed``, ``position``, ``norm``, ``unpatch``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gradlake.errors import InputError

UNET_GROUPS = {"proj_in": "encoder", "down": "encoder", "across": "bottleneck", "up": "decoder",
               "proj_out": "decoder"}
CHUNK = 4096  # entries of a share computation at a time


def layer_groups(names: list[str], model: str = "") -> list[str]:
    """The layer group of each parameter of ``names`` of a model named ``model`` (module docstring)."""
    parts = [name.split(".") for name in names]
    indices: dict[str, set[str]] = {}
    for p in parts:
        if len(p) > 2 and p[1].isdigit():
            indices.setdefault(p[0], set()).add(p[1])
    if model == "unet" and all(p[0] in UNET_GROUPS for p in parts):
        return [UNET_GROUPS[p[0]] for p in parts]
    return [".".join(p[:2]) if len(indices.get(p[0], ())) > 1 else p[0] for p in parts]


@dataclass(frozen=True)
class Layers:
    """φ's parameter blocks (in φ order) and their layer groups (in order of first block)."""

    blocks: tuple[str, ...]
    offsets: np.ndarray  # [B + 1]: block b is φ[offsets[b]:offsets[b + 1]]
    groups: tuple[str, ...]
    group_of: np.ndarray  # [B] group index of each block

    @classmethod
    def from_spec(cls, projector: dict[str, Any], model: dict[str, Any], k: int) -> Layers:
        """From a store's projector spec and model config; InputError when the spec records
        no blocks or they do not tile φ's k entries."""
        params = projector.get("parameters") or []
        if not params:
            raise InputError("the store's projector spec records no parameter blocks "
                             "(a store written by an older gradlake or without a projector)")
        params = sorted(params, key=lambda p: p["offset"])
        offsets = np.array([p["offset"] for p in params] + [params[-1]["offset"] + params[-1]["k"]])
        if offsets[0] != 0 or offsets[-1] != k or (np.diff(offsets) <= 0).any() or any(
                p["offset"] + p["k"] != offsets[i + 1] for i, p in enumerate(params)):
            raise InputError(f"the projector spec's parameter blocks do not tile φ's {k} entries")
        names = tuple(p["name"] for p in params)
        labels = layer_groups(list(names), model.get("name", ""))
        groups = tuple(dict.fromkeys(labels))
        return cls(names, offsets, groups, np.array([groups.index(g) for g in labels]))

    def block_shares(self, phi_a: np.ndarray, w_phi_b: np.ndarray) -> np.ndarray:
        """share_b of each row pair: φ_A [n, k] and W φ_B [n, k] -> [n, blocks] (float64)."""
        out = np.empty((len(phi_a), len(self.blocks)))
        for start in range(0, len(phi_a), CHUNK):
            part = np.asarray(phi_a[start:start + CHUNK], np.float64) * w_phi_b[start:start + CHUNK]
            out[start:start + CHUNK] = np.add.reduceat(part, self.offsets[:-1], axis=1)
        return out

    def group_shares(self, block_shares: np.ndarray) -> np.ndarray:
        """Block shares [..., blocks] summed per layer group -> [..., groups]."""
        onehot = np.zeros((len(self.blocks), len(self.groups)))
        onehot[np.arange(len(self.blocks)), self.group_of] = 1.0
        return block_shares @ onehot

    def group_slices(self) -> list[np.ndarray]:
        """The φ entries of each layer group (index arrays, in group order)."""
        return [np.concatenate([np.arange(self.offsets[b], self.offsets[b + 1])
                                for b in np.flatnonzero(self.group_of == g)]) for g in range(len(self.groups))]

    def describe(self) -> dict[str, Any]:
        """For a table's metadata: the blocks (with their group) and the groups, in order."""
        return {"blocks": list(self.blocks), "block_groups": [self.groups[g] for g in self.group_of],
                "groups": list(self.groups), "share": "phi_A[b] . (W phi_B)[b]; shares sum to H"}


def pair_shares(layers: Layers, phi_a: np.ndarray, w_phi_b: np.ndarray, result: dict[str, np.ndarray],
                candidates: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Shares of the listed pairs of a :meth:`TopK.result` as extra top-k table columns:
    ``share:<group>`` [Q, k] and ``block_shares`` [Q, k, blocks] per kind. ``phi_a`` [Q, k]:
    the queries' φ_A; ``w_phi_b`` [m, k]: W φ_B of the sorted rows ``candidates`` listed."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for kind in ("top", "bottom"):
        ids = result[f"{kind}_ids"]
        qi, rank = np.nonzero(ids >= 0)
        blocks = np.full((*ids.shape, len(layers.blocks)), np.nan)
        blocks[qi, rank] = layers.block_shares(phi_a[qi], w_phi_b[np.searchsorted(candidates, ids[qi, rank])])
        groups = layers.group_shares(blocks)
        for g, name in enumerate(layers.groups):
            out.setdefault(f"share:{name}", {})[kind] = groups[..., g]
        out.setdefault("block_shares", {})[kind] = blocks
    return out
