"""Hyperbolic (leapfrog) layer of Lensink, Peters and Haber."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..module import Block, Chain, InvertibleModule, Parallel
from ..squeeze import HaarSqueeze
from .blocks import _CONV, _CONV_T, _glorot, check_kernel_fits, restoring_padding
from .coupling import Coupling
from .subnets import Subnet, build_subnet

__all__ = ["HyperbolicLayer"]

_ACTIONS = ("squeeze", "none", "unsqueeze")


class _Leapfrog(Block):
    """:math:`c \\mapsto 2c - \\alpha K^T \\sigma(K c + b)`, one kernel for both convolutions."""

    def __init__(self, n_channels, n_hidden, k, s, p, alpha, activation, ndim):
        super().__init__()
        fan = k**ndim
        self.W = _glorot((n_hidden, n_channels, *(k,) * ndim), n_channels * fan, n_hidden * fan)
        self.b = torch.nn.Parameter(torch.zeros(n_hidden))
        self.k, self.s, self.p, self.alpha, self.activation, self.ndim = (
            k,
            s,
            p,
            alpha,
            activation,
            ndim,
        )

    def _forward(self, c):
        check_kernel_fits(c, self.k, self.p, "HyperbolicLayer")
        h = self.activation(_CONV[self.ndim](c, self.W, self.b, stride=self.s, padding=self.p))
        pad = restoring_padding(h, c.shape[2:], self.k, self.p, self.s)
        back = _CONV_T[self.ndim](h, self.W, stride=self.s, padding=self.p, output_padding=pad)
        return 2.0 * c - self.alpha * back


class _LeapfrogAround(Block):
    """:math:`c \\mapsto 2c - F(c)` for a user's residual function :math:`F`."""

    def __init__(self, residual: Block) -> None:
        super().__init__()
        self.residual = residual

    def _forward(self, c):
        return 2.0 * c - self.residual(c)


class _SwapHalves(InvertibleModule):
    """(a, b) -> (b, a) along channels, for two halves of equal size."""

    def _forward(self, x, *cond):
        a, b = x.chunk(2, dim=1)
        return torch.cat((b, a), dim=1), x.new_zeros(x.shape[0])

    _inverse = _forward

    def _pullback(self, y, cond, dy, dlogdet):
        return self._forward(y)[0], self._forward(dy)[0], (), {}

    _pullback_inverse = _pullback


class HyperbolicLayer(Chain):
    r"""One leapfrog step of a hyperbolic network on the state :math:`(x_{prev}, x_{curr})`.

    Parameters
    ----------
    n_in : int
        Channels of each of the two states; the input is ``cat(x_prev, x_curr)`` with
        ``2 * n_in`` channels.
    n_hidden : int
        Channels of the convolution :math:`K`.
    action : {"none", "squeeze", "unsqueeze"}
        Applied to both states first: an orthonormal Haar squeeze (channels x ``2**ndim``,
        spatial size / 2), its inverse, or nothing.
    alpha : float
        Step size :math:`\alpha`.
    k, s, p : int
        Kernel size, stride and padding of :math:`K`.
    activation : callable
        :math:`\sigma` (default ``torch.tanh``).
    ndim : int
        Spatial dimensions 1, 2 or 3.
    subnet : factory, optional
        Replaces :math:`\alpha K^T \sigma(K\,\cdot + b)` by a residual function
        :math:`F` from ``subnet(c, c)`` (``c`` the channels of one state after the action; see
        :mod:`invops.layers.subnets`): :math:`x_{next} = 2x_{curr} - x_{prev} - F(x_{curr})`,
        still exactly invertible with unit determinant.
    logdet : bool
        Whether to report the log-determinant (always 0).

    Notes
    -----
    After the action,

    .. math::
        x_{next} = 2 x_{curr} - x_{prev} - \alpha K^T \sigma(K x_{curr} + b), \qquad
        (x_{prev}, x_{curr}) \mapsto (x_{curr}, x_{next}),

    with :math:`K` a convolution and :math:`K^T` its transpose (the same kernel). The inverse
    is :math:`x_{prev} = 2 x_{curr} - x_{next} - \alpha K^T\sigma(K x_{curr} + b)`. The map has
    unit Jacobian determinant in absolute value, so the logdet is 0 (InvertibleNetworks.jl's
    network reports 1). It is a coupling (:math:`x_{curr}` conditions :math:`x_{prev}`), so the
    reverse pass evaluates :math:`K` once.

    Examples
    --------
    >>> import torch, invops
    >>> layer = invops.HyperbolicLayer(2, 8, action="squeeze")
    >>> y, logdet = layer(torch.randn(3, 4, 8, 8))
    >>> y.shape
    torch.Size([3, 16, 4, 4])
    """

    def __init__(
        self,
        n_in: int,
        n_hidden: int = 16,
        action: str = "none",
        alpha: float = 1.0,
        k: int = 3,
        s: int = 1,
        p: int = 1,
        activation: Callable[[torch.Tensor], torch.Tensor] = torch.tanh,
        ndim: int = 2,
        subnet: Subnet | None = None,
        logdet: bool = True,
    ) -> None:
        if action not in _ACTIONS:
            raise ValueError(f"HyperbolicLayer: action must be one of {_ACTIONS}, got {action!r}")
        if ndim not in (1, 2, 3):
            raise ValueError(f"HyperbolicLayer: ndim must be 1, 2 or 3, got {ndim}")
        if n_in < 1 or n_hidden < 1:
            raise ValueError(
                f"HyperbolicLayer: n_in and n_hidden must be >= 1, got {n_in} and {n_hidden}"
            )
        factor = 2**ndim
        if action == "unsqueeze" and n_in % factor:
            raise ValueError(
                f"HyperbolicLayer: unsqueeze needs n_in divisible by {factor}, got {n_in}"
            )
        n_mid = {"none": n_in, "squeeze": n_in * factor, "unsqueeze": n_in // factor}[action]
        layers: list[InvertibleModule] = []
        if action == "squeeze":
            layers.append(Parallel(HaarSqueeze(), HaarSqueeze(), sizes=(1, 1)))
        elif action == "unsqueeze":
            layers.append(Parallel(HaarSqueeze().reverse(), HaarSqueeze().reverse(), sizes=(1, 1)))
        if subnet is None:
            leapfrog: Block = _Leapfrog(n_mid, n_hidden, k, s, p, alpha, activation, ndim)
        else:
            leapfrog = _LeapfrogAround(build_subnet(subnet, n_mid, n_mid, type(self).__name__))
        layers.append(
            Coupling(
                2 * n_mid,
                leapfrog,
                "negate",
                n_first=n_mid,
                fixed="second",
                ndim=ndim,
                owner=type(self).__name__,
            )
        )
        layers.append(_SwapHalves())
        super().__init__(*layers, logdet=logdet)
        self.n_in, self.n_out, self.action, self.ndim = n_in, n_mid, action, ndim

    def _validate(self, x, cond, inverse):
        n = 2 * (self.n_out if inverse else self.n_in)
        if x.ndim != self.ndim + 2 or x.shape[1] != n:
            raise ValueError(
                f"HyperbolicLayer: {'y' if inverse else 'x'} must have shape "
                f"(B, {n}, {', '.join('*' * self.ndim)}) (two states of "
                f"{n // 2} channels), got {tuple(x.shape)}"
            )
        # every piece after the squeeze keeps the shape, so the squeeze sees the same shape in
        # either direction
        self.layers[0]._validate(x, cond, inverse)
