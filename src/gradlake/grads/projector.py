"""The random projection P, regenerated on demand and never stored.

Every random factor is a pure function of (seed, name, shape, role, kind): a SHA-256 of
those values keys a Philox4x64 counter-based generator, whose raw 64-bit output is turned
into entries without any library sampling routine (Rademacher: one bit per entry;
Gaussian: Box-Muller in float64, then float32). So the same seed gives bit-identical
factors in every process, on every machine and in every later run.

Entries are scaled by 1/sqrt(rows), so E[PᵀP] = I and projected inner products are
unbiased estimates of the exact ones. A factor whose requested size is >= the dimension
it acts on is the identity (exact); with large enough k_in, k_out and k_dense the whole
projection is the identity and φ equals the per-example gradient (in the layout of
``model.named_parameters()``), which is what the exactness tests use.

How each parameter is covered (see :mod:`gradlake.grads.coverage`):
- ``kron``: the weight of a Linear or Conv layer, projected by P_out ⊗ P_in
  (k_out' * k_in' coordinates; k' = min(k, dimension));
- ``kron-bias``: that layer's bias, projected by the same P_out (k_out' coordinates);
- ``exact``: any other parameter, whose per-example gradient is computed exactly and
  projected by a dense matrix (min(k_dense, numel) coordinates).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from gradlake.errors import InputError

SPEC_FORMAT = "gradlake.projector/1"
GENERATOR = "philox4x64-sha256/1"
KINDS = ("rademacher", "gaussian")


def random_factor(seed: int, name: str, shape: tuple[int, ...], role: str, kind: str,
                  rows: int, cols: int) -> np.ndarray:
    """A [rows, cols] float32 matrix with entries of variance 1/rows, a pure function of its key."""
    key = json.dumps({"generator": GENERATOR, "seed": seed, "name": name, "shape": list(shape),
                      "role": role, "kind": kind}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).digest()
    bits = np.random.Philox(key=int.from_bytes(digest[:16], "little"))
    n = rows * cols
    if kind == "rademacher":
        raw = bits.random_raw((n + 63) // 64).astype("<u8")
        signs = np.unpackbits(raw.view(np.uint8), bitorder="little")[:n]
        values = 1.0 - 2.0 * signs.astype(np.float64)
    else:
        raw = bits.random_raw(2 * ((n + 1) // 2)).astype(np.uint64)
        u1 = ((raw[0::2] >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53  # (0, 1]
        u2 = (raw[1::2] >> np.uint64(11)).astype(np.float64) * 2.0**-53  # [0, 1)
        radius, angle = np.sqrt(-2.0 * np.log(u1)), 2.0 * np.pi * u2
        values = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1).reshape(-1)[:n]
    return (values / math.sqrt(rows)).astype(np.float32).reshape(rows, cols)


class Projector:
    """P = blocks of per-layer Kronecker factors and dense factors, keyed by ``seed``.

    ``k_in`` / ``k_out``: rows of the input-side / output-side factor of each Linear or
    Conv layer (clipped to the layer's dimensions; identity where k >= dimension).
    ``k_dense``: coordinates for each parameter outside such layers (default k_in * k_out).
    """

    def __init__(self, seed: int = 0, k_in: int = 16, k_out: int = 16, kind: str = "rademacher",
                 k_dense: int | None = None):
        for field, value in (("k_in", k_in), ("k_out", k_out), ("k_dense", k_dense)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise InputError(f"projector {field}: expected int > 0, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InputError(f"projector seed: expected int, got {seed!r}")
        if kind not in KINDS:
            raise InputError(f"projector kind: expected one of {', '.join(KINDS)}, got {kind!r}")
        self.seed, self.k_in, self.k_out, self.kind = seed, k_in, k_out, kind
        self.k_dense = k_in * k_out if k_dense is None else k_dense
        self._factors: dict[tuple, torch.Tensor | None] = {}

    def __repr__(self) -> str:
        return (f"Projector(seed={self.seed}, k_in={self.k_in}, k_out={self.k_out}, "
                f"kind={self.kind!r}, k_dense={self.k_dense})")

    def settings(self) -> dict[str, Any]:
        return {"seed": self.seed, "k_in": self.k_in, "k_out": self.k_out, "kind": self.kind,
                "k_dense": self.k_dense}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Projector:
        """The projector that wrote ``spec`` (a dict from :meth:`spec`, e.g. read from a store)."""
        if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
            raise InputError(f"projector spec: expected a dict with format {SPEC_FORMAT!r}, "
                             f"got {str(spec)[:80]!r}")
        if spec.get("generator") != GENERATOR:
            raise InputError(f"projector spec generator: this gradlake regenerates {GENERATOR!r}, "
                             f"the spec was written with {spec.get('generator')!r}")
        missing = [f for f in ("seed", "k_in", "k_out", "kind", "k_dense") if f not in spec]
        if missing:
            raise InputError(f"projector spec: missing field {missing[0]!r}")
        return cls(seed=spec["seed"], k_in=spec["k_in"], k_out=spec["k_out"], kind=spec["kind"],
                   k_dense=spec["k_dense"])

    @classmethod
    def from_config(cls, settings) -> Projector:
        """The projector of a :class:`gradlake.config.GradsConfig`."""
        return cls(seed=settings.seed, k_in=settings.k_in, k_out=settings.k_out,
                   kind=getattr(settings, "projection", "rademacher"),
                   k_dense=getattr(settings, "k_dense", 0) or None)

    def spec(self, model: nn.Module) -> dict[str, Any]:
        """JSON-able description: settings, generator, total k, every parameter and its block."""
        from gradlake.grads.coverage import plan

        layout = plan(model).layout(self)
        return {"format": SPEC_FORMAT, "generator": GENERATOR, **self.settings(), "k": layout.k,
                "parameters": [block.describe() for block in layout.blocks]}

    def k(self, model: nn.Module) -> int:
        """Length of φ for ``model``."""
        from gradlake.grads.coverage import plan

        return plan(model).layout(self).k

    def rows(self, role: str, dim: int) -> int:
        """Rows of a factor acting on ``dim`` coordinates (role: "in", "out" or "dense")."""
        k = {"in": self.k_in, "out": self.k_out, "dense": self.k_dense}[role]
        return min(k, dim)

    def factor(self, name: str, shape: tuple[int, ...], role: str, dim: int,
               device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """The [rows, dim] factor of (name, shape, role), or None where it is the identity."""
        key = (name, tuple(shape), role, dim, str(device), dtype)
        if key not in self._factors:
            rows = self.rows(role, dim)
            if rows >= dim:
                self._factors[key] = None
            else:
                matrix = random_factor(self.seed, name, tuple(shape), role, self.kind, rows, dim)
                self._factors[key] = torch.from_numpy(matrix).to(device=device, dtype=dtype)
        return self._factors[key]
