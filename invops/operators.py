"""Physics operators J and J^T inside networks: PyLops, scipy, matrices or torch callables.

:func:`as_operator` turns a linear operator into a :class:`Operator` that applies it to a BATCH of
torch tensors (one sample per row) and differentiates through it exactly: reverse mode applies
the adjoint, forward mode applies the operator to the tangent. Operators that compute on numpy
or cupy arrays receive zero-copy views of the torch tensors (DLPack) and a whole batch at once
through ``matmat``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pylops
import scipy.sparse
import scipy.sparse.linalg
import torch

from ._arrays import from_torch, to_torch
from .nonlinear import LinearJacobian, NonlinearOperator, blockdiag, vstack

__all__ = ["Operator", "as_operator", "apply_operator", "apply_adjoint", "vstack", "blockdiag"]


class Operator(NonlinearOperator):
    r"""A linear operator :math:`J` applied to batches of torch tensors.

    Build it with :func:`as_operator`. ``apply(x)`` maps ``(B, *model_shape)`` to
    ``(B, *data_shape)`` and ``adjoint(y)`` maps back. ``model_shape`` / ``data_shape`` may be
    None for torch callables, which then accept any shape they accept.

    It is a :class:`~invops.NonlinearOperator` whose Jacobian at any point is the operator
    itself (on the flattened batch, :math:`I_B \otimes J`), so it composes with networks:
    ``as_operator(A) @ net``. ``apply`` takes torch, numpy or cupy arrays and is differentiable.

    Notes
    -----
    Complex operators on real models (for instance ``pylops.medical.MRI2D``): ``apply`` returns
    complex data, and ``adjoint`` returns the real part of :math:`J^H r`, which is the gradient
    of :math:`\tfrac12\|Jx - d\|^2` with respect to a real :math:`x`. Reverse mode through
    :func:`apply_operator` is consistent with that (the cotangent of a real input is
    :math:`\mathrm{Re}(J^H \bar y)`).
    """

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        adjoint: Callable[[torch.Tensor], torch.Tensor],
        model_shape: tuple[int, ...] | None,
        data_shape: tuple[int, ...] | None,
        is_complex: bool,
        name: str,
    ) -> None:
        super().__init__()
        self._adjoint: Callable[[torch.Tensor], torch.Tensor]  # set below, not a sub-module
        # plain attributes: callables that are torch modules must not become sub-modules (their
        # parameters are not the operator's)
        object.__setattr__(self, "_forward", forward)
        object.__setattr__(self, "_adjoint", adjoint)
        self.model_shape = model_shape
        self.data_shape = data_shape
        self.is_complex = is_complex
        self.name = name

    def __repr__(self) -> str:
        return (
            f"Operator({self.name}, model_shape={self.model_shape}, data_shape={self.data_shape})"
        )

    def check_model(self, x: torch.Tensor, name: str = "model") -> None:
        """Raise ``ValueError`` unless ``x`` is a batch ``(B, *model_shape)``."""
        if self.model_shape is not None and tuple(x.shape[1:]) != self.model_shape:
            raise ValueError(
                f"{name}: the operator {self.name} expects models of shape {self.model_shape} "
                f"(batch first: (B, {', '.join(map(str, self.model_shape))})), "
                f"got {tuple(x.shape)}"
            )

    def check_data(self, d: torch.Tensor, name: str = "data") -> None:
        """Raise ``ValueError`` unless ``d`` is a batch ``(B, *data_shape)``."""
        if self.data_shape is not None and tuple(d.shape[1:]) != self.data_shape:
            raise ValueError(
                f"{name}: the operator {self.name} produces data of shape {self.data_shape} "
                f"(batch first: (B, {', '.join(map(str, self.data_shape))})), "
                f"got {tuple(d.shape)}"
            )
        if self.is_complex and not d.is_complex():
            raise TypeError(
                f"{name}: the operator {self.name} is complex, so the data must be complex, "
                f"got dtype {d.dtype}"
            )

    def check_output(
        self,
        out: Any,
        inp: torch.Tensor,
        adjoint: bool = False,
        shape: Sequence[int] | None = None,
        data: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Check what the forward (or ``adjoint``) map returned for the batch ``inp``; return it.

        The result must be a tensor with ``inp``'s batch size and, after the batch dimension,
        ``shape`` if given (inferred by the caller: the model's or the data's shape), else the
        declared ``data_shape`` (forward) or ``model_shape`` (adjoint). With ``data``, a
        forward map that returns complex values needs complex data (as a complex matrix or
        PyLops operator does). Raises ``TypeError`` or ``ValueError`` naming the operator.
        """
        which = "adjoint" if adjoint else "forward map"
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"the operator {self.name}: its {which} must return a torch.Tensor, "
                f"got {type(out).__name__}"
            )
        if shape is None:
            shape = self.model_shape if adjoint else self.data_shape
        expected = (inp.shape[0], *shape) if shape is not None else None
        if (
            out.ndim < 1
            or out.shape[0] != inp.shape[0]
            or (expected is not None and tuple(out.shape) != tuple(expected))
        ):
            want = f"{tuple(expected)}" if expected is not None else f"({inp.shape[0]}, ...)"
            raise ValueError(
                f"the operator {self.name}: its {which} returned shape {tuple(out.shape)} for "
                f"an input of shape {tuple(inp.shape)}, expected {want} "
                f"({'models' if adjoint else 'data'}, batch first)"
            )
        if data is not None and out.is_complex() and not data.is_complex():
            raise TypeError(
                f"d: the operator {self.name} returns complex data, so the data must be complex, "
                f"got dtype {data.dtype}"
            )
        return out

    def apply(self, x: Any, *cond: Any) -> Any:
        """:math:`J x` for a batch ``x`` of shape ``(B, *model_shape)`` (differentiable)."""
        return NonlinearOperator.apply(self, x, *cond)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """:math:`J^H y` for a batch (its real part for a complex operator and real models)."""
        self.check_data(y)
        return self.check_output(self._adjoint(y), y, adjoint=True)

    # ---------------------------------------------------------- NonlinearOperator primitives
    n_conditions = 0

    def _apply_t(self, x: torch.Tensor, cond: tuple) -> torch.Tensor:
        return apply_operator(self, x)

    def _jvp_t(self, x, cond, dx, dtheta):
        self.check_model(x)
        y = self.check_output(self._forward(x), x)
        return y, torch.zeros_like(y) if dx is None else self.check_output(self._forward(dx), dx)

    def _vjp_t(self, dy, x, cond):
        self.check_model(x)
        self.check_data(dy, name="dy")
        dx = self.check_output(self._adjoint(dy), dy, adjoint=True)
        return (dx.real if dx.is_complex() and not x.is_complex() else dx), (), {}

    def _linearize(self, x, cond, wrt):
        self.check_model(x)
        y = self.check_output(self._forward(x), x)
        return LinearJacobian(self, x, y, wrt), y


