"""The operator contract: InvertibleModule, Chain, Reversed and Block.

A layer implements its math once, in differentiable torch ops (``_forward`` and ``_inverse``).
Everything else (memory-free reverse mode, forward mode, the Jacobian operator, the autograd
bridge, array conversion and input checks) is provided here, so that every layer and network looks
the same from outside. Layers may override ``_pullback`` / ``_pullback_inverse`` with a cheaper
hand-written reverse pass; the generic one recomputes the input by inversion and backpropagates
through one local forward graph.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import torch

from . import _reconstruction
from ._arrays import array_kind, from_torch, to_torch
from ._autodiff import (
    Grads,
    Tangent,
    accumulate_into_grad,
    add_grads,
    add_tangents,
    differentiable_copy,
    forward_mode,
    local_grads,
    tangent_rule_applies,
    trainable,
)
from .nonlinear import InvertibleOperator, NonlinearOperator

__all__ = [
    "InvertibleModule",
    "Chain",
    "Reversed",
    "Identity",
    "Parallel",
    "Block",
    "plain_autograd",
    "is_plain_autograd",
]

# Data-dependent initialisation mutates shared state, so concurrent first calls from several
# threads serialise on this lock. It is reentrant: a module's first call may run torch code that
# calls another invops module's public methods. (Gradient accumulation has its own lock, in
# ``_autodiff.accumulate_into_grad``.)
_INIT_LOCK = threading.RLock()

_PLAIN_AUTOGRAD: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "invops_plain_autograd", default=False
)


@contextlib.contextmanager
def plain_autograd(enabled: bool = True) -> Iterator[None]:
    """Run every invops module through plain torch autograd inside the block.

    The math is the same ``_forward`` / ``_inverse`` code, but torch stores every activation as
    usual. This is the correctness oracle for the memory-free reverse mode and the baseline for
    memory benchmarks.

    Examples
    --------
    >>> import torch, invops
    >>> layer = invops.ActNorm(3).double()
    >>> x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    >>> with invops.plain_autograd():
    ...     y, logdet = layer(x)
    >>> y.grad_fn is not None
    True
    """
    token = _PLAIN_AUTOGRAD.set(enabled)
    try:
        yield
    finally:
        _PLAIN_AUTOGRAD.reset(token)


def is_plain_autograd() -> bool:
    """Whether :func:`plain_autograd` is active."""
    return _PLAIN_AUTOGRAD.get()


def _unaliased(t: torch.Tensor, *sources: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of it if it shares memory with one of ``sources`` (the caller's arrays).

    Layers that move no data (``Identity``, a squeeze that is a reshape) would otherwise hand
    back a view of the input, and writing into the output would change the caller's input.
    """
    if torch.compiler.is_compiling():  # compiled graphs return fresh outputs
        return t
    try:
        ptr = t.untyped_storage().data_ptr()
        shared = ptr and any(s.untyped_storage().data_ptr() == ptr for s in sources)
    except (NotImplementedError, RuntimeError):  # torch.func wrappers have no storage to share
        return t
    return t.clone() if shared else t


def _has_tangent(module: torch.nn.Module, dtheta: dict) -> bool:
    """Whether ``dtheta`` holds a tangent for one of ``module``'s parameters."""
    return bool(dtheta) and any(p in dtheta for p in module.parameters())


class _Oriented(torch.nn.Module):
    """Calls a module's raw math in one direction, so ``torch.func.functional_call`` can use it."""

    def __init__(self, module: InvertibleModule, inverse: bool) -> None:
        super().__init__()
        self.module = module
        self.inverse = inverse

    def forward(self, x: torch.Tensor, *cond: torch.Tensor):
        if self.inverse:
            return self.module._inverse(x, *cond)
        return self.module._forward(x, *cond)


