"""RealNVP coupling: the second channel group is transformed by a law conditioned on the first."""

from __future__ import annotations

from typing import Any

from .coupling import Coupling
from .laws import CouplingLaw, coupling_law
from .subnets import RESIDUAL_CONV, Subnet, subnet_factory

__all__ = ["CouplingLayerBasic"]


class CouplingLayerBasic(Coupling):
    r"""Coupling of Dinh et al. (RealNVP): the second channel group is scaled and shifted.

    Parameters
    ----------
    n_in : int
        Channels (>= 2, odd counts allowed: the first group has ``ceil(n_in / 2)``).
    n_hidden : int
        Hidden channels of the default conditioner.
    ndim : int
        Spatial dimensions 1, 2, 3, or 0 for dense ``(B, C)`` data (an MLP conditioner).
    law : str or CouplingLaw
        The coupling law (default ``"affine"``; ``"additive"``, ``"spline"`` or any
        :class:`~invops.CouplingLaw`).
    scale : (float, float)
        Bounds of the affine law's sigmoid scale (default ``(0.5, 2)``; the scale is 1 when the
        conditioner outputs 0).
    subnet : factory or torch.nn.Module, optional
        Conditioner factory ``(n_in, n_out) -> Block`` (see :mod:`invops.layers.subnets`), or a
        ready module from ``ceil(n_in/2)`` to ``law.n_params * floor(n_in/2)`` channels.
    logdet : bool
        Whether to report the log-determinant.
    **subnet_options
        ``k1, k2, p1, p2, s1, s2, activation`` of the default
        :class:`~invops.SubnetFactory` (defaults here ``3, 3, 1, 1, 1, 1``, SiLU).

    Notes
    -----
    :math:`y_1 = x_1`, :math:`y_2 = \tau(x_2; g(x_1))`; for the affine law
    :math:`\tau(x; a, T) = S(a)\odot x + T` with :math:`S(a) = l + (h-l)\sigma(a + a_0)` and
    logdet :math:`\sum\log S`. See :class:`~invops.Coupling` for the one-evaluation reverse
    pass.

    Examples
    --------
    >>> import torch, invops
    >>> layer = invops.CouplingLayerBasic(3, 8, ndim=1)
    >>> y, logdet = layer(torch.randn(2, 3, 6))
    >>> y.shape, logdet.shape
    (torch.Size([2, 3, 6]), torch.Size([2]))
    """

    def __init__(
        self,
        n_in: int,
        n_hidden: int = 32,
        *,
        ndim: int = 2,
        law: str | CouplingLaw = "affine",
        scale: tuple[float, float] = (0.5, 2.0),
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
            coupling_law(law, scale, owner),
            fixed="first",
            ndim=ndim,
            owner=owner,
            logdet=logdet,
        )
