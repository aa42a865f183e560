"""Conditional HINT networks: a flow of x given y, with y's own invertible lane."""

from __future__ import annotations

from typing import Any

import torch

from .._autodiff import Grads, add_grads, add_tangents
from ..layers.actnorm import ActNorm
from ..layers.conditional import ConditionLane
from ..layers.conv1x1 import Conv1x1
from ..layers.coupling import Coupling
from ..layers.coupling_hint import CouplingLayerHINT
from ..layers.laws import CouplingLaw, coupling_law
from ..layers.subnets import RESIDUAL_CONV, Subnet, require_factory, subnet_factory
from ..module import Chain, InvertibleModule
from ._multiscale import (
    ScaleSkeleton,
    build_scales,
    check_scale_args,
    lane_level,
    sample_conditional,
    squeezer,
)

__all__ = ["NetworkConditionalHINT", "TwoLane", "TwoLaneNetwork", "conditional_hint_steps"]


def conditional_hint_steps(
    cx: int,
    cy: int,
    count: int,
    ndim: int,
    subnet: Subnet,
    law: str | CouplingLaw,
    permute: bool,
    owner: str,
) -> tuple[list[InvertibleModule], list[InvertibleModule]]:
    """``count`` conditional HINT steps: input-lane chains (ending in a coupling conditioned on
    the condition lane) and condition-lane chains, on ``cx`` and ``cy`` channels."""
    hint: dict[str, Any] = dict(ndim=ndim, law=law, subnet=subnet)

    def lane(c: int) -> list[InvertibleModule]:
        return [ActNorm(c), *([Conv1x1(c)] if permute else []), CouplingLayerHINT(c, **hint)]

    x_steps: list[InvertibleModule] = []
    y_steps: list[InvertibleModule] = []
    for _ in range(count):
        y_steps.append(Chain(*lane(cy)))
        couple = Coupling(
            cx,
            subnet,
            coupling_law(law, (0.5, 2.0), owner),
            fixed="none",
            n_conditions=1,
            condition_channels=cy,
            ndim=ndim,
            owner=owner,
        )
        x_steps.append(Chain(*lane(cx), couple))
    return x_steps, y_steps


