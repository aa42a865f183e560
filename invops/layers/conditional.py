"""Conditional coupling layers: Glow and HINT steps whose conditioners see an observation."""

from __future__ import annotations

from typing import Any, cast

from ..module import Chain, InvertibleModule
from .conv1x1 import Conv1x1
from .coupling import Coupling
from .coupling_hint import CouplingLayerHINT
from .laws import CouplingLaw, coupling_law
from .subnets import GLOW_CONV, RESIDUAL_CONV, Subnet, require_factory, subnet_factory

__all__ = ["ConditionalLayerGlow", "ConditionalLayerHINT", "ConditionLane"]


class ConditionalLayerGlow(Chain):
    r"""Glow step whose coupling conditioner also sees a condition :math:`c`.

    Parameters
    ----------
    n_in : int
        Channels of the input (>= 2).
    n_cond : int
        Channels of the condition: an image with the input's spatial size
        ``(B, n_cond, *spatial)``, or a vector ``(B, n_cond)``.
    n_hidden : int
        Hidden channels of the default conditioner (:class:`~invops.ConditionalResidualBlock`,
        or an MLP on ``cat(x, c)`` for dense data).
    ndim : int
        Spatial dimensions 1, 2, 3, or 0 for dense data.
    freeze_conv : bool
        Freeze the 1x1 convolution.
    law : str or CouplingLaw
        The coupling law (default ``"affine"``).
    scale : (float, float)
        Bounds of the affine law's sigmoid scale.
    cond_transform : InvertibleModule, optional
        Applied to the condition before the conditioner sees it (its output then has
        ``n_cond`` channels); trained with the layer. :class:`~invops.NetworkConditionalGlow`
        uses it to normalise the condition and squeeze it to each scale's resolution.
    subnet : factory or torch.nn.Module, optional
        Conditioner factory, called as ``subnet(n_in, n_out, n_cond=n_cond)`` (see
        :mod:`invops.layers.subnets`); the conditioner is called as ``net(x2, c)``.
    logdet : bool
        Whether to report the log-determinant.
    **subnet_options
        ``k1, k2, p1, p2, s1, s2, activation`` of the default
        :class:`~invops.SubnetFactory` (defaults here ``3, 1, 1, 0, 1, 1``, SiLU).

    Notes
    -----
    As :class:`~invops.CouplingLayerGlow` with :math:`(a, T) = g(x'_2, c)`. The reverse modes
    return the condition's cotangent (``backward`` gives ``dx, x, dc``).

    Examples
    --------
    >>> import torch, invops
    >>> layer = invops.ConditionalLayerGlow(3, 2, 8)
    >>> y, logdet = layer(torch.randn(4, 3, 6, 6), torch.randn(4, 2, 6, 6))
    """

    def __init__(
        self,
        n_in: int,
        n_cond: int,
        n_hidden: int = 32,
        *,
        ndim: int = 2,
        freeze_conv: bool = False,
        law: str | CouplingLaw = "affine",
        scale: tuple[float, float] = (0.5, 2.0),
        cond_transform: InvertibleModule | None = None,
        subnet: Subnet | None = None,
        logdet: bool = True,
        **subnet_options: Any,
    ) -> None:
        owner = type(self).__name__
        if n_in < 2:
            raise ValueError(f"{owner}: n_in must be >= 2, got {n_in}")
        coupling = Coupling(
            n_in,
            subnet_factory(subnet, owner, n_hidden, ndim, GLOW_CONV, subnet_options),
            coupling_law(law, scale, owner),
            fixed="second",
            n_conditions=1,
            condition_channels=n_cond,
            cond_transform=cond_transform,
            ndim=ndim,
            owner=owner,
        )
        super().__init__(Conv1x1(n_in, freeze=freeze_conv), coupling, logdet=logdet)

    def _validate(self, x, cond, inverse):
        self.layers[1]._validate(x, cond, inverse)


class ConditionLane:
    """``forward_y`` / ``inverse_y`` for modules whose condition has its own invertible lane,
    available as ``self.y_lane``."""

    y_lane: InvertibleModule

    def forward_y(self, y: Any):
        """Apply the condition lane: ``z_y, logdet_y``."""
        return self.y_lane(y)

    def inverse_y(self, zy: Any):
        """Invert the condition lane: ``y, logdet_inv_y``."""
        return self.y_lane.inverse(zy)


