"""Invertible recurrent inference machine (i-RIM): loop unrolling with physics operators."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .._arrays import array_kind, from_torch
from ..jacobian import JacobianOperator
from ..layers.actnorm import ActNorm
from ..layers.coupling import Coupling
from ..layers.coupling_hint import CouplingLayerHINT
from ..layers.coupling_irim import CouplingLayerIRIM
from ..layers.subnets import IRIM_CONV, Subnet, subnet_factory
from ..module import Block, Chain, InvertibleModule
from ..nonlinear import NonlinearOperator
from ..operators import Operator, apply_adjoint, apply_operator, as_operator

__all__ = ["NetworkLoop", "link_function"]

_OPERATOR: contextvars.ContextVar[Operator | None] = contextvars.ContextVar(
    "invops_loop_operator", default=None
)

_LINKS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "exp": torch.exp,
    "softplus": F.softplus,
    "sigmoid": torch.sigmoid,
}


class _UserLink(torch.autograd.Function):
    """A link given as ``(psi, dpsi)``: reverse and forward mode use ``dpsi`` exactly."""

    @staticmethod
    def forward(x, psi, dpsi):
        return psi(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _, dpsi = inputs
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)  # forward mode (jvp, Jacobian) reads x too
        ctx.dpsi = dpsi

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * ctx.dpsi(x), None, None

    @staticmethod
    def jvp(ctx, dx, _psi, _dpsi):
        (x,) = ctx.saved_tensors
        return dx * ctx.dpsi(x)


def link_function(
    link: str | Callable | tuple[Callable, Callable] | None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The link :math:`\\psi` as a differentiable torch function.

    ``None`` or ``"identity"``, ``"exp"``, ``"softplus"``, ``"sigmoid"``, any differentiable
    torch callable, or a pair ``(psi, dpsi)`` of callables with ``dpsi`` the derivative.
    """
    if link is None:
        return _LINKS["identity"]
    if isinstance(link, str):
        if link not in _LINKS:
            raise ValueError(f"link: expected one of {tuple(_LINKS)}, got {link!r}")
        return _LINKS[link]
    if isinstance(link, tuple) and len(link) == 2 and all(callable(f) for f in link):
        psi, dpsi = link
        return lambda x: _UserLink.apply(x, psi, dpsi)
    if callable(link):
        return link
    raise TypeError(f"link: expected a name, a callable or a (psi, dpsi) pair, got {link!r}")


@contextlib.contextmanager
def _bound(op: Operator) -> Iterator[None]:
    token = _OPERATOR.set(op)
    try:
        yield
    finally:
        _OPERATOR.reset(token)