def _parts(t: torch.Tensor, split: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The channels handed to the next scale and those kept here (none without a split)."""
    keep = (t.shape[1] + 1) // 2 if split else t.shape[1]
    return t[:, :keep], t[:, keep:]


class TwoLane(InvertibleModule):
    """Steps on two lanes, x given y, optionally squeezed and with a deeper scale nested inside.

    Each step updates the condition lane, then the input lane conditioned on it. The reverse
    passes recover the condition lane by inversion; see :class:`NetworkConditionalHINT`.
    """

    n_conditions = 1

    def __init__(self, x_steps, y_steps, deeper=None, squeeze=None, split=False, logdet=True):
        super().__init__(logdet=logdet)
        self.split = split
        self.x_steps = torch.nn.ModuleList(x_steps)
        self.y_steps = torch.nn.ModuleList(y_steps)
        self.deeper = deeper
        self.squeeze = squeeze
        self.q = None if squeeze is None else squeezer(squeeze)

    # orthogonal squeezes: a cotangent goes through them with the same maps
    def _down(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.q is None else self.q._forward(t)[0]

    def _up(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.q is None else self.q._inverse(t)[0]

    def y_chain(self) -> Chain:
        """This scale's condition lane as an invertible module."""
        deeper = None if self.deeper is None else self.deeper.y_chain()
        channels = self.y_steps[0].layers[0].n_channels
        return lane_level(
            list(self.y_steps), deeper, channels, self.squeeze, self.split, self.logdet
        )

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

    # -- forward mode, by hand: the walks of _forward and _inverse with tangents
    def _down_tangent(self, t):
        return None if t is None else self._down(t)

    def _up_tangent(self, t):
        return None if t is None else self._up(t)

    @staticmethod
    def _parts_tangent(t, split):
        return (None, None) if t is None else _parts(t, split)

    def _deeper_tangent(self, x, y, dx, dy, dtheta, inverse):
        (xa, xb), (ya, _) = _parts(x, self.split), _parts(y, self.split)
        dxa, dxb = self._parts_tangent(dx, self.split)
        dya, _ = self._parts_tangent(dy, self.split)
        xa, dxa, logdet, dlogdet = self.deeper._tangent(xa, (ya,), dxa, (dya,), dtheta, inverse)
        if dxa is None and dxb is None:
            dx = None
        else:
            dxa = torch.zeros_like(xa) if dxa is None else dxa
            dxb = torch.zeros_like(xb) if dxb is None else dxb
            dx = torch.cat((dxa, dxb), 1)
        return torch.cat((xa, xb), 1), dx, logdet, dlogdet

    def _tangent_rule(self, x, cond, dx, dcond, dtheta, inverse=False):
        (y,), (dy,) = cond, dcond
        x, dx = self._down(x), self._down_tangent(dx)
        y, dy = self._down(y), self._down_tangent(dy)
        total, dtotal = x.new_zeros(x.shape[0]), None
        if not inverse:
            for x_step, y_step in zip(self.x_steps, self.y_steps):
                y, dy, _, _ = y_step._tangent(y, (), dy, (), dtheta)
                x, dx, logdet, dlogdet = x_step._tangent(x, (y,), dx, (dy,), dtheta)
                total, dtotal = total + logdet, add_tangents(dtotal, dlogdet)
            if self.deeper is not None:
                x, dx, logdet, dlogdet = self._deeper_tangent(x, y, dx, dy, dtheta, False)
                total, dtotal = total + logdet, add_tangents(dtotal, dlogdet)
            return self._up(x), self._up_tangent(dx), total, dtotal
        for y_step in self.y_steps:  # the condition lane to its end, as in _inverse
            y, dy, _, _ = y_step._tangent(y, (), dy, (), dtheta)
        if self.deeper is not None:
            x, dx, logdet, dlogdet = self._deeper_tangent(x, y, dx, dy, dtheta, True)
            total, dtotal = total + logdet, add_tangents(dtotal, dlogdet)
        for x_step, y_step in zip(reversed(self.x_steps), reversed(self.y_steps)):
            x, dx, logdet, dlogdet = x_step._tangent(x, (y,), dx, (dy,), dtheta, True)
            total, dtotal = total + logdet, add_tangents(dtotal, dlogdet)
            y, dy, _, _ = y_step._tangent(y, (), dy, (), dtheta, True)
        return self._up(x), self._up_tangent(dx), total, dtotal

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


class TwoLaneNetwork(ScaleSkeleton, ConditionLane, InvertibleModule):
    """A conditional HINT network: a :class:`TwoLane` tree ``self.top`` and its condition lane.

    Built by the multiscale skeleton on the two lanes ``(x, y)``: ``L`` scales of ``K`` steps,
    both lanes squeezed (``squeeze``, none for dense data) and split alike.
    """

    top: TwoLane
    n_conditions = 1
    _names = {False: "x", True: "zx"}

    def __init__(
        self,
        n_in: int,
        n_cond: int,
        n_hidden: int,
        L: int,
        K: int,
        *,
        split_scales: bool,
        permute: bool,
        ndim: int,
        squeeze: str | None,
        law: str | CouplingLaw,
        subnet: Subnet | None,
        subnet_options: dict[str, Any],
        logdet: bool,
    ) -> None:
        super().__init__(logdet=logdet)
        owner = type(self).__name__
        check_scale_args(owner, L, K, ndim)
        factory = require_factory(
            subnet_factory(subnet, owner, n_hidden, ndim, RESIDUAL_CONV, subnet_options), owner
        )
        squeeze = squeeze if ndim > 0 else None
        self.top = build_scales(  # type: ignore[assignment]  # assemble builds a TwoLane
            (n_in, n_cond),
            L,
            ndim,
            squeeze,
            split_scales,
            steps=lambda chs, i: conditional_hint_steps(
                chs[0], chs[1], K, ndim, factory, law, permute, owner
            ),
            assemble=lambda made, deeper, chs: TwoLane(
                made[0], made[1], deeper, squeeze, split_scales, logdet
            ),
            owner=owner,
            needs="HINT needs",
        )
        self.y_lane = self.top.y_chain()
        self._record(n_in, L, K, ndim, squeeze, split_scales)
        self.n_cond_channels = n_cond

    def _check_condition(self, x: torch.Tensor, cond: tuple) -> None:
        (y,) = cond
        expected = (x.shape[0], self.n_cond_channels, *x.shape[2:])
        if tuple(y.shape) != expected:
            raise ValueError(
                f"{type(self).__name__}: cond[0] (the observation y) must have shape {expected}, "
                f"got {tuple(y.shape)}"
            )

    def sample(self, y: torch.Tensor, n: int = 1) -> torch.Tensor:
        """``n`` posterior samples of :math:`x` per observation of the batch ``y``:
        ``(n, B, n_in, *spatial)``."""
        return sample_conditional(self, y, n, (self.n_in, *y.shape[2:]))

    def _forward(self, x, y):
        return self.top._forward(x, y)

    def _inverse(self, z, y):
        return self.top._inverse(z, y)

    def _pullback(self, z, cond, dz, dlogdet):
        return self.top._pullback(z, cond, dz, dlogdet)

    def _pullback_inverse(self, x, cond, dx, dlogdet):
        return self.top._pullback_inverse(x, cond, dx, dlogdet)

    def _tangent_rule(self, x, cond, dx, dcond, dtheta, inverse=False):
        return self.top._tangent(x, cond, dx, dcond, dtheta, inverse)


class NetworkConditionalHINT(TwoLaneNetwork):
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
    law : str or CouplingLaw
        The law of every coupling (default the bounded affine law).
    subnet : factory, optional
        Conditioner factory ``(n_in, n_out) -> Block`` (see :mod:`invops.layers.subnets`),
        called once per coupling.
    logdet : bool
        Whether to report the log-determinant.
    **subnet_options
        ``k1, k2, p1, p2, s1, s2, activation`` of the default
        :class:`~invops.SubnetFactory` (defaults ``3, 3, 1, 1, 1, 1``, SiLU).

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

    def __init__(
        self,
        n_in: int,
        n_cond: int,
        n_hidden: int,
        depth: int,
        permute: bool = True,
        ndim: int = 2,
        *,
        law: str | CouplingLaw = "affine",
        subnet: Subnet | None = None,
        logdet: bool = True,
        **subnet_options: Any,
    ) -> None:
        owner = type(self).__name__
        if n_in < 2 or n_cond < 2:
            raise ValueError(f"{owner}: n_in and n_cond must be >= 2, got {n_in} and {n_cond}")
        if depth < 1:
            raise ValueError(f"{owner}: depth must be >= 1, got {depth}")
        super().__init__(
            n_in,
            n_cond,
            n_hidden,
            1,
            depth,
            split_scales=False,
            permute=permute,
            ndim=ndim,
            squeeze=None,
            law=law,
            subnet=subnet,
            subnet_options=subnet_options,
            logdet=logdet,
        )

    def _validate(self, x, cond, inverse):
        # one scale without squeezes: a shape message in the network's own terms
        if x.ndim != self.ndim + 2 or x.shape[1] != self.n_in:
            raise ValueError(
                f"{type(self).__name__}: {self._names[inverse]} must have shape (B, {self.n_in}"
                f"{', *' * self.ndim}) ({self.ndim} spatial dimensions), got {tuple(x.shape)}"
            )
        self._check_condition(x, cond)
