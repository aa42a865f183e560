r"""Nonlinear operators and their algebra: compose networks with physics operators.

:class:`NonlinearOperator` is the type of every differentiable map in invops: layers and
networks (:class:`~invops.InvertibleModule`, the subclass that is also invertible), coupling
sub-networks (:class:`~invops.Block`), linear physics operators
(:func:`invops.operators.as_operator`) and everything built from them with ``@``, ``+``, ``-``,
scalar ``*`` and :func:`vstack` / :func:`blockdiag`. It is a ``torch.nn.Module``, so a composite
holds its parts' parameters: ``parameters()``, ``state_dict()``, ``.to(device)`` and every
``torch.optim`` optimizer see all of them.

The contract (arrays are batch first; torch, numpy or cupy in gives the same kind out):

========================================  =====================  =================================
method                                    returns                meaning
========================================  =====================  =================================
``apply(x, *cond)`` / ``op(x, *cond)``    ``y``                  the map; torch autograd runs
                                                                 through it (memory-free for the
                                                                 invertible parts)
``jvp(x, *cond, dx=None, dtheta=None)``   ``y, dy``              forward mode: input and/or
                                                                 parameter tangents
``vjp(dy, x, *cond, at="input")``         ``dx, dtheta`` (+      reverse mode from the INPUT ``x``;
                                          ``dcond``)             ``dtheta`` ordered as
                                                                 ``parameters()``
``jacobian(x, *cond, wrt="input")``       pylops operator        the linearization at ``x``
                                                                 (``wrt``: ``"input"``,
                                                                 ``"params"``, ``"both"``)
========================================  =====================  =================================

``InvertibleModule`` keeps its own, documented reverse mode: its ``vjp(dy, y, ...)`` starts from
the OUTPUT ``y`` (the input is recomputed by inversion, no activations stored) and returns
``dx, dtheta, x``; ``vjp(dy, x, at="input")`` gives the contract above. Code written for any
operator therefore passes ``at="input"``. Its ``jvp`` also returns the log-determinant and its
tangent when the module has ``logdet=True``.

Composites follow PyLops: ``F @ G`` is :math:`F \circ G` (``G`` is applied first), ``F + G`` and
``F - G`` add outputs of the same shape, ``a * F`` scales, :func:`vstack` concatenates the
flattened outputs per sample and :func:`blockdiag` splits the flattened input per sample between
its parts. A composite's Jacobian is the matching PyLops expression of its parts' Jacobians at
the right linearization points, e.g. ``J_F(G(x)) @ J_G(x)`` for ``F @ G``; building it runs the
forward pass once (each part at its own input) and every product is evaluated lazily by the
solver. With ``wrt="params"`` the columns are the composite's trainable parameters in
``parameters()`` order, shared parameters counted once: each part's parameter Jacobian is fed by a
restriction of that vector.

Batches: a batch holds independent samples, so the Jacobian of a batched operator is block
diagonal; like :class:`~invops.JacobianOperator`, ``jacobian`` works on the whole batch
flattened (``dims == x.shape``). Shapes are checked when composing where the parts know them
(``model_shape`` / ``data_shape`` per sample, e.g. those of :func:`~invops.operators.as_operator`)
and at call time otherwise, with a ``ValueError`` naming both sides.

Writing a new operator: subclass :class:`NonlinearOperator` and implement
``_forward(x, *cond) -> y`` in differentiable torch ops. Reverse mode, forward mode (dual
tensors) and the Jacobian follow from it.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import pylops
import torch
import torch.autograd.forward_ad as fwAD
from pylops.utils.backend import get_array_module

from ._arrays import array_kind, from_torch, to_torch, torch_to_numpy_dtype
from ._autodiff import Grads, add_grads, functional_state, trainable

__all__ = [
    "NonlinearOperator",
    "Composition",
    "Sum",
    "Scaled",
    "VStack",
    "BlockDiag",
    "vstack",
    "blockdiag",
]

_WRT = ("input", "params", "both")


# ---------------------------------------------------------------------------------- helpers
def n_conditions(op: torch.nn.Module) -> int | None:
    """Number of condition arguments ``op`` takes after ``x``; None if it takes any number."""
    n = getattr(op, "n_conditions", None)
    return None if n is None else int(n)


def _cond_for(op: torch.nn.Module, cond: tuple) -> tuple:
    n = n_conditions(op)
    return cond if n is None else cond[:n]


def _is_array(a: Any) -> bool:
    try:
        array_kind(a)
    except TypeError:
        return False
    return True


def _add_conds(total: list, new: Sequence) -> None:
    for i, d in enumerate(new):
        if d is not None:
            total[i] = d if total[i] is None else total[i] + d


def _reference(module: torch.nn.Module) -> torch.Tensor | None:
    for p in module.parameters():
        return p
    for b in module.buffers():
        if b.is_floating_point():
            return b
    return None


def _check_wrt(wrt: str) -> None:
    if wrt not in _WRT:
        raise ValueError(f"wrt: expected one of {_WRT}, got {wrt!r}")


def _describe(op: torch.nn.Module) -> str:
    if isinstance(op, _Composite):
        return f"{type(op).__name__}({', '.join(_describe(o) for o in op.ops)})"
    name = getattr(op, "name", None)
    return f"{type(op).__name__}({name})" if isinstance(name, str) else type(op).__name__


def _real_dtype(t: torch.Tensor) -> torch.dtype:
    return t.real.dtype if t.is_complex() else t.dtype


def _check_cotangent(dy: torch.Tensor, y: torch.Tensor, owner: str) -> None:
    if tuple(dy.shape) != tuple(y.shape):
        raise ValueError(
            f"{owner}: the cotangent dy must have the output's shape {tuple(y.shape)}, "
            f"got {tuple(dy.shape)}"
        )


class _RawMath(torch.nn.Module):
    """Calls an operator's ``_forward`` so that ``torch.func.functional_call`` can use it."""

    def __init__(self, op: NonlinearOperator) -> None:
        super().__init__()
        self.op = op

    def forward(self, x, *cond):
        return self.op._forward(x, *cond)