class _DataFitGradient(Block):
    """:math:`(\\eta, d) \\mapsto [\\mathrm{AN}(\\mathrm{Re}\\,J^T(J\\psi(\\eta) - d)), 0, ...]`."""

    def __init__(self, n_memory: int, link: Callable, ndim: int) -> None:
        super().__init__()
        self.normalize = ActNorm(1, logdet=False)
        self.n_memory, self.link, self.ndim = n_memory, link, ndim

    def _forward(self, eta: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        op = _OPERATOR.get()
        if op is None:
            raise RuntimeError(
                "NetworkLoop: no physics operator is bound (call through NetworkLoop)"
            )
        model = self.link(eta[:, 0])
        # the data and the model fix the shapes J and J^T must return, also for callables
        residual = apply_operator(op, model, data_shape=d.shape[1:], data=d) - d
        grad = apply_adjoint(op, residual, model_shape=model.shape[1:])
        grad = grad.reshape(eta.shape[0], 1, *eta.shape[2:]).to(eta.dtype)
        normalized, _ = self.normalize._forward(grad)
        zeros = normalized.new_zeros(eta.shape[0], self.n_memory - 1, *eta.shape[2:])
        return torch.cat((normalized, zeros), dim=1)


class _BoundLoop(InvertibleModule):
    """The unrolled loop with one physics operator bound: an invertible map of ``cat(eta, s)``."""

    n_conditions = 1

    def __init__(self, loop: NetworkLoop, op: Operator) -> None:
        super().__init__(logdet=False)
        self.steps = loop.steps
        self.op = op
        self.n_in, self.ndim = loop.n_in, loop.ndim

    def _validate(self, x, cond, inverse):
        if x.ndim != self.ndim + 2:
            raise ValueError(
                f"NetworkLoop: eta and s must be (B, C, {', '.join('*' * self.ndim)}) "
                f"({self.ndim}D models), got a packed state of shape {tuple(x.shape)}"
            )
        (d,) = cond
        self.op.check_model(x[:, 0], name="eta (as a model for J)")
        if d.shape[0] != x.shape[0]:
            raise ValueError(
                f"NetworkLoop: d must have the models' batch size {x.shape[0]}, "
                f"got {d.shape[0]} (shape {tuple(d.shape)})"
            )
        self.op.check_data(d, name="d")

    def _forward(self, x, *cond):
        with _bound(self.op):
            return self.steps._forward(x, *cond)

    def _inverse(self, y, *cond):
        with _bound(self.op):
            return self.steps._inverse(y, *cond)

    def _pullback(self, y, cond, dy, dlogdet):
        with _bound(self.op):
            return self.steps._pullback(y, cond, dy, dlogdet)

    def _pullback_inverse(self, x, cond, dx, dlogdet):
        with _bound(self.op):
            return self.steps._pullback_inverse(x, cond, dx, dlogdet)

    def _jvp(self, *args, **kwargs):
        with _bound(self.op):
            return super()._jvp(*args, **kwargs)


class NetworkLoop(NonlinearOperator):
    r"""Invertible recurrent inference machine of Putzky and Welling ("Invert to learn to invert").

    Parameters
    ----------
    n_in : int
        Channels of the state: the model estimate :math:`\eta` (1 channel) and the memory
        :math:`s` (``n_in - 1`` channels); ``n_in >= 2``.
    n_hidden : int
        Hidden channels of every coupling's conditioner.
    maxiter : int
        Number of unrolled iterations, each with its own weights.
    link : str, callable or (callable, callable), optional
        Link :math:`\psi` from the state to the physical model: ``"identity"`` (default),
        ``"exp"``, ``"softplus"``, ``"sigmoid"``, a differentiable torch callable, or a pair
        ``(psi, dpsi)``.
    type : {"additive", "hint"}
        Invertible step: :class:`~invops.CouplingLayerIRIM` or
        :class:`~invops.CouplingLayerHINT` (``permute="both"``).
    ndim : int
        Spatial dimensions of the model (1, 2 or 3).
    subnet : factory, optional
        Conditioner factory ``(n_in, n_out) -> Block`` (see :mod:`invops.layers.subnets`),
        called once per coupling.
    **subnet_options
        ``k1, k2, p1, p2, s1, s2, activation`` of the default
        :class:`~invops.SubnetFactory` (defaults of InvertibleNetworks.jl, ``4, 3, 0, 1, 4,
        1``: the first convolution downsamples by 4, so model sizes must be multiples of 4;
        SiLU).

    Notes
    -----
    Iteration :math:`j` computes the data-fit gradient and injects it into the memory, then
    applies an invertible step :math:`L_j`:

    .. math::
        g_j = \mathrm{Re}\, J^H\big(J\psi(\eta) - d\big), \qquad
        s \leftarrow s + [\mathrm{AN}_j(g_j), 0, \dots, 0], \qquad
        (\eta, s) \leftarrow L_j(\eta, s).

    The injection is an additive coupling of :math:`s` conditioned on :math:`\eta` (and
    :math:`d`), so every iteration, and the loop, is invertible in :math:`(\eta, s)` for fixed
    :math:`d` and :math:`J`. The reverse pass walks the iterations backwards, recomputing each
    state by inversion: peak memory does not depend on ``maxiter``. Each iteration's reverse pass
    applies :math:`J` and :math:`J^H` once each to recompute :math:`g_j` and once each to
    backpropagate through it (exactly, including :math:`\psi'`).

    ``J`` is anything :func:`invops.operators.as_operator` accepts; it is bound for the call,
    so a deferred ``loss.backward()`` uses the operator of its own forward call. Complex
    operators (e.g. ``pylops.medical.MRI2D``) take complex data ``d``; the gradient injected is
    the real part of :math:`J^H r`.

    ``jacobian`` returns the Jacobian of the packed map
    :math:`\mathrm{cat}(\eta, s) \mapsto \mathrm{cat}(\eta', s')` (channels: :math:`\eta` first).

    As a :class:`~invops.NonlinearOperator` (in composites, e.g. ``P @ loop``), the loop maps the
    packed state ``x = cat(eta, s)`` with the conditions ``(d, J)``:
    ``loop.apply(x, d, J) == loop.bind(J).apply(x, d)``.

    Examples
    --------
    >>> import numpy as np, pylops, torch, invops
    >>> op = invops.operators.as_operator(pylops.Identity(64), model_shape=(8, 8))
    >>> loop = invops.NetworkLoop(3, 4, maxiter=2).double()
    >>> eta, s = torch.zeros(2, 1, 8, 8, dtype=torch.float64), torch.zeros(2, 2, 8, 8,
    ...                                                                   dtype=torch.float64)
    >>> d = torch.randn(2, 64, dtype=torch.float64)
    >>> eta_out, s_out = loop(eta, s, d, op)
    >>> eta_out.shape
    torch.Size([2, 1, 8, 8])
    """

    def __init__(
        self,
        n_in: int,
        n_hidden: int,
        maxiter: int,
        link: str | Callable | tuple[Callable, Callable] | None = None,
        type: str = "additive",
        ndim: int = 2,
        *,
        subnet: Subnet | None = None,
        **subnet_options: Any,
    ) -> None:
        super().__init__()
        if n_in < 2:
            raise ValueError(f"NetworkLoop: n_in must be >= 2 (eta + memory), got {n_in}")
        if maxiter < 1:
            raise ValueError(f"NetworkLoop: maxiter must be >= 1, got {maxiter}")
        if type not in ("additive", "hint"):
            raise ValueError(f"NetworkLoop: type must be 'additive' or 'hint', got {type!r}")
        if ndim not in (1, 2, 3):
            raise ValueError(f"NetworkLoop: ndim must be 1, 2 or 3, got {ndim}")
        self.n_in, self.maxiter, self.ndim = n_in, maxiter, ndim
        # shadows torch.nn.Module.type() (a dtype cast) on instances: kept for compatibility
        self.type = type  # type: ignore[method-assign, assignment]
        psi = link_function(link)
        factory = subnet_factory(subnet, "NetworkLoop", n_hidden, ndim, IRIM_CONV, subnet_options)
        steps: list[InvertibleModule] = []
        for _ in range(maxiter):
            steps.append(
                Coupling(
                    n_in,
                    _DataFitGradient(n_in - 1, psi, ndim),
                    "additive",
                    n_first=1,
                    fixed="first",
                    n_conditions=1,
                    ndim=ndim,
                    owner="NetworkLoop",
                )
            )
            if type == "additive":
                steps.append(CouplingLayerIRIM(n_in, ndim=ndim, subnet=factory))
            else:
                steps.append(CouplingLayerHINT(n_in, permute="both", ndim=ndim, subnet=factory))
        self.steps = Chain(*steps, logdet=False)

    # ----------------------------------------------------------------- helpers
    def bind(self, J: Any) -> InvertibleModule:
        """The loop with ``J`` bound: an invertible module of ``cat(eta, s)`` with condition ``d``.

        It shares this network's parameters and has the whole operator contract
        (``forward``, ``inverse``, ``backward``, ``vjp``, ``jvp``, ``jacobian``).
        """
        return _BoundLoop(self, as_operator(J))

    def _pack(self, bound: InvertibleModule, eta: Any, s: Any, names=("eta", "s")):
        kind = array_kind(eta, names[0])
        eta_t = bound._to_tensor(eta, names[0])
        s_t = bound._to_tensor(s, names[1])
        if eta_t.ndim < 2 or eta_t.shape[1] != 1:
            raise ValueError(
                f"NetworkLoop: {names[0]} must have 1 channel, got shape {tuple(eta_t.shape)}"
            )
        if s_t.ndim < 2 or s_t.shape[1] != self.n_in - 1 or s_t.shape[2:] != eta_t.shape[2:]:
            raise ValueError(
                f"NetworkLoop: {names[1]} must have shape (B, {self.n_in - 1}, "
                f"{', '.join(map(str, eta_t.shape[2:]))}), got {tuple(s_t.shape)}"
            )
        if s_t.shape[0] != eta_t.shape[0]:
            raise ValueError(
                f"NetworkLoop: {names[0]} and {names[1]} must have the same batch size, "
                f"got {eta_t.shape[0]} and {s_t.shape[0]}"
            )
        if eta_t.shape[0] == 0:
            raise ValueError(
                f"NetworkLoop: {names[0]} is an empty batch (shape {tuple(eta_t.shape)}); "
                "expected at least one sample"
            )
        return kind, torch.cat((eta_t, s_t), dim=1)

    @staticmethod
    def _unpack(x: torch.Tensor, kind: str):
        return from_torch(x[:, :1], kind), from_torch(x[:, 1:], kind)

    # ----------------------------------------------------------------- public API
    def forward(self, eta: Any, s: Any, d: Any, J: Any):
        """Run the loop: ``eta, s`` after ``maxiter`` iterations."""
        bound = self.bind(J)
        kind, x = self._pack(bound, eta, s)
        return self._unpack(bound.forward(x, d), kind)

    def inverse(self, eta: Any, s: Any, d: Any, J: Any):
        """Run the loop backwards: the ``eta, s`` that ``forward`` maps to the given state."""
        bound = self.bind(J)
        kind, y = self._pack(bound, eta, s)
        return self._unpack(bound.inverse(y, d), kind)

    def backward(self, deta: Any, ds: Any, eta: Any, s: Any, d: Any, J: Any):
        """Reverse mode from the output state; accumulates ``p.grad`` (locally: see
        :func:`invops.distributed.all_reduce_gradients` for data-parallel training).

        Returns ``deta_in, ds_in, eta_in, s_in, dd``: the cotangents of the input state, the
        input state recomputed by inversion, and the cotangent of the data.
        """
        bound = self.bind(J)
        kind, y = self._pack(bound, eta, s)
        _, dy = self._pack(bound, deta, ds, names=("deta", "ds"))
        dx, x, dd = bound.backward(dy, y, d)
        return (*self._unpack(dx, kind), *self._unpack(x, kind), from_torch(dd, kind))

    def vjp(self, deta: Any, ds: Any, eta: Any, s: Any, d: Any, J: Any):
        """Like :meth:`backward` without touching ``p.grad``.

        Returns ``deta_in, ds_in, dtheta, eta_in, s_in, dd`` with ``dtheta`` ordered as
        ``parameters()``.
        """
        bound = self.bind(J)
        kind, y = self._pack(bound, eta, s)
        _, dy = self._pack(bound, deta, ds, names=("deta", "ds"))
        dx, dtheta, x, dd = bound.vjp(dy, y, d)
        dtheta = tuple(from_torch(g, kind) for g in dtheta)
        return (*self._unpack(dx, kind), dtheta, *self._unpack(x, kind), from_torch(dd, kind))

    def jvp(
        self,
        eta: Any,
        s: Any,
        d: Any,
        J: Any,
        deta: Any = None,
        ds: Any = None,
        dtheta: Sequence | None = None,
        dd: Any = None,
    ):
        """Forward mode: ``eta_out, s_out, deta_out, ds_out``."""
        bound = self.bind(J)
        kind, x = self._pack(bound, eta, s)
        dx = None
        if deta is not None or ds is not None:
            deta_t = torch.zeros_like(x[:, :1]) if deta is None else bound._to_tensor(deta, "deta")
            ds_t = torch.zeros_like(x[:, 1:]) if ds is None else bound._to_tensor(ds, "ds")
            _, dx = self._pack(bound, deta_t, ds_t, names=("deta", "ds"))
        y, dy = bound.jvp(x, d, dx=dx, dtheta=dtheta, dcond=None if dd is None else (dd,))
        return (*self._unpack(y, kind), *self._unpack(dy, kind))

    def jacobian(self, eta: Any, s: Any, d: Any, J: Any, wrt: str = "input") -> JacobianOperator:
        """Jacobian of ``cat(eta, s) -> cat(eta', s')`` at the given state, as a pylops operator."""
        bound = self.bind(J)
        _, x = self._pack(bound, eta, s)
        return bound.jacobian(x, d, wrt=wrt)

    # ----------------------------------------------------------------- as a NonlinearOperator
    # the packed state cat(eta, s) with the conditions (d, J), through the bound loop
    n_conditions = 2

    def _bound(self, cond: tuple) -> tuple[InvertibleModule, tuple]:
        d, J = cond
        return self.bind(J), (d,)

    def _apply_t(self, x, cond):
        bound, c = self._bound(cond)
        return bound._apply_t(x, c)

    def _jvp_t(self, x, cond, dx, dtheta):
        bound, c = self._bound(cond)
        return bound._jvp_t(x, c, dx, dtheta)

    def _vjp_t(self, dy, x, cond):
        bound, c = self._bound(cond)
        dx, dcond, grads = bound._vjp_t(dy, x, c)
        return dx, (*dcond, None), grads

    def _linearize(self, x, cond, wrt):
        bound, c = self._bound(cond)
        return bound._linearize(x, c, wrt)
