"""Memory-free bridge between invops modules and ``torch.autograd``.

Under grad mode, ``module(x)`` runs through :class:`_MemoryFreeFunction`: the forward pass is
computed without a graph and only the OUTPUT is saved. The backward pass recomputes the input by
inversion (``module._pullback``) and returns the cotangents of the input, the conditions and the
parameters. Because the parameters are explicit inputs of the Function and their gradients are
returned (not written into ``p.grad`` by hand), ``loss.backward()`` fills ``p.grad`` through
autograd's own accumulation, mixes with ordinary torch layers on either side, and fires
DistributedDataParallel's gradient hooks.

Double backward (``create_graph=True``) is not supported through the bridge; use
:func:`invops.plain_autograd` for higher-order derivatives.
"""

from __future__ import annotations

import torch

from . import _reconstruction

__all__ = ["apply_memory_free"]


class _MemoryFreeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, module, inverse, n_conditions, x, *rest):
        from .module import _unaliased

        cond = rest[:n_conditions]
        out, logdet = (module._inverse if inverse else module._forward)(x, *cond)
        out = _unaliased(out, x, *cond)  # a layer that only reshapes must not return its input
        ctx.module = module
        ctx.inverse = inverse
        ctx.n_params = len(rest) - n_conditions
        ctx.params = rest[n_conditions:]
        ctx.save_for_backward(out, *cond)
        return out, logdet

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlogdet):
        out, *cond = ctx.saved_tensors
        module = ctx.module
        pull = module._pullback_inverse if ctx.inverse else module._pullback
        inp, dinp, dcond, grads = pull(out, tuple(cond), dout, dlogdet)
        if _reconstruction.SETTING is not None:
            _reconstruction.check(module, out, inp, tuple(cond), ctx.inverse)
        dparams = tuple(grads.get(p) for p in ctx.params)
        return (None, None, None, dinp, *dcond, *dparams)


def apply_memory_free(module, x: torch.Tensor, cond: tuple, inverse: bool = False):
    """Apply ``module`` (or its inverse) through the memory-free autograd Function."""
    params = tuple(p for p in module.parameters() if p.requires_grad)
    return _MemoryFreeFunction.apply(module, inverse, len(cond), x, *cond, *params)
