"""A module's ``torch.einsum`` calls with one of its parameters, for the spectral rule's recording.

A two-operand einsum of a batched input x (the batch on its dimension 0 and the output's) and a
parameter W (or a complex view of one) is a contraction like a spectral conv's: the gradient of
sample b's ⟨y, δ⟩ w.r.t. W is the einsum of conj(x_b) and δ_b onto W's subscripts, where every
subscript of W is one of x's or the output's (as AFNO's block-diagonal complex MLP,
``"...bi,bio->...bo"``). :func:`subscripts` writes such a call in the spectral rule's letters
(weight dims "abcdefgh", batch "z"); :class:`Einsums` hands each one to a callback while open.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.overrides import TorchFunctionMode

_OTHERS = "ijklmnopqrstuvw"  # the input's and the output's other dims


def subscripts(equation: str, x: torch.Tensor, weight: torch.Tensor, weight_first: bool
               ) -> tuple[str, str, str] | None:
    """(x, weight, output) subscripts in the rule's letters, or None where the call is not such a contraction."""
    lhs, arrow, rhs = equation.replace(" ", "").partition("->")
    terms = lhs.split(",")
    if not arrow or len(terms) != 2 or x.dim() < 1:
        return None
    tx, tw = terms[::-1] if weight_first else terms
    if "..." in tw or len(tw) != weight.dim() or len(tw) > 8:
        return None
    used = set(equation)
    spare = (c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" if c not in used)
    ellipsis = "".join(next(spare) for _ in range(x.dim() - len(tx.replace("...", ""))))
    tx, rhs = tx.replace("...", ellipsis), rhs.replace("...", ellipsis)
    if (len(set(tx)) != len(tx) or len(set(tw)) != len(tw) or len(set(rhs)) != len(rhs) or len(tx) != x.dim()
            or not rhs or rhs[0] != tx[0] or tx[0] in tw or not set(tw) <= set(tx) | set(rhs)
            or not set(rhs) <= set(tx) | set(tw) or len(set(tx + rhs) - set(tw)) > len(_OTHERS) + 1):
        return None
    letters = {c: "abcdefgh"[i] for i, c in enumerate(tw)}
    letters[tx[0]] = "z"
    others = iter(_OTHERS)
    for c in tx + rhs:
        if c not in letters:
            letters[c] = next(others)
    return tuple("".join(letters[c] for c in s) for s in (tx, tw, rhs))


class Einsums(TorchFunctionMode):
    """While open, each ``torch.einsum`` of two operands one of which ``weight_of`` names (a parameter
    or a view of one) runs as ``record(equation, operands, index of the weight)``, which returns the result."""

    def __init__(self, weight_of: Callable[[torch.Tensor], str | None], record: Callable):
        super().__init__()
        self.weight_of, self.record = weight_of, record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.einsum and not kwargs and len(args) >= 2:
            equation, *operands = args
            operands = list(operands[0]) if len(operands) == 1 and isinstance(operands[0], (list, tuple)) \
                else operands
            found = [i for i, o in enumerate(operands) if isinstance(o, torch.Tensor) and self.weight_of(o)]
            if len(operands) == 2 and len(found) == 1:
                return self.record(equation, operands, found[0])
        return func(*args, **(kwargs or {}))
