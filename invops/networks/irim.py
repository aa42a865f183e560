"""Invertible recurrent inference machine (i-RIM): loop unrolling with physics operators."""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .._arrays import array_kind, from_torch
from .._autodiff import add_tangents
from ..jacobian import JacobianOperator
from ..layers.actnorm import ActNorm
from ..layers.coupling import Coupling
from ..layers.coupling_hint import CouplingLayerHINT
from ..layers.coupling_irim import CouplingLayerIRIM
from ..layers.laws import Affine
from ..layers.subnets import (
    IRIM_CONV,
    RESIDUAL_CONV,
    Subnet,
    build_subnet,
    require_factory,
    subnet_factory,
)
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
    link: str | Callable | tuple[Callable, Callable] | list | None,
    n_channels: int | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The link :math:`\\psi` as a differentiable torch function.

    ``None`` or ``"identity"``, ``"exp"``, ``"softplus"``, ``"sigmoid"``, any differentiable
    torch callable, or a pair ``(psi, dpsi)`` of callables with ``dpsi`` the derivative. A
    **list** of such links, one per channel, applies link ``i`` to channel ``i`` (dimension 1)
    of its input; ``n_channels``, if given, is the length the list must have.
    """
    if isinstance(link, list):
        if n_channels is not None and len(link) != n_channels:
            raise ValueError(
                f"link: a list of links needs one per model channel ({n_channels}), got {len(link)}"
            )
        links = [link_function(item) for item in link]
        return lambda x: torch.cat([f(x[:, i : i + 1]) for i, f in enumerate(links)], dim=1)
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


def _bound_operator() -> Operator:
    op = _OPERATOR.get()
    if op is None:
        raise RuntimeError("NetworkLoop: no physics operator is bound (call through NetworkLoop)")
    return op


@contextlib.contextmanager
def _bound(op: Operator) -> Iterator[None]:
    token = _OPERATOR.set(op)
    try:
        yield
    finally:
        _OPERATOR.reset(token)


def _model_of_channels(channels: torch.Tensor, complex_model: bool) -> torch.Tensor:
    """Real channels ``(B, n, *spatial)`` as the operator's model: ``k = n`` real or ``n / 2``
    complex channels, without a channel axis when ``k == 1``."""
    if complex_model:
        k = channels.shape[1] // 2
        channels = torch.complex(channels[:, :k], channels[:, k:])
    return channels[:, 0] if channels.shape[1] == 1 else channels


def _adjoint_channels(
    op: Operator,
    residual: torch.Tensor,
    model_shape: Sequence[int],
    like: torch.Tensor,
    complex_model: bool,
) -> torch.Tensor:
    """``J^H residual`` as real channels shaped like ``like`` ``(B, n_model, *spatial)``."""
    batch, n_model, spatial = like.shape[0], like.shape[1], like.shape[2:]
    grad = apply_adjoint(op, residual, model_shape=model_shape)
    if complex_model:
        if not grad.is_complex():
            raise TypeError(
                f"NetworkLoop: the adjoint of {op.name} returned a real {grad.dtype} array "
                "for a complex model; build the operator with "
                "invops.operators.as_operator(J, real_model=False) (a raw J is adapted so "
                "automatically), or make its adjoint return the complex J^H r"
            )
        grad = grad.reshape(batch, n_model // 2, *spatial)
        grad = torch.cat((grad.real, grad.imag), dim=1)
    else:
        if grad.is_complex():  # a complex operator on a real model: Re J^H r
            grad = grad.real
        grad = grad.reshape(batch, n_model, *spatial)
    return grad.to(like.dtype)


_STARTS = ("zero", "adjoint", "steepest")
_TYPES = ("additive", "hint", "proximal")
# the proximal iteration's gate offset at first: S(-3) = 0.54 in Affine's (0.5, 2) bounds, a
# damped memory; the bounds keep the inverse's amplification <= 2 per iteration, so states
# recomputed by inversion in float32 stay accurate
_GATE_START = -3.0
# the proximal iteration's conditioner: full resolution (its update is the image's own
# correction, not a coarse one) and ReLU, which trained 1.1-3.8 dB better than a smooth
# softplus (beta 10) on benchmarks/unrolled_vs_deepinv.py; its price is float32 memory-free
# gradients within 1e-4..1.5e-3 of plain autograd's (kinks crossed by recomputed states)
_PROXIMAL_CONV = dict(RESIDUAL_CONV, activation=F.relu)


class _InitialEstimate(Block):
    r""":math:`(s, d) \mapsto \eta_0(d)`, the start added to :math:`\eta` (``s`` gives the shape).

    ``"adjoint"``: :math:`w \odot g` with :math:`g = J^H d` (as real channels) and :math:`w` a
    learned scale per physical channel, 1 at first. ``"steepest"``: :math:`w \odot t(d)\, g`
    with :math:`t = \|g\|^2 / \|J g\|^2` per sample, the exact line search from zero along
    the steepest-descent direction of :math:`\tfrac12\|J\eta - d\|^2`. A callable
    ``init(d, A, A_adjoint)`` returns :math:`\eta_0` itself (``A``/``A_adjoint`` apply the
    bound operator, differentiably).
    """

    def __init__(self, rule: str | Callable, n_model: int, complex_model: bool) -> None:
        super().__init__()
        self.rule, self.n_model, self.complex_model = rule, n_model, complex_model
        k = n_model // 2 if complex_model else n_model
        self.weight = torch.nn.Parameter(torch.ones(k)) if isinstance(rule, str) else None

    def extra_repr(self) -> str:
        return f"rule={self.rule if isinstance(self.rule, str) else 'callable'}"

    def _layout(self, s: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """A tensor shaped like the start ``(B, n_model, *spatial)`` and the operator's model
        shape."""
        like = s[:, : self.n_model]
        k = self.n_model // 2 if self.complex_model else self.n_model
        return like, (tuple(like.shape[2:]) if k == 1 else (k, *like.shape[2:]))

    def _scale(self, weight: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        assert weight is not None  # the named starts have a weight
        return _channel_weights(weight, self.complex_model, like)

    def _gradient_and_step(self, op, d, like, model_shape):
        """``g = J^H d`` as channels, and (for ``"steepest"``) ``J g`` and the step ``t``."""
        g = _adjoint_channels(op, d, model_shape, like, self.complex_model)
        if self.rule != "steepest":
            return g, None, None
        q = apply_operator(op, _model_of_channels(g, self.complex_model), data_shape=d.shape[1:])
        # (J g = 0 only if g = 0, since <g, g> = Re<d, J g>: the start is then 0)
        t = _sum_squares(g) / (_sum_squares(q) + torch.finfo(g.dtype).tiny)
        return g, q, t

    def _forward(self, s: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        op = _bound_operator()
        like, model_shape = self._layout(s)
        if not isinstance(self.rule, str):
            start = self.rule(d, *self._maps(op, d, model_shape))
            return self._check_start(start, like)
        g, _, t = self._gradient_and_step(op, d, like, model_shape)
        scaled = self._scale(self.weight, like) * g
        return scaled if t is None else _per_sample(t, g) * scaled

    def _maps(self, op, d, model_shape):
        def forward(m: torch.Tensor) -> torch.Tensor:
            return apply_operator(op, m, data_shape=d.shape[1:])

        def adjoint(r: torch.Tensor) -> torch.Tensor:
            return apply_adjoint(op, r, model_shape=model_shape)

        return forward, adjoint

    def _check_start(self, start: Any, like: torch.Tensor) -> torch.Tensor:
        if not isinstance(start, torch.Tensor) or start.shape != like.shape:
            got = tuple(start.shape) if isinstance(start, torch.Tensor) else type(start).__name__
            raise ValueError(
                f"NetworkLoop: init(d, A, A_adjoint) must return the start as a tensor of shape "
                f"{tuple(like.shape)} (B, n_model, *spatial), got {got}"
            )
        if start.dtype != like.dtype:
            raise TypeError(
                f"NetworkLoop: init(d, A, A_adjoint) returned {start.dtype}, the state is "
                f"{like.dtype}"
            )
        return start

    def _tangent_rule(self, x, cond, dx, dcond, dtheta):
        r"""Linear in :math:`d` but for :math:`t`: with :math:`q = Jg`,
        :math:`dt = 2(\langle g, dg\rangle - t\,\langle q, dq\rangle) / \|q\|^2`."""
        if not isinstance(self.rule, str):  # a user's callable: dual tensors
            return self._tangent_dual(x, cond, dx, dcond, dtheta)
        (d,), (dd,) = cond, dcond
        op = _bound_operator()
        like, model_shape = self._layout(x)
        g, q, t = self._gradient_and_step(op, d, like, model_shape)
        dg = (
            None if dd is None else _adjoint_channels(op, dd, model_shape, like, self.complex_model)
        )
        scale = self._scale(self.weight, like)
        dweight = dtheta.get(self.weight)
        dscale = None if dweight is None else self._scale(dweight, like)
        if t is None:
            y = scale * g
            terms = [] if dg is None else [scale * dg]
        else:
            step = _per_sample(t, g)
            y = step * scale * g
            terms = []
            if dg is not None:
                dq = apply_operator(
                    op, _model_of_channels(dg, self.complex_model), data_shape=d.shape[1:]
                )
                qq = _sum_squares(q) + torch.finfo(g.dtype).tiny
                dt = 2 * (_inner(g, dg) - t * _inner(q, dq)) / qq
                terms += [step * scale * dg, _per_sample(dt, g) * scale * g]
        if dscale is not None:
            terms.append(dscale * g if t is None else _per_sample(t, g) * dscale * g)
        return y, (sum(terms[1:], terms[0]) if terms else None)


def _channel_weights(weight: torch.Tensor, complex_model: bool, like: torch.Tensor) -> torch.Tensor:
    """One weight per physical channel, broadcast over ``like`` ``(B, n_model, *spatial)`` (a
    complex channel's real and imaginary parts share theirs)."""
    per_channel = torch.cat((weight, weight)) if complex_model else weight
    return per_channel.view(1, -1, *(1,) * (like.ndim - 2))


def _is_real(value: Any) -> bool:
    """A real number: Python's or numpy's ints and floats (``numbers.Real``), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _sum_squares(t: torch.Tensor) -> torch.Tensor:
    """``||t_i||^2`` per sample (real tensors, or complex ones by their parts)."""
    t = torch.view_as_real(t) if t.is_complex() else t
    return t.square().flatten(1).sum(1)


def _inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Re <a_i, b_i>`` per sample."""
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    return (a * b).flatten(1).sum(1)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *(1,) * (like.ndim - 1))


