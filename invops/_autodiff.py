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

Forward mode is hand-written: a layer's ``_tangent_rule`` computes its output and the output's
tangent together, from the input's tangent and a dict mapping parameters to their tangents, with
ordinary torch ops (no dual tensors). Tangents may be ``None``, meaning zero, so a pass with
parameter tangents only does no work for the input's. The pieces: :func:`add_tangents`,
:func:`elementwise_tangent` (activations, through torch's fused derivative kernels),
:func:`conv_tangent` and :func:`linear_tangent` (:math:`d(W * x) = dW * x + W * dx` in one
call), and :func:`tangent_rule_applies`, which decides whether a class's rule matches its math.
A module without a rule (a user's ``TorchBlock``, an unknown ``InvertibleModule`` subclass)
falls back to :func:`forward_mode`: ``torch.autograd.forward_ad`` dual tensors through its math
with its parameters swapped in by ``torch.func.functional_call`` (:func:`functional_state` names
them). Both kinds mix in one network.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

__all__ = [
    "Grads",
    "Tangent",
    "accumulate_into_grad",
    "add_grads",
    "add_tangents",
    "conv_tangent",
    "differentiable_copy",
    "elementwise_tangent",
    "forward_mode",
    "functional_state",
    "linear_tangent",
    "local_grads",
    "register_elementwise_tangent",
    "tangent_rule_applies",
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


# ------------------------------------------------------------------------------ hand tangents
Tangent = torch.Tensor | None
"""A tangent; ``None`` means zero (no work is spent on it)."""


def add_tangents(a: Tangent, b: Tangent) -> Tangent:
    """``a + b`` where either may be None (zero)."""
    if a is None:
        return b
    return a if b is None else a + b


def tangent_rule_applies(cls: type) -> bool:
    """Whether ``cls`` has a hand-written tangent rule that matches its math.

    A rule (``_tangent_rule``, or one of the names in ``cls._tangent_rule_names``) is written for
    the math of the class that defines it. It applies to ``cls`` only if no class between them
    redefines the math (the methods named in ``cls._tangent_math``): a user's subclass of a
    built-in layer that changes ``_forward`` gets the dual-tensor fallback, never a rule that
    differentiates the parent's math.
    """
    cached = _RULES.get(cls)
    if cached is None:
        mro = cls.__mro__

        def first(names) -> int:
            return min(
                (i for i, c in enumerate(mro) if any(n in vars(c) for n in names)), default=-1
            )

        rule = first(getattr(cls, "_tangent_rule_names", ("_tangent_rule",)))
        math = first(getattr(cls, "_tangent_math", ()))
        cached = _RULES[cls] = rule >= 0 and (math < 0 or rule <= math)
    return cached


_RULES: dict[type, bool] = {}

# elementwise functions -> ``rule(z, dz, y) -> dy``, through torch's fused derivative kernels
# (the same formulas torch's own forward AD uses)
_aten = torch.ops.aten
_ELEMENTWISE: dict[Callable, Callable] = {}


def register_elementwise_tangent(fn: Callable, rule: Callable) -> None:
    """Declare ``rule(z, dz, y) -> dy`` the tangent of the elementwise function ``fn``."""
    _ELEMENTWISE[fn] = rule


def _relu(z, dz, y):
    return _aten.threshold_backward(dz, z, 0)


def _silu(z, dz, y):
    return _aten.silu_backward(dz, z)


def _tanh(z, dz, y):
    return _aten.tanh_backward(dz, y)


def _sigmoid(z, dz, y):
    return _aten.sigmoid_backward(dz, y)


for _fn, _rule in (
    (torch.relu, _relu),
    (F.relu, _relu),
    (F.silu, _silu),
    (torch.tanh, _tanh),
    (F.tanh, _tanh),
    (torch.sigmoid, _sigmoid),
    (F.sigmoid, _sigmoid),
    (F.softplus, lambda z, dz, y: _aten.softplus_backward(dz, z, 1.0, 20.0)),
    (F.gelu, lambda z, dz, y: _aten.gelu_backward(dz, z)),
    (F.elu, lambda z, dz, y: _aten.elu_backward(dz, 1.0, 1, 1, False, z)),
    (F.leaky_relu, lambda z, dz, y: _aten.leaky_relu_backward(dz, z, 0.01, False)),
):
    register_elementwise_tangent(_fn, _rule)


def _module_rule(fn: Any) -> Callable | None:
    """The tangent rule of a stock torch activation module (exact types only)."""
    kind = type(fn)
    nn = torch.nn
    if kind is nn.ReLU:
        return _relu
    if kind is nn.SiLU:
        return _silu
    if kind is nn.Tanh:
        return _tanh
    if kind is nn.Sigmoid:
        return _sigmoid
    if kind is nn.Softplus:
        return lambda z, dz, y: _aten.softplus_backward(dz, z, fn.beta, fn.threshold)
    if kind is nn.GELU:
        return lambda z, dz, y: _aten.gelu_backward(dz, z, approximate=fn.approximate)
    if kind is nn.ELU:
        return lambda z, dz, y: _aten.elu_backward(dz, fn.alpha, 1, 1, False, z)
    if kind is nn.LeakyReLU:
        return lambda z, dz, y: _aten.leaky_relu_backward(dz, z, fn.negative_slope, False)
    return None


def elementwise_tangent(fn: Callable, z: torch.Tensor, dz: Tangent) -> tuple[torch.Tensor, Tangent]:
    """``(fn(z), fn'(z) * dz)`` for an elementwise function ``fn``.

    Known activations (torch's relu, silu, tanh, sigmoid, softplus, gelu, elu, leaky relu, as
    functions or stock modules, and those registered with :func:`register_elementwise_tangent`)
    use torch's fused derivative kernels; any other function is differentiated with forward-mode
    AD (dual tensors) on its own.
    """
    try:
        rule = _ELEMENTWISE.get(fn)
    except TypeError:  # unhashable callables
        rule = None
    if rule is None:
        rule = _module_rule(fn)
    if dz is None:
        return fn(z), None
    if rule is None:
        with torch.no_grad(), fwAD.dual_level():
            y, dy = fwAD.unpack_dual(fn(fwAD.make_dual(z, dz)))
        return y, torch.zeros_like(y) if dy is None else dy
    y = fn(z)
    return y, rule(z, dz, y)


def _bias_view(b: torch.Tensor, ndim: int) -> torch.Tensor:
    return b.reshape(1, -1, *([1] * (ndim - 2)))


def conv_tangent(
    conv: Callable,
    x: torch.Tensor,
    dx: Tangent,
    weight: torch.Tensor,
    dweight: Tangent,
    bias: torch.Tensor | None = None,
    dbias: Tangent = None,
    *,
    transposed: bool = False,
    **options,
) -> tuple[torch.Tensor, Tangent]:
    r"""A convolution and its tangent: :math:`y = W * x + b`, :math:`dy = W * dx + dW * x + db`.

    ``conv`` is ``F.conv{1,2,3}d`` or, with ``transposed=True``, ``F.conv_transpose{1,2,3}d``;
    ``options`` are its keyword arguments (stride, padding, ...). With tangents of both the
    input and the weight, the two products of :math:`dy` are one convolution of the inputs
    ``[dx, x]`` stacked along channels with the weights ``[W, dW]`` stacked along their input
    channels: one call instead of two, and no temporary for the sum.
    """
    y = conv(x, weight, bias, **options)
    if dx is None and dweight is None:
        dy = None
    elif dweight is None:
        dy = conv(dx, weight, None, **options)
    elif dx is None:
        dy = conv(x, dweight, None, **options)
    else:
        dim = 0 if transposed else 1  # the weight's input-channel dimension
        dy = conv(torch.cat((dx, x), 1), torch.cat((weight, dweight), dim), None, **options)
    if dbias is not None:
        db = _bias_view(dbias, y.ndim)
        dy = db.expand_as(y).clone() if dy is None else dy.add_(db)
    return y, dy


def linear_tangent(
    x: torch.Tensor,
    dx: Tangent,
    weight: torch.Tensor,
    dweight: Tangent,
    bias: torch.Tensor | None = None,
    dbias: Tangent = None,
) -> tuple[torch.Tensor, Tangent]:
    r""":math:`y = A x + a` and :math:`dy = A\,dx + dA\,x + da` (one product for both terms)."""
    y = F.linear(x, weight, bias)
    if dweight is None:
        dy = None if dx is None else F.linear(dx, weight)
    elif dx is None:
        dy = F.linear(x, dweight)
    else:
        dy = F.linear(torch.cat((dx, x), -1), torch.cat((weight, dweight), 1))
    if dbias is not None:
        dy = dbias.expand_as(y).clone() if dy is None else dy.add_(dbias)
    return y, dy
