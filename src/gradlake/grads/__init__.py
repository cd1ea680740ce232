"""Projected per-example gradients that never form a full per-example gradient.

    from gradlake.grads import Projector, compute
    p = Projector(seed=0, k_in=16, k_out=16)          # regenerated, never stored
    phi = compute(model, inputs, targets, observables=("C", "V"), projector=p)
    p.spec(model)                                      # JSON provenance; Projector.from_spec(spec)
    describe(model, inputs)                            # which path covers each module's parameters

See :mod:`gradlake.grads.projector` (the projection), :mod:`gradlake.grads.capture_plan` (which
path covers each parameter), :mod:`gradlake.grads.routes` (which hooks cover them, checked),
:mod:`gradlake.grads.capture` (one batch's forward and backward passes), :mod:`gradlake.grads.hooks`
(its hooks; :mod:`~gradlake.grads.kron`, :mod:`~gradlake.grads.module_rules` with
:mod:`~gradlake.grads.affine`, :mod:`~gradlake.grads.attention`, :mod:`~gradlake.grads.spectral`
and :mod:`~gradlake.grads.tensors` their rules) and :mod:`gradlake.grads.full` (full per-example
gradients, the reference path).
"""

from gradlake.grads.adapters import ChannelsLast
from gradlake.grads.api import compute, describe
from gradlake.grads.projector import Projector

__all__ = ["ChannelsLast", "Projector", "compute", "describe"]