class _TiedSubnets:
    """A conditioner factory for tied iterations: the first iteration's calls build the
    conditioners; every later iteration gets the same ones, in the same order."""

    def __init__(self, factory: Subnet) -> None:
        self.factory, self.position = factory, 0
        self.built: list[Any] = []

    def next_iteration(self) -> None:
        self.position = 0

    def __call__(self, n_in: int, n_out: int, **kwargs: Any):
        if self.position == len(self.built):
            ready = isinstance(self.factory, torch.nn.Module)  # one module: shared as it is
            self.built.append(self.factory if ready else self.factory(n_in, n_out, **kwargs))
        self.position += 1
        return self.built[self.position - 1]


class _DataFit(Block):
    """The physical model of a state and the data-fit gradient :math:`g` at it, with tangents.

    ``g`` has ``n_model`` real channels: :math:`\\mathrm{Re}\\,J^H(J\\psi(\\eta) - d)` for a real
    model, :math:`[\\mathrm{Re}, \\mathrm{Im}]\\,J^H(J\\psi(\\eta_c) - d)` for a complex one.
    """

    def __init__(
        self,
        link: Callable,
        ndim: int,
        n_model: int = 1,
        complex_model: bool = False,
        complex_link: str = "parts",
    ) -> None:
        super().__init__()
        self.link, self.ndim = link, ndim
        self.n_model, self.complex_model, self.complex_link = n_model, complex_model, complex_link

    def physical_model(self, eta: torch.Tensor) -> torch.Tensor:
        """The operator's model for a state ``eta`` ``(B, n_model, *spatial)``.

        ``(B, k, *spatial)`` with ``k`` the operator's model channels (``n_model``, or
        ``n_model / 2`` complex ones), or ``(B, *spatial)`` when ``k == 1``.
        """
        if not self.complex_model:
            model = self.link(eta)
        else:
            k = self.n_model // 2
            re, im = eta[:, :k], eta[:, k:]
            if self.complex_link == "parts":
                parts = self.link(eta)
                model = torch.complex(parts[:, :k], parts[:, k:])
            else:  # the link maps the magnitude and keeps the phase
                tiny = torch.finfo(eta.dtype).tiny  # |z| = 0 gives a finite (zero) model
                radius = torch.sqrt(re.square() + im.square() + tiny)
                factor = self.link(radius) / radius
                model = torch.complex(factor * re, factor * im)
        return model[:, 0] if model.shape[1] == 1 else model

    def _operator(self) -> Operator:
        return _bound_operator()

    def _adjoint_channels(
        self, op: Operator, residual: torch.Tensor, model: torch.Tensor, eta: torch.Tensor
    ) -> torch.Tensor:
        """``J^H residual`` as ``n_model`` real channels shaped like ``eta`` (linear in
        ``residual``, so the tangent goes through it too)."""
        return _adjoint_channels(op, residual, model.shape[1:], eta, self.complex_model)

    def _gradient(self, eta: torch.Tensor, d: torch.Tensor) -> tuple:
        """``(op, model, g)``: the bound operator, the physical model and the data-fit gradient."""
        op = self._operator()
        model = self.physical_model(eta)
        # the data and the model fix the shapes J and J^H must return, also for callables
        residual = apply_operator(op, model, data_shape=d.shape[1:], data=d) - d
        return op, model, self._adjoint_channels(op, residual, model, eta)

    def _gradient_tangent(self, eta, d, deta, dd) -> tuple:
        r"""``(op, model, g, dg)``, ``dg`` None for zero tangents. With
        :math:`r = J\psi(\eta) - d`: :math:`dr = J(\psi'(\eta)\,d\eta) - dd`,
        :math:`dg = J^H dr` (one extra pair of operator calls on the tangent)."""
        op, model, grad = self._gradient(eta, d)
        if deta is None and dd is None:
            return op, model, grad, None
        if deta is not None:
            dmodel = self._model_tangent(eta, deta)
            dresidual = apply_operator(op, dmodel, data_shape=d.shape[1:], data=d)
            if dd is not None:
                dresidual = dresidual - dd
        else:
            dresidual = -dd
        return op, model, grad, self._adjoint_channels(op, dresidual, model, eta)

    # -- forward mode, by hand: one extra pair of operator calls on the tangent
    def _link_slope(self, x: torch.Tensor) -> torch.Tensor:
        """``psi'(x)`` element by element (the link is applied element-wise, per channel)."""
        with torch.enable_grad():
            xr = x.detach().requires_grad_()
            (slope,) = torch.autograd.grad(self.link(xr).sum(), xr)
        return slope

    def _model_tangent(self, eta: torch.Tensor, deta: torch.Tensor) -> torch.Tensor:
        """The tangent of :meth:`physical_model` at ``eta`` in the direction ``deta``."""
        if not self.complex_model:
            identity = self.link is _LINKS["identity"]  # no slope to compute
            dmodel = deta if identity else self._link_slope(eta) * deta
        else:
            k = self.n_model // 2
            re, im, dre, dim = eta[:, :k], eta[:, k:], deta[:, :k], deta[:, k:]
            if self.complex_link == "parts":
                parts = self._link_slope(eta) * deta
                dmodel = torch.complex(parts[:, :k], parts[:, k:])
            else:  # factor(r) = psi(r) / r scales (re, im); r the magnitude
                tiny = torch.finfo(eta.dtype).tiny
                radius = torch.sqrt(re.square() + im.square() + tiny)
                dradius = (re * dre + im * dim) / radius
                factor = self.link(radius) / radius
                dfactor = (self._link_slope(radius) - factor) * dradius / radius
                dmodel = torch.complex(dfactor * re + factor * dre, dfactor * im + factor * dim)
        return dmodel[:, 0] if dmodel.shape[1] == 1 else dmodel


