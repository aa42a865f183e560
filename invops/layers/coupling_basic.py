"""RealNVP affine coupling with a bounded sigmoid scale."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..module import Block
from ._subnets import as_block, conv_kwargs, default_subnet
from .coupling import Coupling

__all__ = ["CouplingLayerBasic"]


class CouplingLayerBasic(Coupling):
    r"""Affine coupling of Dinh et al. (RealNVP): the second channel group is scaled and shifted.

    Parameters
    ----------
    n_in : int
        Channels (>= 2, odd counts allowed: the first group has ``ceil(n_in / 2)``).
    n_hidden : int
        Hidden channels of the default residual-block conditioner.
    k1, k2, p1, p2, s1, s2 : int
        Kernel sizes, paddings and strides of the default conditioner (see
        :class:`~invops.ResidualBlock`).
    ndim : int
        Spatial dimensions 1, 2, 3, or 0 for dense ``(B, C)`` data (an MLP conditioner).
    scale : (float, float)
        Bounds of the sigmoid scale (default ``(0.5, 2)``; the scale is 1 when the conditioner
        outputs 0).
    subnet : Block or torch.nn.Module, optional
        A custom conditioner from ``ceil(n_in/2)`` to ``2 * floor(n_in/2)`` channels.
    activation : callable, optional
        Nonlinearity of the default conditioner (default SiLU; see
        :func:`~invops.layers._subnets.default_subnet` for why not ReLU).
    logdet : bool
        Whether to report the log-determinant.

    Notes
    -----
    :math:`y_1 = x_1`, :math:`y_2 = S(a)\odot x_2 + T` with :math:`(a, T) = g(x_1)` and
    :math:`S(a) = l + (h-l)\sigma(a + a_0)`; logdet :math:`\sum\log S`. See
    :class:`~invops.layers.coupling.Coupling` for the one-evaluation reverse pass.

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
        k1: int = 3,
        k2: int = 3,
        p1: int = 1,
        p2: int = 1,
        s1: int = 1,
        s2: int = 1,
        ndim: int = 2,
        scale: tuple[float, float] = (0.5, 2.0),
        subnet: Block | torch.nn.Module | None = None,
        activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
        logdet: bool = True,
    ) -> None:
        if n_in < 2:
            raise ValueError(f"CouplingLayerBasic: n_in must be >= 2, got {n_in}")
        n_first = (n_in + 1) // 2
        if subnet is None:
            conv = conv_kwargs(k1, k2, p1, p2, s1, s2)
            subnet = default_subnet(
                n_first, 2 * (n_in - n_first), n_hidden, ndim, conv, activation=activation
            )
        super().__init__(
            n_in,
            as_block(subnet),
            n_first=n_first,
            fixed="first",
            kind="affine",
            scale=scale,
            ndim=ndim,
            logdet=logdet,
        )
