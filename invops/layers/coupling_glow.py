"""Glow step: an orthogonal 1x1 convolution followed by an affine coupling."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..module import Block, Chain
from ._subnets import as_block, conv_kwargs, default_subnet
from .conv1x1 import Conv1x1
from .coupling import Coupling

__all__ = ["CouplingLayerGlow"]


class CouplingLayerGlow(Chain):
    r"""Glow coupling (Kingma and Dhariwal): 1x1 convolution, then affine coupling.

    Parameters
    ----------
    n_in : int
        Channels (>= 2, odd counts allowed).
    n_hidden : int
        Hidden channels (or features, for dense data) of the conditioner.
    k1, k2, p1, p2, s1, s2 : int
        Conditioner convolutions (defaults 3, 1, 1, 0, 1, 1 as in InvertibleNetworks.jl).
    ndim : int
        Spatial dimensions 1, 2, 3, or 0 for dense ``(B, C)`` data (MLP conditioner).
    freeze_conv : bool
        Freeze the 1x1 convolution (no gradient, not in the parameter Jacobian).
    n_reflections : int
        Householder reflections of the 1x1 convolution.
    scale : (float, float)
        Bounds of the sigmoid scale.
    subnet : Block or torch.nn.Module, optional
        Custom conditioner from ``floor(n_in/2)`` to ``2 * ceil(n_in/2)`` channels.
    activation : callable, optional
        Nonlinearity of the default conditioner (default SiLU; see
        :func:`~invops.layers._subnets.default_subnet` for why not ReLU).
    logdet : bool
        Whether to report the log-determinant.

    Notes
    -----
    :math:`x' = Wx`; :math:`(x'_1, x'_2)` with :math:`x'_1` the first ``ceil(n_in/2)`` channels;
    :math:`y_1 = S(a) \odot x'_1 + T`, :math:`y_2 = x'_2`, :math:`(a, T) = g(x'_2)`. The logdet
    is that of the coupling (the convolution is orthogonal). Parameters are ordered as the
    convolution's, then the conditioner's.

    Examples
    --------
    >>> import torch, invops
    >>> layer = invops.CouplingLayerGlow(5, 16, ndim=3)
    >>> y, logdet = layer(torch.randn(2, 5, 4, 4, 4))
    >>> dense = invops.CouplingLayerGlow(3, 16, ndim=0)
    >>> z, _ = dense(torch.randn(7, 3))
    """

    def __init__(
        self,
        n_in: int,
        n_hidden: int = 32,
        k1: int = 3,
        k2: int = 1,
        p1: int = 1,
        p2: int = 0,
        s1: int = 1,
        s2: int = 1,
        ndim: int = 2,
        freeze_conv: bool = False,
        n_reflections: int = 3,
        scale: tuple[float, float] = (0.5, 2.0),
        subnet: Block | torch.nn.Module | None = None,
        activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
        logdet: bool = True,
    ) -> None:
        if n_in < 2:
            raise ValueError(f"CouplingLayerGlow: n_in must be >= 2, got {n_in}")
        n_first = (n_in + 1) // 2
        if subnet is None:
            conv = conv_kwargs(k1, k2, p1, p2, s1, s2)
            subnet = default_subnet(
                n_in - n_first, 2 * n_first, n_hidden, ndim, conv, activation=activation
            )
        conv1x1 = Conv1x1(n_in, n_reflections=n_reflections, freeze=freeze_conv)
        coupling = Coupling(
            n_in,
            as_block(subnet),
            n_first=n_first,
            fixed="second",
            kind="affine",
            scale=scale,
            ndim=ndim,
            owner=type(self).__name__,
        )
        super().__init__(conv1x1, coupling, logdet=logdet)

    @property
    def conv(self) -> Conv1x1:
        return self.layers[0]

    @property
    def coupling(self) -> Coupling:
        return self.layers[1]

    def _validate(self, x, cond, inverse):
        self.coupling._validate(x, cond, inverse)
