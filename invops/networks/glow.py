"""Multiscale Glow network."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..layers.actnorm import ActNorm
from ..layers.coupling_glow import CouplingLayerGlow
from ..module import Chain, InvertibleModule
from ._multiscale import check_multiscale_input, check_scale_args, multiscale, sample_flow

__all__ = ["NetworkGlow"]


class NetworkGlow(Chain):
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
    k1, k2, p1, p2, s1, s2 : int
        Conditioner convolutions (see :class:`~invops.CouplingLayerGlow`).
    freeze_conv : bool
        Freeze every 1x1 convolution.
    activation : callable, optional
        Conditioner nonlinearity (default SiLU).
    sample_shape : sequence of int, optional
        Shape of one sample ``(C, *spatial)`` used by :meth:`sample` when none is given.

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
        k1: int = 3,
        k2: int = 1,
        p1: int = 1,
        p2: int = 0,
        s1: int = 1,
        s2: int = 1,
        freeze_conv: bool = False,
        activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
        sample_shape: Sequence[int] | None = None,
    ) -> None:
        check_scale_args("NetworkGlow", L, K, ndim)
        conv = dict(k1=k1, k2=k2, p1=p1, p2=p2, s1=s1, s2=s2)

        def steps(c: int, level: int) -> list[InvertibleModule]:
            out: list[InvertibleModule] = []
            for _ in range(K):
                out.append(ActNorm(c))
                out.append(
                    CouplingLayerGlow(
                        c,
                        n_hidden,
                        ndim=ndim,
                        freeze_conv=freeze_conv,
                        activation=activation,
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
            owner="NetworkGlow",
            needs="couplings need",
        )
        super().__init__(*net.layers, logdet=logdet)
        self.n_in, self.L, self.K, self.ndim = n_in, L, K, ndim
        self.split_scales, self.squeeze = split_scales, squeeze
        self.sample_shape = None if sample_shape is None else tuple(sample_shape)

    def extra_repr(self) -> str:
        return (
            f"n_in={self.n_in}, L={self.L}, K={self.K}, split_scales={self.split_scales}, "
            f"ndim={self.ndim}, squeeze={self.squeeze!r}"
        )

    def _validate(self, x, cond, inverse):
        check_multiscale_input(
            x, self.n_in, self.L, self.ndim, "NetworkGlow", "z" if inverse else "x"
        )

    def sample(self, n: int, shape: Sequence[int] | None = None) -> torch.Tensor:
        """Draw ``n`` samples: ``inverse(z)`` with ``z ~ N(0, I)`` of shape ``(n, *shape)``."""
        return sample_flow(self, n, shape or self.sample_shape)
