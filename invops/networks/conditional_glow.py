"""Conditional multiscale Glow: a flow of x given an observation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..layers.actnorm import ActNorm
from ..layers.conditional import ConditionalLayerGlow
from ..layers.laws import CouplingLaw
from ..layers.subnets import GLOW_CONV, Subnet
from ..module import Chain, InvertibleModule
from ._multiscale import MultiscaleFlow, sample_conditional, squeezer

__all__ = ["NetworkConditionalGlow"]


class NetworkConditionalGlow(MultiscaleFlow):
    r"""Glow conditioned on an observation :math:`c`, passed to every step.

    Parameters
    ----------
    n_in : int
        Channels of the input :math:`x`.
    n_cond : int
        Channels of the condition.
    n_hidden, L, K : int
        Conditioner width, scales, steps per scale.
    split_scales : bool
        Factor out half of the channels after every scale but the last.
    logdet : bool
        Whether to report the log-determinant.
    ndim : int
        Spatial dimensions 1, 2, 3, or 0 for dense data.
    squeeze : {"checkerboard", "patch", "haar"}
        Squeeze per scale, applied to :math:`x` and to image conditions alike.
    dense_condition : bool
        The condition is a vector ``(B, n_cond)`` (for any ``ndim``) rather than an image with
        the input's spatial size ``(B, n_cond, *spatial)``.
    coupling : {"affine", "spline"} or CouplingLaw
        The law of every coupling (default the bounded affine law).
    subnet : factory, optional
        Conditioner factory, called as ``subnet(n_in, n_out, n_cond=c)`` once per coupling (see
        :mod:`invops.layers.subnets`).
    **subnet_options
        ``k1, k2, p1, p2, s1, s2, activation`` of the default
        :class:`~invops.SubnetFactory` (defaults ``3, 1, 1, 0, 1, 1``, SiLU).

    Notes
    -----
    The condition is normalised once by its own ActNorm (data-initialised) and, for image
    conditions, squeezed to the resolution of each scale (:math:`i + 1` squeezes at scale
    :math:`i`); every step of scale :math:`i` is ActNorm followed by a
    :class:`~invops.ConditionalLayerGlow` whose conditioner sees it. Unlike
    InvertibleNetworks.jl, ``inverse(z, c)`` takes the raw condition (not a transformed one
    returned by an earlier forward) and the latent keeps the input's shape. Reverse modes
    return the condition's cotangent.

    Examples
    --------
    >>> import torch, invops
    >>> net = invops.NetworkConditionalGlow(1, 1, 8, L=2, K=1, split_scales=True)
    >>> x, c = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    >>> z, logdet = net(x, c)
    >>> bool((net.inverse(z, c)[0] - x).abs().max() < 1e-4)
    True
    """

    def __init__(
        self,
        n_in: int,
        n_cond: int,
        n_hidden: int,
        L: int,
        K: int,
        split_scales: bool = False,
        logdet: bool = True,
        ndim: int = 2,
        squeeze: str = "checkerboard",
        dense_condition: bool = False,
        *,
        coupling: str | CouplingLaw = "affine",
        subnet: Subnet | None = None,
        **subnet_options: Any,
    ) -> None:
        if n_cond < 1:
            raise ValueError(f"{type(self).__name__}: n_cond must be >= 1, got {n_cond}")
        dense_condition = dense_condition or ndim == 0
        cond_norm = ActNorm(n_cond)

        def step(c: int, level: int, subnet: Subnet) -> list[InvertibleModule]:
            transform: InvertibleModule
            if dense_condition:
                transform, channels = cond_norm, n_cond
            else:
                transform = Chain(cond_norm, *(squeezer(squeeze) for _ in range(level + 1)))
                channels = n_cond * 2 ** (ndim * (level + 1))
            glow = ConditionalLayerGlow(
                c, channels, ndim=ndim, law=coupling, cond_transform=transform, subnet=subnet
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
        )
        self.n_cond_channels, self.dense_condition = n_cond, dense_condition
        self.cond_norm = cond_norm

    def _check_condition(self, x, cond):
        (c,) = cond
        expected = (
            (x.shape[0], self.n_cond_channels)
            if self.dense_condition
            else (x.shape[0], self.n_cond_channels, *x.shape[2:])
        )
        if tuple(c.shape) != expected:
            raise ValueError(
                f"{type(self).__name__}: cond[0] must have shape {expected}, got {tuple(c.shape)}"
            )

    def sample(
        self, c: torch.Tensor, n: int = 1, shape: Sequence[int] | None = None
    ) -> torch.Tensor:
        """``n`` samples of :math:`x` for each condition in the batch ``c``: ``(n, B, *x_shape)``.

        ``shape`` is the shape of one sample ``(n_in, *spatial)``; it is taken from ``c`` for
        image conditions and must be given for vector conditions on spatial data.
        """
        if shape is None:
            if self.dense_condition and self.ndim > 0:
                raise ValueError(
                    f"{type(self).__name__}.sample: with a vector condition give "
                    "shape=(n_in, *spatial)"
                )
            shape = (self.n_in, *c.shape[2:])
        return sample_conditional(self, c, n, shape)