class InvertibleModule(InvertibleOperator):
    """Base class of every invertible layer and network: a nonlinear operator.

    Subclasses implement ``_forward(x, *cond) -> (y, logdet)`` and
    ``_inverse(y, *cond) -> (x, logdet_inv)`` with differentiable torch ops, where ``logdet`` has
    shape ``(B,)`` and is the log absolute determinant of dy/dx for each sample. They may
    implement ``_validate(x, cond, inverse)`` to check shapes, and ``_pullback`` /
    ``_pullback_inverse`` to provide a cheaper reverse pass than the generic one. Every module is
    a :class:`~invops.NonlinearOperator` (``apply(x)`` is ``y`` alone; ``A @ module`` composes).

    Parameters
    ----------
    logdet : bool
        Whether the public methods return (and accept cotangents for) the log-determinant.

    Notes
    -----
    For a map :math:`y = f_\\theta(x)` with log-determinant :math:`\\ell(x) = \\log|\\det
    \\partial_x f_\\theta(x)|`, the reverse mode computes, for cotangents :math:`\\bar y` and
    :math:`\\bar\\ell`,

    .. math::
        \\bar x = (\\partial_x f)^T \\bar y + (\\partial_x \\ell)^T \\bar\\ell, \\qquad
        \\bar\\theta = (\\partial_\\theta f)^T \\bar y + (\\partial_\\theta \\ell)^T \\bar\\ell,

    from the output :math:`y` alone: :math:`x = f_\\theta^{-1}(y)` is recomputed, so a network
    of :math:`N` layers stores no activations between layers. The forward mode computes
    :math:`\\dot y = \\partial_x f\\,\\dot x + \\partial_\\theta f\\,\\dot\\theta` with
    ``torch.func.jvp``.

    Attributes
    ----------
    n_conditions : int
        Number of condition tensors the module takes after ``x``.
    memory_free : bool
        If False, ``module(x)`` under grad mode uses plain autograd instead of the memory-free
        bridge (same math, stored activations).
    """

    n_conditions: int = 0

    def __init__(self, logdet: bool = True) -> None:
        super().__init__()
        self.logdet = bool(logdet)
        self.memory_free = True

    # ------------------------------------------------------------------ math, to be implemented
    def _forward(self, x: torch.Tensor, *cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _inverse(self, y: torch.Tensor, *cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _validate(self, x: torch.Tensor, cond: tuple, inverse: bool) -> None:
        """Raise ``ValueError`` if ``x`` (an output when ``inverse``) has the wrong shape."""

    # ------------------------------------------------------------------ reverse mode primitives
    def _pullback(
        self,
        y: torch.Tensor,
        cond: tuple,
        dy: torch.Tensor,
        dlogdet: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, Grads]:
        """Reverse mode of the forward map, from its output.

        Returns ``(x, dx, dcond, grads)``: the recomputed input, its cotangent, the cotangents of
        the conditions (``None`` where not differentiable) and a dict of parameter cotangents.
        """
        with torch.no_grad():
            x, _ = self._inverse(y, *cond)
        dx, dcond, grads = self._local_backprop(x, cond, dy, dlogdet, inverse=False)
        return x, dx, dcond, grads

    def _pullback_inverse(
        self,
        x: torch.Tensor,
        cond: tuple,
        dx: torch.Tensor,
        dlogdet: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, Grads]:
        """Reverse mode of the inverse map from its output ``x``: ``(y, dy, dcond, grads)``."""
        with torch.no_grad():
            y, _ = self._forward(x, *cond)
        dy, dcond, grads = self._local_backprop(y, cond, dx, dlogdet, inverse=True)
        return y, dy, dcond, grads

    def _local_backprop(self, inp, cond, dout, dlogdet, inverse):
        inp = differentiable_copy(inp)
        cond = tuple(differentiable_copy(c) for c in cond)
        params = trainable(self)
        with torch.enable_grad():
            out, logdet = (self._inverse if inverse else self._forward)(inp, *cond)
            dinputs, grads = local_grads((out, logdet), (dout, dlogdet), (inp, *cond), params)
        dinp = dinputs[0] if dinputs[0] is not None else torch.zeros_like(inp)
        return dinp, tuple(dinputs[1:]), grads

    # ------------------------------------------------------------------ forward mode primitives
    # The math the hand-written tangent rule of a class differentiates: a subclass that
    # redefines one of these without a rule of its own falls back to dual tensors.
    _tangent_math: tuple[str, ...] = ("_forward", "_inverse")
    # declared, not defined: the classes that have a rule define it (see tangent_rule_applies)
    _tangent_rule: Callable[..., Any]

    def _tangent(
        self,
        x: torch.Tensor,
        cond: tuple,
        dx: Tangent,
        dcond: tuple,
        dtheta: dict,
        inverse: bool = False,
    ) -> tuple[torch.Tensor, Tangent, torch.Tensor, Tangent]:
        """Forward mode, primal and tangent together: ``(y, dy, logdet, dlogdet)``.

        ``dx``, the entries of ``dcond`` (one per condition) and the returned tangents may be
        None, meaning zero; ``dtheta`` maps trainable parameters to their tangents (missing:
        zero). ``inverse`` differentiates the inverse map. The class's hand-written
        ``_tangent_rule`` (same signature) runs when it has one that matches its math
        (:func:`~invops._autodiff.tangent_rule_applies`); otherwise dual tensors run through
        the module's math.
        """
        if dx is None and all(d is None for d in dcond) and not _has_tangent(self, dtheta):
            y, logdet = (self._inverse if inverse else self._forward)(x, *cond)
            return y, None, logdet, None
        if tangent_rule_applies(type(self)):
            return self._tangent_rule(x, cond, dx, dcond, dtheta, inverse)
        return self._tangent_dual(x, cond, dx, dcond, dtheta, inverse)

    def _tangent_dual(self, x, cond, dx, dcond, dtheta, inverse=False):
        """The fallback of :meth:`_tangent`: forward-mode AD (dual tensors) through the math."""
        (y, dy), (logdet, dlogdet) = forward_mode(
            self, _Oriented(self, inverse), "module.", (x, *cond), (dx, *dcond), dtheta
        )
        return y, dy, logdet, dlogdet

    def _jvp(
        self,
        x: torch.Tensor,
        cond: tuple,
        dx: torch.Tensor | None,
        dcond: tuple | None,
        dtheta: dict | None,
        inverse: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward mode; returns ``(y, dy, logdet, dlogdet)`` with zeros for absent tangents.

        Runs :meth:`_tangent` without a graph; tangents of frozen parameters are ignored.
        """
        dcond = tuple(dcond) if dcond is not None else (None,) * len(cond)
        dtheta = {p: t for p, t in (dtheta or {}).items() if p.requires_grad}
        with torch.no_grad():
            y, dy, logdet, dlogdet = self._tangent(x, cond, dx, dcond, dtheta, inverse)
        dy = torch.zeros_like(y) if dy is None else dy
        dlogdet = torch.zeros_like(logdet) if dlogdet is None else dlogdet
        return y, dy, logdet, dlogdet

    # ------------------------------------------------------------------ helpers
    @property
    def _reference_tensor(self) -> torch.Tensor | None:
        for t in self.parameters():
            return t
        for b in self.buffers():
            if b.is_floating_point():
                return b
        return None

    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype of the module's parameters, or None for a module without any."""
        ref = self._reference_tensor
        return None if ref is None else ref.dtype

    @property
    def device(self) -> torch.device | None:
        """The device of the module's parameters, or None for a module without any."""
        ref = self._reference_tensor
        return None if ref is None else ref.device

    def _to_tensor(self, a: Any, name: str, like: torch.Tensor | None = None) -> torch.Tensor:
        # a module without parameters takes dtype and device from the primary input ``like``
        ref = self._reference_tensor if self._reference_tensor is not None else like
        t = to_torch(
            a, device=None if ref is None or isinstance(a, torch.Tensor) else ref.device, name=name
        )
        if not (t.is_floating_point() or t.is_complex()):
            raise TypeError(f"{name}: expected a floating-point array, got dtype {t.dtype}")
        if ref is not None:
            # conditions and their tangents may be complex (data of a complex physics operator)
            # at the same precision
            complex_ok = name.startswith(("cond", "dcond"))
            dtype = t.real.dtype if t.is_complex() and complex_ok else t.dtype
            if dtype != ref.dtype:
                raise TypeError(
                    f"{name}: expected dtype {ref.dtype} (the module's or input's dtype), "
                    f"got {t.dtype}; "
                    f"convert the input or the module (module.double() / module.float())"
                )
            if t.device != ref.device:
                raise ValueError(
                    f"{name}: expected a tensor on {ref.device} (the module's or input's device), "
                    f"got one on {t.device}"
                )
        return t

    def _prepare(self, x: Any, cond: tuple, inverse: bool, name: str = "x"):
        kind = array_kind(x, name)
        if len(cond) != self.n_conditions:
            raise TypeError(
                f"{type(self).__name__} expects {self.n_conditions} condition argument(s) "
                f"after {name}, got {len(cond)}"
            )
        x = self._to_tensor(x, name)
        if x.ndim >= 1 and x.shape[0] == 0:
            raise ValueError(
                f"{type(self).__name__}: {name} is an empty batch (shape {tuple(x.shape)}); "
                "expected at least one sample"
            )
        cond = tuple(self._to_tensor(c, f"cond[{i}]", like=x) for i, c in enumerate(cond))
        self._validate(x, cond, inverse)
        return kind, x, cond

    def _needs_init(self) -> bool:
        """Whether a data-dependent initialisation is still pending anywhere in the module."""
        return (
            any(
                m is not self and isinstance(m, InvertibleModule) and m._pending_init()
                for m in self.modules()
            )
            or self._pending_init()
        )

    def _pending_init(self) -> bool:
        return False

    def _init_snapshot(self) -> Any:
        """What this module's data-dependent initialisation may change, for a rollback."""
        own = (*self.parameters(recurse=False), *self.buffers(recurse=False))
        return [(t, t.detach().clone()) for t in own]

    def _init_restore(self, snapshot: Any) -> None:
        """Undo an initialisation from :meth:`_init_snapshot`'s result."""
        with torch.no_grad():
            for t, saved in snapshot:
                t.copy_(saved)

    def _ensure_initialized(self, x: torch.Tensor, cond: tuple, inverse: bool) -> None:
        # Data-dependent initialisation mutates parameters, which must not happen inside the
        # autograd bridge or a torch.func transform, so it runs here, once, before any of them.
        # It is all-or-nothing: if the first call fails midway (bad data, an operator that
        # raises), every layer it initialised is restored, so no layer keeps statistics of a
        # batch that never went through. The lock makes concurrent first calls initialise once
        # (Dynamo cannot trace a lock; a compiled call checks the flags, which it guards on).
        if torch.compiler.is_compiling():
            if self._needs_init():
                self._initialize_all(x, cond, inverse)
            return
        with _INIT_LOCK:
            if self._needs_init():
                self._initialize_all(x, cond, inverse)

    def _initialize_all(self, x: torch.Tensor, cond: tuple, inverse: bool) -> None:
        pending = [
            m for m in self.modules() if isinstance(m, InvertibleModule) and m._pending_init()
        ]
        snapshots = [(m, m._init_snapshot()) for m in pending]
        try:
            with torch.no_grad():
                (self._inverse if inverse else self._forward)(x.detach(), *cond)
        except BaseException as err:
            for m, snapshot in snapshots:
                m._init_restore(snapshot)
            layer = getattr(err, "invops_layer", None)
            if isinstance(err, ValueError) and layer is not None and layer is not self:
                path = next((n for n, m in self.named_modules() if m is layer), None)
                if path is not None:
                    raise ValueError(
                        f"{type(self).__name__}: layer {path!r} ({type(layer).__name__}) could "
                        f"not be initialised: {err}; no layer of the network was initialised"
                    ) from err
            raise

    def _cotangent_logdet(self, dlogdet: Any, out: torch.Tensor) -> torch.Tensor | None:
        """``dlogdet`` as a ``(B,)`` tensor on ``out``'s device and in its dtype."""
        if dlogdet is None:
            return None
        if not self.logdet:
            raise ValueError(
                f"dlogdet was given but {type(self).__name__} was built with logdet=False"
            )
        batch = out.shape[0]
        if isinstance(dlogdet, (int, float)):
            return torch.full((batch,), float(dlogdet), dtype=out.dtype, device=out.device)
        t = to_torch(dlogdet, name="dlogdet").to(device=out.device, dtype=out.dtype)
        if t.numel() == 1:
            return t.reshape(()).expand(batch).clone()
        if tuple(t.shape) != (batch,):
            raise ValueError(
                f"dlogdet: expected shape ({batch},) or a scalar, got {tuple(t.shape)}"
            )
        return t

    def _use_bridge(self, x: torch.Tensor, cond: tuple) -> bool:
        if not torch.is_grad_enabled() or not self.memory_free or is_plain_autograd():
            return False
        return (
            x.requires_grad
            or any(c.requires_grad for c in cond)
            or any(p.requires_grad for p in self.parameters())
        )

    def _apply_direction(self, x: Any, cond: tuple, inverse: bool):
        kind, x, cond = self._prepare(x, cond, inverse, name="y" if inverse else "x")
        self._ensure_initialized(x, cond, inverse)
        grad_ctx = contextlib.nullcontext() if kind == "torch" else torch.no_grad()
        with grad_ctx:
            if self._use_bridge(x, cond):
                from .autograd import apply_memory_free

                y, logdet = apply_memory_free(self, x, cond, inverse)  # unaliased inside
            else:
                y, logdet = (self._inverse if inverse else self._forward)(x, *cond)
                y = _unaliased(y, x, *cond)
        if not self.logdet:
            return from_torch(y, kind)
        return from_torch(y, kind), from_torch(logdet, kind)

    def _ordered_grads(self, grads: Grads) -> tuple[torch.Tensor, ...]:
        return tuple(grads[p] if p in grads else torch.zeros_like(p) for p in self.parameters())

    def _dcond_out(self, dcond: tuple, cond: tuple, kind: str):
        out = tuple(
            from_torch(d if d is not None else torch.zeros_like(c), kind)
            for d, c in zip(dcond, cond)
        )
        return out[0] if len(out) == 1 else out

    def _reverse_public(self, dout, out, cond, dlogdet, inverse: bool):
        name = "x" if inverse else "y"
        kind, out, cond = self._prepare(out, cond, inverse=not inverse, name=name)
        dout = self._to_tensor(dout, "dx" if inverse else "dy", like=out)
        if dout.shape != out.shape:
            raise ValueError(
                f"cotangent of {name}: expected shape {tuple(out.shape)}, got {tuple(dout.shape)}"
            )
        self._ensure_initialized(out, cond, inverse=not inverse)
        dlogdet = self._cotangent_logdet(dlogdet, out)
        with torch.no_grad():
            if inverse:
                inp, dinp, dcond, grads = self._pullback_inverse(out, cond, dout, dlogdet)
            else:
                inp, dinp, dcond, grads = self._pullback(out, cond, dout, dlogdet)
            if _reconstruction.SETTING is not None:
                _reconstruction.check(self, out, inp, cond, inverse)
            inp, dinp = _unaliased(inp, out, dout, *cond), _unaliased(dinp, out, dout, *cond)
        return kind, inp, dinp, cond, dcond, grads

    # ------------------------------------------------------------------ public API
    def forward(self, x: Any, *cond: Any) -> Any:
        """Apply the map: ``y, logdet`` (``y`` alone when ``logdet=False``).

        Under torch grad mode with torch inputs, the call goes through a memory-free
        ``torch.autograd.Function`` that saves only the output.
        """
        return self._apply_direction(x, cond, inverse=False)

    def inverse(self, y: Any, *cond: Any) -> Any:
        """Invert the map: ``x, logdet_inv`` with ``logdet_inv = -logdet(x)``."""
        return self._apply_direction(y, cond, inverse=True)

    def backward(self, dy: Any, y: Any, *cond: Any, dlogdet: Any = None) -> Any:
        """Reverse mode from the output ``y``, with no stored activations.

        Recomputes ``x`` by inversion, accumulates dL/dtheta into ``p.grad`` and returns
        ``dx, x`` (conditional modules: ``dx, x, dcond``). ``dlogdet`` is the cotangent of the
        log-determinant, of shape ``(B,)`` or a scalar; ``None`` means zero.

        The accumulation is local: in data-parallel training nothing is communicated (DDP's
        hooks only see ``loss.backward()``); call
        :func:`invops.distributed.all_reduce_gradients` before the optimiser step.
        """
        kind, x, dx, cond, dcond, grads = self._reverse_public(dy, y, cond, dlogdet, inverse=False)
        accumulate_into_grad(grads)
        out = (from_torch(dx, kind), from_torch(x, kind))
        return out + (self._dcond_out(dcond, cond, kind),) if self.n_conditions else out

    def backward_inverse(self, dx: Any, x: Any, *cond: Any, dlogdet: Any = None) -> Any:
        """Reverse mode of the inverse map from its output ``x``: returns ``dy, y`` (+ ``dcond``).

        ``dlogdet`` is the cotangent of the inverse's log-determinant.
        """
        kind, y, dy, cond, dcond, grads = self._reverse_public(dx, x, cond, dlogdet, inverse=True)
        accumulate_into_grad(grads)
        out = (from_torch(dy, kind), from_torch(y, kind))
        return out + (self._dcond_out(dcond, cond, kind),) if self.n_conditions else out

    def vjp(self, dy: Any, y: Any, *cond: Any, dlogdet: Any = None, at: str = "output") -> Any:
        """Adjoint Jacobian: ``dx, dtheta, x`` (+ ``dcond``), without touching ``p.grad``.

        ``dtheta`` is a tuple ordered as ``parameters()``; frozen parameters
        (``requires_grad=False``) are constants and get zeros. ``at="input"`` takes the input
        ``x`` instead of ``y`` and returns ``dx, dtheta`` (+ ``dcond``), as every
        :class:`~invops.NonlinearOperator` does.
        """
        if at != "output":
            if dlogdet is not None:
                raise ValueError("dlogdet: only with at='output'")
            return NonlinearOperator.vjp(self, dy, y, *cond, at=at)
        kind, x, dx, cond, dcond, grads = self._reverse_public(dy, y, cond, dlogdet, inverse=False)
        dtheta = tuple(from_torch(g, kind) for g in self._ordered_grads(grads))
        out = (from_torch(dx, kind), dtheta, from_torch(x, kind))
        return out + (self._dcond_out(dcond, cond, kind),) if self.n_conditions else out

    def jvp(
        self,
        x: Any,
        *cond: Any,
        dx: Any = None,
        dtheta: Sequence | None = None,
        dcond: Sequence | None = None,
    ) -> Any:
        """Forward mode: ``y, dy, logdet, dlogdet`` (``y, dy`` when ``logdet=False``).

        ``dx`` perturbs the input, ``dtheta`` (a sequence ordered as ``parameters()``, entries
        may be None) the parameters and ``dcond`` the conditions. Frozen parameters are
        constants: their entries are ignored.
        """
        kind, x, cond = self._prepare(x, cond, inverse=False)
        self._ensure_initialized(x, cond, inverse=False)
        dx_t = None if dx is None else self._to_tensor(dx, "dx", like=x)
        if dx_t is not None and dx_t.shape != x.shape:
            raise ValueError(f"dx: expected shape {tuple(x.shape)}, got {tuple(dx_t.shape)}")
        dcond_t = None
        if dcond is not None:
            if len(dcond) != len(cond):
                raise ValueError(f"dcond: expected {len(cond)} entries, got {len(dcond)}")
            dcond_t = tuple(
                None if d is None else self._to_tensor(d, "dcond", like=x) for d in dcond
            )
        dtheta_map = self._tangent_dict(dtheta)
        y, dy, logdet, dlogdet = self._jvp(x, cond, dx_t, dcond_t, dtheta_map)
        sources = (x, *cond) if dx_t is None else (x, dx_t, *cond)
        y, dy = _unaliased(y, *sources), _unaliased(dy, *sources)
        out: tuple[Any, ...] = (from_torch(y, kind), from_torch(dy, kind))
        if self.logdet:
            out += (from_torch(logdet, kind), from_torch(dlogdet, kind))
        return out

    def _tangent_tensor(self, d: Any, p: torch.nn.Parameter, name: str) -> torch.Tensor:
        # the module's own conversion: a tangent of another dtype or device is refused
        return self._to_tensor(d, name)

    def jacobian(self, x: Any, *cond: Any, wrt: str = "input") -> Any:
        """The linearization at ``x`` as a :class:`invops.JacobianOperator`.

        ``wrt`` is ``"input"``, ``"params"`` (trainable parameters, flattened in
        ``parameters()`` order) or ``"both"`` (input first, then parameters).
        """
        from .jacobian import JacobianOperator

        return JacobianOperator(self, x, *cond, wrt=wrt)

    def reverse(self) -> InvertibleModule:
        """The inverse map as a module that shares this module's parameters."""
        return Reversed(self)


class Reversed(InvertibleModule):
    """The inverse of an invertible module, sharing its parameters.

    ``Reversed(m).forward`` is ``m.inverse`` and so on; ``Reversed(m).reverse()`` is ``m``.

    Examples
    --------
    >>> import torch, invops
    >>> layer = invops.Conv1x1(3).double()
    >>> inv = layer.reverse()
    >>> x = torch.randn(2, 3, 5, dtype=torch.float64)
    >>> y, _ = layer(x)
    >>> torch.allclose(inv(y)[0], x)
    True
    """

    def __init__(self, module: InvertibleModule) -> None:
        super().__init__(logdet=module.logdet)
        self.module = module
        self.n_conditions = module.n_conditions

    def _forward(self, x, *cond):
        return self.module._inverse(x, *cond)

    def _inverse(self, y, *cond):
        return self.module._forward(y, *cond)

    def _validate(self, x, cond, inverse):
        self.module._validate(x, cond, not inverse)

    def _pullback(self, y, cond, dy, dlogdet):
        return self.module._pullback_inverse(y, cond, dy, dlogdet)

    def _pullback_inverse(self, x, cond, dx, dlogdet):
        return self.module._pullback(x, cond, dx, dlogdet)

    def _tangent_rule(self, x, cond, dx, dcond, dtheta, inverse=False):
        return self.module._tangent(x, cond, dx, dcond, dtheta, not inverse)

    def reverse(self) -> InvertibleModule:
        return self.module

    def extra_repr(self) -> str:
        return ""


class Chain(InvertibleModule):
    """Sequential composition of invertible modules: ``Chain(a, b)(x) = b(a(x))``.

    Log-determinants add. The reverse pass walks the layers from the output, recomputing each
    layer's input by inverting it, so its peak memory does not grow with the number of layers.
    Conditional members receive the chain's condition arguments; the others do not.

    Parameters
    ----------
    *modules : InvertibleModule
        The layers, in application order.
    logdet : bool
        Whether the chain reports its log-determinant.

    Examples
    --------
    >>> import torch, invops
    >>> flow = invops.Chain(invops.ActNorm(3), invops.Conv1x1(3), invops.LeakyReLU(0.1))
    >>> x = torch.randn(8, 3, 4, 4)
    >>> y, logdet = flow(x)
    >>> logdet.shape
    torch.Size([8])
    >>> x_rec, _ = flow.inverse(y)
    >>> bool((x_rec - x).abs().max() < 1e-4)
    True
    """

    def __init__(self, *modules: InvertibleModule, logdet: bool = True) -> None:
        super().__init__(logdet=logdet)
        for i, m in enumerate(modules):
            if not isinstance(m, InvertibleModule):
                raise TypeError(
                    f"Chain: argument {i} must be an InvertibleModule, got {type(m).__name__}"
                )
        if not modules:
            raise ValueError("Chain: expected at least one module, got none")
        self.layers = torch.nn.ModuleList(modules)
        self.n_conditions = max(m.n_conditions for m in modules)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> InvertibleModule:
        return cast(InvertibleModule, self.layers[i])

    def __iter__(self) -> Iterator[InvertibleModule]:
        return cast(Iterator[InvertibleModule], iter(self.layers))

    @staticmethod
    def _cond_for(m: InvertibleModule, cond: tuple) -> tuple:
        return cond[: m.n_conditions]

    def _validate(self, x, cond, inverse):
        layer = self.layers[-1] if inverse else self.layers[0]
        layer._validate(x, self._cond_for(layer, cond), inverse)

    def _forward(self, x, *cond):
        total = x.new_zeros(x.shape[0])
        for m in self.layers:
            x, logdet = m._forward(x, *self._cond_for(m, cond))
            total = total + logdet
        return x, total

    def _inverse(self, y, *cond):
        total = y.new_zeros(y.shape[0])
        for m in reversed(self.layers):
            y, logdet = m._inverse(y, *self._cond_for(m, cond))
            total = total + logdet
        return y, total

    def _walk(self, layers, out, cond, dout, dlogdet, inverse):
        grads: Grads = {}
        dcond_total: list = [None] * len(cond)
        for m in layers:
            mc = self._cond_for(m, cond)
            pull = m._pullback_inverse if inverse else m._pullback
            out, dout, dcond, g = pull(out, mc, dout, dlogdet)
            add_grads(grads, g)
            for i, d in enumerate(dcond):
                if d is not None:
                    dcond_total[i] = d if dcond_total[i] is None else dcond_total[i] + d
        return out, dout, tuple(dcond_total), grads

    def _pullback(self, y, cond, dy, dlogdet):
        return self._walk(reversed(self.layers), y, cond, dy, dlogdet, inverse=False)

    def _pullback_inverse(self, x, cond, dx, dlogdet):
        return self._walk(self.layers, x, cond, dx, dlogdet, inverse=True)

    def _tangent_rule(self, x, cond, dx, dcond, dtheta, inverse=False):
        total, dtotal = x.new_zeros(x.shape[0]), None
        for m in reversed(self.layers) if inverse else self.layers:
            n = m.n_conditions
            x, dx, logdet, dlogdet = m._tangent(x, cond[:n], dx, dcond[:n], dtheta, inverse)
            total = total + logdet
            dtotal = add_tangents(dtotal, dlogdet)
        return x, dx, total, dtotal


class Identity(InvertibleModule):
    """The identity map (logdet 0); a placeholder lane in :class:`Parallel`.

    Its public methods return copies, never the caller's array (as every module's do), so
    writing into an output leaves the input unchanged.

    Examples
    --------
    >>> import torch, invops
    >>> x = torch.zeros(2, 3)
    >>> y, logdet = invops.Identity()(x)
    >>> y += 1.0
    >>> float(x.abs().max())
    0.0
    """

    def _forward(self, x, *cond):
        return x, x.new_zeros(x.shape[0])

    def _inverse(self, y, *cond):
        return y, y.new_zeros(y.shape[0])

    def _pullback(self, y, cond, dy, dlogdet):
        return y, dy, (None,) * len(cond), {}

    def _pullback_inverse(self, x, cond, dx, dlogdet):
        return x, dx, (None,) * len(cond), {}

    def _tangent_rule(self, x, cond, dx, dcond, dtheta, inverse=False):
        return x, dx, x.new_zeros(x.shape[0]), None


class Parallel(InvertibleModule):
    """Apply modules side by side to consecutive channel groups: ``[a(x[:, :n]), b(x[:, n:])]``.

    Parameters
    ----------
    *modules : InvertibleModule
        One module per channel group. All must scale the channel count by the same factor
        (1 for most layers, ``2**ndim`` for squeezes), so output groups follow from input groups.
    sizes : sequence of int
        Channel count of each input group; they must add up to the input's channels.
    logdet : bool
        Whether to report the log-determinant (the sum of the members').

    Examples
    --------
    >>> import torch, invops
    >>> from invops.module import Identity, Parallel
    >>> par = Parallel(Identity(), invops.ActNorm(2), sizes=(1, 2))
    >>> y, logdet = par(torch.randn(4, 3, 5))
    >>> y.shape
    torch.Size([4, 3, 5])
    """

    def __init__(
        self, *modules: InvertibleModule, sizes: Sequence[int], logdet: bool = True
    ) -> None:
        super().__init__(logdet=logdet)
        if len(modules) != len(sizes) or not modules:
            raise ValueError(
                f"Parallel: expected one channel size per module, got {len(modules)} modules "
                f"and sizes {tuple(sizes)}"
            )
        if any(int(n) < 1 for n in sizes):
            raise ValueError(f"Parallel: sizes must be >= 1, got {tuple(sizes)}")
        self.lanes = torch.nn.ModuleList(modules)
        self.sizes = tuple(int(n) for n in sizes)
        self.n_conditions = max(m.n_conditions for m in modules)

    def _groups(self, x: torch.Tensor) -> list[torch.Tensor]:
        factor = x.shape[1] // sum(self.sizes)
        return list(torch.split(x, [n * factor for n in self.sizes], dim=1))

    def _validate(self, x, cond, inverse):
        total = sum(self.sizes)
        if x.ndim < 2 or x.shape[1] % total:
            raise ValueError(
                f"Parallel: {'y' if inverse else 'x'} must have a multiple of {total} channels "
                f"(groups {self.sizes}), got shape {tuple(x.shape)}"
            )
        for m, part in zip(self.lanes, self._groups(x)):
            m._validate(part, cond[: m.n_conditions], inverse)

    def _run(self, x, cond, inverse):
        outs, total = [], x.new_zeros(x.shape[0])
        for m, part in zip(self.lanes, self._groups(x)):
            out, logdet = (m._inverse if inverse else m._forward)(part, *cond[: m.n_conditions])
            outs.append(out)
            total = total + logdet
        return torch.cat(outs, dim=1), total

    def _forward(self, x, *cond):
        return self._run(x, cond, inverse=False)

    def _inverse(self, y, *cond):
        return self._run(y, cond, inverse=True)

    def _walk(self, out, cond, dout, dlogdet, inverse):
        inputs, dinputs, grads = [], [], {}
        dcond_total: list = [None] * len(cond)
        for m, part, dpart in zip(self.lanes, self._groups(out), self._groups(dout)):
            pull = m._pullback_inverse if inverse else m._pullback
            inp, dinp, dcond, g = pull(part, cond[: m.n_conditions], dpart, dlogdet)
            inputs.append(inp)
            dinputs.append(dinp)
            add_grads(grads, g)
            for i, d in enumerate(dcond):
                if d is not None:
                    dcond_total[i] = d if dcond_total[i] is None else dcond_total[i] + d
        return torch.cat(inputs, 1), torch.cat(dinputs, 1), tuple(dcond_total), grads

    def _pullback(self, y, cond, dy, dlogdet):
        return self._walk(y, cond, dy, dlogdet, inverse=False)

    def _pullback_inverse(self, x, cond, dx, dlogdet):
        return self._walk(x, cond, dx, dlogdet, inverse=True)

    def _tangent_rule(self, x, cond, dx, dcond, dtheta, inverse=False):
        parts = self._groups(x)
        dparts = [None] * len(parts) if dx is None else self._groups(dx)
        outs, douts, total, dtotal = [], [], x.new_zeros(x.shape[0]), None
        for m, part, dpart in zip(self.lanes, parts, dparts):
            n = m.n_conditions
            out, dout, logdet, dlogdet = m._tangent(
                part, cond[:n], dpart, dcond[:n], dtheta, inverse
            )
            outs.append(out)
            douts.append(dout)
            total = total + logdet
            dtotal = add_tangents(dtotal, dlogdet)
        dy = None
        if any(d is not None for d in douts):
            zero = torch.zeros_like
            dy = torch.cat([zero(o) if d is None else d for o, d in zip(outs, douts)], 1)
        return torch.cat(outs, dim=1), dy, total, dtotal


class Block(NonlinearOperator):
    """Base class of non-invertible blocks used inside couplings (activations, residual blocks).

    Subclasses implement ``_forward(x, *cond) -> y`` with differentiable torch ops. The block
    exposes ``forward(x, *cond)``, ``backward(dy, x, *cond)`` (accumulates parameter gradients,
    returns ``dx``, or ``dx, dcond`` with conditions), ``vjp(dy, x, *cond)`` (returns
    ``dx, dtheta`` or ``dx, dtheta, dcond``) and ``jvp(x, *cond, dx=None, dtheta=None,
    dcond=None)`` (returns ``y, dy``). Blocks work on torch tensors.
    """

    def _forward(self, x: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        return self._forward(x, *cond)

    def _vjp(self, dy, x, cond):
        x = differentiable_copy(x)
        cond = tuple(differentiable_copy(c) for c in cond)
        params = trainable(self)
        with torch.enable_grad():
            y = self._forward(x, *cond)
            dinputs, grads = local_grads((y,), (dy,), (x, *cond), params)
        dinputs = [torch.zeros_like(t) if d is None else d for d, t in zip(dinputs, (x, *cond))]
        return dinputs[0], tuple(dinputs[1:]), grads

    def backward(self, dy: torch.Tensor, x: torch.Tensor, *cond: torch.Tensor) -> Any:
        dx, dcond, grads = self._vjp(dy, x, cond)
        accumulate_into_grad(grads)
        return (dx, *dcond) if cond else dx

    def vjp(self, dy: torch.Tensor, x: torch.Tensor, *cond: torch.Tensor, at: str = "input") -> Any:
        if at != "input":
            return NonlinearOperator.vjp(self, dy, x, *cond, at=at)  # raises: not invertible
        dx, dcond, grads = self._vjp(dy, x, cond)
        dtheta = tuple(grads.get(p, torch.zeros_like(p)) for p in self.parameters())
        return (dx, dtheta, *dcond) if cond else (dx, dtheta)

    # the math a hand-written ``_tangent_rule`` differentiates (see InvertibleModule)
    _tangent_math: tuple[str, ...] = ("_forward",)
    _tangent_rule: Callable[..., Any]  # declared, not defined (see InvertibleModule)

    def _tangent(
        self, x: torch.Tensor, cond: tuple, dx: Tangent, dcond: tuple, dtheta: dict
    ) -> tuple[torch.Tensor, Tangent]:
        """Forward mode, primal and tangent together: ``(y, dy)``.

        Tangents may be None (zero) in and out; ``dcond`` has one entry per condition and
        ``dtheta`` maps trainable parameters to tangents. Runs the class's ``_tangent_rule``
        (same signature) when it has one that matches its math, else dual tensors through
        ``_forward`` (the fallback of :class:`~invops.TorchBlock` and user blocks).
        """
        if dx is None and all(d is None for d in dcond) and not _has_tangent(self, dtheta):
            return self._forward(x, *cond), None
        if tangent_rule_applies(type(self)):
            return self._tangent_rule(x, cond, dx, dcond, dtheta)
        return self._tangent_dual(x, cond, dx, dcond, dtheta)

    def _tangent_dual(self, x, cond, dx, dcond, dtheta):
        """The fallback of :meth:`_tangent`: forward-mode AD (dual tensors) through ``_forward``."""
        inputs, tangents = (x, *cond), (dx, *dcond)
        ((y, dy),) = forward_mode(self, _BlockMath(self), "block.", inputs, tangents, dtheta)
        return y, dy

    def jvp(
        self,
        x: torch.Tensor,
        *cond: torch.Tensor,
        dx: torch.Tensor | None = None,
        dtheta: Sequence | None = None,
        dcond: Sequence | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward mode: ``y, dy`` (tangents of frozen parameters are ignored)."""
        params = list(self.parameters())
        if dtheta is not None and len(dtheta) != len(params):
            raise ValueError(
                f"dtheta: expected {len(params)} entries (one per parameter), got {len(dtheta)}"
            )
        tangent = {
            p: d
            for p, d in zip(params, dtheta if dtheta is not None else ())
            if d is not None and p.requires_grad
        }
        dcond = tuple(dcond) if dcond is not None else (None,) * len(cond)
        with torch.no_grad():
            y, dy = self._tangent(x, tuple(cond), dx, dcond, tangent)
        return y, torch.zeros_like(y) if dy is None else dy


class _BlockMath(torch.nn.Module):
    def __init__(self, block: Block) -> None:
        super().__init__()
        self.block = block

    def forward(self, x, *cond):
        return self.block._forward(x, *cond)
