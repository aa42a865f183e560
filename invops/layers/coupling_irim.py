"""i-RIM coupling: an additive coupling conjugated by an orthogonal 1x1 convolution."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..module import Block, Chain
from ._subnets import as_block, conv_kwargs, default_subnet
from .conv1x1 import Conv1x1
from .coupling import Coupling

__all__ = ["CouplingLayerIRIM"]


class CouplingLayerIRIM(Chain):
    r"""Invertible layer of Putzky and Welling's i-RIM: :math:`y = W^T A(Wx)`.

    Parameters
    ----------
    n_in : int
        Channels (>= 2).
    n_hidden : int
        Hidden channels of the strided residual-block conditioner.
    k1, k2, p1, p2, s1, s2 : int
        Conditioner convolutions; the defaults (4, 3, 0, 1, 4, 1) downsample by 4, so spatial
        sizes must be multiples of 4.
    ndim : int
        Spatial dimensions 1, 2 or 3.
    n_reflections : int
        Householder reflections of the 1x1 convolution.
    subnet : Block or torch.nn.Module, optional
        Custom conditioner from ``ceil(n_in/2)`` to ``floor(n_in/2)`` channels.
    activation : callable, optional
        Nonlinearity of the default conditioner (default SiLU; see
        :func:`~invops.layers._subnets.default_subnet` for why not ReLU).
    logdet : bool
        Whether to report the log-determinant (always 0: the layer preserves volume).

    Notes
    -----
    With :math:`W` orthogonal and :math:`A` the additive coupling
    :math:`A(u)_1 = u_1,\ A(u)_2 = u_2 + g(u_1)`, the layer is
    :math:`y = W^T A(W x)`, with inverse :math:`x = W^T A^{-1}(W y)`. The same :math:`W` is used
    on both sides (one parameter, gradients summed).

    Examples
    --------
    >>> import torch, invops
    >>> layer = invops.CouplingLayerIRIM(4, 8)
    >>> y, logdet = layer(torch.randn(1, 4, 8, 8))
    >>> logdet.tolist()
    [0.0]
    """

    def __init__(
        self,
        n_in: int,
        n_hidden: int = 32,
        k1: int = 4,
        k2: int = 3,
        p1: int = 0,
        p2: int = 1,
        s1: int = 4,
        s2: int = 1,
        ndim: int = 2,
        n_reflections: int = 3,
        subnet: Block | torch.nn.Module | None = None,
        activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
        logdet: bool = True,
    ) -> None:
        if n_in < 2:
            raise ValueError(f"CouplingLayerIRIM: n_in must be >= 2, got {n_in}")
        n_first = (n_in + 1) // 2
        if subnet is None:
            conv = conv_kwargs(k1, k2, p1, p2, s1, s2)
            subnet = default_subnet(
                n_first, n_in - n_first, n_hidden, ndim, conv, activation=activation
            )
        conv1x1 = Conv1x1(n_in, n_reflections=n_reflections)
        coupling = Coupling(
            n_in,
            as_block(subnet),
            n_first=n_first,
            fixed="first",
            kind="additive",
            ndim=ndim,
            owner=type(self).__name__,
        )
        super().__init__(conv1x1, coupling, conv1x1.reverse(), logdet=logdet)

    @property
    def coupling(self) -> Coupling:
        return self.layers[1]

    def _validate(self, x, cond, inverse):
        self.coupling._validate(x, cond, inverse)
