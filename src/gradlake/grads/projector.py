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

How each parameter is covered (see :mod:`gradlake.grads.capture_plan`):
- ``kron``: the weight of a Linear or Conv layer, projected by P_out ⊗ P_in
  (k_out' * k_in' coordinates; k' = min(k, dimension));
- ``kron-bias``: that layer's bias, projected by the same P_out (k_out' coordinates);
- ``exact``: any other parameter (a ruled module's), whose full per-example gradient is computed
  by its module's rule and projected by a dense matrix (min(k_dense, numel) coordinates);
- ``spectral``: a spectral conv's weight, computed in full and projected as a d_out x d_in
  matrix by P_out ⊗ P_in (:mod:`gradlake.grads.capture_plan`).

Allocation: "uniform" gives every layer the same k_in x k_out and every other parameter
k_dense; "energy" gives each layer and parameter its own rows (``dims``), chosen by
:func:`gradlake.grads.allocation.calibrate` from the per-example gradient energy of a few
calibration samples, and recorded in the spec, so a store opened later projects identically.
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
CONV_FORMS = ("separable", "full")
ALLOCATIONS = ("uniform", "energy")


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
    ``conv``: the input-side factor of a conv, acting on C_in * taps coordinates
    (taps = prod(kernel)). "full" (default): one dense (k_in, C_in, *kernel) kernel,
    costing k_in / C_out of the layer's forward. "separable": P_channel ⊗ P_space with
    k_space' = min(k_space, taps) spatial and k_c' = min(C_in, ceil(k_in / k_space'))
    channel rows (k_in' = k_c' * min(taps, k_in // k_c')), applied as a 1x1 conv then one
    single-channel conv — several times cheaper on thin layers, but a nearly rank-one
    block's inner products then carry relative variance ≈ 1/k_c' + 1/k_space' instead of
    ≈ 1/k_in (see benchmarks/bench_grads.py --study).
    ``allocation``: "uniform", or "energy" with ``dims`` = {"layers": {layer: [k_out, k_in]},
    "dense": {parameter: k_dense}} for every layer and every parameter outside layers
    (k_in, k_out and k_dense then unused), made within a total of ``k_total`` by
    :func:`gradlake.grads.allocation.calibrate`; ``calibration`` is its JSON-able record.
    """

    def __init__(self, seed: int = 0, k_in: int = 16, k_out: int = 16, kind: str = "rademacher",
                 k_dense: int | None = None, conv: str = "full", k_space: int = 4,
                 allocation: str = "uniform", k_total: int | None = None, dims: dict[str, Any] | None = None,
                 calibration: dict[str, Any] | None = None):
        for field, value in (("k_in", k_in), ("k_out", k_out), ("k_dense", k_dense), ("k_space", k_space)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise InputError(f"projector {field}: expected int > 0, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InputError(f"projector seed: expected int, got {seed!r}")
        if kind not in KINDS:
            raise InputError(f"projector kind: expected one of {', '.join(KINDS)}, got {kind!r}")
        if conv not in CONV_FORMS:
            raise InputError(f"projector conv: expected one of {', '.join(CONV_FORMS)}, got {conv!r}")
        if allocation not in ALLOCATIONS:
            raise InputError(f"projector allocation: expected one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
        if allocation == "energy":
            if isinstance(k_total, bool) or not isinstance(k_total, int) or k_total <= 0:
                raise InputError(f"projector k_total: expected int > 0 with allocation 'energy', got {k_total!r}")
            dims = _check_dims(dims)
        elif dims is not None or k_total is not None:
            raise InputError("projector dims / k_total: only with allocation 'energy'")
        self.seed, self.k_in, self.k_out, self.kind = seed, k_in, k_out, kind
        self.k_dense = k_in * k_out if k_dense is None else k_dense
        self.conv, self.k_space = conv, k_space
        self.allocation, self.k_total, self.dims, self.calibration = allocation, k_total, dims, calibration
        self._factors: dict[tuple, torch.Tensor | None] = {}

    def __repr__(self) -> str:
        return "Projector(" + ", ".join(f"{k}={v!r}" for k, v in self.settings().items()) + ")"

    def settings(self) -> dict[str, Any]:
        """The constructor's arguments (JSON-able); a uniform allocation adds no field, so specs of
        stores written before allocations existed still match."""
        out = {"seed": self.seed, "k_in": self.k_in, "k_out": self.k_out, "kind": self.kind,
               "k_dense": self.k_dense, "conv": self.conv, "k_space": self.k_space}
        if self.allocation != "uniform":
            out.update(allocation=self.allocation, k_total=self.k_total, dims=self.dims,
                       calibration=self.calibration)
        return out

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Projector:
        """The projector that wrote ``spec`` (a dict from :meth:`spec`, e.g. read from a store)."""
        if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
            raise InputError(f"projector spec: expected a dict with format {SPEC_FORMAT!r}, "
                             f"got {str(spec)[:80]!r}")
        if spec.get("generator") != GENERATOR:
            raise InputError(f"projector spec generator: this gradlake regenerates {GENERATOR!r}, "
                             f"the spec was written with {spec.get('generator')!r}")
        fields = list(cls(0).settings())
        missing = [f for f in fields if f not in spec]
        if missing:
            raise InputError(f"projector spec: missing field {missing[0]!r}")
        optional = ("allocation", "k_total", "dims", "calibration")
        return cls(**{f: spec[f] for f in fields}, **{f: spec[f] for f in optional if f in spec})

    @classmethod
    def from_config(cls, settings) -> Projector:
        """The uniform projector of a :class:`gradlake.config.GradsConfig` (an energy allocation
        also needs a model and calibration samples: :func:`gradlake.grads.allocation.calibrate`)."""
        return cls(seed=settings.seed, k_in=settings.k_in, k_out=settings.k_out, kind=settings.projection,
                   k_dense=settings.k_dense or None)

    def spec(self, model: nn.Module) -> dict[str, Any]:
        """JSON-able description: settings, generator, total k, every parameter and its block."""
        from gradlake.grads.capture_plan import plan

        layout = plan(model).layout(self)
        return {"format": SPEC_FORMAT, "generator": GENERATOR, **self.settings(), "k": layout.k,
                "parameters": [block.describe() for block in layout.blocks]}

    def k(self, model: nn.Module) -> int:
        """Length of φ for ``model``."""
        from gradlake.grads.capture_plan import plan

        return plan(model).layout(self).k

    def apply(self, model: nn.Module, grads: torch.Tensor) -> torch.Tensor:
        """Project full per-example gradients [..., p] (``model.named_parameters()`` order) to [..., k].

        The reference for the factorised capture (and the projection step of the dense
        baselines): the same P, applied block by block to gradients that exist in full.
        """
        from gradlake.grads.capture_plan import plan

        model_plan = plan(model)
        layers = {layer.name: layer for layer in model_plan.layers}
        device, lead = grads.device, grads.shape[:-1]
        grads = grads.reshape(-1, grads.shape[-1]).float()
        out, start = [], 0
        for block in model_plan.layout(self).blocks:
            shape, numel = block.shape, math.prod(block.shape)  # a complex entry: (real, imaginary)
            g, start = grads[:, start:start + numel], start + numel

            def factor(name, key_shape, role, dim, rows=None):
                f = self.factor(name, key_shape, role, dim, device, torch.float32, rows)
                return torch.eye(dim, device=device) if f is None else f

            if block.path == "exact":
                f = self.factor(block.name, tuple(shape), "dense", numel, device, torch.float32)
                out.append(g if f is None else g @ f.T)
                continue
            if block.path == "spectral":
                d_out, d_in = block.factors["d_out"], block.factors["d_in"]
                p_out, p_in = factor(block.name, shape, "out", d_out), factor(block.name, shape, "in", d_in)
                out.append((p_out @ g.reshape(-1, d_out, d_in) @ p_in.T).flatten(1))
                continue
            layer = layers[block.module]
            weight_shape = tuple(layer.module.weight.shape)
            p_out = factor(layer.name, weight_shape, "out", layer.d_out)
            if block.path == "kron-bias":
                out.append(g @ p_out.T)
                continue
            split = layer.input_split(self)
            if split:
                c_in = weight_shape[1]
                p_in = torch.kron(factor(layer.name, weight_shape, "in-channel", c_in, split[0]),
                                  factor(layer.name, weight_shape, "in-space", layer.d_in // c_in, split[1]))
            else:
                p_in = factor(layer.name, weight_shape, "in", layer.d_in)
            out.append((p_out @ g.reshape(-1, layer.d_out, layer.d_in) @ p_in.T).flatten(1))
        if start != grads.shape[1]:
            raise InputError(f"projector apply: expected gradients with {start} entries (the model's "
                             f"parameters), got {grads.shape[1]}")
        return torch.cat(out, dim=1).reshape(*lead, -1)

    def rows(self, role: str, dim: int, name: str | None = None) -> int:
        """Rows of a factor acting on ``dim`` coordinates (role: "in", "out" or "dense") of
        ``name`` (a layer for "in" / "out", a parameter for "dense"; needed with ``dims``)."""
        return min(self._requested(role, name), dim)

    def _requested(self, role: str, name: str | None) -> int:
        if self.dims is None:
            return {"in": self.k_in, "out": self.k_out, "dense": self.k_dense}[role]
        if role == "dense":
            k = self.dims["dense"].get(name)
        else:
            pair = self.dims["layers"].get(name)
            k = None if pair is None else pair[0 if role == "out" else 1]
        if k is None:
            raise InputError(f"projector dims: no rows allocated to {'parameter' if role == 'dense' else 'layer'} "
                             f"{name!r} (the allocation was calibrated on another model)")
        return k

    def conv_split(self, c_in: int, taps: int, name: str | None = None) -> tuple[int, int] | None:
        """(channel rows, spatial rows) of a conv's separable input factor; None for "full"."""
        if self.conv == "full":
            return None
        k_in = self._requested("in", name)
        space = min(self.k_space, taps)
        channel = min(c_in, -(-k_in // space))
        return channel, min(taps, k_in // channel)

    def factor(self, name: str, shape: tuple[int, ...], role: str, dim: int,
               device: torch.device, dtype: torch.dtype, rows: int | None = None) -> torch.Tensor | None:
        """The [rows, dim] factor of (name, shape, role), or None where it is the identity.

        ``rows`` defaults to :meth:`rows` (roles "in", "out", "dense"); the separable conv
        factors (roles "in-channel", "in-space") pass theirs from :meth:`conv_split`.
        """
        rows = self.rows(role, dim, name) if rows is None else rows
        key = (name, tuple(shape), role, rows, dim, str(device), dtype)
        if key not in self._factors:
            if rows >= dim:
                self._factors[key] = None
            else:
                matrix = random_factor(self.seed, name, tuple(shape), role, self.kind, rows, dim)
                self._factors[key] = torch.from_numpy(matrix).to(device=device, dtype=dtype)
        return self._factors[key]


def _check_dims(dims) -> dict[str, Any]:
    """``dims`` as {"layers": {name: [k_out, k_in]}, "dense": {name: k}}, ints > 0; else InputError."""
    if not isinstance(dims, dict) or set(dims) != {"layers", "dense"}:
        raise InputError(f"projector dims: expected {{'layers': ..., 'dense': ...}}, got {str(dims)[:80]!r}")

    def positive(v):
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    layers, dense = dims["layers"], dims["dense"]
    if not isinstance(layers, dict) or not isinstance(dense, dict):
        raise InputError("projector dims: 'layers' and 'dense' must be mappings")
    for name, pair in layers.items():
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(positive(v) for v in pair):
            raise InputError(f"projector dims: layer {name!r}: expected [k_out, k_in] > 0, got {pair!r}")
    for name, k in dense.items():
        if not positive(k):
            raise InputError(f"projector dims: parameter {name!r}: expected k > 0, got {k!r}")
    return {"layers": {n: [int(a), int(b)] for n, (a, b) in layers.items()}, "dense": dict(dense)}
