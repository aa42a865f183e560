"""Conditional multiscale Glow: a flow of x given an observation."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..layers.actnorm import ActNorm
from ..layers.conditional import ConditionalLayerGlow
from ..module import Chain, InvertibleModule
from ._multiscale import check_multiscale_input, check_scale_args, multiscale, squeezer

__all__ = ["NetworkConditionalGlow"]


class NetworkConditionalGlow(Chain):
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
    k1, k2, p1, p2, s1, s2 : int
        Conditioner convolutions.
    activation : callable, optional
        Conditioner nonlinearity (default SiLU).

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
        k1: int = 3,
        k2: int = 1,
        p1: int = 1,
        p2: int = 0,
        s1: int = 1,
        s2: int = 1,
        activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        check_scale_args("NetworkConditionalGlow", L, K, ndim)
        if n_cond < 1:
            raise ValueError(f"NetworkConditionalGlow: n_cond must be >= 1, got {n_cond}")
        dense_condition = dense_condition or ndim == 0
        cond_norm = ActNorm(n_cond)
        conv = dict(k1=k1, k2=k2, p1=p1, p2=p2, s1=s1, s2=s2)

        def steps(c: int, level: int) -> list[InvertibleModule]:
            if dense_condition:
                transform, channels = cond_norm, n_cond
            else:
                transform = Chain(cond_norm, *(squeezer(squeeze) for _ in range(level + 1)))
                channels = n_cond * 2 ** (ndim * (level + 1))
            out: list[InvertibleModule] = []
            for _ in range(K):
                out.append(ActNorm(c))
                out.append(
                    ConditionalLayerGlow(
                        c,
                        channels,
                        n_hidden,
                        ndim=ndim,
                        activation=activation,
                        cond_transform=transform,
                        **conv,
                    )
                )
            return out

        net = multiscale(
            n_in,
            L,
            steps,
            ndim,
            squeeze,
            split_scales,
            logdet=logdet,
            owner="NetworkConditionalGlow",
            needs="couplings need",
        )
        super().__init__(*net.layers, logdet=logdet)
        self.n_in, self.n_cond_channels, self.L, self.K, self.ndim = n_in, n_cond, L, K, ndim
        self.split_scales, self.dense_condition = split_scales, dense_condition
        self.cond_norm = cond_norm

    def _validate(self, x, cond, inverse):
        owner = "NetworkConditionalGlow"
        check_multiscale_input(x, self.n_in, self.L, self.ndim, owner, "z" if inverse else "x")
        (c,) = cond
        expected = (
            (x.shape[0], self.n_cond_channels)
            if self.dense_condition
            else (x.shape[0], self.n_cond_channels, *x.shape[2:])
        )
        if tuple(c.shape) != expected:
            raise ValueError(f"{owner}: cond[0] must have shape {expected}, got {tuple(c.shape)}")

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
                    "NetworkConditionalGlow.sample: with a vector condition give "
                    "shape=(n_in, *spatial)"
                )
            shape = (self.n_in, *c.shape[2:])
        ref = next(self.parameters())
        with torch.no_grad():
            draws = [
                self.inverse(torch.randn(c.shape[0], *shape, dtype=ref.dtype, device=ref.device), c)
                for _ in range(n)
            ]
        return torch.stack([d[0] if self.logdet else d for d in draws])