# -------------------------------------------------------------------- differentiable application
# Every call of the user's maps is checked: the forward output against the declared data shape
# (or the one the caller knows), the adjoint output against the model's shape, and in reverse
# and forward mode against the shapes of the primal input and output.
class _Apply(torch.autograd.Function):
    @staticmethod
    def forward(x, op, shape):
        return op.check_output(op._forward(x), x, shape=shape)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, op = inputs[0], inputs[1]
        ctx.op = op
        ctx.real_input = not x.is_complex()
        ctx.in_shape, ctx.out_shape = tuple(x.shape[1:]), tuple(output.shape[1:])

    @staticmethod
    def backward(ctx, grad):
        out = ctx.op.check_output(ctx.op._adjoint(grad), grad, adjoint=True, shape=ctx.in_shape)
        return (out.real if ctx.real_input and out.is_complex() else out), None, None

    @staticmethod
    def jvp(ctx, dx, *_):
        return ctx.op.check_output(ctx.op._forward(dx), dx, shape=ctx.out_shape)


class _Adjoint(torch.autograd.Function):
    @staticmethod
    def forward(y, op, shape):
        return op.check_output(op._adjoint(y), y, adjoint=True, shape=shape)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.op = inputs[1]
        ctx.in_shape, ctx.out_shape = tuple(inputs[0].shape[1:]), tuple(output.shape[1:])

    @staticmethod
    def backward(ctx, grad):
        return ctx.op.check_output(ctx.op._forward(grad), grad, shape=ctx.in_shape), None, None

    @staticmethod
    def jvp(ctx, dy, *_):
        return ctx.op.check_output(ctx.op._adjoint(dy), dy, adjoint=True, shape=ctx.out_shape)


