r"""Coupling laws: how a coupling layer changes one channel group given its conditioner's output.

A coupling splits its input into a fixed group :math:`x_a` and a changed group :math:`x_b` and
computes :math:`y_b = \tau(x_b; h)` with :math:`h = g(x_a, c)` the conditioner's output. The
element-wise bijection :math:`\tau` is the *law*. A law is a small object:

- ``n_params``: how many conditioner output channels it needs per changed channel;
- ``forward(x, h) -> (y, logdet)`` and ``inverse(y, h) -> (x, -logdet)``, with ``logdet`` the
  per-sample log absolute determinant, shape ``(B,)``;
- optionally ``tangent(x, h, dx, dh) -> (y, dy, logdet, dlogdet)``, the forward mode written
  out (the default differentiates ``forward`` with ``torch.func.jvp``), and
  ``tangent_inverse(y, h, dy, dh) -> (x, dx, logdet_inv, dlogdet_inv)``, that of the inverse
  (the default solves the forward tangent, which is diagonal in ``x``). Tangents may be None,
  meaning zero.

``h`` has ``n_params * n`` channels in parameter-major order: channel ``k * n + c`` is parameter
``k`` of changed channel ``c`` (so ``h.unflatten(1, (n_params, n))`` separates them). Laws are
``torch.nn.Module`` objects, so a law may hold learned parameters of its own.

:class:`~invops.Coupling` runs any law with ONE conditioner evaluation in every reverse mode:
it evaluates :math:`h` with a local graph on the fixed group (known from either side), undoes
the law without a graph, and backpropagates through ``forward`` of the recovered input. A law
therefore only needs the two directions of its math in differentiable torch ops.

Examples
--------
A law in ten lines: :math:`y = x + \sinh(h)`, volume preserving.

>>> import torch, invops
>>> class SinhShift(invops.CouplingLaw):
...     n_params = 1
...     def forward(self, x, h):
...         return x + torch.sinh(h), x.new_zeros(x.shape[0])
...     def inverse(self, y, h):
...         return y - torch.sinh(h), y.new_zeros(y.shape[0])
>>> layer = invops.Coupling(4, invops.SubnetFactory(8, ndim=1), law=SinhShift(), ndim=1)
>>> x = torch.randn(2, 4, 6)
>>> bool((layer.inverse(layer(x)[0])[0] - x).abs().max() < 1e-5)
True
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "CouplingLaw",
    "Affine",
    "Additive",
    "Negate",
    "as_law",
    "bounded_scale",
    "coupling_law",
    "per_sample",
]


def per_sample(t: torch.Tensor) -> torch.Tensor:
    """Sum a batch-first tensor over everything but the batch: shape ``(B,)``."""
    return t.flatten(1).sum(1)


def bounded_scale(
    logit: torch.Tensor, low: float, high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Scale :math:`S = l + (h - l)\,\sigma(a + a_0)` in :math:`(l, h)` with :math:`S(0) = 1`.

    Returns ``(S, log S)``. The offset :math:`a_0` puts :math:`S = 1` at :math:`a = 0`, so a
    coupling whose sub-network outputs zeros is the identity.
    """
    offset = math.log((1.0 - low) / (high - 1.0))
    z = logit + offset
    if low == 0.0:
        return high * torch.sigmoid(z), math.log(high) - F.softplus(-z)
    s = low + (high - low) * torch.sigmoid(z)
    return s, torch.log(s)


