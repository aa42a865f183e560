"""Conditional HINT network: a flow of x given y, with y's own invertible lane."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..layers._subnets import conv_kwargs, default_subnet
from ..layers.actnorm import ActNorm
from ..layers.conditional import ConditionLane
from ..layers.conv1x1 import Conv1x1
from ..layers.coupling import Coupling
from ..layers.coupling_hint import CouplingLayerHINT
from ..module import Chain, Grads, InvertibleModule, add_grads

__all__ = ["NetworkConditionalHINT"]


class NetworkConditionalHINT(ConditionLane, InvertibleModule):
    r"""Conditional HINT of Kruse et al. for amortised posterior sampling.

    Parameters
    ----------
    n_in : int
        Channels of the unknown :math:`x` (>= 2).
    n_cond : int
        Channels of the observation :math:`y` (>= 2), with :math:`x`'s spatial size.
    n_hidden : int
        Conditioner width.
    depth : int
        Number of steps.
    permute : bool
        Orthogonal 1x1 convolutions before each lane's HINT block.
    ndim : int
        Spatial dimensions 1, 2, 3, or 0 for dense data.
    k1, k2, p1, p2, s1, s2 : int
        Conditioner convolutions.
    activation : callable, optional
        Conditioner nonlinearity (default SiLU).
    logdet : bool
        Whether to report the log-determinant.

    Notes
    -----
    Step :math:`j` updates the condition lane and then the input lane:

    .. math::
        y_{j+1} = H^y_j\big(C^y_j\,\mathrm{AN}^y_j(y_j)\big), \qquad
        x_{j+1} = S_j(y_{j+1}) \odot H^x_j\big(C^x_j\,\mathrm{AN}^x_j(x_j)\big) + T_j(y_{j+1}).

    ``forward(x, y)`` returns :math:`z_x = x_{D+1}` and the logdet of :math:`x \mapsto z_x`
    given :math:`y`; :meth:`forward_y` / :meth:`inverse_y` map :math:`y \leftrightarrow
    z_y = y_{D+1}` with their own logdet. The joint map :math:`(x, y) \mapsto (z_x, z_y)` is
    triangular, so its logdet is the sum: training on pairs minimises
    ``flow_nll(zx, ldx) + flow_nll(zy, ldy)``; posterior samples are ``inverse(z, y_obs)`` with
    :math:`z \sim N(0, I)`.

    The reverse pass walks the steps backwards: each input-lane step is pulled back from its
    output (one conditioner evaluation per coupling), and the condition states
    :math:`y_{j+1}` are recovered by inverting the condition lane step by step, which also
    carries the condition's cotangent back, so memory does not grow with ``depth``. The reverse
    mode of the inverse map (``backward_inverse``) walks forwards and keeps one cotangent of
    :math:`y`'s size per step for the condition lane.

    Examples
    --------
    >>> import torch, invops
    >>> net = invops.NetworkConditionalHINT(2, 3, 8, depth=2, ndim=0)
    >>> x, y = torch.randn(5, 2), torch.randn(5, 3)
    >>> zx, logdet_x = net(x, y)
    >>> zy, logdet_y = net.forward_y(y)
    >>> bool((net.inverse(zx, y)[0] - x).abs().max() < 1e-4)
    True
    """

    n_cond = 1

    def __init__(
        self,
        n_in: int,
        n_cond: int,
        n_hidden: int,
        depth: int,
        permute: bool = True,
        ndim: int = 2,
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
        if n_in < 2 or n_cond < 2:
            raise ValueError(
                f"NetworkConditionalHINT: n_in and n_cond must be >= 2, got {n_in} and {n_cond}"
            )
        if depth < 1:
            raise ValueError(f"NetworkConditionalHINT: depth must be >= 1, got {depth}")
        conv = conv_kwargs(k1, k2, p1, p2, s1, s2)
        hint = dict(n_hidden=n_hidden, ndim=ndim, activation=activation, **conv)

        def lane(c: int) -> list[InvertibleModule]:
            return [ActNorm(c), *([Conv1x1(c)] if permute else []), CouplingLayerHINT(c, **hint)]

        x_steps, y_steps = [], []
        for _ in range(depth):
            y_steps.append(Chain(*lane(n_cond)))
            couple = Coupling(
                n_in,
                default_subnet(n_cond, 2 * n_in, n_hidden, ndim, conv, activation=activation),
                fixed="none",
                kind="affine",
                n_cond=1,
                ndim=ndim,
            )
            x_steps.append(Chain(*lane(n_in), couple))
        self.x_steps = torch.nn.ModuleList(x_steps)
        self.y_steps = torch.nn.ModuleList(y_steps)
        self.y_lane = Chain(*y_steps, logdet=logdet)
        self.n_in, self.n_cond_channels, self.ndim = n_in, n_cond, ndim

    def _validate(self, x, cond, inverse):
        owner = "NetworkConditionalHINT"
        name = "zx" if inverse else "x"
        if x.ndim != self.ndim + 2 or x.shape[1] != self.n_in:
            raise ValueError(
                f"{owner}: {name} must have shape (B, {self.n_in}"
                f"{', *' * self.ndim}) ({self.ndim} spatial dimensions), got {tuple(x.shape)}"
            )
        (y,) = cond
        expected = (x.shape[0], self.n_cond_channels, *x.shape[2:])
        if tuple(y.shape) != expected:
            raise ValueError(
                f"{owner}: cond[0] (the observation y) must have shape {expected}, "
                f"got {tuple(y.shape)}"
            )

    # -- the conditional map x -> z_x given y
    def _forward(self, x, y):
        total = x.new_zeros(x.shape[0])
        for x_step, y_step in zip(self.x_steps, self.y_steps):
            y, _ = y_step._forward(y)
            x, logdet = x_step._forward(x, y)
            total = total + logdet
        return x, total

    def _final_condition(self, y: torch.Tensor) -> torch.Tensor:
        for y_step in self.y_steps:
            y, _ = y_step._forward(y)
        return y

    def _inverse(self, zx, y):
        y_next = self._final_condition(y)
        total = zx.new_zeros(zx.shape[0])
        for x_step, y_step in zip(reversed(self.x_steps), reversed(self.y_steps)):
            zx, logdet = x_step._inverse(zx, y_next)
            total = total + logdet
            y_next, _ = y_step._inverse(y_next)
        return zx, total

    def _pullback(self, zx, cond, dzx, dlogdet):
        (y,) = cond
        y_next = self._final_condition(y)
        dy_next = torch.zeros_like(y_next)
        grads: Grads = {}
        for x_step, y_step in zip(reversed(self.x_steps), reversed(self.y_steps)):
            zx, dzx, (dy_step,), g = x_step._pullback(zx, (y_next,), dzx, dlogdet)
            add_grads(grads, g)
            if dy_step is not None:
                dy_next = dy_next + dy_step
            # the condition lane's logdet is not part of this map's, hence no dlogdet here
            y_next, dy_next, _, g = y_step._pullback(y_next, (), dy_next, None)
            add_grads(grads, g)
        return zx, dzx, (dy_next,), grads

    def _pullback_inverse(self, x, cond, dx, dlogdet):
        (y,) = cond
        grads: Grads = {}
        dys = []
        for x_step, y_step in zip(self.x_steps, self.y_steps):
            y, _ = y_step._forward(y)
            x, dx, (dy_step,), g = x_step._pullback_inverse(x, (y,), dx, dlogdet)
            add_grads(grads, g)
            dys.append(torch.zeros_like(y) if dy_step is None else dy_step)
        dy = torch.zeros_like(y)
        for y_step, dy_step in zip(reversed(self.y_steps), reversed(dys)):
            y, dy, _, g = y_step._pullback(y, (), dy + dy_step, None)
            add_grads(grads, g)
        return x, dx, (dy,), grads
