"""J_B of a model at a fixed batch, as products: the operator the exact minibatch solvers apply."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, jvp, vjp, vmap

from gradlake.errors import GradlakeError


class BatchJacobian:
    """J_B of ``model`` at a fixed batch of inputs, as products (no Jacobian is formed).

    The model runs in eval mode in ``dtype`` (float64 by default, so the Krylov tolerance
    is not limited by float32 round-off).
    """

    def __init__(self, model: nn.Module, inputs: torch.Tensor, dtype=torch.float64):
        model = model.eval()
        device = next(model.parameters()).device
        self.params = {n: p.detach().to(device, dtype) for n, p in model.named_parameters()}
        buffers = {n: b.detach().to(device, dtype) if b.is_floating_point() else b
                   for n, b in model.named_buffers()}
        self.inputs = torch.as_tensor(inputs).to(device, dtype)

        def forward(params):
            return functional_call(model, (params, buffers), (self.inputs,))

        self._model, self._buffers, self._independent = model, buffers, False

        self._forward = forward
        self.output, self._vjp = vjp(forward, self.params)
        self.output = self.output.detach()
        self._jvp = self._forward_mode()

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def _forward_mode(self):
        """t -> J t: forward-mode AD through the model (a forward pass with tangents, about 2.6x
        cheaper than the alternative on the UNets), or, for a model with an operation that has no
        forward-mode formula, the VJP of u -> Jᵀu (linear, so its VJP at any point is t -> J t),
        which reuses the saved forward graph."""
        def forward_mode(t):
            return jvp(self._forward, (self.params,), (t,))[1]

        try:
            vmap(forward_mode)({n: torch.zeros((1, *p.shape), dtype=p.dtype, device=p.device)
                                for n, p in self.params.items()})
            return forward_mode
        except (NotImplementedError, RuntimeError):
            _, linear = vjp(lambda u: self._vjp(u)[0], torch.zeros_like(self.output))
            return lambda t: linear(t)[0]

    def jvp(self, tangents: dict[str, torch.Tensor]) -> torch.Tensor:
        """J t for a batch of parameter-space tangents (leading axis: columns)."""
        return vmap(self._jvp)(tangents)

    def vjp(self, cotangents: torch.Tensor) -> dict[str, torch.Tensor]:
        """Jᵀ u for a batch of output-space cotangents [columns, *output]."""
        return vmap(lambda u: self._vjp(u)[0])(cotangents)

    def gram(self, u: torch.Tensor) -> torch.Tensor:
        """K u = J Jᵀ u for columns u [columns, *output]."""
        return self.jvp(self.vjp(u))

    def flat(self, tangents: dict[str, torch.Tensor]) -> torch.Tensor:
        """Parameter-space vectors as rows [m, p] (``named_parameters`` order); one dict entry
        without a leading axis is taken as one row."""
        return torch.cat([tangents[k].reshape(-1, self.params[k].numel()) for k in self.params], 1)

    def unflat(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows [m, p] back to a dict of [m, *shape] tangents."""
        parts = torch.split(v, [t.numel() for t in self.params.values()], dim=1)
        return {k: part.reshape(v.shape[0], *t.shape) for (k, t), part in zip(self.params.items(), parts)}

    def placed(self, residual: torch.Tensor) -> torch.Tensor:
        """Rows b_j [B, outputs]: sample j's residual r_j at sample j, zero elsewhere."""
        n = self.output.shape[0]
        b = torch.zeros((n, *self.output.shape), dtype=self.output.dtype, device=self.output.device)
        b[torch.arange(n), torch.arange(n)] = residual.to(b)
        return b.reshape(n, -1)

    def sample_jacobians(self, chunk: int = 256):
        """Yield J_i [d, p] (columns in ``named_parameters`` order) sample by sample.

        Each comes from reverse mode on that sample alone, N times cheaper than cotangents
        pushed through the whole batch. That needs a batch-independent model (no batch
        statistics), which is checked on the first call against one batch VJP.
        """
        def single(i):
            def f(params):
                return functional_call(self._model, (params, self._buffers), (self.inputs[i:i + 1],))[0]
            return self.flat(torch.func.jacrev(f, chunk_size=chunk)(self.params))

        if not self._independent:
            u = torch.randn(self.output.shape, dtype=self.output.dtype, generator=torch.Generator().manual_seed(0))
            u = u.to(self.output.device)
            batch = self.flat(self._vjp(u)[0])[0]  # Jᵀu through the batch, to be matched by Σ_i J_iᵀu_i
            left = batch.clone()
            for i in range(self.output.shape[0]):
                jac_i = single(i)
                left -= jac_i.T @ u[i].reshape(-1)
                yield jac_i
            if float(torch.linalg.vector_norm(left)) > 1e-6 * max(float(torch.linalg.vector_norm(batch)), 1e-300):
                raise GradlakeError("exact: the model's outputs depend on other samples of the batch (batch "
                                    "statistics?), so per-sample Jacobians do not apply; use method = \"pcg\"")
            self._independent = True
            return
        for i in range(self.output.shape[0]):
            yield single(i)



def blocked(apply, block: int):
    """``apply`` on at most ``block`` rows at a time (bounded memory for vmapped products)."""
    def run(v: torch.Tensor) -> torch.Tensor:
        return torch.cat([apply(v[i:i + block]) for i in range(0, v.shape[0], block)]) if len(v) else v
    return run