class ConditionalLayerHINT(ConditionLane, Chain):
    r"""Conditional HINT step of Kruse et al.: an input lane :math:`x`, a condition lane :math:`y`.

    Parameters
    ----------
    n_in : int
        Channels of the input :math:`x` (>= 2).
    n_cond : int
        Channels of the condition :math:`y` (>= 2), with the input's spatial size.
    n_hidden : int
        Hidden channels of every conditioner.
    permute : bool
        Mix each lane with an orthogonal 1x1 convolution first.
    ndim : int
        Spatial dimensions 1, 2, 3, or 0 for dense data.
    law : str or CouplingLaw
        The law of every coupling (default ``"affine"``).
    scale : (float, float)
        Bounds of the affine law's sigmoid scales.
    subnet : factory, optional
        Conditioner factory ``(n_in, n_out) -> Block`` (see :mod:`invops.layers.subnets`),
        called once per coupling of both lanes and of the coupling between them.
    logdet : bool
        Whether to report the log-determinant.
    **subnet_options
        ``k1, k2, p1, p2, s1, s2, activation`` of the default
        :class:`~invops.SubnetFactory` (defaults here ``3, 3, 1, 1, 1, 1``, SiLU).

    Notes
    -----
    The condition lane is its own invertible map, :math:`z_y = H_y(C_y\,y)`, available as
    :meth:`forward_y` / :meth:`inverse_y`. The input lane is

    .. math::
        z_x = S(z_y) \odot H_x(C_x\,x) + T(z_y),

    so ``forward(x, y)`` returns :math:`z_x` and the logdet of :math:`x \mapsto z_x` given
    :math:`y`, and ``inverse(z_x, y)`` takes the raw condition. The joint map
    :math:`(x, y) \mapsto (z_x, z_y)` is triangular: its logdet is
    ``forward(x, y)[1] + forward_y(y)[1]``. Posterior sampling is ``inverse(z, y_obs)`` with
    :math:`z \sim N(0, I)`. Reverse modes return the cotangent of :math:`y`, which flows through
    :math:`H_y`.

    Examples
    --------
    >>> import torch, invops
    >>> layer = invops.ConditionalLayerHINT(4, 3, 8, ndim=1)
    >>> x, y = torch.randn(2, 4, 6), torch.randn(2, 3, 6)
    >>> zx, logdet_x = layer(x, y)
    >>> zy, logdet_y = layer.forward_y(y)
    """

    def __init__(
        self,
        n_in: int,
        n_cond: int,
        n_hidden: int = 32,
        permute: bool = True,
        *,
        ndim: int = 2,
        law: str | CouplingLaw = "affine",
        scale: tuple[float, float] = (0.5, 2.0),
        subnet: Subnet | None = None,
        logdet: bool = True,
        **subnet_options: Any,
    ) -> None:
        owner = type(self).__name__
        if n_in < 2 or n_cond < 2:
            raise ValueError(f"{owner}: n_in and n_cond must be >= 2, got {n_in} and {n_cond}")
        factory = require_factory(
            subnet_factory(subnet, owner, n_hidden, ndim, RESIDUAL_CONV, subnet_options), owner
        )
        hint: dict[str, Any] = dict(ndim=ndim, law=law, scale=scale, subnet=factory)
        x_lane: list[InvertibleModule] = [Conv1x1(n_in)] if permute else []
        x_lane.append(CouplingLayerHINT(n_in, **hint))
        y_lane: list[InvertibleModule] = [Conv1x1(n_cond)] if permute else []
        y_lane.append(CouplingLayerHINT(n_cond, **hint))
        self_y_lane = Chain(*y_lane)
        coupling = Coupling(
            n_in,
            factory,
            coupling_law(law, scale, owner),
            fixed="none",
            n_conditions=1,
            condition_channels=n_cond,
            cond_transform=self_y_lane,
            ndim=ndim,
            owner=owner,
        )
        super().__init__(*x_lane, coupling, logdet=logdet)
        self.n_in, self.n_cond_channels, self.ndim = n_in, n_cond, ndim

    @property
    def y_lane(self) -> InvertibleModule:
        """The condition lane :math:`y \\mapsto z_y` as an invertible module."""
        return cast(InvertibleModule, self.layers[-1].cond_transform)

    def _validate(self, x, cond, inverse):
        self.layers[-1]._validate(x, cond, inverse)
        (y,) = cond
        expected = (x.shape[0], self.n_cond_channels, *x.shape[2:])
        if tuple(y.shape) != expected:
            raise ValueError(
                f"ConditionalLayerHINT: cond[0] (the condition y) must have shape {expected} "
                f"(the input's batch and spatial size, {self.n_cond_channels} channels), "
                f"got {tuple(y.shape)}"
            )