# ---------------------------------------------------------------------------------- base type
class NonlinearOperator(torch.nn.Module):
    r"""A differentiable map with a Jacobian: the base type of every operator in invops.

    Subclasses implement ``_forward(x, *cond) -> y`` in differentiable torch ops; the
    invertible layers, the physics operators and the composites provide their own primitives.
    See the module docstring (:mod:`invops.nonlinear`) for the contract.

    Attributes
    ----------
    model_shape, data_shape : tuple of int or None
        Shape of one input / one output sample, where known (checked when composing).
    is_complex : bool
        Whether the output is complex.
    n_conditions : int, optional
        Number of condition arguments after ``x`` (a class attribute; undeclared means any).

    Notes
    -----
    For :math:`y = F_\theta(x)` the Jacobian is :math:`J = \partial_x F` (``wrt="input"``),
    :math:`\partial_\theta F` (``"params"``) or :math:`[\partial_x F,\ \partial_\theta F]`
    (``"both"``); ``J @ v`` runs the forward mode and ``J.H @ w`` the reverse mode. Operator
    algebra (``@``, ``+``, ``-``, scalar ``*``) builds :class:`Composition`, :class:`Sum` and
    :class:`Scaled`, whose Jacobians are the PyLops expressions of the parts' Jacobians.

    Examples
    --------
    >>> import torch, invops
    >>> class Cube(invops.NonlinearOperator):
    ...     def _forward(self, x):
    ...         return x**3
    >>> x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    >>> Cube().apply(x)
    tensor([[1., 8.]], dtype=torch.float64)
    >>> Cube().jvp(x, dx=torch.ones_like(x))[1]
    tensor([[ 3., 12.]], dtype=torch.float64)
    >>> (2 * Cube() @ Cube()).apply(x)
    tensor([[   2., 1024.]], dtype=torch.float64)
    """

    model_shape: tuple[int, ...] | None = None
    data_shape: tuple[int, ...] | None = None
    is_complex: bool = False
    # ndarray @ op, scalar * op with numpy scalars: numpy defers to the operator's reflected
    # methods instead of building object arrays
    __array_ufunc__ = None

    # ------------------------------------------------------------------ math, to be implemented
    def _forward(self, x: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            f"{type(self).__name__}: a NonlinearOperator subclass implements "
            "_forward(x, *cond) -> y in differentiable torch ops"
        )

    def _validate_input(self, x: torch.Tensor, cond: tuple) -> None:
        """Raise ``ValueError`` if ``x`` does not fit the operator (default: ``model_shape``)."""
        if self.model_shape is not None and tuple(x.shape[1:]) != tuple(self.model_shape):
            raise ValueError(
                f"{_describe(self)}: x must have shape (B, "
                f"{', '.join(map(str, self.model_shape))}), got {tuple(x.shape)}"
            )

    # ------------------------------------------------------------------ primitives (torch level)
    def _apply_t(self, x: torch.Tensor, cond: tuple) -> torch.Tensor:
        """The output, differentiable by torch autograd."""
        self._validate_input(x, cond)
        return self._forward(x, *cond)

    def _jvp_t(
        self, x: torch.Tensor, cond: tuple, dx: torch.Tensor | None, dtheta: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward mode: ``(y, dy)`` for an input tangent ``dx`` (None: zero) and parameter
        tangents ``dtheta`` (a dict parameter -> tangent)."""
        self._validate_input(x, cond)
        # dual tensors rather than torch.func.jvp: custom autograd Functions inside (physics
        # operators on numpy / cupy arrays) need tangents with storage
        with torch.no_grad(), fwAD.dual_level():
            duals = {
                p: fwAD.make_dual(p.detach(), dtheta[p])
                for p in self.parameters()
                if p.requires_grad and dtheta.get(p) is not None
            }
            x_in = x if dx is None else fwAD.make_dual(x, dx)
            out = torch.func.functional_call(
                _RawMath(self),
                functional_state(self, duals, "op."),
                (x_in, *cond),
                strict=False,
                tie_weights=False,
            )
            y, dy = fwAD.unpack_dual(out)
        return y, torch.zeros_like(y) if dy is None else dy

    def _vjp_t(
        self, dy: torch.Tensor, x: torch.Tensor, cond: tuple
    ) -> tuple[torch.Tensor, tuple, Grads]:
        """Reverse mode from the input: ``(dx, dcond, grads)``."""
        self._validate_input(x, cond)
        x_ = x.detach().requires_grad_()
        cond_ = tuple(
            c.detach().requires_grad_() if c.is_floating_point() or c.is_complex() else c
            for c in cond
        )
        params = trainable(self)
        with torch.enable_grad():
            y = self._forward(x_, *cond_)
            _check_cotangent(dy, y, _describe(self))
            inputs = [x_, *[c for c in cond_ if c.requires_grad], *params]
            found = torch.autograd.grad(y, inputs, dy, allow_unused=True) if y.requires_grad else ()
        grads: list[torch.Tensor | None] = [*found, *[None] * (len(inputs) - len(found))]
        dx = grads[0] if grads[0] is not None else torch.zeros_like(x)
        if dx.is_complex() and not x.is_complex():
            dx = dx.real
        it = iter(grads[1:])
        dcond = tuple(next(it) if c.requires_grad else None for c in cond_)
        return dx, dcond, {p: g for p, g in zip(params, it) if g is not None}

    def _linearize(
        self, x: torch.Tensor, cond: tuple, wrt: str
    ) -> tuple[pylops.LinearOperator, torch.Tensor]:
        """The Jacobian at ``x`` and the output ``y`` there (computed once, without a graph)."""
        self._validate_input(x, cond)
        with torch.no_grad():
            y = self._forward(x, *cond)
        return _GenericJacobian(self, x, cond, y, wrt), y

    # ------------------------------------------------------------------ conversions
    def _prepare_input(self, x: Any, cond: tuple, name: str = "x"):
        kind = array_kind(x, name)
        n = n_conditions(self)
        if n is not None and len(cond) != n:
            raise TypeError(
                f"{_describe(self)} expects {n} condition argument(s) after {name}, got {len(cond)}"
            )
        ref = _reference(self)
        device = None if ref is None or isinstance(x, torch.Tensor) else ref.device
        x_t = to_torch(x, device=device, name=name)
        if not (x_t.is_floating_point() or x_t.is_complex()):
            raise TypeError(f"{name}: expected a floating-point array, got dtype {x_t.dtype}")
        if ref is not None:
            if _real_dtype(x_t) != ref.dtype:
                raise TypeError(
                    f"{name}: expected dtype {ref.dtype} (the operator's parameters), got "
                    f"{x_t.dtype}; convert the input or the operator (op.double() / op.float())"
                )
            if x_t.device != ref.device:
                raise ValueError(
                    f"{name}: expected a tensor on {ref.device} (the operator's parameters), "
                    f"got one on {x_t.device}"
                )
        # conditions that are not arrays (a physics operator given to an i-RIM) pass unchanged
        cond_t = tuple(
            to_torch(c, device=x_t.device, name=f"cond[{i}]") if _is_array(c) else c
            for i, c in enumerate(cond)
        )
        return kind, x_t, cond_t

    def _tangent_tensor(self, d: Any, p: torch.nn.Parameter, name: str) -> torch.Tensor:
        """A parameter tangent as a tensor on ``p``'s device and dtype."""
        return to_torch(d, device=p.device, name=name).to(p.dtype)

    def _tangent_dict(self, dtheta: Sequence | None) -> dict:
        if dtheta is None:
            return {}
        params = list(self.parameters())
        if len(dtheta) != len(params):
            raise ValueError(
                f"dtheta: expected {len(params)} entries (one per parameter), got {len(dtheta)}"
            )
        out = {}
        for i, (p, d) in enumerate(zip(params, dtheta)):
            if d is None:
                continue
            d = self._tangent_tensor(d, p, f"dtheta[{i}]")
            if d.shape != p.shape:
                raise ValueError(
                    f"dtheta[{i}]: expected shape {tuple(p.shape)}, got {tuple(d.shape)}"
                )
            out[p] = d
        return out

    # ------------------------------------------------------------------ public API
    def forward(self, x: Any, *cond: Any) -> Any:
        """``op(x, *cond)`` is :meth:`apply`."""
        return self.apply(x, *cond)

    def apply(self, x: Any, *cond: Any) -> Any:
        """The output ``y = F(x)`` alone, batch first, as the kind of array given.

        With torch tensors under grad mode, ``y.backward()`` reaches ``x`` and every part's
        parameters. Called with a function instead of an array (``op.apply(fn)``), this is
        ``torch.nn.Module.apply``: ``fn`` is applied to every sub-module.
        """
        if callable(x) and not _is_array(x) and not cond:
            return torch.nn.Module.apply(self, x)
        kind, x_t, cond_t = self._prepare_input(x, cond)
        grad = contextlib.nullcontext() if kind == "torch" else torch.no_grad()
        with grad:
            y = self._apply_t(x_t, cond_t)
        return from_torch(y, kind)

    def jvp(self, x: Any, *cond: Any, dx: Any = None, dtheta: Sequence | None = None) -> Any:
        """Forward mode: ``y, dy`` with ``dy = J_x dx + J_theta dtheta``.

        ``dtheta`` is a sequence ordered as ``parameters()`` (entries may be None); frozen
        parameters are constants. The conditions are held fixed.
        """
        kind, x_t, cond_t = self._prepare_input(x, cond)
        dx_t = None
        if dx is not None:
            dx_t = to_torch(dx, device=x_t.device, name="dx").to(x_t.dtype)
            if dx_t.shape != x_t.shape:
                raise ValueError(f"dx: expected shape {tuple(x_t.shape)}, got {tuple(dx_t.shape)}")
        tangents = self._tangent_dict(dtheta)
        with torch.no_grad():
            y, dy = self._jvp_t(x_t, cond_t, dx_t, tangents)
        return from_torch(y, kind), from_torch(dy, kind)

    def vjp(self, dy: Any, x: Any, *cond: Any, at: str = "input") -> Any:
        """Reverse mode from the input ``x``: ``dx, dtheta`` (+ one ``dcond`` per condition;
        None for a condition that is not an array).

        ``dtheta`` is a tuple ordered as ``parameters()`` (frozen parameters get zeros);
        ``p.grad`` is not touched. ``at="input"`` says that ``x`` is the input; only invertible
        operators can also start from the output (:meth:`invops.InvertibleModule.vjp`).
        """
        if at != "input":
            if at == "output":
                raise TypeError(
                    f"{_describe(self)} is not invertible, so it cannot pull back from its "
                    "output; give its input x with at='input'"
                )
            raise ValueError(f"at: expected 'input' or 'output', got {at!r}")
        kind, x_t, cond_t = self._prepare_input(x, cond)
        dy_t = to_torch(dy, device=x_t.device, name="dy")
        with torch.no_grad():
            dx, dcond, grads = self._vjp_t(dy_t, x_t, cond_t)
        dtheta = tuple(
            from_torch(grads[p] if p in grads else torch.zeros_like(p), kind)
            for p in self.parameters()
        )
        dcond_out = tuple(
            None
            if not isinstance(c, torch.Tensor)
            else from_torch(torch.zeros_like(c) if d is None else d, kind)
            for d, c in zip(dcond, cond_t)
        )
        return (from_torch(dx, kind), dtheta, *dcond_out)

    def jacobian(self, x: Any, *cond: Any, wrt: str = "input") -> pylops.LinearOperator:
        """The linearization at ``x`` as a ``pylops.LinearOperator`` on flattened vectors.

        ``wrt`` is ``"input"`` (``dims == x.shape``), ``"params"`` (trainable parameters
        flattened in ``parameters()`` order) or ``"both"`` (input first). Vectors are numpy or
        cupy arrays; results come back in the kind given.
        """
        _check_wrt(wrt)
        _, x_t, cond_t = self._prepare_input(x, cond)
        with torch.no_grad():
            J, _ = self._linearize(x_t, cond_t, wrt)
        return J

    # ------------------------------------------------------------------ algebra
    def __matmul__(self, other: Any) -> Composition:
        return Composition(self, _operand(other, "@"))

    def __rmatmul__(self, other: Any) -> Composition:
        return Composition(_operand(other, "@"), self)

    def __add__(self, other: Any) -> Sum:
        return Sum(self, _operand(other, "+"))

    def __radd__(self, other: Any) -> Sum:
        return Sum(_operand(other, "+"), self)

    def __sub__(self, other: Any) -> Sum:
        return Sum(self, Scaled(-1.0, _operand(other, "-")))

    def __rsub__(self, other: Any) -> Sum:
        return Sum(_operand(other, "-"), Scaled(-1.0, self))

    def __neg__(self) -> Scaled:
        return Scaled(-1.0, self)

    def __mul__(self, a: Any) -> Scaled:
        return Scaled(_scalar(a, "*"), self)

    __rmul__ = __mul__

    def __truediv__(self, a: Any) -> Scaled:
        return Scaled(1.0 / _scalar(a, "/"), self)


def _operand(other: Any, op: str) -> NonlinearOperator:
    """The other side of a binary operation as a NonlinearOperator, or a clear TypeError."""
    if isinstance(other, NonlinearOperator):
        return other
    import scipy.sparse.linalg

    if isinstance(other, (pylops.LinearOperator, scipy.sparse.linalg.LinearOperator)):
        from .operators import as_operator

        return as_operator(other)
    if _is_array(other) or hasattr(other, "toarray"):
        raise TypeError(
            f"operator {op} {type(other).__name__}: an array next to an operator is ambiguous; "
            "apply the operator with op.apply(x), or wrap a matrix with "
            "invops.operators.as_operator(M, model_shape=..., data_shape=...)"
        )
    raise TypeError(
        f"operator {op} {type(other).__name__}: expected an invops.NonlinearOperator or a "
        f"pylops / scipy LinearOperator, got {type(other).__name__}"
    )


def _scalar(a: Any, op: str) -> float:
    if isinstance(a, (torch.Tensor, np.ndarray)) and a.ndim == 0:
        a = a.item()
    if isinstance(a, numbers.Real) and not isinstance(a, bool):
        a = float(a)
        if not math.isfinite(a):
            raise ValueError(f"operator {op}: the scalar must be finite, got {a}")
        return a
    if isinstance(a, (NonlinearOperator, pylops.LinearOperator)):
        raise TypeError(
            f"operator {op}: two operators are composed with @ (F @ G applies G first), "
            "not multiplied"
        )
    raise TypeError(f"operator {op}: expected a real scalar, got {type(a).__name__}")


# ---------------------------------------------------------------------------------- invertible
class InvertibleOperator(NonlinearOperator):
    """The NonlinearOperator primitives of :class:`~invops.InvertibleModule` (a base class).

    ``apply`` is ``forward`` without the log-determinant, through the memory-free autograd
    bridge under grad mode. Inside composites, reverse mode starts from this part's output
    (``_pullback``: the input is recomputed by inversion, nothing stored), and the Jacobian is
    the module's :class:`~invops.JacobianOperator`.
    """

    def apply(self, x: Any, *cond: Any) -> Any:
        if callable(x) and not _is_array(x) and not cond:
            return torch.nn.Module.apply(self, x)
        out = self.forward(x, *cond)
        return out[0] if self.logdet else out

    def _apply_t(self, x, cond):
        out = self._apply_direction(x, cond, inverse=False)
        return out[0] if self.logdet else out

    def _jvp_t(self, x, cond, dx, dtheta):
        _, x, cond = self._prepare(x, cond, inverse=False)
        self._ensure_initialized(x, cond, inverse=False)
        y, dy, _, _ = self._jvp(x, cond, dx, None, dtheta)
        return y, dy

    def _pullback_t(self, y, cond, dy):
        """Reverse mode from the output: ``(x, dx, dcond, grads)``, memory-free."""
        _check_cotangent(dy, y, _describe(self))
        with torch.no_grad():
            return self._pullback(y, cond, dy, None)

    def _vjp_t(self, dy, x, cond):
        # a forward without graph, then the memory-free pullback from the output: no
        # activations are stored, at the cost of one extra forward pass
        _, x, cond = self._prepare(x, cond, inverse=False)
        self._ensure_initialized(x, cond, inverse=False)
        with torch.no_grad():
            y, _ = self._forward(x, *cond)
        _, dx, dcond, grads = self._pullback_t(y, cond, dy)
        return dx, dcond, grads

    def _linearize(self, x, cond, wrt):
        from .jacobian import JacobianOperator

        J = JacobianOperator(self, x, *cond, wrt=wrt)
        return J, J._y


def _invertible(op: torch.nn.Module) -> bool:
    return isinstance(op, InvertibleOperator)


# ---------------------------------------------------------------------------------- Jacobians
class _TorchVectors(pylops.LinearOperator):
    """Moves solver vectors (numpy / cupy) to torch at the linearization point and back."""

    __array_ufunc__ = None  # keep ``ndarray * J`` from building object arrays

    def _torch(self, v: Any, dtype: torch.dtype) -> tuple[torch.Tensor, str]:
        kind = array_kind(v, "vector")
        t = to_torch(v, device=self._device, name="vector").reshape(-1)
        if not t.is_complex() or dtype.is_complex:
            t = t.to(dtype)
        return t, kind

    def _split(self, t: torch.Tensor, x: torch.Tensor, params: list, wrt: str):
        n_x = x.numel() if wrt != "params" else 0
        dx = t[:n_x].reshape(x.shape) if wrt != "params" else None
        tangents, offset = {}, n_x
        if wrt != "input":
            for p in params:
                tangents[p] = t[offset : offset + p.numel()].reshape(p.shape)
                offset += p.numel()
        return dx, tangents

    @staticmethod
    def _join(dx, grads, params, wrt, like):
        parts = [dx.reshape(-1)] if wrt != "params" else []
        if wrt != "input":
            parts += [grads.get(p, torch.zeros_like(p)).reshape(-1) for p in params]
        return torch.cat(parts).contiguous() if parts else like.new_zeros(0)


class _GenericJacobian(_TorchVectors):
    """The Jacobian of an operator written as ``_forward``: jvp by dual tensors, vjp by autograd."""

    def __init__(self, op, x, cond, y, wrt):
        self.op, self.wrt = op, wrt
        self._x, self._cond = x.detach(), tuple(c.detach() for c in cond)
        self._y_shape = tuple(y.shape)
        self._device = x.device
        self._params = trainable(op) if wrt != "input" else []
        n_params = sum(p.numel() for p in self._params)
        dims = {"input": tuple(x.shape), "params": (n_params,), "both": (x.numel() + n_params,)}
        self._in_dtype = x.dtype
        self._out_dtype = torch.promote_types(x.dtype, y.dtype)
        super().__init__(
            dtype=torch_to_numpy_dtype(self._out_dtype),
            dims=dims[wrt],
            dimsd=self._y_shape,
            name="J",
        )

    def _matvec(self, v):
        t, kind = self._torch(v, self._in_dtype)
        dx, tangents = self._split(t, self._x, self._params, self.wrt)
        with torch.no_grad():
            _, dy = self.op._jvp_t(self._x, self._cond, dx, tangents)
        return from_torch(dy.reshape(-1).contiguous(), kind)

    def _rmatvec(self, w):
        t, kind = self._torch(w, self._out_dtype)
        with torch.no_grad():
            dx, _, grads = self.op._vjp_t(t.reshape(self._y_shape), self._x, self._cond)
        return from_torch(self._join(dx, grads, self._params, self.wrt, t), kind)


class LinearJacobian(_TorchVectors):
    r"""A linear operator applied to a whole batch, as a PyLops operator: its own Jacobian.

    ``op`` has batched torch ``_forward`` / ``_adjoint`` (an :class:`invops.operators.Operator`);
    the operator is :math:`I_B \otimes A` on the flattened batch. It has no parameters: with
    ``wrt="params"`` it has no columns, with ``"both"`` it is the input Jacobian. For a complex
    operator on real models the adjoint is :math:`\mathrm{Re}(A^H w)`, the adjoint of ``A`` as
    a real-linear map (the dot test holds for real parts).
    """

    def __init__(self, op, x: torch.Tensor, y: torch.Tensor, wrt: str) -> None:
        self.op = op
        self._x_shape, self._y_shape = tuple(x.shape), tuple(y.shape)
        self._device = x.device
        self._in_dtype = x.dtype
        self._out_dtype = torch.promote_types(x.dtype, y.dtype)
        self._real_model = not x.is_complex()
        n_in = 0 if wrt == "params" else x.numel()
        self._wrt = wrt
        super().__init__(
            dtype=torch_to_numpy_dtype(self._out_dtype),
            dims=self._x_shape if wrt == "input" else (n_in,),
            dimsd=self._y_shape,
            name="A",
        )

    def _matvec(self, v):
        t, kind = self._torch(v, self._in_dtype)
        if self._wrt == "params":
            return from_torch(t.new_zeros(math.prod(self._y_shape), dtype=self._out_dtype), kind)
        with torch.no_grad():
            y = self.op._forward(t.reshape(self._x_shape))
        return from_torch(y.reshape(-1).contiguous(), kind)

    def _rmatvec(self, w):
        t, kind = self._torch(w, self._out_dtype)
        if self._wrt == "params":
            return from_torch(t.new_zeros(0, dtype=self._in_dtype), kind)
        with torch.no_grad():
            x = self.op._adjoint(t.reshape(self._y_shape))
        if self._real_model and x.is_complex():
            x = x.real
        return from_torch(x.reshape(-1).contiguous(), kind)


class _Gather(pylops.LinearOperator):
    """``v -> v[idx]``: a restriction (or permutation) of a vector; the adjoint scatters back.

    Feeds each part of a composite its slice of the composite's input/parameter vector.
    """

    __array_ufunc__ = None

    def __init__(self, n: int, idx: np.ndarray, dtype) -> None:
        self._idx = np.asarray(idx, dtype=np.int64)
        self._on: dict = {}
        super().__init__(dtype=dtype, dims=(int(n),), dimsd=(len(self._idx),), name="R")

    def _index(self, ncp):
        if ncp not in self._on:
            self._on[ncp] = ncp.asarray(self._idx)
        return self._on[ncp]

    def _matvec(self, v):
        ncp = get_array_module(v)
        return v[self._index(ncp)]

    def _rmatvec(self, w):
        ncp = get_array_module(w)
        out = ncp.zeros(self.shape[1], dtype=w.dtype)
        out[self._index(ncp)] = w  # indices are unique
        return out


def _gather(n: int, idx: np.ndarray, dtype) -> pylops.LinearOperator | None:
    """A :class:`_Gather`, or None when it is the identity."""
    idx = np.asarray(idx, dtype=np.int64)
    if len(idx) == n and np.array_equal(idx, np.arange(n)):
        return None
    return _Gather(n, idx, dtype)


def _compose(J: pylops.LinearOperator, S: pylops.LinearOperator | None):
    return J if S is None else J @ S


def _finish(J: pylops.LinearOperator, dims: tuple, dimsd: tuple) -> pylops.LinearOperator:
    J.dims, J.dimsd = dims, dimsd
    return J


class _ParamLayout:
    """Where each trainable parameter of a composite sits in its ``(x, theta)`` vector."""

    def __init__(self, owner: torch.nn.Module, x: torch.Tensor, wrt: str) -> None:
        self.params = trainable(owner) if wrt != "input" else []
        self.n_x = x.numel() if wrt != "params" else 0
        self.offsets, offset = {}, self.n_x
        for p in self.params:
            self.offsets[p] = offset
            offset += p.numel()
        self.n = offset
        self.n_params = offset - self.n_x
        self.dtype = torch_to_numpy_dtype(x.dtype)
        self.wrt = wrt

    def dims(self, x: torch.Tensor) -> tuple:
        return {"input": tuple(x.shape), "params": (self.n_params,), "both": (self.n,)}[self.wrt]

    def param_index(self, part: torch.nn.Module) -> np.ndarray:
        idx = [np.arange(self.offsets[p], self.offsets[p] + p.numel()) for p in trainable(part)]
        return np.concatenate(idx) if idx else np.zeros(0, dtype=np.int64)

    def part_wrt(self, part: torch.nn.Module) -> str | None:
        """The ``wrt`` a part is linearized with when its input is this composite's input;
        None when it contributes nothing (``"params"`` and the part has no parameters)."""
        has_params = self.wrt != "input" and bool(trainable(part))
        if self.wrt == "params":
            return "params" if has_params else None
        return "both" if has_params else "input"

    def selector(self, part: torch.nn.Module, x_index: np.ndarray | None = None):
        """The restriction of the composite's vector to what ``part``'s Jacobian takes."""
        wrt = self.part_wrt(part)
        parts = []
        if wrt in ("input", "both"):
            parts.append(np.arange(self.n_x) if x_index is None else x_index)
        if wrt in ("params", "both"):
            parts.append(self.param_index(part))
        idx = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return _gather(self.n, idx, self.dtype)


# ---------------------------------------------------------------------------------- composites
class _Composite(NonlinearOperator):
    """Shared machinery of the composites: parts, conditions, error context."""

    def __init__(self, ops: Sequence[NonlinearOperator], owner: str) -> None:
        super().__init__()
        for i, op in enumerate(ops):
            if not isinstance(op, NonlinearOperator):
                raise TypeError(
                    f"{owner}: part {i} must be an invops.NonlinearOperator (wrap linear "
                    f"operators with invops.operators.as_operator), got {type(op).__name__}"
                )
        self.ops = torch.nn.ModuleList(ops)
        counts = [n_conditions(op) for op in ops]
        known = [c for c in counts if c is not None]
        self.n_conditions = None if len(known) < len(counts) else max(known, default=0)
        self.is_complex = any(op.is_complex for op in ops)

    def extra_repr(self) -> str:
        ms = "" if self.model_shape is None else f"model_shape={self.model_shape}"
        ds = "" if self.data_shape is None else f"data_shape={self.data_shape}"
        return ", ".join(s for s in (ms, ds) if s)

    def _in_context(self, op, fn, source: str | None, h: torch.Tensor | None):
        """Run ``fn()``; a shape or type error of ``op`` on an intermediate names both sides."""
        try:
            return fn()
        except (ValueError, TypeError) as exc:
            if source is None or h is None:
                raise
            raise type(exc)(
                f"{type(self).__name__}: {source} gives {tuple(h.shape)} ({h.dtype}), which "
                f"{_describe(op)} does not accept: {exc}"
            ) from exc


class Composition(_Composite):
    r"""``F @ G``: the composition :math:`F \circ G` (``G`` applied first, as in PyLops).

    Parameters
    ----------
    *ops : NonlinearOperator
        The parts in mathematical order: ``Composition(F, G, H)(x) = F(G(H(x)))``. Nested
        compositions are flattened.

    Notes
    -----
    The Jacobian is :math:`J_F(G(x))\,J_G(x)`; with parameters, part :math:`k` adds
    :math:`J_{F_1}\cdots J_{F_{k-1}}\,\partial_{\theta_k} F_k`, built as
    ``J_F_both @ VStack([J_G, R_F])`` with ``R_F`` the restriction to ``F``'s parameters, so each
    part's Jacobian is applied once per product.

    Reverse mode stores the input of every part that cannot recompute it (non-invertible parts,
    e.g. physics operators) and the final output; an invertible part (an
    :class:`~invops.InvertibleModule`) pulls back from its output, recomputing its input by
    inversion, so it stores nothing. Under torch autograd each invertible part goes through the
    memory-free bridge, which saves only its output.

    Examples
    --------
    >>> import numpy as np, pylops, torch, invops
    >>> from invops.operators import as_operator
    >>> A = as_operator(pylops.MatrixMult(np.eye(8)[:5]), model_shape=(2, 4))
    >>> net = invops.ActNorm(2).double()
    >>> F = A @ net                      # x -> A(net(x))
    >>> F.apply(torch.randn(3, 2, 4, dtype=torch.float64)).shape
    torch.Size([3, 5])
    """

    def __init__(self, *ops: NonlinearOperator) -> None:
        flat: list = []
        for op in ops:
            flat.extend(op.ops if isinstance(op, Composition) else [op])
        if len(flat) < 2:
            raise ValueError(f"Composition: expected at least two operators, got {len(flat)}")
        super().__init__(flat, "Composition")
        for outer, inner in zip(flat[:-1], flat[1:]):
            _check_fits(outer, inner)
        self.model_shape = flat[-1].model_shape
        self.data_shape = flat[0].data_shape

    @property
    def _order(self) -> list:
        return list(reversed(self.ops))  # application order

    def _validate_input(self, x, cond):
        pass  # the first part applied checks its input

    def _walk(self, x, cond, fn):
        h, source = x, None
        for op in self._order:
            h = self._in_context(op, lambda op=op, h=h: fn(op, h, _cond_for(op, cond)), source, h)
            source = f"the output of {_describe(op)}"
        return h

    def _apply_t(self, x, cond):
        return self._walk(x, cond, lambda op, h, c: op._apply_t(h, c))

    def _jvp_t(self, x, cond, dx, dtheta):
        state = [dx]

        def step(op, h, c):
            y, state[0] = op._jvp_t(h, c, state[0], dtheta)
            return y

        y = self._walk(x, cond, step)
        return y, state[0]

    def _vjp_t(self, dy, x, cond):
        order = self._order
        saved: list = []  # inputs of the parts that cannot recompute them, in order

        def forward(op, h, c):
            if not _invertible(op):
                saved.append(h)
            return op._apply_t(h, c)

        with torch.no_grad():
            out = self._walk(x, cond, forward)
        _check_cotangent(dy, out, "Composition")
        grads: Grads = {}
        dcond: list = [None] * len(cond)
        g = dy
        for op in reversed(order):
            c = _cond_for(op, cond)
            if _invertible(op):
                out, g, dc, gr = op._pullback_t(out, c, g)
            else:
                out = saved.pop()
                g, dc, gr = op._vjp_t(g, out, c)
            add_grads(grads, gr)
            _add_conds(dcond, dc)
        return g, tuple(dcond), grads

    def _linearize(self, x, cond, wrt):
        layout = _ParamLayout(self, x, wrt)
        # M maps the composite's (x, theta) vector to the tangent of the current point h; None
        # while that tangent is zero (wrt="params" before the first part with parameters)
        M = None if wrt == "params" else _gather(layout.n, np.arange(layout.n_x), layout.dtype)
        M = pylops.Identity(layout.n, dtype=layout.dtype) if wrt != "params" and M is None else M
        h, source = x, None
        for op in self._order:
            c = _cond_for(op, cond)
            own = wrt != "input" and bool(trainable(op))
            if M is None and not own:
                with torch.no_grad():
                    h = self._in_context(op, lambda op=op, h=h, c=c: op._apply_t(h, c), source, h)
            else:
                part_wrt = "input" if not own else ("params" if M is None else "both")
                J, h = self._in_context(
                    op, lambda op=op, h=h, c=c, w=part_wrt: op._linearize(h, c, w), source, h
                )
                if not own:
                    M = J if isinstance(M, pylops.Identity) else J @ M
                else:
                    R = _gather(layout.n, layout.param_index(op), layout.dtype)
                    R = pylops.Identity(layout.n, dtype=layout.dtype) if R is None else R
                    M = J @ R if M is None else J @ pylops.VStack([M, R])
            source = f"the output of {_describe(op)}"
        if M is None:  # no trainable parameters anywhere
            dtype = np.result_type(layout.dtype, torch_to_numpy_dtype(h.dtype))
            M = pylops.Zero(h.numel(), layout.n, dtype=dtype)
        return _finish(M, layout.dims(x), tuple(h.shape)), h


def _check_fits(outer: NonlinearOperator, inner: NonlinearOperator) -> None:
    ms, ds = outer.model_shape, inner.data_shape
    if ms is not None and ds is not None and tuple(ms) != tuple(ds):
        raise ValueError(
            f"cannot compose {_describe(outer)} @ {_describe(inner)}: the right operand produces "
            f"data of shape {tuple(ds)} per sample, the left operand expects models of shape "
            f"{tuple(ms)}; give matching shapes (as_operator(..., model_shape=, data_shape=))"
        )


def _same_shapes(owner: str, ops: Sequence[NonlinearOperator], attr: str) -> tuple | None:
    known = [(op, getattr(op, attr)) for op in ops if getattr(op, attr) is not None]
    for op, shape in known[1:]:
        if tuple(shape) != tuple(known[0][1]):
            raise ValueError(
                f"{owner}: {_describe(known[0][0])} has {attr} {tuple(known[0][1])} but "
                f"{_describe(op)} has {attr} {tuple(shape)}; the parts must agree"
            )
    return tuple(known[0][1]) if known else None


class Sum(_Composite):
    r"""``F + G`` (and ``F - G`` as ``F + (-1) G``): outputs of the same shape added.

    Notes
    -----
    The Jacobian is :math:`J_F(x) + J_G(x)` (``pylops`` sum); with parameters each part's
    parameter Jacobian is fed by the restriction of the composite's parameter vector to its own
    parameters, so a parameter shared by both parts gets both contributions.

    Examples
    --------
    >>> import torch, invops
    >>> net = invops.ActNorm(2).double()
    >>> F = net - 0.5 * net
    >>> x = torch.randn(3, 2, dtype=torch.float64)
    >>> torch.allclose(F.apply(x), 0.5 * net.apply(x))
    True
    """

    def __init__(self, *ops: NonlinearOperator) -> None:
        flat: list = []
        for op in ops:
            flat.extend(op.ops if isinstance(op, Sum) else [op])
        if len(flat) < 2:
            raise ValueError(f"Sum: expected at least two operators, got {len(flat)}")
        super().__init__(flat, "Sum")
        self.model_shape = _same_shapes("Sum", flat, "model_shape")
        self.data_shape = _same_shapes("Sum", flat, "data_shape")

    def _outputs(self, x, cond, fn):
        outs = []
        for op in self.ops:
            y = fn(op, x, _cond_for(op, cond))
            if outs and y.shape != outs[0][1].shape:
                raise ValueError(
                    f"Sum: {_describe(op)} gives an output of shape {tuple(y.shape)} but "
                    f"{_describe(outs[0][0])} gives {tuple(outs[0][1].shape)}; added outputs "
                    "must have the same shape"
                )
            outs.append((op, y))
        return outs

    def _apply_t(self, x, cond):
        outs = self._outputs(x, cond, lambda op, h, c: op._apply_t(h, c))
        return sum((y for _, y in outs[1:]), outs[0][1])

    def _jvp_t(self, x, cond, dx, dtheta):
        pairs = iter([op._jvp_t(x, _cond_for(op, cond), dx, dtheta) for op in self.ops])
        tangents: list = []

        def output(op, h, c):
            y, dy = next(pairs)
            tangents.append(dy)
            return y

        outs = self._outputs(x, cond, output)
        return sum((y for _, y in outs[1:]), outs[0][1]), sum(tangents[1:], tangents[0])

    def _vjp_t(self, dy, x, cond):
        def split(ys):
            _check_cotangent(dy, ys[0], "Sum")
            return [dy] * len(ys)

        dxs, dcond, grads = _part_pullbacks(self.ops, [x] * len(self.ops), cond, split)
        return sum(dxs[1:], dxs[0]), dcond, grads

    def _linearize(self, x, cond, wrt):
        layout = _ParamLayout(self, x, wrt)
        terms, y = [], None
        for op in self.ops:
            c = _cond_for(op, cond)
            part_wrt = layout.part_wrt(op)
            if part_wrt is None:
                with torch.no_grad():
                    yk = op._apply_t(x, c)
            else:
                J, yk = op._linearize(x, c, part_wrt)
                terms.append(_compose(J, layout.selector(op)))
            if y is not None and yk.shape != y.shape:
                raise ValueError(
                    f"Sum: {_describe(op)} gives an output of shape {tuple(yk.shape)}, the first "
                    f"part {tuple(y.shape)}; added outputs must have the same shape"
                )
            y = yk if y is None else y + yk
        dtype = np.result_type(layout.dtype, torch_to_numpy_dtype(y.dtype))
        M = terms[0] if len(terms) == 1 else None
        if len(terms) > 1:
            M = terms[0]
            for T in terms[1:]:
                M = M + T
        elif not terms:
            M = pylops.Zero(y.numel(), layout.n, dtype=dtype)
        else:
            M = M * 1.0  # a new object: the part's own Jacobian must keep its dims
        return _finish(M, layout.dims(x), tuple(y.shape)), y


def _split_stacked_cotangent(dy: torch.Tensor, ys: Sequence, owner: str) -> list:
    """The cotangent ``(B, sum of part sizes)`` of stacked outputs, cut into the parts' shapes."""
    sizes = [y[0].numel() for y in ys]
    if tuple(dy.shape) != (ys[0].shape[0], sum(sizes)):
        raise ValueError(
            f"{owner}: the cotangent dy must have shape {(ys[0].shape[0], sum(sizes))}, "
            f"got {tuple(dy.shape)}"
        )
    return [d.reshape(y.shape) for d, y in zip(torch.split(dy, sizes, dim=1), ys)]


def _part_pullbacks(ops, xs, cond, split):
    """Reverse mode of parts applied side by side to ``xs``: ``(dxs, dcond, grads)``.

    Each part runs forward once without a graph; ``split(ys)`` cuts the composite's cotangent
    into one per part. An invertible part then pulls back from that output (memory-free), the
    others from their input.
    """
    with torch.no_grad():
        ys = [op._apply_t(x, _cond_for(op, cond)) for op, x in zip(ops, xs)]
    dys = split(ys)
    grads: Grads = {}
    dcond: list = [None] * len(cond)
    dxs = []
    for op, x, y, dy in zip(ops, xs, ys, dys):
        c = _cond_for(op, cond)
        if _invertible(op):
            _, dx, dc, gr = op._pullback_t(y, c, dy)
        else:
            dx, dc, gr = op._vjp_t(dy, x, c)
        dxs.append(dx)
        add_grads(grads, gr)
        _add_conds(dcond, dc)
    return dxs, tuple(dcond), grads


class Scaled(_Composite):
    r"""``a * F``: the output scaled by a real number (Jacobian :math:`a J_F`).

    Examples
    --------
    >>> import torch, invops
    >>> F = 3 * invops.LeakyReLU(0.5, logdet=False).double()
    >>> F.apply(torch.tensor([[1.0, -2.0]], dtype=torch.float64))
    tensor([[ 3., -3.]], dtype=torch.float64)
    """

    def __init__(self, scale: float, op: NonlinearOperator) -> None:
        scale = _scalar(scale, "*")
        if isinstance(op, Scaled):
            scale, op = scale * op.scale, op.op
        super().__init__([op], "Scaled")
        self.scale: float = scale
        self.model_shape, self.data_shape = op.model_shape, op.data_shape

    def extra_repr(self) -> str:
        return f"scale={self.scale}"

    @property
    def op(self) -> NonlinearOperator:
        return cast(NonlinearOperator, self.ops[0])

    def _apply_t(self, x, cond):
        return self.scale * self.op._apply_t(x, _cond_for(self.op, cond))

    def _jvp_t(self, x, cond, dx, dtheta):
        y, dy = self.op._jvp_t(x, _cond_for(self.op, cond), dx, dtheta)
        return self.scale * y, self.scale * dy

    def _vjp_t(self, dy, x, cond):
        dx, dcond, grads = self.op._vjp_t(self.scale * dy, x, _cond_for(self.op, cond))
        return dx, dcond, grads

    def _linearize(self, x, cond, wrt):
        J, y = self.op._linearize(x, _cond_for(self.op, cond), wrt)
        return _finish(J * self.scale, J.dims, J.dimsd), self.scale * y


def _interleave(n_batch: int, sizes: Sequence[int]) -> np.ndarray:
    """Indices that turn part-major blocks ``[part 0 (B, n_0), part 1 (B, n_1), ...]`` into the
    sample-major layout ``(B, n_0 + n_1 + ...)``."""
    starts = np.concatenate([[0], np.cumsum([n_batch * n for n in sizes])[:-1]])
    rows = [
        np.concatenate([s + b * n + np.arange(n) for s, n in zip(starts, sizes)])
        for b in range(n_batch)
    ]
    return np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, dtype=np.int64)


