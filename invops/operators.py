"""Physics operators J and J^T inside networks: PyLops, scipy, matrices or torch callables.

:func:`as_operator` turns a linear operator into a :class:`Operator` that applies it to a BATCH of
torch tensors (one sample per row) and differentiates through it exactly: reverse mode applies
the adjoint, forward mode applies the operator to the tangent. Operators that compute on numpy
or cupy arrays receive zero-copy views of the torch tensors (DLPack) and a whole batch at once
through ``matmat``.
"""

from __future__ import annotations

import copy
import functools
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

__all__ = [
    "Operator",
    "BatchedOperator",
    "as_operator",
    "per_sample",
    "register_batching_rule",
    "apply_operator",
    "apply_adjoint",
    "vstack",
    "blockdiag",
]


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


def _operand_dtype(matrix: torch.Tensor, like: torch.Tensor) -> torch.dtype:
    """The dtype to apply ``matrix`` to ``like`` in: complex if either is, ``like``'s precision."""
    target = _matching_dtype(matrix, like)
    if like.is_complex() and not target.is_complex:
        target = torch.complex64 if target == torch.float32 else torch.complex128
    return target


def as_operator(
    J: Any,
    model_shape: Sequence[int] | None = None,
    data_shape: Sequence[int] | None = None,
    real_model: bool = True,
    *,
    is_complex: bool | None = None,
    ndim: int | None = None,
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
        - a *physics object*: anything with methods ``A`` and ``A_adjoint`` on batches with a
          channel axis, ``(B, C, *spatial)`` (deepinv's ``LinearPhysics``, duck-typed: invops
          does not import deepinv); see Notes;
        - a list (or a tuple that is not a callable pair) of ``B`` of the above, one operator
          per sample of a batch of exactly ``B`` (a different sampling mask per scan, say): see
          :func:`per_sample`;
        - an :class:`Operator` (returned unchanged), including a :class:`BatchedOperator` that
          holds one operator per sample natively, such as
          :class:`invops.physics.TorchMRI` built from a stack of masks.
        - a pylops-mpi ``MPILinearOperator`` (e.g. ``MPIVStack``) whose model is replicated on
          every rank and whose data are split across the ranks: each rank passes the same
          models and its own data block (see :mod:`invops.operators_mpi`; ``data_shape`` is
          then the shape of this rank's block).
    model_shape, data_shape : sequence of int, optional
        Shapes of one model and one datum (override the operator's own; required to reshape
        flat matrices and scipy operators into images).
    real_model : bool
        Models are real: the adjoint of a complex operator returns the real part of
        :math:`J^H y`.
    is_complex : bool, optional
        For callables and physics objects: the operator returns complex data, so the data it is
        compared with must be complex (checked before any call, as for complex matrices and
        PyLops operators, which know it themselves). Default: False for callables; for a
        physics object that is a ``torch.nn.Module``, whether it holds a complex tensor.
    ndim : int, optional
        For physics objects: spatial dimensions of a model. Models then come without a
        channel axis when they have one channel, ``(B, *spatial)``, the layout
        :class:`~invops.NetworkLoop` uses; the adapter adds the physics' channel axis before
        ``A`` and drops it after ``A_adjoint``. Without ``ndim``, models are passed as they are.

    Returns
    -------
    Operator
        A :class:`BatchedOperator` for a list of per-sample operators.

    Notes
    -----
    Two ways to give one operator per sample. A **list** of ``B`` operators is applied row by
    row, in one call for the whole batch wherever a batching rule knows how to stack that kind
    of operator (dense matrices, ``pylops.Diagonal``, ``pylops.medical.MRI2D`` with array or
    vertical-line masks, :class:`invops.physics.MultiCoilMRI2D`,
    :class:`invops.physics.TorchMRI`; see :func:`register_batching_rule`), else one call per
    sample. A **batched operator** is an :class:`Operator` whose own ``forward`` and ``adjoint``
    apply sample ``i``'s map to row ``i`` (a :class:`BatchedOperator` with ``batch_size = B``,
    or a ``(forward, adjoint)`` pair of torch callables that do so themselves).

    A **physics object** is applied as it is to whole batches. When it is a ``torch.nn.Module``
    whose floating-point buffers (a blur filter, a mask) differ from the batch in precision or
    device, a copy cast to the batch's precision and device is used (one per precision and
    device, made once); its own tensors are never changed. Any other object must return what
    it is given in the batch's precision, else a ``TypeError`` names it.

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
    if _from_pylops_mpi(J):  # imported here only: importing mpi4py starts MPI
        from .operators_mpi import mpi_operator

        return mpi_operator(J, model_shape, data_shape, real_model)
    if isinstance(J, (list, tuple)) and not _is_callable_pair(J):
        return per_sample(J, model_shape, data_shape, real_model, is_complex=is_complex, ndim=ndim)
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
        return Operator(forward, adjoint, ms, ds, bool(is_complex), "callables")

    if _is_physics(J):
        return _physics_operator(J, ms, ds, real_model, is_complex, ndim)

    raise TypeError(
        "J: expected a pylops.LinearOperator, a scipy LinearOperator or sparse matrix, a dense "
        "numpy/torch matrix, a (forward, adjoint) pair of callables, an object with methods A "
        f"and A_adjoint (a physics), or a pylops-mpi MPILinearOperator; got {type(J).__name__}"
    )


