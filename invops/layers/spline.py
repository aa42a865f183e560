"""Monotone rational-quadratic spline coupling law (Neural Spline Flows)."""

from __future__ import annotations

import math
from typing import Any

import torch

from .coupling import Coupling
from .laws import CouplingLaw
from .subnets import RESIDUAL_CONV, Subnet, subnet_factory

__all__ = ["Spline", "CouplingLayerSpline"]

Tensor = torch.Tensor


class Spline(CouplingLaw):
    r"""Element-wise monotone rational-quadratic spline with identity tails.

    The coupling law of Neural Spline Flows (Durkan, Bekasov, Murray and Papamakarios, 2019):
    every transformed element gets its own spline, parametrised by the conditioner output.

    Parameters
    ----------
    bins : int
        Number of bins :math:`K` (at least 2).
    bound : float
        The spline acts on :math:`[-B, B]`; outside it the law is the identity.
    min_bin_width, min_bin_height : float
        Smallest bin width and height, as fractions of :math:`2B` (``0 <= m`` and
        ``m * bins < 1``).
    min_derivative : float
        Smallest knot derivative, ``0 <= min_derivative < 1``.

    Attributes
    ----------
    n_params : int
        Conditioner output channels per transformed channel, :math:`3K - 1`.

    Notes
    -----
    **Parameters.** For ``x`` of shape ``(B, n, *spatial)`` the conditioner output ``h`` has
    ``n_params * n`` channels in parameter-major order: channel ``k * n + c`` is parameter
    ``k`` of channel ``c`` (``h.view(B, n_params, n, *spatial)``). Parameters ``0..K-1`` are
    the width logits :math:`u^w`, ``K..2K-1`` the height logits :math:`u^h` and
    ``2K..3K-2`` the logits :math:`u^d` of the ``K-1`` interior knot derivatives. With
    :math:`p = \mathrm{softmax}(u^w)` and :math:`m` the minimum width,

    .. math::
        w_k = 2B\,\bigl(m + (1 - mK)\,p_k\bigr), \qquad
        \delta_k = \delta_{\min} + \mathrm{softplus}(u^d_k + c), \qquad
        c = \log\bigl(e^{1 - \delta_{\min}} - 1\bigr),

    and the heights :math:`h_k` likewise. The knots are :math:`x_0 = -B`,
    :math:`x_k = x_0 + \sum_{j<k} w_j`, :math:`x_K = B` (and :math:`y_k` from the heights); the
    boundary derivatives are :math:`\delta_0 = \delta_K = 1`, so value and slope are continuous
    where the identity tails begin. The offset :math:`c` gives :math:`\delta_k = 1` at
    :math:`u^d = 0`, and zero logits give uniform bins with :math:`w_k = h_k`: a conditioner
    whose last layer is zero makes the law the identity, exactly in floating point (the
    formulas below are arranged so that every deviation term vanishes there).

    **Map.** In bin :math:`k`, with :math:`s = h_k / w_k`, :math:`\theta = (x - x_k) / w_k`,
    :math:`\eta = 1 - \theta`, :math:`a = \delta_k - s` and :math:`b = \delta_{k+1} - s`,

    .. math::
        y = y_k + h_k\,\frac{\theta\,(s + a\eta)}{D}, \qquad D = s + (a + b)\,\theta\eta,
        \qquad
        \log\frac{dy}{dx} = \log\bigl(\delta_{k+1}\theta^2 + 2s\theta\eta + \delta_k\eta^2\bigr)
        + 2 \log\frac{s}{D},

    which is the rational-quadratic spline of the paper. In bins close to the identity
    (:math:`|\delta_k - 1| + |\delta_{k+1} - 1| + 2|s - 1| < 1/2`), ``y`` and the first factor
    of the slope are evaluated as :math:`x + (y_k - x_k)` and 1 plus deviation terms that are
    all exactly zero for the identity spline (and small there, so nothing cancels); elsewhere
    the all-positive forms above keep full relative accuracy in flat and steep bins. Both are
    the same function, so derivatives do not depend on the choice. :math:`\delta_k - 1` is
    evaluated as :math:`\log(1 + \sigma(c)(e^{u} - 1))`, equal to
    :math:`\mathrm{softplus}(u + c) - \mathrm{softplus}(c)` and exactly 0 at :math:`u = 0`.

    **Inverse.** :math:`\theta` solves :math:`\alpha\theta^2 + \beta\theta - s\Delta = 0` with
    :math:`\Delta = y - y_k`, :math:`\alpha = \Delta(a + b) - h_k a` and
    :math:`\beta = h_k\delta_k - \Delta(a + b)`; the root in :math:`[0, 1]` is
    :math:`\theta = 2s\Delta / (\beta + \sqrt{\beta^2 + 4\alpha s\Delta})` (the paper's stable
    form) where :math:`\beta \ge 0`, and the algebraically equal
    :math:`(\sqrt{\beta^2 + 4\alpha s\Delta} - \beta) / (2\alpha)` where :math:`\beta < 0`,
    which avoids the cancellation of the first form there. Near the identity, ``x`` is again
    :math:`y + (x_k - y_k)` plus a deviation that vanishes for the identity spline.

    Inputs with :math:`|x| \ge B` (including :math:`\pm B` itself, where both branches agree)
    pass unchanged with log-slope 0. The log-determinant of ``forward`` is the sum of the
    element-wise log-slopes over all non-batch dimensions; ``inverse`` returns its negative.

    Examples
    --------
    >>> import torch
    >>> from invops.layers.spline import Spline
    >>> law = Spline(bins=4, bound=2.0)
    >>> law.n_params
    11
    >>> x = torch.linspace(-3, 3, 13, dtype=torch.float64).reshape(1, 13)
    >>> y, logdet = law.forward(x, torch.zeros(1, law.n_params * 13, dtype=torch.float64))
    >>> torch.equal(y, x), logdet.item()
    (True, 0.0)
    >>> h = 2 * torch.randn(1, law.n_params * 13, dtype=torch.float64)
    >>> y, logdet = law.forward(x, h)
    >>> x_back, logdet_inv = law.inverse(y, h)
    >>> torch.allclose(x_back, x), torch.allclose(logdet_inv, -logdet)
    (True, True)
    """

    def __init__(
        self,
        bins: int = 8,
        bound: float = 3.0,
        min_bin_width: float = 1e-3,
        min_bin_height: float = 1e-3,
        min_derivative: float = 1e-3,
    ) -> None:
        super().__init__()
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
            raise ValueError(f"Spline: bins must be an integer >= 2, got {bins!r}")
        bound = float(bound)
        if not (math.isfinite(bound) and bound > 0):
            raise ValueError(f"Spline: bound must be finite and > 0, got {bound}")
        for name, m in (("min_bin_width", min_bin_width), ("min_bin_height", min_bin_height)):
            if not 0.0 <= float(m) < 1.0 / bins:
                raise ValueError(
                    f"Spline: {name} must satisfy 0 <= {name} < 1 / bins = {1.0 / bins:.4g}, "
                    f"got {m}"
                )
        if not 0.0 <= float(min_derivative) < 1.0:
            raise ValueError(
                f"Spline: min_derivative must satisfy 0 <= min_derivative < 1, got {min_derivative}"
            )
        self.bins = bins
        self.bound = bound
        self.min_bin_width = float(min_bin_width)
        self.min_bin_height = float(min_bin_height)
        self.min_derivative = float(min_derivative)
        self.n_params = 3 * bins - 1
        # softplus(offset) = 1 - min_derivative, so a zero logit gives derivative 1
        self.offset = math.log(math.expm1(1.0 - self.min_derivative))
        self._sigmoid_offset = -math.expm1(self.min_derivative - 1.0)  # sigmoid(offset)
        self._size_scales = (1.0 - self.min_bin_width * bins, 1.0 - self.min_bin_height * bins)

    def extra_repr(self) -> str:
        text = f"bins={self.bins}, bound={self.bound}"
        defaults = {"min_bin_width": 1e-3, "min_bin_height": 1e-3, "min_derivative": 1e-3}
        for name, default in defaults.items():
            if getattr(self, name) != default:
                text += f", {name}={getattr(self, name)}"
        return text

    # ------------------------------------------------------------------ public law interface
    def forward(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """Apply the splines: ``(y, logdet)`` with ``logdet`` of shape ``(B,)``."""
        n = self._check(x, h, "x")
        inside = x.abs() < self.bound
        # outside points are evaluated at 0 and discarded: finite values keep gradients clean
        xs = torch.where(inside, x, 0.0)
        knots, derivatives, _ = self._knots(h, n)
        position = self._locate(knots, xs, row=0)
        values = self._bin_values(knots, derivatives, position, self._edges)
        y_in, log_slope, _ = _rq_forward(xs, *values)
        y = torch.where(inside, y_in, x)
        return y, _per_sample(torch.where(inside, log_slope, 0.0))

    def inverse(self, y: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """Invert the splines: ``(x, logdet_inv)`` with ``logdet_inv = -logdet(x)``."""
        n = self._check(y, h, "y")
        inside = y.abs() < self.bound
        ys = torch.where(inside, y, 0.0)
        knots, derivatives, _ = self._knots(h, n)
        position = self._locate(knots, ys, row=1)
        values = self._bin_values(knots, derivatives, position, self._edges)
        x_in, log_slope = _rq_inverse(ys, *values)
        x = torch.where(inside, x_in, y)
        return x, -_per_sample(torch.where(inside, log_slope, 0.0))

    def tangent(
        self, x: Tensor, h: Tensor, dx: Tensor | None, dh: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Forward map and its directional derivative: ``(y, dy, logdet, dlogdet)``.

        Hand-derived (no dual tensors); ``dx`` or ``dh`` may be None, meaning zero.
        """
        n = self._check(x, h, "x")
        for name, d, ref in (("dx", dx, x), ("dh", dh, h)):
            if d is not None and d.shape != ref.shape:
                raise ValueError(
                    f"Spline: {name} must have the shape of {name[1:]}, {tuple(ref.shape)}, "
                    f"got {tuple(d.shape)}"
                )
        dx = torch.zeros_like(x) if dx is None else dx
        inside = x.abs() < self.bound
        xs = torch.where(inside, x, 0.0)
        knots, derivatives, saved = self._knots(h, n)
        position = self._locate(knots, xs, row=0)
        values = self._bin_values(knots, derivatives, position, self._edges)
        y_in, log_slope, state = _rq_forward(xs, *values)
        if dh is None:
            dy_in, dlog_slope = _rq_tangent_input(dx, values, state)
        else:
            dknots, dderivatives = self._knots_tangent(saved, dh, n)
            dvalues = self._bin_values(dknots, dderivatives, position, (0.0, 0.0, 0.0))
            dy_in, dlog_slope = _rq_tangent(dx, values, dvalues, state)
        y = torch.where(inside, y_in, x)
        dy = torch.where(inside, dy_in, dx)
        logdet = _per_sample(torch.where(inside, log_slope, 0.0))
        dlogdet = _per_sample(torch.where(inside, dlog_slope, 0.0))
        return y, dy, logdet, dlogdet

    # ------------------------------------------------------------------ parametrisation
    def _check(self, x: Tensor, h: Tensor, name: str) -> int:
        if x.ndim < 2:
            raise ValueError(
                f"Spline: {name} must have layout (B, n, *spatial), got shape {tuple(x.shape)}"
            )
        n = x.shape[1]
        expected = (x.shape[0], self.n_params * n, *x.shape[2:])
        if tuple(h.shape) != expected:
            raise ValueError(
                f"Spline: h must have shape {expected} (n_params * n = {self.n_params} * {n} "
                f"= {self.n_params * n} channels for {name} of shape {tuple(x.shape)}), "
                f"got {tuple(h.shape)} ({h.shape[1] if h.ndim > 1 else 'no'} channels)"
            )
        if h.dtype != x.dtype:
            raise TypeError(f"Spline: h must have the dtype of {name}, {x.dtype}, got {h.dtype}")
        return n

    def _split(self, h: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """Width and height logits ``(B, 2, K, n, ...)`` and derivative logits ``(B, K-1, ...)``."""
        k = self.bins
        hv = h.unflatten(1, (self.n_params, n))
        return hv[:, : 2 * k].unflatten(1, (2, k)), hv[:, 2 * k :]

    def _scale_sizes(self, t: Tensor) -> Tensor:
        sw, sh = self._size_scales
        if sw == sh:
            return t * sw
        return t * t.new_tensor(self._size_scales).view(1, 2, *([1] * (t.ndim - 2)))

    def _derivative_excess(self, u: Tensor) -> Tensor:
        """:math:`\\delta - 1 = \\mathrm{softplus}(u + c) - \\mathrm{softplus}(c)`, exactly 0 at 0.

        Evaluated as ``log1p(sigmoid(c) * expm1(u))``, an identity, which is exactly 0 at
        ``u = 0``. Above ``u = 40`` it continues linearly (``expm1`` would overflow in float32),
        which differs from the softplus by :math:`e^{-40 - c} < 10^{-17}`.
        """
        cap = 40.0
        excess = torch.log1p(self._sigmoid_offset * torch.expm1(u.clamp(max=cap)))
        return excess + torch.relu(u - cap)

    def _knots(self, h: Tensor, n: int) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        """Interior knots ``(B, 2, K-1, n, ...)`` (x, then y) and derivatives ``(B, K-1, ...)``.

        Also returns the softmax and the derivative logits, which the tangent reuses.
        """
        size_logits, derivative_logits = self._split(h, n)
        k = self.bins
        p = torch.softmax(size_logits, dim=2)
        # 1/K + scale * (p - 1/K) = m + (1 - mK) p; exactly 1/K for zero logits
        sizes = self._scale_sizes(p[:, :, :-1] - 1.0 / k) + 1.0 / k
        knots = torch.cumsum(sizes, dim=2) * (2.0 * self.bound) - self.bound
        derivatives = 1.0 + self._derivative_excess(derivative_logits)
        return knots, derivatives, (p, derivative_logits)

    def _knots_tangent(
        self, saved: tuple[Tensor, Tensor], dh: Tensor, n: int
    ) -> tuple[Tensor, Tensor]:
        """Directional derivative of :meth:`_knots` along ``dh``."""
        p, derivative_logits = saved
        dsize_logits, dderivative_logits = self._split(dh, n)
        dp = p * (dsize_logits - (p * dsize_logits).sum(dim=2, keepdim=True))
        dknots = torch.cumsum(self._scale_sizes(dp[:, :, :-1]), dim=2) * (2.0 * self.bound)
        dderivatives = torch.sigmoid(derivative_logits + self.offset) * dderivative_logits
        return dknots, dderivatives

    @property
    def _edges(self) -> tuple[float, float, float]:
        """First knot, last knot (both rows) and the derivative at both ends."""
        return (-self.bound, self.bound, 1.0)

    def _locate(self, knots: Tensor, v: Tensor, row: int) -> tuple[Tensor, Tensor, Tensor]:
        """Bin of every element of ``v`` among the knots of ``row`` (0: x, 1: y).

        Returns the interior-knot indices of the bin's left and right ends ``(B, 2, n, ...)``
        (clamped; the ends that are the first or last knot are masked) and those two masks.
        """
        k = (v.unsqueeze(1) >= knots[:, row]).sum(dim=1, keepdim=True)
        ends = torch.cat([(k - 1).clamp(min=0), k.clamp(max=self.bins - 2)], dim=1)
        k = k.squeeze(1)
        return ends, k == 0, k == self.bins - 1

    @staticmethod
    def _bin_values(
        knots: Tensor,
        derivatives: Tensor,
        position: tuple[Tensor, Tensor, Tensor],
        edges: tuple[float, float, float],
    ) -> tuple[Tensor, ...]:
        """``(x_k, x_k+1, y_k, y_k+1, delta_k, delta_k+1)`` per element, edges filled in."""
        ends, first, last = position
        low, high, slope = edges
        at_knots = knots.gather(2, ends.unsqueeze(1).expand(-1, 2, *([-1] * (ends.ndim - 1))))
        at_derivatives = derivatives.gather(1, ends)
        return (
            torch.where(first, low, at_knots[:, 0, 0]),
            torch.where(last, high, at_knots[:, 0, 1]),
            torch.where(first, low, at_knots[:, 1, 0]),
            torch.where(last, high, at_knots[:, 1, 1]),
            torch.where(first, slope, at_derivatives[:, 0]),
            torch.where(last, slope, at_derivatives[:, 1]),
        )


# ---------------------------------------------------------------------- element-wise math
def _per_sample(t: Tensor) -> Tensor:
    return t.flatten(1).sum(1)


def _near_identity(s, dk, dk1):
    """Bins whose slope and knot derivatives are all close to 1.

    There the map is evaluated as the identity plus terms that vanish exactly for the identity
    spline (and, being small, lose nothing to cancellation); elsewhere the usual all-positive
    forms are used. Both are the same function, so gradients are unaffected by the choice.
    """
    return (dk - 1.0).abs() + (dk1 - 1.0).abs() + 2.0 * (s - 1.0).abs() < 0.5


def _log_slope(theta, eta, tt, s, dk, dk1, d, near):
    """:math:`\\log(\\delta_{k+1}\\theta^2 + 2s\\theta\\eta + \\delta_k\\eta^2) + 2\\log(s/D)`."""
    theta2, eta2 = theta * theta, eta * eta
    m_near = 1.0 + ((dk1 - 1.0) * theta2 + 2.0 * (s - 1.0) * tt + (dk - 1.0) * eta2)
    m_far = dk1 * theta2 + 2.0 * s * tt + dk * eta2
    m = torch.where(near, m_near, m_far)
    return torch.log(m) + 2.0 * torch.log(s / d), m


def _rq_forward(x, xk, xk1, yk, yk1, dk, dk1):
    wk = xk1 - xk
    hk = yk1 - yk
    s = hk / wk
    rel = x - xk
    theta = rel / wk
    eta = 1.0 - theta
    a = dk - s
    b = dk1 - s
    tt = theta * eta
    d = s + (a + b) * tt
    near = _near_identity(s, dk, dk1)
    inner = s + a * eta
    ratio = theta * inner / d
    # near the identity: y - y_k - (x - x_k) = (x - x_k) (s (s + a eta) - D) / D
    deviation = s * (s - 1.0) + eta * (a * (s - theta) - b * theta)
    y = torch.where(near, x + (yk - xk) + rel * deviation / d, yk + hk * ratio)
    log_slope, m = _log_slope(theta, eta, tt, s, dk, dk1, d, near)
    return y, log_slope, (wk, hk, s, theta, eta, a, b, tt, d, m, inner, ratio)


def _rq_tangent_input(dx, values, state):
    """Tangent along ``dx`` only (fixed spline parameters)."""
    _, _, _, _, dk, dk1 = values
    wk, _, s, theta, eta, a, b, tt, d, m, _, _ = state
    dtheta = dx / wk
    slope = m * (s / d) ** 2
    dm = 2.0 * (dk1 * theta + s * (eta - theta) - dk * eta) * dtheta
    dd = (a + b) * (eta - theta) * dtheta
    return slope * dx, dm / m - 2.0 * dd / d


def _rq_tangent(dx, values, dvalues, state):
    """Tangent along ``dx`` and the tangents of the bin values."""
    xk, xk1, yk, yk1, dk, dk1 = values
    dxk, dxk1, dyk, dyk1, ddk, ddk1 = dvalues
    wk, hk, s, theta, eta, a, b, tt, d, m, inner, ratio = state
    dwk = dxk1 - dxk
    dhk = dyk1 - dyk
    ds = (dhk - s * dwk) / wk
    dtheta = (dx - dxk - theta * dwk) / wk
    da = ddk - ds
    db = ddk1 - ds
    dtt = (eta - theta) * dtheta
    dd = ds + (da + db) * tt + (a + b) * dtt
    dratio = (dtheta * inner + theta * (ds + da * eta - a * dtheta) - ratio * dd) / d
    dy = dyk + dhk * ratio + hk * dratio
    dm = (
        ddk1 * theta * theta
        + 2.0 * (dk1 * theta - dk * eta) * dtheta
        + 2.0 * (ds * tt + s * dtt)
        + ddk * eta * eta
    )
    return dy, dm / m + 2.0 * (ds / s - dd / d)


def _rq_inverse(y, xk, xk1, yk, yk1, dk, dk1):
    wk = xk1 - xk
    hk = yk1 - yk
    s = hk / wk
    a = dk - s
    b = dk1 - s
    delta = y - yk
    ab = a + b
    beta = hk * dk - delta * ab
    alpha = delta * ab - hk * a
    root = torch.sqrt(beta * beta + 4.0 * s * alpha * delta)
    negative = beta < 0
    # each branch sees safe values where it is not selected, so no inf/nan reaches a gradient
    denom = torch.where(negative, 1.0, beta + root)
    alpha_safe = torch.where(negative, alpha, 1.0)
    theta_pos = 2.0 * s * delta / denom
    theta_neg = (root - beta) / (2.0 * alpha_safe)
    theta = torch.where(negative, theta_neg, theta_pos)
    # near the identity (where beta > 0): x - x_k - (y - y_k) = (y - y_k) (2 h_k - beta - root)
    # / (beta + root)
    near = _near_identity(s, dk, dk1)
    x = torch.where(near, y + (xk - yk) + delta * (2.0 * hk - beta - root) / denom, xk + wk * theta)
    eta = 1.0 - theta
    tt = theta * eta
    d = s + ab * tt
    log_slope, _ = _log_slope(theta, eta, tt, s, dk, dk1, d, near)
    return x, log_slope


class CouplingLayerSpline(Coupling):
    r"""Neural spline flow coupling: the second channel group goes through monotone splines.

    Parameters
    ----------
    n_in : int
        Channels (>= 2, odd counts allowed: the first group has ``ceil(n_in / 2)``).
    n_hidden : int
        Hidden channels (features, for dense data) of the default conditioner.
    bins : int
        Bins of every rational-quadratic spline.
    bound : float
        The splines act on ``[-bound, bound]``; outside, the layer is the identity.
    ndim : int
        Spatial dimensions 1, 2, 3, or 0 for dense ``(B, C)`` data (an MLP conditioner).
    subnet : factory or torch.nn.Module, optional
        Conditioner factory ``(n_in, n_out) -> Block`` (see :mod:`invops.layers.subnets`), or a
        ready module from ``ceil(n_in/2)`` to ``(3 * bins - 1) * floor(n_in/2)`` channels.
    logdet : bool
        Whether to report the log-determinant.
    **subnet_options
        ``k1, k2, p1, p2, s1, s2, activation`` of the default
        :class:`~invops.SubnetFactory` (defaults here ``3, 3, 1, 1, 1, 1``, SiLU).

    Notes
    -----
    :math:`y_1 = x_1`, :math:`y_2 = \tau(x_2; g(x_1))` with :math:`\tau` the
    :class:`Spline` law (Durkan et al. 2019): a monotone rational-quadratic spline per element
    of :math:`x_2`, identity tails outside ``[-bound, bound]``, exact inverse and logdet. The
    conditioner starts at zero, so the layer starts as the identity. Alternate it with a
    channel mixing (:class:`~invops.Conv1x1`, :class:`~invops.Conv1x1LU`), or use
    ``NetworkGlow(..., coupling="spline")``. The reverse pass evaluates the conditioner once
    (see :class:`~invops.Coupling`).

    Examples
    --------
    >>> import torch, invops
    >>> layer = invops.CouplingLayerSpline(3, 16, bins=6, ndim=0)
    >>> x = 4 * torch.randn(5, 3, dtype=torch.float64)   # some entries beyond the bound
    >>> layer = layer.double()
    >>> y, logdet = layer(x)
    >>> bool((layer.inverse(y)[0] - x).abs().max() < 1e-12)
    True
    """

    def __init__(
        self,
        n_in: int,
        n_hidden: int = 32,
        bins: int = 8,
        bound: float = 3.0,
        *,
        ndim: int = 2,
        subnet: Subnet | None = None,
        logdet: bool = True,
        **subnet_options: Any,
    ) -> None:
        owner = type(self).__name__
        if n_in < 2:
            raise ValueError(f"{owner}: n_in must be >= 2, got {n_in}")
        super().__init__(
            n_in,
            subnet_factory(subnet, owner, n_hidden, ndim, RESIDUAL_CONV, subnet_options),
            Spline(bins=bins, bound=bound),
            fixed="first",
            ndim=ndim,
            owner=owner,
            logdet=logdet,
        )