class _DataFitGradient(_DataFit):
    """:math:`(\\eta, d) \\mapsto [\\mathrm{AN}(g), 0, ...]`, the injection of the additive and
    HINT iterations (``g`` the data-fit gradient, ``AN`` a per-channel ActNorm)."""

    def __init__(
        self,
        n_memory: int,
        link: Callable,
        ndim: int,
        n_model: int = 1,
        complex_model: bool = False,
        complex_link: str = "parts",
    ) -> None:
        super().__init__(link, ndim, n_model, complex_model, complex_link)
        self.normalize = ActNorm(n_model, logdet=False)
        self.n_memory = n_memory

    def _with_memory(self, normalized: torch.Tensor) -> torch.Tensor:
        zeros = normalized.new_zeros(
            normalized.shape[0], self.n_memory - self.n_model, *normalized.shape[2:]
        )
        return torch.cat((normalized, zeros), dim=1)

    def _forward(self, eta: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        op, model, grad = self._gradient(eta, d)
        self._initialize_normalization(op, d, model, grad)
        normalized, _ = self.normalize._forward(grad)
        return self._with_memory(normalized)

    @torch.no_grad()
    def _initialize_normalization(self, op, d, model, grad) -> None:
        r"""The ActNorm's first-call initialisation, guarded against a vanishing gradient.

        At a data-consistent estimate (a start from :math:`J^H d` when :math:`J J^H = I` on
        the data, as for a Cartesian MRI mask) the first gradient is zero up to rounding, and
        normalising its rounding errors to unit variance would amplify every later gradient by
        up to :math:`10^7`. A channel whose gradient is that small against the data's own scale
        (standard deviation below :math:`\sqrt{\epsilon}` times that of :math:`J^H d`) is
        normalised by the scale of :math:`J^H d` instead (the gradient at a zero model), with no
        shift.
        """
        if self.normalize._ready:
            return
        self.normalize._initialize(grad.detach(), inverse=False)
        reference = ActNorm(self.n_model, logdet=False).to(grad.device, grad.dtype)
        reference._initialize(
            _adjoint_channels(op, d.detach(), model.shape[1:], grad, self.complex_model), False
        )
        std, std_data = (torch.exp(-a.log_scale) for a in (self.normalize, reference))
        vanishing = std < torch.finfo(grad.dtype).eps ** 0.5 * std_data
        if bool(vanishing.any()):
            self.normalize.log_scale.copy_(
                torch.where(vanishing, reference.log_scale, self.normalize.log_scale)
            )
            self.normalize.bias.copy_(
                torch.where(vanishing, torch.zeros_like(std), self.normalize.bias)
            )

    def _tangent_rule(self, x, cond, dx, dcond, dtheta):
        """The gradient's tangent (:meth:`_DataFit._gradient_tangent`), then ActNorm's."""
        (d,), (dd,) = cond, dcond
        op, model, grad, dgrad = self._gradient_tangent(x, d, dx, dd)
        self._initialize_normalization(op, d, model, grad)
        normalized, dnormalized, _, _ = self.normalize._tangent_rule(grad, (), dgrad, (), dtheta)
        out = self._with_memory(normalized)
        return out, None if dnormalized is None else self._with_memory(dnormalized)


class _ProximalStep(_DataFit):
    r"""The velocity's affine coefficients in the proximal iteration:
    :math:`(\eta, d) \mapsto (a + b, \; z - \eta + t)`.

    :math:`z = \eta - \tau \odot g` is a gradient step on the data fit (step :math:`\tau`
    learned per physical channel) and :math:`(a, t) = R(z)` the conditioner's output, read by
    an affine coupling law as log-scale-like gate :math:`a` (with a learned offset :math:`b`,
    negative at first: a damped memory) and shift.
    """

    def __init__(
        self,
        conditioner: Block,
        link: Callable,
        ndim: int,
        n_model: int,
        complex_model: bool,
        complex_link: str,
        step: float,
    ) -> None:
        super().__init__(link, ndim, n_model, complex_model, complex_link)
        self.conditioner = conditioner
        k = n_model // 2 if complex_model else n_model
        self.step = torch.nn.Parameter(torch.full((k,), float(step)))
        self.gate = torch.nn.Parameter(torch.full((n_model,), _GATE_START))

    def _coefficients(self, h: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        if h.ndim < 2 or h.shape[1] != 2 * self.n_model:
            raise ValueError(
                f"NetworkLoop: the proximal iteration's conditioner must return "
                f"2 * n_model = {2 * self.n_model} channels (gate and shift), got "
                f"{tuple(h.shape)}"
            )
        a, t = h.chunk(2, dim=1)
        return torch.cat((a + _channel_weights(self.gate, False, a), t - shift), dim=1)

    def _forward(self, eta: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        _, _, grad = self._gradient(eta, d)
        shift = _channel_weights(self.step, self.complex_model, grad) * grad  # eta - z
        return self._coefficients(self.conditioner(eta - shift), shift)

    def _tangent_rule(self, x, cond, dx, dcond, dtheta):
        r""":math:`dz = d\eta - d\tau\, g - \tau\, dg`, then the conditioner's own tangent."""
        (d,), (dd,) = cond, dcond
        _, _, grad, dgrad = self._gradient_tangent(x, d, dx, dd)
        tau = _channel_weights(self.step, self.complex_model, grad)
        shift = tau * grad
        dtau, dgate = dtheta.get(self.step), dtheta.get(self.gate)
        dshift = add_tangents(
            None if dgrad is None else tau * dgrad,
            None if dtau is None else _channel_weights(dtau, self.complex_model, grad) * grad,
        )
        dz = add_tangents(dx, None if dshift is None else -dshift)
        h, dh = self.conditioner._tangent(x - shift, (), dz, (), dtheta)
        y = self._coefficients(h, shift)
        if dh is None and dshift is None and dgate is None:
            return y, None
        da, dt = (torch.zeros_like(h) if dh is None else dh).chunk(2, dim=1)
        if dgate is not None:
            da = da + _channel_weights(dgate, False, da)
        if dshift is not None:
            dt = dt - dshift
        return y, torch.cat((da, dt), dim=1)


class _Velocity(Block):
    r""":math:`v \mapsto w \odot v`: the proximal iteration's update of :math:`\eta` (``w``
    learned per channel, 1 at first)."""

    def __init__(self, n_model: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(n_model))

    def _forward(self, v: torch.Tensor) -> torch.Tensor:
        return _channel_weights(self.weight, False, v) * v

    def _tangent_rule(self, x, cond, dx, dcond, dtheta):
        weight, dweight = _channel_weights(self.weight, False, x), dtheta.get(self.weight)
        return weight * x, add_tangents(
            None if dx is None else weight * dx,
            None if dweight is None else _channel_weights(dweight, False, x) * x,
        )


class _BoundLoop(InvertibleModule):
    """The unrolled loop with one physics operator bound: an invertible map of ``cat(eta, s)``."""

    n_conditions = 1
    # the operator may hold one map per sample (a list of masks, a batched callable pair), so the
    # opt-in reconstruction check inverts the whole batch, not its first sample alone
    reconstruction_whole_batch = True

    def __init__(self, loop: NetworkLoop, op: Operator) -> None:
        super().__init__(logdet=False)
        self.steps = loop.steps
        self.op = op
        self.n_in, self.ndim = loop.n_in, loop.ndim
        self.n_model, self.complex_model = loop.n_model, loop.complex_model

    def _validate(self, x, cond, inverse):
        if x.ndim != self.ndim + 2:
            raise ValueError(
                f"NetworkLoop: eta and s must be (B, C, {', '.join('*' * self.ndim)}) "
                f"({self.ndim}D models), got a packed state of shape {tuple(x.shape)}"
            )
        (d,) = cond
        n_samples = getattr(self.op, "batch_size", None)
        if n_samples is not None and n_samples != x.shape[0]:
            raise ValueError(
                f"NetworkLoop: J holds {n_samples} per-sample operators ({self.op.name}) but "
                f"the batch has {x.shape[0]} models; give one operator per sample"
            )
        # the operator's model: k = n_model (real) or n_model / 2 (complex) channels, no
        # channel axis when k == 1 (only the shape is checked: a view, no copy). Both checks
        # come before the batch sizes: for a distributed operator they are collective and make
        # the batch sizes agree across ranks, so every rank raises the same error
        k = self.n_model // 2 if self.complex_model else self.n_model
        self.op.check_model(x[:, 0] if k == 1 else x[:, :k], name="eta (as a model for J)")
        self.op.check_data(d, name="d")
        if d.shape[0] != x.shape[0]:
            raise ValueError(
                f"NetworkLoop: d must have the models' batch size {x.shape[0]}, "
                f"got {d.shape[0]} (shape {tuple(d.shape)})"
            )
        if self.complex_model and not d.is_complex():
            raise TypeError(
                f"d: a complex model (complex_model=True) needs complex data, got dtype {d.dtype}"
            )

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

    def _tangent_rule(self, x, cond, dx, dcond, dtheta, inverse=False):
        # the steps' own rules, the data-fit gradient's included, with the operator bound
        with _bound(self.op):
            return self.steps._tangent(x, cond, dx, dcond, dtheta, inverse)


class NetworkLoop(NonlinearOperator):
    r"""Invertible recurrent inference machine of Putzky and Welling ("Invert to learn to invert").

    Parameters
    ----------
    n_in : int
        Channels of the state: the model estimate :math:`\eta` (``n_model`` channels) and the
        memory :math:`s` (``n_in - n_model`` channels); ``n_in >= 2 * n_model``.
    n_hidden : int
        Hidden channels of every coupling's conditioner.
    maxiter : int
        Number of unrolled iterations, each with its own weights.
    link : str, callable, (callable, callable) or list, optional
        Link :math:`\psi` from the state to the physical model, applied channel-wise:
        ``"identity"`` (default), ``"exp"``, ``"softplus"``, ``"sigmoid"``, a differentiable
        torch callable, a pair ``(psi, dpsi)``, or a list of these, one per model channel
        (``n_model`` of them; ``n_model / 2`` with ``complex_link="magnitude"``).
    type : {"additive", "hint", "proximal"}
        Invertible step: :class:`~invops.CouplingLayerIRIM` or
        :class:`~invops.CouplingLayerHINT` (``permute="both"``) after the data-fit gradient is
        injected into the memory (Putzky and Welling's i-RIM), or ``"proximal"``: a gradient
        step on the data fit corrected by a full-resolution conditioner through a damped
        velocity, an invertible proximal gradient iteration with memory (see Notes; needs
        ``n_in == 2 * n_model``). ``"proximal"`` is the recommended choice for inverse
        problems.
    ndim : int
        Spatial dimensions of the model (1, 2 or 3).
    subnet : factory, optional
        Conditioner factory ``(n_in, n_out) -> Block`` (see :mod:`invops.layers.subnets`),
        called once per coupling.
    n_model : int
        Real channels of the model estimate :math:`\eta` (several physical parameters, e.g.
        velocity and density). The operator's model is ``(n_model, *spatial)``, or
        ``(*spatial)`` when ``n_model == 1``.
    complex_model : bool
        The model is complex with ``k = n_model / 2`` channels, carried as ``2k`` real
        channels, real parts first; the operator's model is complex ``(k, *spatial)``, or
        ``(*spatial)`` when ``k == 1`` (e.g. ``pylops.medical.MRI2D``), and the data ``d`` are
        complex.
    complex_link : {"parts", "magnitude"}
        For complex models: the link maps the real and imaginary parts separately
        (``"parts"``, the default), or maps the magnitude and keeps the phase
        (``"magnitude"``: :math:`\psi(|z|)\, z / |z|`, which is continuous at :math:`z = 0`
        only if :math:`\psi(0) = 0`).
    init : {None, "zero", "adjoint", "steepest"} or callable
        Start of the estimate, **added** to the ``eta`` passed in (pass zeros):
        ``None``/``"zero"`` (default, no start); ``"adjoint"``: :math:`w\,J^H d`, with
        :math:`w` a learned scale per physical channel (1 at first); ``"steepest"``:
        :math:`w\,t(d)\,J^H d` with :math:`t = \|J^H d\|^2 / \|J J^H d\|^2` per sample,
        the exact line search from zero along the steepest-descent direction (right for any
        scaling of ``J``; one extra application of ``J``); or a callable
        ``init(d, A, A_adjoint)`` returning the start ``(B, n_model, *spatial)``, where ``A``
        and ``A_adjoint`` apply the bound operator to models and data, differentiably. The
        start is part of the map: its derivative in ``d`` enters every mode.
        ``"steepest"`` is the recommended choice for inverse problems (see Notes).
    tied : bool
        Share one set of conditioner weights between all iterations (a recurrent network of
        ``maxiter`` steps); each iteration keeps its own 1x1 convolution and the ActNorm of its
        data-fit gradient (``type="proximal"``: its own step, gate offset and output weight).
        Gradients of the shared weights are summed over the iterations.
    step_size : float
        ``type="proximal"``: the first value of every iteration's gradient step :math:`\tau`
        (learned, one per physical channel). 1 suits operators of norm at most 1 (a normalised
        blur, an orthonormal Fourier transform); take about :math:`1/\|J\|^2` otherwise.
    **subnet_options
        ``k1, k2, p1, p2, s1, s2, activation`` of the default
        :class:`~invops.SubnetFactory` (defaults of InvertibleNetworks.jl, ``4, 3, 0, 1, 4,
        1``: the first convolution downsamples by 4, so model sizes must be multiples of 4;
        SiLU). For ``type="proximal"`` the defaults are full-resolution 3x3 convolutions
        (``3, 3, 1, 1, 1, 1``) and ReLU.

    Notes
    -----
    With ``init``, a first step adds the start :math:`\eta_0(d)` to :math:`\eta`; it is an
    additive coupling of :math:`\eta` conditioned on :math:`d` alone, so the loop stays
    invertible in :math:`(\eta, s)`. Starting from a data-consistent estimate rather than
    zero lets the iterations refine instead of first rebuilding the image's scale: on the
    deblurring task of ``benchmarks/unrolled_vs_deepinv.py`` it gained 1.5 dB over the zero
    start at the same cost (23.8 against 22.3 dB; see ``BENCHMARKS.md``).

    **Proximal iteration** (``type="proximal"``). The memory :math:`v` has one channel per model
    channel (a velocity, zero at first). Iteration :math:`j` takes a gradient step and
    corrects it:

    .. math::
        z = \eta - \tau_j \odot g_j, \qquad (a, t) = R_j(z), \qquad
        v \leftarrow S(a + b_j) \odot v + (z - \eta) + t, \qquad
        \eta \leftarrow \eta + w_j \odot v,

    with :math:`g_j = \mathrm{Re}\,J^H(J\psi(\eta) - d)` the data-fit gradient below (the
    gradient with respect to the physical model :math:`\psi(\eta)`, as in the additive loop:
    the gradient in :math:`\eta` for the identity link), :math:`R_j` the conditioner (full
    resolution, :math:`2\,n_{model}` output channels), :math:`S` the bounded scale of
    :class:`~invops.layers.laws.Affine` (in :math:`(0.5, 2)`), :math:`\tau_j` learned per
    physical channel (a complex channel's parts share it) and :math:`b_j, w_j` per real channel;
    :math:`\tau_j` starts at ``step_size``, :math:`b_j` at -3 (:math:`S = 0.54`), :math:`w_j`
    at 1. The velocity's update is an affine coupling of :math:`v` conditioned on :math:`\eta`
    and :math:`d`, the estimate's an additive coupling conditioned on :math:`v`, so every
    iteration is invertible; inverting the velocity's update divides by :math:`S \ge 0.5`
    (never by a vanishing gate). Without the memory term :math:`S\,v` (the first iteration,
    where :math:`v = 0`) and with :math:`w_j = 1` the update is
    :math:`\eta \leftarrow z + t(z)`: a gradient step and a learned residual correction,
    deepinv's unrolled PGD with a residual denoiser; later iterations add the learned
    momentum. A fresh loop (conditioners at zero) with the identity link is the heavy-ball
    method with step ``step_size`` and momentum 0.54. The conditioner
    reads the corrected estimate itself at full resolution, which the additive i-RIM cannot do:
    there the estimate is updated from a rotated half of the state through quarter-resolution
    conditioners. On ``benchmarks/unrolled_vs_deepinv.py`` it is the configuration that beats
    deepinv's unrolled PGD at equal parameters and training steps (see ``BENCHMARKS.md``). Its
    default conditioners use ReLU, which trained better than smooth activations there; in
    float32 a few pre-activations recomputed by inversion then fall on the other side of the
    kink, and memory-free gradients agree with plain autograd's to about :math:`10^{-3}`
    (relative) rather than :math:`10^{-6}`; pass ``activation=`` a smooth function if that
    matters.

    **Additive and HINT iterations.** Iteration :math:`j` computes the data-fit gradient and
    injects it into the memory, then applies an invertible step :math:`L_j`:

    .. math::
        g_j = \mathrm{Re}\, J^H\big(J\psi(\eta) - d\big), \qquad
        s \leftarrow s + [\mathrm{AN}_j(g_j), 0, \dots, 0], \qquad
        (\eta, s) \leftarrow L_j(\eta, s).

    :math:`g_j` has ``n_model`` channels and goes into the first ``n_model`` channels of
    :math:`s` (``AN`` is a per-channel ActNorm). For a complex model,
    :math:`\eta_c = \eta_{re} + i\,\eta_{im}` and
    :math:`g_j = [\mathrm{Re}, \mathrm{Im}]\, J^H(J\psi(\eta_c) - d)`, the gradient of
    :math:`\tfrac12\|J\psi(\eta_c) - d\|^2` with respect to the real and imaginary parts;
    nothing else changes, so a complex loop *is* the real loop with ``n_model = 2k`` (the same
    modules and ``state_dict``) and the real-stacked operator
    :math:`[\mathrm{Re}\,J, -\mathrm{Im}\,J; \mathrm{Im}\,J, \mathrm{Re}\,J]`.

    The injection is an additive coupling of :math:`s` conditioned on :math:`\eta` (and
    :math:`d`), so every iteration, and the loop, is invertible in :math:`(\eta, s)` for fixed
    :math:`d` and :math:`J`. The reverse pass walks the iterations backwards, recomputing each
    state by inversion: peak memory does not depend on ``maxiter``. Each iteration's reverse pass
    applies :math:`J` and :math:`J^H` once each to recompute :math:`g_j` and once each to
    backpropagate through it (exactly, including :math:`\psi'`).

    ``J`` is anything :func:`invops.operators.as_operator` accepts, including physics objects
    with ``A`` and ``A_adjoint`` (deepinv's linear physics: their channel axis is added for a
    one-channel model and their float32 buffers are matched to the loop's precision); it is
    bound for the call,
    so a deferred ``loss.backward()`` uses the operator of its own forward call. Complex
    operators (e.g. ``pylops.medical.MRI2D``) take complex data ``d``; for a real model the
    gradient injected is the real part of :math:`J^H r`. ``J`` may also be a list of ``B``
    operators, one per sample (a sampling mask per scan), or a batched operator
    (:class:`invops.operators.BatchedOperator`, e.g. :class:`invops.physics.TorchMRI` with a
    stack of masks): the loop stays one call on one batch, and per-sample operators that can
    be stacked (MRI masks, coil maps, matrices) are applied in one batched call per iteration.

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

    A complex model (one channel, carried as real and imaginary parts) under one MRI mask per
    scan:

    >>> masks = [invops.physics.cartesian_mask((8, 8), 2, rng=i) for i in range(2)]
    >>> J = [pylops.medical.MRI2D((8, 8), mask=m) for m in masks]
    >>> loop = invops.NetworkLoop(4, 4, maxiter=2, n_model=2, complex_model=True).double()
    >>> eta, s = torch.zeros(2, 2, 8, 8, dtype=torch.float64), torch.zeros(2, 2, 8, 8,
    ...                                                                   dtype=torch.float64)
    >>> d = torch.randn(2, 8, 8, dtype=torch.complex128)
    >>> eta_out, s_out = loop(eta, s, d, J)
    >>> eta_out.shape, s_out.shape
    (torch.Size([2, 2, 8, 8]), torch.Size([2, 2, 8, 8]))
    """

    def __init__(
        self,
        n_in: int,
        n_hidden: int,
        maxiter: int,
        link: str | Callable | tuple[Callable, Callable] | list | None = None,
        type: str = "additive",
        ndim: int = 2,
        *,
        subnet: Subnet | None = None,
        n_model: int = 1,
        complex_model: bool = False,
        complex_link: str = "parts",
        init: str | Callable | None = None,
        tied: bool = False,
        step_size: float = 1.0,
        **subnet_options: Any,
    ) -> None:
        super().__init__()
        if isinstance(n_model, bool) or not isinstance(n_model, int) or n_model < 1:
            raise ValueError(f"NetworkLoop: n_model must be an int >= 1, got {n_model!r}")
        if complex_model and n_model % 2:
            raise ValueError(
                "NetworkLoop: a complex model of k channels is carried as 2k real channels, so "
                f"complex_model=True needs an even n_model, got n_model={n_model}"
            )
        if n_in < 2 * n_model:
            raise ValueError(
                f"NetworkLoop: n_in must be >= 2 * n_model = {2 * n_model} (eta has n_model "
                f"channels and the memory at least n_model: the injected data-fit gradient, or "
                f"the proximal iteration's velocity), got n_in={n_in} with n_model={n_model}"
            )
        if maxiter < 1:
            raise ValueError(f"NetworkLoop: maxiter must be >= 1, got {maxiter}")
        if type not in _TYPES:
            raise ValueError(f"NetworkLoop: type must be one of {_TYPES}, got {type!r}")
        if type == "proximal" and n_in != 2 * n_model:
            raise ValueError(
                f"NetworkLoop: type='proximal' carries one velocity channel per model channel, "
                f"so n_in must be 2 * n_model = {2 * n_model}, got n_in={n_in}"
            )
        if not _is_real(step_size):
            raise TypeError(
                f"NetworkLoop: step_size must be a real number, got {step_size.__class__.__name__}"
            )
        if not (math.isfinite(step_size) and step_size > 0):
            raise ValueError(f"NetworkLoop: step_size must be finite and > 0, got {step_size}")
        if step_size != 1.0 and type != "proximal":
            raise ValueError(
                f"NetworkLoop: step_size is the proximal iteration's (type='proximal'), "
                f"got step_size={step_size} with type={type!r}"
            )
        if ndim not in (1, 2, 3):
            raise ValueError(f"NetworkLoop: ndim must be 1, 2 or 3, got {ndim}")
        if complex_link not in ("parts", "magnitude"):
            raise ValueError(
                f"NetworkLoop: complex_link must be 'parts' or 'magnitude', got {complex_link!r}"
            )
        if init is not None and not callable(init) and init not in _STARTS:
            raise ValueError(
                f"NetworkLoop: init must be one of {_STARTS}, a callable init(d, A, A_adjoint) "
                f"or None, got {init!r}"
            )
        if not isinstance(tied, bool):
            raise TypeError(f"NetworkLoop: tied must be a bool, got {tied.__class__.__name__}")
        self.n_in, self.maxiter, self.ndim = n_in, maxiter, ndim
        self.init = "zero" if init is None else init
        self.tied = tied
        # shadows torch.nn.Module.type() (a dtype cast) on instances: kept for compatibility
        self.type = type  # type: ignore[method-assign, assignment]
        self.n_model, self.complex_model = n_model, bool(complex_model)
        self.complex_link = complex_link
        magnitude = self.complex_model and complex_link == "magnitude"
        psi = link_function(link, n_model // 2 if magnitude else n_model)
        conv = _PROXIMAL_CONV if type == "proximal" else IRIM_CONV
        factory = subnet_factory(subnet, "NetworkLoop", n_hidden, ndim, conv, subnet_options)
        if not tied and maxiter > 1:  # one module in every iteration would tie them silently
            require_factory(factory, "NetworkLoop (without tied=True)")
        tied_factory = _TiedSubnets(factory) if tied else None
        steps: list[InvertibleModule] = []
        if self.init != "zero":
            # eta += eta_0(d): an additive coupling of eta conditioned on d alone (s, the fixed
            # group, is not read), so the loop stays invertible and eta_0 is differentiated in d
            start = _InitialEstimate(self.init, n_model, self.complex_model)
            steps.append(
                Coupling(
                    n_in,
                    start,
                    "additive",
                    n_first=n_model,
                    fixed="second",
                    n_conditions=1,
                    ndim=ndim,
                    owner="NetworkLoop",
                )
            )
        for _ in range(maxiter):
            if tied_factory is not None:
                tied_factory.next_iteration()
                factory = tied_factory
            if type == "proximal":
                steps += self._proximal_iteration(factory, psi, step_size)
                continue
            data_fit = _DataFitGradient(
                n_in - n_model, psi, ndim, n_model, self.complex_model, complex_link
            )
            steps.append(
                Coupling(
                    n_in,
                    data_fit,
                    "additive",
                    n_first=n_model,
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

    def _proximal_iteration(self, factory: Subnet, link: Callable, step_size: float) -> list:
        """The velocity's affine coupling on ``z = eta - tau g``, then ``eta += w v``."""
        n_in, n_model, ndim = self.n_in, self.n_model, self.ndim
        conditioner = build_subnet(factory, n_model, 2 * n_model, "NetworkLoop")
        step = _ProximalStep(
            conditioner, link, ndim, n_model, self.complex_model, self.complex_link, step_size
        )
        options: dict[str, Any] = dict(n_first=n_model, ndim=ndim, owner="NetworkLoop")
        return [
            Coupling(n_in, step, Affine(), fixed="first", n_conditions=1, logdet=False, **options),
            Coupling(n_in, _Velocity(n_model), "additive", fixed="second", **options),
        ]

    # ----------------------------------------------------------------- helpers
    def bind(self, J: Any) -> InvertibleModule:
        """The loop with ``J`` bound: an invertible module of ``cat(eta, s)`` with condition ``d``.

        It shares this network's parameters and has the whole operator contract
        (``forward``, ``inverse``, ``backward``, ``vjp``, ``jvp``, ``jacobian``). A raw ``J``
        is adapted with :func:`invops.operators.as_operator` (``real_model=False`` for a
        complex model, so that the adjoint returns the complex :math:`J^H r`).
        """
        return _BoundLoop(self, as_operator(J, real_model=not self.complex_model, ndim=self.ndim))

    def physical_model(self, eta: Any) -> Any:
        r"""The model the operator sees for a state ``eta`` ``(B, n_model, *spatial)``.

        :math:`\psi(\eta)` for a real model; the complex :math:`\psi(\eta_{re}) + i\,
        \psi(\eta_{im})` (or the magnitude link) for a complex one. Shape ``(B, k, *spatial)``,
        or ``(B, *spatial)`` when the operator's model has one channel. Same array kind out.
        """
        kind = array_kind(eta, "eta")
        eta_t = _BoundLoop(self, None)._to_tensor(  # type: ignore[arg-type]  # no operator needed
            eta, "eta"
        )  # dtype/device checks, no copy
        if eta_t.ndim != self.ndim + 2 or eta_t.shape[1] != self.n_model:
            raise ValueError(
                f"NetworkLoop: eta must be (B, {self.n_model}, {', '.join('*' * self.ndim)}), "
                f"got shape {tuple(eta_t.shape)}"
            )
        data_fit = next(m for m in self.steps.modules() if isinstance(m, _DataFit))
        return from_torch(data_fit.physical_model(eta_t), kind)

    def _pack(self, bound: InvertibleModule, eta: Any, s: Any, names=("eta", "s")):
        kind = array_kind(eta, names[0])
        eta_t = bound._to_tensor(eta, names[0])
        s_t = bound._to_tensor(s, names[1])
        n_model, n_memory = self.n_model, self.n_in - self.n_model
        if eta_t.ndim < 2 or eta_t.shape[1] != n_model:
            raise ValueError(
                f"NetworkLoop: {names[0]} must have {n_model} channel"
                f"{'s' if n_model > 1 else ''}, got shape {tuple(eta_t.shape)}"
            )
        if s_t.ndim < 2 or s_t.shape[1] != n_memory or s_t.shape[2:] != eta_t.shape[2:]:
            raise ValueError(
                f"NetworkLoop: {names[1]} must have shape (B, {n_memory}, "
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

    def _unpack(self, x: torch.Tensor, kind: str):
        n = self.n_model
        return from_torch(x[:, :n], kind), from_torch(x[:, n:], kind)

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
        n = self.n_model
        dx = None
        if deta is not None or ds is not None:
            deta_t = torch.zeros_like(x[:, :n]) if deta is None else bound._to_tensor(deta, "deta")
            ds_t = torch.zeros_like(x[:, n:]) if ds is None else bound._to_tensor(ds, "ds")
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