def _is_physics(J: Any) -> bool:
    return callable(getattr(J, "A", None)) and callable(getattr(J, "A_adjoint", None))


def _physics_operator(physics, ms, ds, real_model, is_complex, ndim) -> Operator:
    """``A`` / ``A_adjoint`` of a physics object on batches, channel axis and precision handled."""
    name = type(physics).__name__
    module = physics if isinstance(physics, torch.nn.Module) else None
    if is_complex is None:
        tensors = [] if module is None else [*module.parameters(), *module.buffers()]
        is_complex = any(t.is_complex() for t in tensors)
    copies: dict = {}

    def matched(like: torch.Tensor):
        """The physics with its floating-point tensors at ``like``'s precision and device."""
        if module is None:
            return physics
        key = (like.device, like.dtype in (torch.float32, torch.complex64))
        if key not in copies:
            # real tensors at the batch's precision, complex ones complex (_matching_dtype)
            def target(t: torch.Tensor) -> torch.dtype:
                numeric = t.is_floating_point() or t.is_complex()
                return _matching_dtype(t, like) if numeric else t.dtype

            tensors = [*module.parameters(), *module.buffers()]
            if all(t.dtype == target(t) and t.device == like.device for t in tensors):
                copies[key] = physics  # already there: no copy
            else:
                copies[key] = copy.deepcopy(module)._apply(
                    lambda t: t.detach().to(like.device, target(t))
                )
        return copies[key]

    def checked(out: Any, inp: torch.Tensor, which: str) -> Any:
        if isinstance(out, torch.Tensor) and (out.is_floating_point() or out.is_complex()):
            single = out.dtype in (torch.float32, torch.complex64)
            if single != (inp.dtype in (torch.float32, torch.complex64)):
                raise TypeError(
                    f"the operator {name}: its {which} returned {out.dtype} for a {inp.dtype} "
                    "input; its tensors are not in the batch's precision (a torch.nn.Module "
                    "physics is cast automatically; convert this one yourself)"
                )
        return out

    def forward(x: torch.Tensor) -> torch.Tensor:
        add_axis = ndim is not None and x.ndim == ndim + 1
        return checked(matched(x).A(x.unsqueeze(1) if add_axis else x), x, "A")

    def adjoint(y: torch.Tensor) -> torch.Tensor:
        out = checked(matched(y).A_adjoint(y), y, "A_adjoint")
        drop_axis = (
            ndim is not None
            and isinstance(out, torch.Tensor)
            and out.ndim == ndim + 2
            and out.shape[1] == 1
        )
        if drop_axis:
            out = out[:, 0]
        return out.real if real_model and out.is_complex() else out

    return Operator(forward, adjoint, ms, ds, bool(is_complex), name)