class VStack(_Composite):
    r"""Outputs of several operators of the same input, concatenated per sample.

    ``VStack([F, G])(x)`` has shape ``(B, m_F + m_G)``: each part's output flattened per
    sample, then concatenated. Build it with :func:`vstack`.

    Notes
    -----
    The Jacobian is ``P @ pylops.VStack([J_F, J_G])``, where ``P`` reorders PyLops' part-major
    stacking of the whole batch into the sample-major layout of the output (the identity for a
    batch of one).
    """

    def __init__(self, ops: Sequence[NonlinearOperator]) -> None:
        ops = list(ops)
        if not ops:
            raise ValueError("vstack: expected at least one operator, got none")
        super().__init__(ops, "vstack")
        self.model_shape = _same_shapes("vstack", ops, "model_shape")
        if all(op.data_shape is not None for op in ops):
            self.data_shape = (sum(math.prod(op.data_shape or ()) for op in ops),)

    def _validate_input(self, x, cond):
        pass  # every part checks the input

    def _apply_t(self, x, cond):
        outs = [op._apply_t(x, _cond_for(op, cond)) for op in self.ops]
        return torch.cat([y.reshape(x.shape[0], -1) for y in outs], dim=1)

    def _jvp_t(self, x, cond, dx, dtheta):
        pairs = [op._jvp_t(x, _cond_for(op, cond), dx, dtheta) for op in self.ops]
        return tuple(torch.cat([p[i].reshape(x.shape[0], -1) for p in pairs], 1) for i in (0, 1))

    def _vjp_t(self, dy, x, cond):
        def split(ys):
            return _split_stacked_cotangent(dy, ys, "vstack")

        dxs, dcond, grads = _part_pullbacks(self.ops, [x] * len(self.ops), cond, split)
        return sum(dxs[1:], dxs[0]), dcond, grads

    def _linearize(self, x, cond, wrt):
        layout = _ParamLayout(self, x, wrt)
        blocks, ys = [], []
        for op in self.ops:
            c = _cond_for(op, cond)
            part_wrt = layout.part_wrt(op)
            if part_wrt is None:
                with torch.no_grad():
                    yk = op._apply_t(x, c)
                blocks.append(pylops.Zero(yk.numel(), layout.n, dtype=layout.dtype))
            else:
                J, yk = op._linearize(x, c, part_wrt)
                blocks.append(_compose(J, layout.selector(op)))
            ys.append(yk.reshape(x.shape[0], -1))
        y = torch.cat(ys, dim=1)
        M = pylops.VStack(blocks)
        P = _gather(y.numel(), _interleave(x.shape[0], [t.shape[1] for t in ys]), M.dtype)
        return _finish(_compose(P, M) if P is not None else M, layout.dims(x), tuple(y.shape)), y