class CouplingLaw(torch.nn.Module):
    r"""Base class of coupling laws: an element-wise bijection of :math:`x_b` given :math:`h`.

    Subclasses set ``n_params`` and implement :meth:`forward` and :meth:`inverse` with
    differentiable torch ops; :meth:`tangent` is optional. See the module docstring for the
    layout of ``h``.
    """

    n_params: int = 1

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, logdet)``: the law applied to ``x`` with conditioner output ``h``."""
        raise NotImplementedError

    def inverse(self, y: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, logdet_inv)`` with ``logdet_inv = -logdet(x)``."""
        raise NotImplementedError

    def tangent(
        self, x: torch.Tensor, h: torch.Tensor, dx: torch.Tensor | None, dh: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """Forward mode ``(y, dy, logdet, dlogdet)`` for tangents ``dx`` and ``dh`` (None: 0)."""
        dx = torch.zeros_like(x) if dx is None else dx
        dh = torch.zeros_like(h) if dh is None else dh
        primals, tangents = torch.func.jvp(self.forward, (x, h), (dx, dh))[:2]
        return primals[0], tangents[0], primals[1], tangents[1]

    def tangent_inverse(
        self, y: torch.Tensor, h: torch.Tensor, dy: torch.Tensor | None, dh: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        r"""Forward mode of the inverse: ``(x, dx, logdet_inv, dlogdet_inv)`` (None: 0).

        The default uses :meth:`tangent` at :math:`x = \tau^{-1}(y; h)`: the law is
        element-wise, so :math:`dy = \tau'(x)\,dx + \partial_h\tau\,dh` is solved for
        :math:`dx` entry by entry (three calls of :meth:`tangent`).
        """
        x, logdet_inv = self.inverse(y, h)
        _, slope, _, _ = self.tangent(x, h, torch.ones_like(x), None)
        _, shift, _, _ = self.tangent(x, h, None, dh)
        if slope is None:
            raise ValueError(
                f"{type(self).__name__}.tangent returned no tangent for dx = 1: a coupling law "
                "must depend on x"
            )
        dx = torch.zeros_like(y) if dy is None else dy
        dx = (dx if shift is None else dx - shift) / slope  # None: a zero tangent
        _, _, _, dlogdet = self.tangent(x, h, dx, dh)
        return x, dx, logdet_inv, None if dlogdet is None else -dlogdet

    def check(self, h: torch.Tensor, n: int, owner: str) -> None:
        """Raise ``ValueError`` unless ``h`` has ``n_params * n`` channels."""
        expected = self.n_params * n
        if h.ndim < 2 or h.shape[1] != expected:
            got = h.shape[1] if h.ndim >= 2 else tuple(h.shape)
            raise ValueError(
                f"{owner}: the sub-network must return {expected} channels, got {got} "
                f"(the {type(self).__name__} law takes {self.n_params} per changed channel, "
                f"{n} channels change)"
            )


class Affine(CouplingLaw):
    r"""Affine law with a bounded scale: :math:`y = S(a) \odot x + t`, :math:`h = (a, t)`.

    Parameters
    ----------
    low, high : float
        Bounds of the scale, ``0 <= low < 1 < high`` (default ``(0.5, 2)``).

    Notes
    -----
    :math:`S(a) = l + (h - l)\,\sigma(a + a_0)` (:func:`bounded_scale`), equal to 1 at
    :math:`a = 0`; :math:`\log|\det| = \sum \log S`. The inverse is :math:`x = (y - t) / S`.
    Bounding the scale keeps a coupling's Lipschitz constants and its inverse's bounded, which
    is what keeps memory-free gradients of deep float32 stacks accurate.
    """

    n_params = 2

    def __init__(self, low: float = 0.5, high: float = 2.0) -> None:
        super().__init__()
        low, high = float(low), float(high)
        if not 0.0 <= low < 1.0 < high:
            raise ValueError(
                f"Affine: scale bounds must satisfy 0 <= low < 1 < high, got ({low}, {high})"
            )
        self.low, self.high = low, high

    def extra_repr(self) -> str:
        return f"low={self.low}, high={self.high}"

    def _coefficients(self, h: torch.Tensor):
        a, t = h.chunk(2, dim=1)
        s, log_s = bounded_scale(a, self.low, self.high)
        return s, log_s, t

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, log_s, t = self._coefficients(h)
        return s * x + t, per_sample(log_s)

    def inverse(self, y: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, log_s, t = self._coefficients(h)
        return (y - t) / s, -per_sample(log_s)

    def _dlog_scale(self, s: torch.Tensor, da: torch.Tensor) -> torch.Tensor:
        # d log S / da = (S - l)(h - S) / ((h - l) S): the sigmoid's derivative, divided by S
        return (s - self.low) * (self.high - s) / ((self.high - self.low) * s) * da

    def tangent(
        self, x: torch.Tensor, h: torch.Tensor, dx: torch.Tensor | None, dh: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        s, log_s, t = self._coefficients(h)
        y = s * x + t
        if dh is None:
            return y, None if dx is None else s * dx, per_sample(log_s), None
        da, dt = dh.chunk(2, dim=1)
        dlog_s = self._dlog_scale(s, da)
        dlogdet = per_sample(dlog_s)
        inner = dlog_s.mul_(x) if dx is None else dlog_s.mul_(x).add_(dx)
        return y, inner.mul_(s).add_(dt), per_sample(log_s), dlogdet

    def tangent_inverse(
        self, y: torch.Tensor, h: torch.Tensor, dy: torch.Tensor | None, dh: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        s, log_s, t = self._coefficients(h)
        x = (y - t) / s
        if dh is None:
            return x, None if dy is None else dy / s, -per_sample(log_s), None
        da, dt = dh.chunk(2, dim=1)
        dlog_s = self._dlog_scale(s, da)
        # y = S x + T  =>  dx = (dy - dT) / S - x dlog S
        dx = (-dt if dy is None else dy - dt).div_(s).sub_(dlog_s * x)
        return x, dx, -per_sample(log_s), -per_sample(dlog_s)


class Additive(CouplingLaw):
    r"""Additive law :math:`y = x + t`, :math:`h = t` (NICE, RevNet, i-RIM): volume preserving."""

    n_params = 1

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x + h, x.new_zeros(x.shape[0])

    def inverse(self, y: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return y - h, y.new_zeros(y.shape[0])

    def tangent(
        self, x: torch.Tensor, h: torch.Tensor, dx: torch.Tensor | None, dh: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        return x + h, _plus(dx, dh), x.new_zeros(x.shape[0]), None

    def tangent_inverse(
        self, y: torch.Tensor, h: torch.Tensor, dy: torch.Tensor | None, dh: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        return y - h, _minus(dy, dh), y.new_zeros(y.shape[0]), None


class Negate(CouplingLaw):
    r"""Negating law :math:`y = t - x`, :math:`h = t`: the leapfrog step of hyperbolic layers.

    Its Jacobian is :math:`-I` on the changed group, so :math:`\log|\det| = 0`; it is its own
    inverse.
    """

    n_params = 1

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return h - x, x.new_zeros(x.shape[0])

    def inverse(self, y: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return h - y, y.new_zeros(y.shape[0])

    def tangent(
        self, x: torch.Tensor, h: torch.Tensor, dx: torch.Tensor | None, dh: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        return h - x, _minus(dh, dx), x.new_zeros(x.shape[0]), None

    def tangent_inverse(
        self, y: torch.Tensor, h: torch.Tensor, dy: torch.Tensor | None, dh: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        return h - y, _minus(dh, dy), y.new_zeros(y.shape[0]), None


def _plus(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def _minus(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if b is None:
        return a
    return -b if a is None else a - b


_NAMED = {"affine": Affine, "additive": Additive, "negate": Negate}


def as_law(law: str | CouplingLaw, owner: str = "Coupling") -> CouplingLaw:
    """A law from its name (``"affine"``, ``"additive"``, ``"negate"``, ``"spline"``) or itself."""
    if isinstance(law, CouplingLaw):
        return law
    if isinstance(law, str):
        if law == "spline":
            from .spline import Spline

            return Spline()
        if law in _NAMED:
            return _NAMED[law]()
        names = (*_NAMED, "spline")
        raise ValueError(f"{owner}: law must be one of {names} or a CouplingLaw, got {law!r}")
    raise TypeError(f"{owner}: law must be a name or a CouplingLaw, got {type(law).__name__}")


def coupling_law(law: str | CouplingLaw, scale: tuple[float, float], owner: str) -> CouplingLaw:
    """The law of a coupling layer: ``law``, with ``scale`` configuring the affine law by name."""
    if isinstance(law, str) and law == "affine":
        try:
            return Affine(*scale)
        except ValueError as err:
            raise ValueError(f"{owner}: {str(err).removeprefix('Affine: ')}") from None
    if tuple(float(s) for s in scale) != (0.5, 2.0):
        raise ValueError(
            f"{owner}: scale configures the 'affine' law only, got law={law!r} with scale={scale}"
        )
    return as_law(law, owner)