def _from_pylops_mpi(J: Any) -> bool:
    return any(cls.__module__.split(".")[0] == "pylops_mpi" for cls in type(J).__mro__)


def _is_callable_pair(J: Any) -> bool:
    return isinstance(J, tuple) and len(J) == 2 and all(callable(f) for f in J)


def _check_sizes(shape, ms, ds, name):
    if math.prod(ms) != shape[1] or math.prod(ds) != shape[0]:
        raise ValueError(
            f"J ({name}): model shape {ms} and data shape {ds} do not match the operator's "
            f"shape {tuple(shape)} (n_data, n_model)"
        )


def _following(matrix: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``on(t)``: ``matrix`` on ``t``'s device and precision, cached per device and dtype (a
    complex matrix stays complex, a real one turns complex for complex tensors)."""
    cache: dict = {}

    def on(t: torch.Tensor) -> torch.Tensor:
        target = _operand_dtype(matrix, t)
        key = (t.device, target)
        if key not in cache:
            cache[key] = matrix.to(device=t.device, dtype=target)
        return cache[key]

    return on


def _matrix_operator(A, ms, ds, real_model) -> Operator:
    if A.ndim != 2:
        raise ValueError(f"J: a matrix must be 2-dimensional, got shape {tuple(A.shape)}")
    A_t = to_torch(np.ascontiguousarray(A) if isinstance(A, np.ndarray) else A, name="J")
    ms = ms or (A_t.shape[1],)
    ds = ds or (A_t.shape[0],)
    _check_sizes(tuple(A_t.shape), ms, ds, "matrix")
    on = _following(A_t)

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


# -------------------------------------------------------------------- one operator per sample
class BatchedOperator(Operator):
    r"""An :class:`Operator` that may hold one linear map per sample of a batch.

    With ``batch_size = B``, row ``i`` of every batch goes through its own operator
    :math:`J_i` and only batches of exactly ``B`` samples are accepted (a clear ``ValueError``
    otherwise); with ``batch_size = None`` one map serves every sample. Build one from a list
    with :func:`per_sample` (or :func:`as_operator`), or directly, e.g.
    :class:`invops.physics.TorchMRI` with a stack of masks.

    Parameters
    ----------
    forward, adjoint : callable
        Batched torch functions ``(B, *model_shape) -> (B, *data_shape)`` and back.
    model_shape, data_shape : tuple of int or None
        Shapes of one model and one datum.
    is_complex : bool
        Whether the operator (its data) is complex.
    name : str
        Shown in error messages.
    batch_size : int or None
        Number of per-sample operators, or None for one shared map.
    one_call : bool
        Whether a batch is applied in one call (``False``: one call per sample).
    parts : list of Operator, optional
        The per-sample operators it was built from, if any.

    Notes
    -----
    The per-sample operator is the block-diagonal map
    :math:`\mathrm{diag}(J_1, \dots, J_B)` on the stacked batch, whose adjoint is
    :math:`\mathrm{diag}(J_1^H, \dots, J_B^H)`; reverse and forward mode through
    :func:`apply_operator` and :func:`apply_adjoint` are therefore exact, as for one operator.
    """

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        adjoint: Callable[[torch.Tensor], torch.Tensor],
        model_shape: tuple[int, ...] | None,
        data_shape: tuple[int, ...] | None,
        is_complex: bool,
        name: str,
        batch_size: int | None = None,
        one_call: bool = True,
        parts: Sequence[Operator] | None = None,
    ) -> None:
        super().__init__(forward, adjoint, model_shape, data_shape, is_complex, name)
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"BatchedOperator: batch_size must be >= 1, got {batch_size}")
        self.batch_size = None if batch_size is None else int(batch_size)
        self.one_call = bool(one_call)
        self.parts = None if parts is None else list(parts)

    def __repr__(self) -> str:
        return (
            f"BatchedOperator({self.name}, batch_size={self.batch_size}, "
            f"model_shape={self.model_shape}, data_shape={self.data_shape})"
        )

    def check_batch(self, n: int, name: str = "model") -> None:
        """Raise ``ValueError`` unless a batch of ``n`` samples matches the per-sample operators."""
        if self.batch_size is not None and n != self.batch_size:
            raise ValueError(
                f"{name}: the operator {self.name} holds one operator per sample for a batch of "
                f"{self.batch_size}, got a batch of {n}"
            )

    def check_model(self, x: torch.Tensor, name: str = "model") -> None:
        super().check_model(x, name)
        self.check_batch(x.shape[0], name)

    def check_data(self, d: torch.Tensor, name: str = "data") -> None:
        super().check_data(d, name)
        self.check_batch(d.shape[0], name)


BatchingRule = Callable[[list, list, bool], "BatchedOperator | None"]
_BATCHING_RULES: list[BatchingRule] = []


def register_batching_rule(rule: BatchingRule) -> BatchingRule:
    """Teach :func:`per_sample` to apply a list of operators of some kind in one batched call.

    ``rule(raw, ops, real_model)`` receives the operators as the user gave them (``raw``), their
    :func:`as_operator` adapters (``ops``, already checked to share model and data shapes) and
    the ``real_model`` flag, and returns a :class:`BatchedOperator` with
    ``batch_size = len(raw)`` that applies them all at once, or None if it does not apply.
    Rules registered later are tried first. Usable as a decorator.
    """
    _BATCHING_RULES.insert(0, rule)
    return rule


def per_sample(
    operators: Sequence[Any],
    model_shape: Sequence[int] | None = None,
    data_shape: Sequence[int] | None = None,
    real_model: bool = True,
    *,
    is_complex: bool | None = None,
    ndim: int | None = None,
) -> BatchedOperator:
    r"""One operator per sample: row ``i`` of a batch goes through ``operators[i]``.

    Parameters
    ----------
    operators : list or tuple
        ``B`` operators of any kind :func:`as_operator` accepts, with the same model and data
        shapes (and all real or all complex).
    model_shape, data_shape, real_model, is_complex, ndim
        As in :func:`as_operator`, for every operator.

    Returns
    -------
    BatchedOperator
        With ``batch_size = B``. ``one_call`` tells whether a batch is applied in one call
        (a batching rule knew how to stack these operators: dense matrices,
        ``pylops.medical.MRI2D`` with array or vertical-line masks,
        :class:`invops.physics.MultiCoilMRI2D` and :class:`invops.physics.TorchMRI` out of
        the box) or row by row, one call per sample.

    Notes
    -----
    The result is the block-diagonal operator :math:`\mathrm{diag}(J_1, \dots, J_B)`; applying
    it to a batch gives exactly what applying each :math:`J_i` to its own sample gives.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from invops.operators import per_sample
    >>> op = per_sample([np.eye(3), 2 * np.eye(3)])
    >>> op.batch_size, op.one_call
    (2, True)
    >>> op.apply(torch.ones(2, 3, dtype=torch.float64))
    tensor([[1., 1., 1.],
            [2., 2., 2.]], dtype=torch.float64)
    """
    if not isinstance(operators, (list, tuple)) or _is_callable_pair(operators):
        what = "a callable pair" if _is_callable_pair(operators) else type(operators).__name__
        raise TypeError(f"J: expected a list of per-sample operators, got {what}")
    if len(operators) == 0:
        raise ValueError("J: the list of per-sample operators is empty")
    ops: list[Operator] = []
    for i, J in enumerate(operators):
        if isinstance(J, BatchedOperator) and J.batch_size is not None:
            raise TypeError(
                f"J[{i}]: a per-sample list cannot hold an operator that is itself per-sample "
                f"({J!r})"
            )
        if isinstance(J, (list, tuple)) and not _is_callable_pair(J):
            raise TypeError(
                f"J[{i}]: expected an operator, got a nested {type(J).__name__} (a list J holds "
                "one operator per sample; give a matrix as a numpy array or torch tensor)"
            )
        try:
            ops.append(
                as_operator(
                    J, model_shape, data_shape, real_model, is_complex=is_complex, ndim=ndim
                )
            )
        except (TypeError, ValueError) as err:
            message = str(err).removeprefix("J: ")
            raise type(err)(f"J[{i}]: {message}") from None
    first = ops[0]
    for i, op in enumerate(ops[1:], start=1):
        if (op.model_shape, op.data_shape) != (first.model_shape, first.data_shape):
            raise ValueError(
                f"J: per-sample operators must share their shapes; J[0] ({first.name}) maps "
                f"{first.model_shape} -> {first.data_shape}, J[{i}] ({op.name}) maps "
                f"{op.model_shape} -> {op.data_shape}"
            )
        if op.is_complex != first.is_complex:
            raise ValueError(
                f"J: per-sample operators must be all real or all complex; J[0] ({first.name}) "
                f"is {'complex' if first.is_complex else 'real'}, J[{i}] ({op.name}) is "
                f"{'complex' if op.is_complex else 'real'}"
            )
    for rule in _BATCHING_RULES:
        batched = rule(list(operators), ops, real_model)
        if batched is not None:
            return batched
    return _row_by_row(ops)


def _row_by_row(ops: list[Operator]) -> BatchedOperator:
    """The fallback: one call of each per-sample operator on its own row."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([op._forward(x[i : i + 1]) for i, op in enumerate(ops)])

    def adjoint(y: torch.Tensor) -> torch.Tensor:
        return torch.cat([op._adjoint(y[i : i + 1]) for i, op in enumerate(ops)])

    first = ops[0]
    return BatchedOperator(
        forward,
        adjoint,
        first.model_shape,
        first.data_shape,
        first.is_complex,
        f"per-sample {first.name}",
        batch_size=len(ops),
        one_call=False,
        parts=ops,
    )