class BlockDiag(_Composite):
    r"""Operators applied to consecutive slices of the flattened input, outputs concatenated.

    ``BlockDiag([F, G])`` maps ``(B, n_F + n_G)`` to ``(B, m_F + m_G)``: per sample, the
    first ``n_F`` entries are reshaped to ``F.model_shape`` and go through ``F``, the rest
    through ``G``. Build it with :func:`blockdiag`.

    Notes
    -----
    The input Jacobian is ``P_out @ pylops.BlockDiag([J_F, J_G]) @ P_in`` with ``P_in`` /
    ``P_out`` the reorderings between the sample-major batch layout and PyLops' part-major one
    (identities for a batch of one).
    """

    def __init__(
        self, ops: Sequence[NonlinearOperator], model_shapes: Sequence[Sequence[int]] | None = None
    ) -> None:
        ops = list(ops)
        if not ops:
            raise ValueError("blockdiag: expected at least one operator, got none")
        super().__init__(ops, "blockdiag")
        if model_shapes is None:
            model_shapes = cast(Sequence[Sequence[int]], [op.model_shape for op in ops])
        elif len(model_shapes) != len(ops):
            raise ValueError(
                f"blockdiag: expected one model shape per operator ({len(ops)}), "
                f"got {len(model_shapes)}"
            )
        for op, shape in zip(ops, model_shapes):
            if shape is None:
                raise ValueError(
                    f"blockdiag: the model shape of {_describe(op)} is unknown, so its slice of "
                    "the input cannot be found; pass model_shapes=[...] (one per operator)"
                )
            if op.model_shape is not None and tuple(op.model_shape) != tuple(shape):
                raise ValueError(
                    f"blockdiag: model shape {tuple(shape)} given for {_describe(op)}, which "
                    f"expects {tuple(op.model_shape)}"
                )
        self.shapes = [tuple(int(n) for n in s) for s in model_shapes]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.model_shape = (sum(self.sizes),)
        if all(op.data_shape is not None for op in ops):
            self.data_shape = (sum(math.prod(op.data_shape or ()) for op in ops),)

    def _validate_input(self, x, cond):
        if x.ndim < 1 or x[0].numel() != sum(self.sizes):
            raise ValueError(
                f"blockdiag: x must have {sum(self.sizes)} entries per sample (parts of "
                f"{self.sizes}), got shape {tuple(x.shape)}"
            )

    def _slices(self, x):
        self._validate_input(x, ())
        flat = x.reshape(x.shape[0], -1)
        parts = torch.split(flat, self.sizes, dim=1)
        return [p.reshape(x.shape[0], *s) for p, s in zip(parts, self.shapes)]

    def _apply_t(self, x, cond):
        outs = [op._apply_t(xk, _cond_for(op, cond)) for op, xk in zip(self.ops, self._slices(x))]
        return torch.cat([y.reshape(x.shape[0], -1) for y in outs], dim=1)

    def _jvp_t(self, x, cond, dx, dtheta):
        dxs = [None] * len(self.ops) if dx is None else self._slices(dx)
        pairs = [
            op._jvp_t(xk, _cond_for(op, cond), dk, dtheta)
            for op, xk, dk in zip(self.ops, self._slices(x), dxs)
        ]
        return tuple(torch.cat([p[i].reshape(x.shape[0], -1) for p in pairs], 1) for i in (0, 1))

    def _vjp_t(self, dy, x, cond):
        def split(ys):
            return _split_stacked_cotangent(dy, ys, "blockdiag")

        dxs, dcond, grads = _part_pullbacks(self.ops, self._slices(x), cond, split)
        dx = torch.cat([d.reshape(x.shape[0], -1) for d in dxs], dim=1).reshape(x.shape)
        return dx, dcond, grads

    def _linearize(self, x, cond, wrt):
        layout = _ParamLayout(self, x, wrt)
        n_batch, total = x.shape[0], sum(self.sizes)
        starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        x_index = [
            (np.arange(n_batch)[:, None] * total + s + np.arange(n)[None, :]).reshape(-1)
            for s, n in zip(starts, self.sizes)
        ]
        blocks, ys, inputs = [], [], []
        for op, xk, idx in zip(self.ops, self._slices(x), x_index):
            c = _cond_for(op, cond)
            part_wrt = layout.part_wrt(op)
            if part_wrt is None:
                with torch.no_grad():
                    yk = op._apply_t(xk, c)
                blocks.append(pylops.Zero(yk.numel(), layout.n, dtype=layout.dtype))
            else:
                J, yk = op._linearize(xk, c, part_wrt)
                blocks.append(J)
                inputs.append(layout.selector(op, x_index=idx))
            ys.append(yk.reshape(n_batch, -1))
        y = torch.cat(ys, dim=1)
        if wrt == "input":
            P_in = _gather(layout.n, np.concatenate(x_index), layout.dtype)
            M = _compose(pylops.BlockDiag(blocks), P_in)
        else:
            it = iter(inputs)
            M = pylops.VStack(
                [B if isinstance(B, pylops.Zero) else _compose(B, next(it)) for B in blocks]
            )
        P = _gather(y.numel(), _interleave(n_batch, [t.shape[1] for t in ys]), M.dtype)
        M = _compose(P, M) if P is not None else M
        return _finish(M, layout.dims(x), tuple(y.shape)), y


