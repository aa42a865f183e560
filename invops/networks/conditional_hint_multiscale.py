"""Multiscale conditional HINT: both lanes squeezed and split per scale."""

from __future__ import annotations

from typing import Any

from ..layers.laws import CouplingLaw
from ..layers.subnets import Subnet
from .conditional_hint import TwoLaneNetwork

__all__ = ["NetworkMultiScaleConditionalHINT"]


class NetworkMultiScaleConditionalHINT(TwoLaneNetwork):
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
        *,
        law: str | CouplingLaw = "affine",
        subnet: Subnet | None = None,
        logdet: bool = True,
        **subnet_options: Any,
    ) -> None:
        super().__init__(
            n_in,
            n_cond,
            n_hidden,
            L,
            K,
            split_scales=split_scales,
            permute=permute,
            ndim=ndim,
            squeeze=squeeze,
            law=law,
            subnet=subnet,
            subnet_options=subnet_options,
            logdet=logdet,
        )