@register_batching_rule
def _stack_matrices(raw: list, ops: list, real_model: bool) -> BatchedOperator | None:
    """Dense matrices: one batched matrix product (``torch.bmm``) on the tensors' device."""
    if not all(isinstance(A, (np.ndarray, torch.Tensor)) for A in raw):
        return None
    mats = [to_torch(np.ascontiguousarray(A) if isinstance(A, np.ndarray) else A) for A in raw]
    if any(M.shape != mats[0].shape for M in mats):
        return None  # as_operator checked the image shapes; flat sizes may still differ
    dtype = functools.reduce(torch.promote_types, (M.dtype for M in mats))
    stack = torch.stack([M.to(dtype) for M in mats])
    ms, ds = ops[0].model_shape, ops[0].data_shape
    on = _following(stack)

    def forward(x: torch.Tensor) -> torch.Tensor:
        M = on(x)
        out = torch.bmm(M, x.reshape(x.shape[0], -1, 1).to(M.dtype))
        return out.reshape(x.shape[0], *ds)

    def adjoint(y: torch.Tensor) -> torch.Tensor:
        M = on(y)
        out = torch.bmm(M.mT.conj(), y.reshape(y.shape[0], -1, 1).to(M.dtype))
        if real_model and out.is_complex():
            out = out.real
        return out.reshape(y.shape[0], *ms)

    return BatchedOperator(
        forward,
        adjoint,
        ms,
        ds,
        stack.is_complex(),
        "per-sample matrices",
        batch_size=len(raw),
        parts=ops,
    )
