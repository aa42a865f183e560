"""i-RIM coupling: an additive coupling conjugated by an orthogonal 1x1 convolution."""

from __future__ import annotations

from typing import Any, cast

from ..module import Chain
from .conv1x1 import Conv1x1
from .coupling import Coupling
from .subnets import IRIM_CONV, Subnet, subnet_factory

__all__ = ["CouplingLayerIRIM"]


class CouplingLayerIRIM(Chain):
    r"""Invertible layer of Putzky and Welling's i-RIM: :math:`y = W^T A(Wx)`.

    Parameters
    ----------
    n_in : int
        Channels (>= 2).
    n_hidden : int
        Hidden channels of the default (strided residual-block) conditioner.
    ndim : int
        Spatial dimensions 1, 2 or 3.
    n_reflections : int
        Householder reflections of the 1x1 convolution.
    subnet : factory or torch.nn.Module, optional
        Conditioner factory ``(n_in, n_out) -> Block`` (see :mod:`invops.layers.subnets`), or a
        ready module from ``ceil(n_in/2)`` to ``floor(n_in/2)`` channels.
    logdet : bool
        Whether to report the log-determinant (always 0: the layer preserves volume).
    **subnet_options
        ``k1, k2, p1, p2, s1, s2, activation`` of the default
        :class:`~invops.SubnetFactory` (defaults here ``4, 3, 0, 1, 4, 1``, which downsample by
        4, so spatial sizes must be multiples of 4; SiLU).

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
        *,
        ndim: int = 2,
        n_reflections: int = 3,
        subnet: Subnet | None = None,
        logdet: bool = True,
        **subnet_options: Any,
    ) -> None:
        owner = type(self).__name__
        if n_in < 2:
            raise ValueError(f"{owner}: n_in must be >= 2, got {n_in}")
        coupling = Coupling(
            n_in,
            subnet_factory(subnet, owner, n_hidden, ndim, IRIM_CONV, subnet_options),
            "additive",
            fixed="first",
            ndim=ndim,
            owner=owner,
        )
        conv1x1 = Conv1x1(n_in, n_reflections=n_reflections)
        super().__init__(conv1x1, coupling, conv1x1.reverse(), logdet=logdet)

    @property
    def coupling(self) -> Coupling:
        return cast(Coupling, self.layers[1])

    def _validate(self, x, cond, inverse):
        self.coupling._validate(x, cond, inverse)