def vstack(ops: Sequence[Any]) -> VStack:
    """Stack operators of the same input: outputs flattened per sample and concatenated.

    Linear operators (pylops, scipy) are wrapped with :func:`invops.operators.as_operator`.

    Examples
    --------
    >>> import numpy as np, pylops, torch
    >>> from invops.operators import vstack
    >>> F = vstack([pylops.Identity(3), pylops.Diagonal(np.arange(3.0))])
    >>> F.apply(torch.ones(2, 3, dtype=torch.float64))
    tensor([[1., 1., 1., 0., 1., 2.],
            [1., 1., 1., 0., 1., 2.]], dtype=torch.float64)
    """
    return VStack([_operand(op, "vstack") for op in _as_list(ops, "vstack")])


def blockdiag(ops: Sequence[Any], model_shapes: Sequence[Sequence[int]] | None = None) -> BlockDiag:
    """Apply operators to consecutive slices of the flattened input; outputs concatenated.

    ``model_shapes`` gives each operator's input shape where the operator does not know it
    (networks); linear operators know theirs.

    Examples
    --------
    >>> import numpy as np, pylops, torch
    >>> from invops.operators import blockdiag
    >>> F = blockdiag([pylops.Identity(2), pylops.Diagonal(np.array([2.0, 3.0]))])
    >>> F.apply(torch.ones(1, 4, dtype=torch.float64))
    tensor([[1., 1., 2., 3.]], dtype=torch.float64)
    """
    return BlockDiag([_operand(op, "blockdiag") for op in _as_list(ops, "blockdiag")], model_shapes)


def _as_list(ops: Any, owner: str) -> list:
    if isinstance(ops, (NonlinearOperator, pylops.LinearOperator)) or not isinstance(
        ops, (list, tuple)
    ):
        raise TypeError(f"{owner}: expected a list of operators, got {type(ops).__name__}")
    return list(ops)
