"""Glow step: an orthogonal 1x1 convolution followed by a coupling."""

from __future__ import annotations

from typing import Any, cast

from ..module import Chain
from .conv1x1 import Conv1x1
from .coupling import Coupling
from .laws import CouplingLaw, coupling_law
from .subnets import GLOW_CONV, Subnet, subnet_factory

__all__ = ["CouplingLayerGlow"]


class CouplingLayerGlow(Chain):
    r"""Glow coupling (Kingma and Dhariwal): 1x1 convolution, then an affine (or other) coupling.

    Parameters
    ----------
    n_in : int
        Channels (>= 2, odd counts allowed).
    n_hidden : int
        Hidden channels (or features, for dense data) of the default conditioner.
    ndim : int
        Spatial dimensions 1, 2, 3, or 0 for dense ``(B, C)`` data (MLP conditioner).
    freeze_conv : bool
        Freeze the 1x1 convolution (no gradient, not in the parameter Jacobian).
    n_reflections : int
        Householder reflections of the 1x1 convolution.
    law : str or CouplingLaw
        The coupling law (default ``"affine"``; ``"spline"`` gives a neural spline flow step).
    scale : (float, float)
        Bounds of the affine law's sigmoid scale.
    subnet : factory or torch.nn.Module, optional
        Conditioner factory ``(n_in, n_out) -> Block`` (see :mod:`invops.layers.subnets`), or a
        ready module from ``floor(n_in/2)`` to ``law.n_params * ceil(n_in/2)`` channels.
    logdet : bool
        Whether to report the log-determinant.
    **subnet_options
        ``k1, k2, p1, p2, s1, s2, activation`` of the default
        :class:`~invops.SubnetFactory` (defaults here ``3, 1, 1, 0, 1, 1``, as in
        InvertibleNetworks.jl, and SiLU).

    Notes
    -----
    :math:`x' = Wx`; :math:`(x'_1, x'_2)` with :math:`x'_1` the first ``ceil(n_in/2)`` channels;
    :math:`y_1 = \tau(x'_1; g(x'_2))`, :math:`y_2 = x'_2`; for the affine law
    :math:`\tau(x; a, T) = S(a) \odot x + T`. The logdet is that of the coupling (the
    convolution is orthogonal). Parameters are ordered as the convolution's, then the
    conditioner's.

    Examples
    --------
    >>> import torch, invops
    >>> layer = invops.CouplingLayerGlow(5, 16, ndim=3)
    >>> y, logdet = layer(torch.randn(2, 5, 4, 4, 4))
    >>> dense = invops.CouplingLayerGlow(3, 16, ndim=0, law="spline")
    >>> z, _ = dense(torch.randn(7, 3))
    """

    def __init__(
        self,
        n_in: int,
        n_hidden: int = 32,
        *,
        ndim: int = 2,
        freeze_conv: bool = False,
        n_reflections: int = 3,
        law: str | CouplingLaw = "affine",
        scale: tuple[float, float] = (0.5, 2.0),
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
            ndim=ndim,
            owner=owner,
        )
        conv1x1 = Conv1x1(n_in, n_reflections=n_reflections, freeze=freeze_conv)
        super().__init__(conv1x1, coupling, logdet=logdet)

    @property
    def conv(self) -> Conv1x1:
        return cast(Conv1x1, self.layers[0])

    @property
    def coupling(self) -> Coupling:
        return cast(Coupling, self.layers[1])

    def _validate(self, x, cond, inverse):
        self.coupling._validate(x, cond, inverse)
