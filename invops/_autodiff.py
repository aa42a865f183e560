r"""The autodiff kit: the pieces every reverse and forward pass of invops is made of.

A layer author needs these when writing a hand-made pullback or tangent (see the page "Writing
your own layer" in ``docs/``); the contract itself lives in :mod:`invops.module`.

Parameter cotangents travel as a :data:`Grads` dict mapping each parameter to its cotangent;
several uses of one parameter (a 1x1 convolution and its ``reverse()``, tied weights) are summed
with :func:`add_grads`. A reverse pass never writes ``p.grad`` itself: the public ``backward``
calls :func:`accumulate_into_grad` once at the end, and the autograd bridge hands the dict to
torch, which accumulates as for any other leaf.

The reverse primitives follow one recipe, the local graph: make leaf copies of the inputs
(:func:`differentiable_copy`), recompute the outputs from them under ``torch.enable_grad()``,
and backpropagate the cotangents through that graph alone with :func:`local_grads`. The graph
lives only for the duration of one layer's pullback, so a network's reverse pass holds at most
one layer's activations at a time.

Forward mode (:func:`forward_mode`) runs ``torch.autograd.forward_ad`` dual tensors through a
module's math with its parameters swapped in by ``torch.func.functional_call``
(:func:`functional_state` names them).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
import torch.autograd.forward_ad as fwAD

__all__ = [
    "Grads",
    "accumulate_into_grad",
    "add_grads",
    "differentiable_copy",
    "forward_mode",
    "functional_state",
    "local_grads",
    "trainable",
]

Grads = dict
"""Maps a parameter to its cotangent (one entry per parameter object)."""

# makes accumulate_into_grad's check-then-add atomic when several threads call ``backward`` on
# one module
_GRAD_LOCK = threading.Lock()


def add_grads(total: Grads, new: Grads) -> Grads:
    """Accumulate the parameter cotangents of ``new`` into ``total`` (in place) and return it."""
    for p, g in new.items():
        total[p] = g if p not in total else total[p] + g
    return total


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of ``module`` that take gradients (frozen ones are constants)."""
    return [p for p in module.parameters() if p.requires_grad]


def differentiable_copy(t: torch.Tensor | None) -> torch.Tensor | None:
    """A detached leaf copy of ``t`` requiring grad (if floating or complex), for a local graph."""
    if t is None:
        return None
    t = t.detach()
    return t.requires_grad_() if t.is_floating_point() or t.is_complex() else t


def local_grads(
    outputs: Sequence[torch.Tensor],
    cotangents: Sequence[torch.Tensor | None],
    inputs: Sequence[torch.Tensor | None],
    params: Sequence[torch.nn.Parameter],
) -> tuple[list[torch.Tensor | None], Grads]:
    """Backpropagate ``cotangents`` through a local graph to ``inputs`` and ``params``.

    Outputs without a cotangent (None) or without a graph are skipped. Returns the input
    cotangents (None where an input does not require grad or is unused) and a :data:`Grads`
    dict of the parameters that received a cotangent.
    """
    pairs = [(o, c) for o, c in zip(outputs, cotangents) if c is not None and o.requires_grad]
    targets = [t for t in inputs if t is not None and t.requires_grad] + list(params)
    if not pairs or not targets:
        return [None] * len(inputs), {}
    grads = torch.autograd.grad(
        [o for o, _ in pairs], targets, [c for _, c in pairs], allow_unused=True
    )
    grads_iter = iter(grads)
    dinputs = [next(grads_iter) if t is not None and t.requires_grad else None for t in inputs]
    dparams = {p: g for p, g in zip(params, grads_iter) if g is not None}
    return dinputs, dparams


def accumulate_into_grad(grads: Grads) -> None:
    """Add the cotangents in ``grads`` to ``p.grad`` (the explicit ``backward`` API).

    A cotangent may be the caller's own tensor (autograd passes ``dy`` through unchanged for
    ``y = x + p``), so ``p.grad`` gets a copy; popping keeps one extra parameter alive, not all
    of them. Concurrent calls from several threads are serialised, so no update is lost.
    """
    with _GRAD_LOCK:
        while grads:
            p, g = grads.popitem()
            if p.grad is None:
                p.grad = g.detach().clone()
            else:
                p.grad.add_(g)


def functional_state(
    module: torch.nn.Module, replacements: dict, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """State for ``torch.func.functional_call`` (``tie_weights=False``) replacing parameters.

    Each module object is named once (shared modules, such as a convolution and its
    ``reverse()``, are reachable by several paths), and each of its replaced parameters is listed
    under that path. Naming one module object twice makes ``functional_call`` in torch 2.13
    restore the replacement instead of the parameter after the call; naming only one of several
    modules that share a parameter would replace it in one of them only.
    """
    state = {}
    for path, sub in module.named_modules():
        for attr, p in sub._parameters.items():
            if p is not None and p in replacements:
                state[prefix + (f"{path}.{attr}" if path else attr)] = replacements[p]
    return state


def forward_mode(
    owner: torch.nn.Module,
    math: torch.nn.Module,
    prefix: str,
    inputs: Sequence[torch.Tensor],
    input_tangents: Sequence[torch.Tensor | None],
    param_tangents: dict,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run ``math(*inputs)`` (which calls ``owner``'s math) in forward-mode AD.

    Returns ``(primal, tangent)`` for each output. Uses ``torch.autograd.forward_ad`` (dual
    tensors, ``owner``'s trainable parameters swapped in with ``functional_call``; ``math``
    holds ``owner`` under the attribute ``prefix`` names) rather than ``torch.func.jvp``: the
    latter hands custom autograd Functions functorch-wrapped tangents without storage, which
    physics operators working on numpy or cupy arrays cannot read. Missing tangents are zero.
    """
    # Forward mode needs no autograd graph, and parameters without a tangent enter as plain
    # (detached) tensors: a dual with a zero tangent would double the cost of every convolution.
    with torch.no_grad(), fwAD.dual_level():
        duals = {
            p: p.detach()
            if param_tangents.get(p) is None
            else fwAD.make_dual(p.detach(), param_tangents[p])
            for p in owner.parameters()
            if p.requires_grad
        }
        args = tuple(
            t if d is None else fwAD.make_dual(t, d) for t, d in zip(inputs, input_tangents)
        )
        out = torch.func.functional_call(
            math,
            functional_state(owner, duals, prefix=prefix),
            args,
            strict=False,
            tie_weights=False,
        )
        pairs = [fwAD.unpack_dual(o) for o in (out if isinstance(out, tuple) else (out,))]
    return [(o, torch.zeros_like(o) if d is None else d) for o, d in pairs]
