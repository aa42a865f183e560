"""Multiscale HINT network."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..layers.actnorm import ActNorm
from ..layers.coupling_hint import CouplingLayerHINT
from ..layers.laws import CouplingLaw
from ..layers.subnets import RESIDUAL_CONV, Subnet
from ..module import InvertibleModule
from ._multiscale import MultiscaleFlow

__all__ = ["NetworkMultiScaleHINT"]


class NetworkMultiScaleHINT(MultiscaleFlow):
    r"""HINT flow of Kruse et al. over ``L`` scales of ``K`` steps (ActNorm, HINT coupling).

    Parameters
    ----------
    n_in, n_hidden, L, K : int
        Input channels, conditioner width, scales and steps per scale.
    split_scales : bool
        Factor out half of the channels after every scale but the last.
    logdet : bool
        Whether to report the log-determinant.
    ndim : int
        Spatial dimensions 1, 2, 3, or 0 for dense data.
    squeeze : {"haar", "checkerboard", "patch"}
        Squeeze per scale (default the orthonormal Haar transform; InvertibleNetworks.jl uses a
        CPU-only wavelet transform here).
    coupling : {"affine", "spline"} or CouplingLaw
        The law of every coupling of the HINT trees (default the bounded affine law).
    sample_shape : sequence of int, optional
        Shape of one sample ``(C, *spatial)`` used by :meth:`sample` when none is given.
    subnet : factory, optional
        Conditioner factory ``(n_in, n_out) -> Block`` (see :mod:`invops.layers.subnets`),
        called once per coupling.
    **subnet_options
        ``k1, k2, p1, p2, s1, s2, activation`` of the default
        :class:`~invops.SubnetFactory` (defaults ``3, 3, 1, 1, 1, 1``, SiLU).

    Notes
    -----
    The same multiscale skeleton as :class:`~invops.NetworkGlow`, with steps
    :math:`x \mapsto H(\mathrm{ActNorm}(x))`, :math:`H` a :class:`~invops.CouplingLayerHINT`
    with ``permute="full"``. The latent has the input's shape. InvertibleNetworks.jl's
    ``split_scales`` path for this network does not run (its issue list, item 10); here it is
    tested like the rest.

    Examples
    --------
    >>> import torch, invops
    >>> net = invops.NetworkMultiScaleHINT(2, 8, L=2, K=1, split_scales=True)
    >>> z, logdet = net(torch.randn(3, 2, 8, 8))
    >>> z.shape
    torch.Size([3, 2, 8, 8])
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
        squeeze: str = "haar",
        *,
        coupling: str | CouplingLaw = "affine",
        sample_shape: Sequence[int] | None = None,
        subnet: Subnet | None = None,
        **subnet_options: Any,
    ) -> None:
        def step(c: int, level: int, subnet: Subnet) -> list[InvertibleModule]:
            hint = CouplingLayerHINT(c, permute="full", ndim=ndim, law=coupling, subnet=subnet)
            return [ActNorm(c), hint]

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
            conv_defaults=RESIDUAL_CONV,
            subnet_options=subnet_options,
            sample_shape=sample_shape,
            needs="HINT needs",
        )
