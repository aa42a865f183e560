"""Multiscale HINT network."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..layers.actnorm import ActNorm
from ..layers.coupling_hint import CouplingLayerHINT
from ..module import Chain, InvertibleModule
from ._multiscale import check_multiscale_input, check_scale_args, multiscale, sample_flow

__all__ = ["NetworkMultiScaleHINT"]


class NetworkMultiScaleHINT(Chain):
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
    k1, k2, p1, p2, s1, s2 : int
        Conditioner convolutions.
    activation : callable, optional
        Conditioner nonlinearity (default SiLU).
    sample_shape : sequence of int, optional
        Shape of one sample ``(C, *spatial)`` used by :meth:`sample` when none is given.

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
        k1: int = 3,
        k2: int = 3,
        p1: int = 1,
        p2: int = 1,
        s1: int = 1,
        s2: int = 1,
        activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
        sample_shape: Sequence[int] | None = None,
    ) -> None:
        check_scale_args("NetworkMultiScaleHINT", L, K, ndim)
        conv = dict(k1=k1, k2=k2, p1=p1, p2=p2, s1=s1, s2=s2)

        def steps(c: int, level: int) -> list[InvertibleModule]:
            out: list[InvertibleModule] = []
            for _ in range(K):
                out.append(ActNorm(c))
                out.append(
                    CouplingLayerHINT(
                        c, n_hidden, permute="full", ndim=ndim, activation=activation, **conv
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
            owner="NetworkMultiScaleHINT",
            needs="HINT needs",
        )
        super().__init__(*net.layers, logdet=logdet)
        self.n_in, self.L, self.K, self.ndim = n_in, L, K, ndim
        self.split_scales, self.squeeze = split_scales, squeeze
        self.sample_shape = None if sample_shape is None else tuple(sample_shape)

    def _validate(self, x, cond, inverse):
        check_multiscale_input(
            x, self.n_in, self.L, self.ndim, "NetworkMultiScaleHINT", "z" if inverse else "x"
        )

    def sample(self, n: int, shape: Sequence[int] | None = None) -> torch.Tensor:
        """Draw ``n`` samples: ``inverse(z)`` with ``z ~ N(0, I)`` of shape ``(n, *shape)``."""
        return sample_flow(self, n, shape or self.sample_shape)
