"""Hierarchical invertible neural transport (HINT) coupling of Kruse et al."""

from __future__ import annotations

from typing import Any

from ..module import Chain, Identity, InvertibleModule, Parallel
from .conv1x1 import Conv1x1
from .coupling import Coupling
from .laws import CouplingLaw, coupling_law
from .subnets import RESIDUAL_CONV, Subnet, require_factory, subnet_factory

__all__ = ["CouplingLayerHINT"]

_PERMUTE = ("none", "lower", "both", "full")


class CouplingLayerHINT(Chain):
    r"""Recursive coupling: each half is coupled, then transformed by its own HINT block.

    Parameters
    ----------
    n_in : int
        Channels, any count >= 2 (odd and non-powers of two included).
    n_hidden : int
        Hidden channels (features, for dense data) of every default conditioner.
    permute : {"none", "lower", "both", "full"}
        Orthogonal 1x1 convolutions around the block: ``"full"`` mixes all channels before,
        ``"both"`` mixes before and un-mixes after (the same convolution), ``"lower"`` mixes the
        lower (second) half before the coupling.
    ndim : int
        Spatial dimensions 1, 2, 3, or 0 for dense ``(B, C)`` data.
    law : str or CouplingLaw
        The law of every coupling of the tree (default ``"affine"``). A law given by name is
        built afresh for each coupling; a law object is shared by all of them.
    scale : (float, float)
        Bounds of the affine law's sigmoid scales.
    recursion_threshold : int
        Blocks with more channels than this recurse into their halves (4, as in
        InvertibleNetworks.jl, in every rank).
    subnet : factory, optional
        Conditioner factory ``(n_in, n_out) -> Block`` (see :mod:`invops.layers.subnets`),
        called once per coupling of the tree, so every branch has its own weights.
    logdet : bool
        Whether to report the log-determinant.
    **subnet_options
        ``k1, k2, p1, p2, s1, s2, activation`` of the default
        :class:`~invops.SubnetFactory` (defaults here ``3, 3, 1, 1, 1, 1``, SiLU).

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
        *,
        ndim: int = 2,
        law: str | CouplingLaw = "affine",
        scale: tuple[float, float] = (0.5, 2.0),
        recursion_threshold: int = 4,
        subnet: Subnet | None = None,
        logdet: bool = True,
        **subnet_options: Any,
    ) -> None:
        owner = type(self).__name__
        if n_in < 2:
            raise ValueError(f"{owner}: n_in must be >= 2, got {n_in}")
        if permute not in _PERMUTE:
            raise ValueError(f"{owner}: permute must be one of {_PERMUTE}, got {permute!r}")
        factory = subnet_factory(subnet, owner, n_hidden, ndim, RESIDUAL_CONV, subnet_options)
        self_kwargs: dict[str, Any] = dict(
            ndim=ndim,
            law=law,
            scale=scale,
            recursion_threshold=recursion_threshold,
            subnet=factory,
        )
        n_a = (n_in + 1) // 2
        n_b = n_in - n_a
        coupling = Coupling(
            n_in,
            require_factory(factory, owner),
            coupling_law(law, scale, owner),
            fixed="first",
            ndim=ndim,
            owner=owner,
        )
        layers: list[InvertibleModule] = [coupling]
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