def apply_operator(
    op: Operator,
    x: torch.Tensor,
    data_shape: Sequence[int] | None = None,
    data: torch.Tensor | None = None,
) -> torch.Tensor:
    """:math:`J x`, differentiable in reverse and forward mode (exact adjoint).

    ``data_shape`` (the shape of one datum, when the caller knows it) and ``data`` (the data
    the result will be compared with) tighten the check of the result; see
    :meth:`Operator.check_output`.
    """
    op.check_model(x)
    shape = None if data_shape is None else tuple(data_shape)
    out = _Apply.apply(x, op, shape)
    if data is not None:  # the data's kind is checked outside the Function: d is no input of it
        op.check_output(out, x, shape=shape, data=data)
    return out


def apply_adjoint(
    op: Operator, y: torch.Tensor, model_shape: Sequence[int] | None = None
) -> torch.Tensor:
    """:math:`J^H y` (real part for complex operators), differentiable in both modes.

    ``model_shape`` (the shape of one model, when the caller knows it) tightens the check of
    the result.
    """
    op.check_data(y)
    return _Adjoint.apply(y, op, None if model_shape is None else tuple(model_shape))


# -------------------------------------------------------------------- adapters
def _batched_matmat(
    matmat: tuple[Callable[[Any], Any], Callable[[Any], Any]],
    model_shape: tuple[int, ...],
    data_shape: tuple[int, ...],
    real_model: bool,
) -> tuple[Callable, Callable]:
    """Wrap numpy/cupy ``matmat``/``rmatmat`` as batched torch functions (columns = samples)."""
    n_model, n_data = math.prod(model_shape), math.prod(data_shape)

    def run(fn, t: torch.Tensor, n_in: int, out_shape: tuple[int, ...], real_out: bool):
        kind = "cupy" if t.device.type == "cuda" else "numpy"
        cols = t.detach().reshape(t.shape[0], n_in).T  # a view: (n_in, B)
        out = fn(from_torch(cols, kind))
        res = to_torch(out, device=t.device)
        if real_out and res.is_complex():
            res = res.real
        res = res.to(_matching_dtype(res, t))  # a float64 operator must not promote float32
        return res.T.reshape(t.shape[0], *out_shape).contiguous()

    def forward(x: torch.Tensor) -> torch.Tensor:
        return run(matmat[0], x, n_model, data_shape, real_out=False)

    def adjoint(y: torch.Tensor) -> torch.Tensor:
        return run(matmat[1], y, n_data, model_shape, real_out=real_model)

    return forward, adjoint


def _matching_dtype(result: torch.Tensor, like: torch.Tensor) -> torch.dtype:
    """``result``'s kind (real or complex) at ``like``'s precision."""
    single = like.dtype in (torch.float32, torch.complex64)
    if result.is_complex():
        return torch.complex64 if single else torch.complex128
    return torch.float32 if single else torch.float64


