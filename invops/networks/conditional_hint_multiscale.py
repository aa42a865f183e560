"""Multiscale conditional HINT: both lanes squeezed and split per scale."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..layers._subnets import conv_kwargs, default_subnet
from ..layers.actnorm import ActNorm
from ..layers.conditional import ConditionLane
from ..layers.conv1x1 import Conv1x1
from ..layers.coupling import Coupling
from ..layers.coupling_hint import CouplingLayerHINT
from ..module import Chain, Grads, Identity, InvertibleModule, Parallel, add_grads
from ._multiscale import check_multiscale_input, check_scale_args, squeezer

__all__ = ["NetworkMultiScaleConditionalHINT"]


def _parts(t: torch.Tensor, split: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The channels handed to the next scale and those kept here (none without a split)."""
    keep = (t.shape[1] + 1) // 2 if split else t.shape[1]
    return t[:, :keep], t[:, keep:]


class _Level(InvertibleModule):
    """One scale of the two-lane network: x given y, with the deeper scales nested inside."""

    n_cond = 1

    def __init__(self, x_steps, y_steps, deeper, squeeze, ndim: int, split: bool, logdet: bool):
        super().__init__(logdet=logdet)
        self.split = split
        self.x_steps = torch.nn.ModuleList(x_steps)
        self.y_steps = torch.nn.ModuleList(y_steps)
        self.deeper = deeper
        self.q = squeezer(squeeze) if ndim else None
        self.ndim = ndim

    # orthogonal squeezes: a cotangent goes through them with the same maps
    def _down(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.q is None else self.q._forward(t)[0]

    def _up(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.q is None else self.q._inverse(t)[0]

    def y_chain(self) -> Chain:
        """This scale's condition lane as an invertible module."""
        layers: list[InvertibleModule] = [] if self.q is None else [self.q]
        layers += list(self.y_steps)
        if self.deeper is not None:
            c = self.y_steps[0].layers[0].n_channels
            if self.split:
                keep = (c + 1) // 2
                layers.append(Parallel(self.deeper.y_chain(), Identity(), sizes=(keep, c - keep)))
            else:
                layers.append(self.deeper.y_chain())
        if self.q is not None:
            layers.append(self.q.reverse())
        return Chain(*layers, logdet=self.logdet)

    def _y_end(self, y: torch.Tensor) -> torch.Tensor:
        y = self._down(y)
        for y_step in self.y_steps:
            y, _ = y_step._forward(y)
        return y

    def _forward(self, x, y):
        x, y = self._down(x), self._down(y)
        total = x.new_zeros(x.shape[0])
        for x_step, y_step in zip(self.x_steps, self.y_steps):
            y, _ = y_step._forward(y)
            x, logdet = x_step._forward(x, y)
            total = total + logdet
        if self.deeper is not None:
            (xa, xb), (ya, _) = _parts(x, self.split), _parts(y, self.split)
            xa, logdet = self.deeper._forward(xa, ya)
            x, total = torch.cat((xa, xb), 1), total + logdet
        return self._up(x), total

    def _inverse(self, z, y):
        y = self._y_end(y)
        z = self._down(z)
        total = z.new_zeros(z.shape[0])
        if self.deeper is not None:
            (za, zb), (ya, _) = _parts(z, self.split), _parts(y, self.split)
            za, logdet = self.deeper._inverse(za, ya)
            z, total = torch.cat((za, zb), 1), total + logdet
        for x_step, y_step in zip(reversed(self.x_steps), reversed(self.y_steps)):
            z, logdet = x_step._inverse(z, y)
            total = total + logdet
            y, _ = y_step._inverse(y)
        return self._up(z), total

    def _pullback(self, z, cond, dz, dlogdet):
        y = self._y_end(cond[0])
        z, dz = self._down(z), self._down(dz)
        dy = torch.zeros_like(y)
        grads: Grads = {}
        if self.deeper is not None:
            (za, zb), (dza, dzb), (ya, yb) = (
                _parts(z, self.split),
                _parts(dz, self.split),
                _parts(y, self.split),
            )
            za, dza, (dya,), g = self.deeper._pullback(za, (ya,), dza, dlogdet)
            add_grads(grads, g)
            z, dz = torch.cat((za, zb), 1), torch.cat((dza, dzb), 1)
            dy = torch.cat((dya, torch.zeros_like(yb)), 1)
        for x_step, y_step in zip(reversed(self.x_steps), reversed(self.y_steps)):
            z, dz, (dy_step,), g = x_step._pullback(z, (y,), dz, dlogdet)
            add_grads(grads, g)
            dy = dy if dy_step is None else dy + dy_step
            y, dy, _, g = y_step._pullback(y, (), dy, None)  # the y lane's logdet is not ours
            add_grads(grads, g)
        return self._up(z), self._up(dz), (self._up(dy),), grads

    def _pullback_inverse(self, x, cond, dx, dlogdet):
        y = self._down(cond[0])
        x, dx = self._down(x), self._down(dx)
        grads: Grads = {}
        contributions = []
        for x_step, y_step in zip(self.x_steps, self.y_steps):
            y, _ = y_step._forward(y)
            x, dx, (dy_step,), g = x_step._pullback_inverse(x, (y,), dx, dlogdet)
            add_grads(grads, g)
            contributions.append(torch.zeros_like(y) if dy_step is None else dy_step)
        dy = torch.zeros_like(y)
        if self.deeper is not None:
            (xa, xb), (dxa, dxb), (ya, yb) = (
                _parts(x, self.split),
                _parts(dx, self.split),
                _parts(y, self.split),
            )
            xa, dxa, (dya,), g = self.deeper._pullback_inverse(xa, (ya,), dxa, dlogdet)
            add_grads(grads, g)
            x, dx = torch.cat((xa, xb), 1), torch.cat((dxa, dxb), 1)
            dy = torch.cat((dya, torch.zeros_like(yb)), 1)
        for y_step, dy_step in zip(reversed(self.y_steps), reversed(contributions)):
            y, dy, _, g = y_step._pullback(y, (), dy + dy_step, None)
            add_grads(grads, g)
        return self._up(x), self._up(dx), (self._up(dy),), grads


class NetworkMultiScaleConditionalHINT(ConditionLane, InvertibleModule):
    r"""Multiscale conditional HINT: :math:`x` given :math:`y`, both squeezed and split per scale.

    Parameters
    ----------
    n_in, n_cond : int
        Channels of :math:`x` and of :math:`y` (same spatial size).
    n_hidden, L, K : int
        Conditioner width, scales, steps per scale.
    split_scales : bool
        Factor out half of both lanes' channels after every scale but the last.
    permute : bool
        Orthogonal 1x1 convolutions before each lane's HINT block.
    ndim : int
        Spatial dimensions 1, 2, 3, or 0 for dense data (no squeeze).
    squeeze : {"checkerboard", "patch", "haar"}
        Squeeze per scale, the same for both lanes.
    k1, k2, p1, p2, s1, s2 : int
        Conditioner convolutions.
    activation : callable, optional
        Conditioner nonlinearity (default SiLU).
    logdet : bool
        Whether to report the log-determinant.

    Notes
    -----
    Scale :math:`i` squeezes both lanes, applies :math:`K` steps of
    :class:`~invops.NetworkConditionalHINT` (condition lane first, then the input lane
    conditioned on it), hands the first ``ceil(c/2)`` channels of both lanes to scale
    :math:`i+1` (``split_scales``; all of them otherwise) and unsqueezes, so both latents keep
    their inputs' shapes. ``forward(x, y)`` gives :math:`z_x` and the logdet of
    :math:`x \mapsto z_x` given :math:`y`; :meth:`forward_y` / :meth:`inverse_y` are the
    condition lane, and the joint logdet is the sum. Reverse passes in both directions recover
    the condition lane by inversion; their memory does not grow with depth, except that
    ``backward_inverse`` keeps one cotangent of the condition's size per step of a scale.

    Examples
    --------
    >>> import torch, invops
    >>> net = invops.NetworkMultiScaleConditionalHINT(1, 1, 8, L=2, K=1, split_scales=True)
    >>> x, y = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    >>> zx, logdet = net(x, y)
    >>> zx.shape
    torch.Size([2, 1, 8, 8])
    """

    n_cond = 1

    def __init__(
        self,
        n_in: int,
        n_cond: int,
        n_hidden: int,
        L: int,
        K: int,
        split_scales: bool = False,
        permute: bool = True,
        ndim: int = 2,
        squeeze: str = "checkerboard",
        k1: int = 3,
        k2: int = 3,
        p1: int = 1,
        p2: int = 1,
        s1: int = 1,
        s2: int = 1,
        activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
        logdet: bool = True,
    ) -> None:
        super().__init__(logdet=logdet)
        owner = "NetworkMultiScaleConditionalHINT"
        check_scale_args(owner, L, K, ndim)
        conv = conv_kwargs(k1, k2, p1, p2, s1, s2)
        hint = dict(n_hidden=n_hidden, ndim=ndim, activation=activation, **conv)

        def lane(c: int) -> list[InvertibleModule]:
            return [ActNorm(c), *([Conv1x1(c)] if permute else []), CouplingLayerHINT(c, **hint)]

        def level(cx: int, cy: int, i: int) -> _Level:
            factor = 2**ndim if ndim else 1
            cx, cy = cx * factor, cy * factor
            if min(cx, cy) < 2:
                raise ValueError(
                    f"{owner}: scale {i} would have {cx} and {cy} channels; HINT needs 2 "
                    "(use fewer scales or split_scales=False)"
                )
            x_steps, y_steps = [], []
            for _ in range(K):
                y_steps.append(Chain(*lane(cy)))
                couple = Coupling(
                    cx,
                    default_subnet(cy, 2 * cx, n_hidden, ndim, conv, activation=activation),
                    fixed="none",
                    kind="affine",
                    n_cond=1,
                    ndim=ndim,
                )
                x_steps.append(Chain(*lane(cx), couple))
            deeper = None
            if i + 1 < L:
                if split_scales:
                    deeper = level((cx + 1) // 2, (cy + 1) // 2, i + 1)
                else:
                    deeper = level(cx, cy, i + 1)
            return _Level(x_steps, y_steps, deeper, squeeze, ndim, split_scales, logdet)

        self.top = level(n_in, n_cond, 0)
        self.y_lane = self.top.y_chain()
        self.n_in, self.n_cond_channels, self.L, self.ndim = n_in, n_cond, L, ndim

    def _validate(self, x, cond, inverse):
        owner = "NetworkMultiScaleConditionalHINT"
        check_multiscale_input(x, self.n_in, self.L, self.ndim, owner, "zx" if inverse else "x")
        (y,) = cond
        expected = (x.shape[0], self.n_cond_channels, *x.shape[2:])
        if tuple(y.shape) != expected:
            raise ValueError(
                f"{owner}: cond[0] (the observation y) must have shape {expected}, "
                f"got {tuple(y.shape)}"
            )

    def _forward(self, x, y):
        return self.top._forward(x, y)

    def _inverse(self, z, y):
        return self.top._inverse(z, y)

    def _pullback(self, z, cond, dz, dlogdet):
        return self.top._pullback(z, cond, dz, dlogdet)

    def _pullback_inverse(self, x, cond, dx, dlogdet):
        return self.top._pullback_inverse(x, cond, dx, dlogdet)
