"""Hierarchical invertible neural transport (HINT) coupling of Kruse et al."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..module import Chain, Identity, Parallel
from ._subnets import conv_kwargs, default_subnet
from .conv1x1 import Conv1x1
from .coupling import Coupling

__all__ = ["CouplingLayerHINT"]

_PERMUTE = ("none", "lower", "both", "full")


class CouplingLayerHINT(Chain):
    r"""Recursive coupling: each half is coupled, then transformed by its own HINT block.

    Parameters
    ----------
    n_in : int
        Channels, any count >= 2 (odd and non-powers of two included).
    n_hidden : int
        Hidden channels (features, for dense data) of every conditioner.
    permute : {"none", "lower", "both", "full"}
        Orthogonal 1x1 convolutions around the block: ``"full"`` mixes all channels before,
        ``"both"`` mixes before and un-mixes after (the same convolution), ``"lower"`` mixes the
        lower (second) half before the coupling.
    k1, k2, p1, p2, s1, s2 : int
        Conditioner convolutions (see :class:`~invops.ResidualBlock`).
    ndim : int
        Spatial dimensions 1, 2, 3, or 0 for dense ``(B, C)`` data.
    scale : (float, float)
        Bounds of the sigmoid scales.
    recursion_threshold : int
        Blocks with more channels than this recurse into their halves (4, as in
        InvertibleNetworks.jl, in every rank).
    activation : callable, optional
        Nonlinearity of the default conditioner (default SiLU; see
        :func:`~invops.layers._subnets.default_subnet` for why not ReLU).
    logdet : bool
        Whether to report the log-determinant.

    Notes
    -----
    With :math:`x = (x_a, x_b)` (the first ``ceil(n/2)`` channels in :math:`x_a`),

    .. math::
        z_b = S(x_a) \odot x_b + T(x_a), \qquad y = \big(H_a(x_a),\ H_b(z_b)\big),

    where :math:`H_a, H_b` are HINT blocks on the halves when the block has more than
    ``recursion_threshold`` channels, and identities otherwise. Every coupling of the tree owns
    its conditioner, so every branch has its own weights and receives its own gradient
    (InvertibleNetworks.jl shares the weights of a level between both branches, and its
    ``backward`` keeps only the last branch's gradient). The logdet is the sum over the tree.

    Examples
    --------
    >>> import torch, invops
    >>> hint = invops.CouplingLayerHINT(7, 8, permute="both", ndim=1)
    >>> y, logdet = hint(torch.randn(2, 7, 6))
    >>> len(hint.couplings())  # 7 = 4 + 3: one coupling, then HINT(4) and HINT(3), one each
    3
    """

    def __init__(
        self,
        n_in: int,
        n_hidden: int = 32,
        permute: str = "none",
        k1: int = 3,
        k2: int = 3,
        p1: int = 1,
        p2: int = 1,
        s1: int = 1,
        s2: int = 1,
        ndim: int = 2,
        scale: tuple[float, float] = (0.5, 2.0),
        recursion_threshold: int = 4,
        activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
        logdet: bool = True,
    ) -> None:
        if n_in < 2:
            raise ValueError(f"CouplingLayerHINT: n_in must be >= 2, got {n_in}")
        if permute not in _PERMUTE:
            raise ValueError(
                f"CouplingLayerHINT: permute must be one of {_PERMUTE}, got {permute!r}"
            )
        self_kwargs = dict(
            n_hidden=n_hidden,
            k1=k1,
            k2=k2,
            p1=p1,
            p2=p2,
            s1=s1,
            s2=s2,
            ndim=ndim,
            scale=scale,
            recursion_threshold=recursion_threshold,
            activation=activation,
        )
        n_a = (n_in + 1) // 2
        n_b = n_in - n_a
        conv = conv_kwargs(k1, k2, p1, p2, s1, s2)
        coupling = Coupling(
            n_in,
            default_subnet(n_a, 2 * n_b, n_hidden, ndim, conv, activation=activation),
            n_first=n_a,
            fixed="first",
            kind="affine",
            scale=scale,
            ndim=ndim,
            owner=type(self).__name__,
        )
        layers = [coupling]
        if n_in > recursion_threshold:
            layers.append(
                Parallel(
                    CouplingLayerHINT(n_a, **self_kwargs) if n_a >= 2 else Identity(),
                    CouplingLayerHINT(n_b, **self_kwargs) if n_b >= 2 else Identity(),
                    sizes=(n_a, n_b),
                )
            )
        if permute in ("full", "both"):
            mixer = Conv1x1(n_in)
            layers.insert(0, mixer)
            if permute == "both":
                layers.append(mixer.reverse())
        elif permute == "lower":
            layers.insert(
                0, Parallel(Identity(), Conv1x1(n_b) if n_b >= 2 else Identity(), sizes=(n_a, n_b))
            )
        super().__init__(*layers, logdet=logdet)
        self.n_in, self.permute, self.ndim = n_in, permute, ndim

    def _validate(self, x, cond, inverse):
        self.couplings()[0]._validate(x, cond, inverse)

    def couplings(self) -> list[Coupling]:
        """Every coupling of the tree, in the order they are applied."""
        return [m for m in self.modules() if isinstance(m, Coupling)]