def as_operator(
    J: Any,
    model_shape: Sequence[int] | None = None,
    data_shape: Sequence[int] | None = None,
    real_model: bool = True,
) -> Operator:
    """Adapt a linear operator for use inside networks.

    Parameters
    ----------
    J : operator
        One of:

        - a ``pylops.LinearOperator`` working on numpy arrays (CPU) or cupy arrays (GPU: torch
          CUDA tensors cross to cupy and back through DLPack without a copy); ``dims`` and
          ``dimsd`` give the model and data shapes;
        - a ``scipy.sparse.linalg.LinearOperator`` or a scipy sparse matrix (CPU);
        - a dense matrix (``numpy.ndarray`` or ``torch.Tensor``, ``(n_data, n_model)``): applied
          with torch on the tensors' device;
        - a pair ``(forward, adjoint)`` of torch callables applied to whole batches
          ``(B, *model_shape)`` and ``(B, *data_shape)``;
        - an :class:`Operator` (returned unchanged).
    model_shape, data_shape : sequence of int, optional
        Shapes of one model and one datum (override the operator's own; required to reshape
        flat matrices and scipy operators into images).
    real_model : bool
        Models are real: the adjoint of a complex operator returns the real part of
        :math:`J^H y`.

    Returns
    -------
    Operator

    Examples
    --------
    >>> import numpy as np, pylops, torch
    >>> from invops.operators import as_operator
    >>> op = as_operator(pylops.Diagonal(np.arange(1.0, 5.0)))
    >>> op.apply(torch.ones(2, 4, dtype=torch.float64))
    tensor([[1., 2., 3., 4.],
            [1., 2., 3., 4.]], dtype=torch.float64)
    """
    if isinstance(J, Operator):
        return J
    ms = None if model_shape is None else tuple(int(n) for n in model_shape)
    ds = None if data_shape is None else tuple(int(n) for n in data_shape)

    if isinstance(J, pylops.LinearOperator):
        ms = ms or tuple(int(n) for n in J.dims)
        ds = ds or tuple(int(n) for n in J.dimsd)
        _check_sizes(J.shape, ms, ds, type(J).__name__)
        fwd, adj = _batched_matmat((J.matmat, J.rmatmat), ms, ds, real_model)
        return Operator(
            fwd, adj, ms, ds, np.iscomplexobj(np.empty(0, dtype=J.dtype)), type(J).__name__
        )

    if isinstance(J, scipy.sparse.linalg.LinearOperator) or scipy.sparse.issparse(J):
        lin = scipy.sparse.linalg.aslinearoperator(J)
        ms = ms or (lin.shape[1],)
        ds = ds or (lin.shape[0],)
        _check_sizes(lin.shape, ms, ds, type(J).__name__)
        fwd, adj = _batched_matmat((lin.matmat, lin.rmatmat), ms, ds, real_model)
        return Operator(
            fwd, adj, ms, ds, np.iscomplexobj(np.empty(0, dtype=lin.dtype)), type(J).__name__
        )

    if isinstance(J, (np.ndarray, torch.Tensor)):
        return _matrix_operator(J, ms, ds, real_model)

    if isinstance(J, tuple) and len(J) == 2 and all(callable(f) for f in J):
        forward, adjoint = J
        return Operator(forward, adjoint, ms, ds, False, "callables")

    raise TypeError(
        "J: expected a pylops.LinearOperator, a scipy LinearOperator or sparse matrix, a dense "
        f"numpy/torch matrix, or a (forward, adjoint) pair of callables; got {type(J).__name__}"
    )


def _check_sizes(shape, ms, ds, name):
    if math.prod(ms) != shape[1] or math.prod(ds) != shape[0]:
        raise ValueError(
            f"J ({name}): model shape {ms} and data shape {ds} do not match the operator's "
            f"shape {tuple(shape)} (n_data, n_model)"
        )


def _matrix_operator(A, ms, ds, real_model) -> Operator:
    if A.ndim != 2:
        raise ValueError(f"J: a matrix must be 2-dimensional, got shape {tuple(A.shape)}")
    A_t = to_torch(np.ascontiguousarray(A) if isinstance(A, np.ndarray) else A, name="J")
    ms = ms or (A_t.shape[1],)
    ds = ds or (A_t.shape[0],)
    _check_sizes(tuple(A_t.shape), ms, ds, "matrix")
    cache: dict = {}

    def on(t: torch.Tensor) -> torch.Tensor:
        # the matrix follows the tensors' device and precision (a complex matrix stays complex)
        target = _matching_dtype(A_t, t)
        key = (t.device, target)
        if key not in cache:
            cache[key] = A_t.to(device=t.device, dtype=target)
        return cache[key]

    def forward(x: torch.Tensor) -> torch.Tensor:
        M = on(x)
        out = x.reshape(x.shape[0], -1).to(M.dtype) @ M.T
        return out.reshape(x.shape[0], *ds)

    def adjoint(y: torch.Tensor) -> torch.Tensor:
        M = on(y)
        out = y.reshape(y.shape[0], -1) @ M.conj()
        if real_model and out.is_complex():
            out = out.real
        return out.reshape(y.shape[0], *ms)

    return Operator(forward, adjoint, ms, ds, A_t.is_complex(), "matrix")
