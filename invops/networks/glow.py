"""Multiscale Glow network."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..layers.actnorm import ActNorm
from ..layers.coupling_glow import CouplingLayerGlow
from ..layers.laws import CouplingLaw
from ..layers.subnets import GLOW_CONV, Subnet
from ..module import InvertibleModule
from ._multiscale import MultiscaleFlow

__all__ = ["NetworkGlow"]


class NetworkGlow(MultiscaleFlow):
    r"""Glow of Kingma and Dhariwal: ``L`` scales of ``K`` steps (ActNorm, Glow coupling).

    Parameters
    ----------
    n_in : int
        Channels of the input.
    n_hidden : int
        Hidden channels (features, for dense data) of every coupling conditioner.
    L, K : int
        Number of scales and of steps per scale.
    split_scales : bool
        Factor out half of the channels at the end of every scale but the last (multiscale
        architecture); otherwise every scale transforms all channels.
    logdet : bool
        Whether to report the log-determinant.
    ndim : int
        Spatial dimensions 1, 2, 3, or 0 for dense ``(B, C)`` data (no squeeze; with
        ``split_scales`` half the features are factored out per scale).
    squeeze : {"checkerboard", "patch", "haar"}
        Squeeze at the start of every scale (channels x ``2**ndim``, spatial sizes / 2).
    coupling : {"affine", "spline"} or CouplingLaw
        The law of every coupling: the bounded affine law of Glow (default) or a
        rational-quadratic spline (neural spline flow); a law object is shared by all couplings.
    freeze_conv : bool
        Freeze every 1x1 convolution.
    sample_shape : sequence of int, optional
        Shape of one sample ``(C, *spatial)`` used by :meth:`sample` when none is given.
    subnet : factory, optional
        Conditioner factory ``(n_in, n_out) -> Block`` (see :mod:`invops.layers.subnets`),
        called once per coupling.
    **subnet_options
        ``k1, k2, p1, p2, s1, s2, activation`` of the default
        :class:`~invops.SubnetFactory` (defaults ``3, 1, 1, 0, 1, 1``, SiLU).

    Notes
    -----
    Scale :math:`i` squeezes, applies :math:`K` steps
    :math:`x \mapsto \mathrm{Glow}(\mathrm{ActNorm}(x))`, passes the first ``ceil(c/2)``
    channels to the next scale (``split_scales``) or all of them, and unsqueezes. The latent
    :math:`z` has the input's shape: the channels factored out at scale :math:`i` are put back
    by that scale's unsqueeze, so ``inverse(z)`` needs nothing from an earlier forward and
    ``inverse(torch.randn_like(x))`` samples a fresh network. Spatial sizes must be multiples
    of ``2**L``. Unlike InvertibleNetworks.jl, the scales squeeze with and without
    ``split_scales``, and the latent is never flattened.

    Examples
    --------
    >>> import torch, invops
    >>> glow = invops.NetworkGlow(3, 16, L=2, K=2, split_scales=True)
    >>> x = torch.randn(4, 3, 8, 8)
    >>> z, logdet = glow(x)
    >>> z.shape
    torch.Size([4, 3, 8, 8])
    >>> bool((glow.inverse(z)[0] - x).abs().max() < 1e-4)
    True
    """

    def __init__(
        self,
        n_in: int,
        n_hidden: int,
        L: int,
        K: int,
        split_scales: bool = False,
        logdet: bool = True,
        ndim: int = 2,
        squeeze: str = "checkerboard",
        *,
        coupling: str | CouplingLaw = "affine",
        freeze_conv: bool = False,
        sample_shape: Sequence[int] | None = None,
        subnet: Subnet | None = None,
        **subnet_options: Any,
    ) -> None:
        def step(c: int, level: int, subnet: Subnet) -> list[InvertibleModule]:
            glow = CouplingLayerGlow(
                c, ndim=ndim, freeze_conv=freeze_conv, law=coupling, subnet=subnet
            )
            return [ActNorm(c), glow]

        super().__init__(
            n_in,
            L,
            K,
            step,
            split_scales=split_scales,
            ndim=ndim,
            squeeze=squeeze,
            logdet=logdet,
            n_hidden=n_hidden,
            subnet=subnet,
            conv_defaults=GLOW_CONV,
            subnet_options=subnet_options,
            sample_shape=sample_shape,
        )
