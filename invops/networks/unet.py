"""Invertible U-Net of Etmann et al. (2020)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..layers.conv1x1 import Conv1x1
from ..layers.coupling_glow import CouplingLayerGlow
from ..layers.subnets import GLOW_CONV, Subnet, subnet_factory
from ..module import Chain, Identity, InvertibleModule, Parallel
from ._multiscale import check_multiscale_input, squeezer

__all__ = ["NetworkUNet"]


def _resample(c: int, ndim: int) -> Chain:
    """Learned orthogonal downsampling: kernel = stride = 2, an orthogonal ``2**d c`` matrix."""
    return Chain(squeezer("patch"), Conv1x1(c * 2**ndim, n_reflections=c * 2**ndim))


class NetworkUNet(Chain):
    r"""Fully invertible U-Net (iUNet) with learned orthogonal down- and upsampling.

    Parameters
    ----------
    n_in : int
        Input channels (>= 2).
    n_hidden : int
        Conditioner width of the coupling blocks.
    blocks : sequence of int
        Coupling blocks per level on the way down (the way up mirrors it); its length is the
        number of levels.
    ndim : int
        Spatial dimensions 1, 2 or 3.
    subnet : factory, optional
        Conditioner factory ``(n_in, n_out) -> Block`` (see :mod:`invops.layers.subnets`),
        called once per coupling.
    logdet : bool
        Whether to report the log-determinant.
    **subnet_options
        ``k1, k2, p1, p2, s1, s2, activation`` of the default
        :class:`~invops.SubnetFactory` (defaults ``3, 1, 1, 0, 1, 1``, SiLU).

    Notes
    -----
    Level :math:`i` on :math:`c` channels applies its down blocks, keeps
    :math:`c - \lceil c/2\rceil` channels as the skip connection and sends
    :math:`\lceil c/2 \rceil` channels down: a learned orthogonal downsampling :math:`D_i`
    (kernel size = stride = 2, i.e. a patch squeeze followed by an orthogonal
    :math:`2^d c' \times 2^d c'` matrix, full Householder parametrisation), level
    :math:`i + 1`, and a learned orthogonal upsampling :math:`U_i` (its own orthogonal matrix,
    then the unsqueeze); the two parts are concatenated and pass the up blocks. Coupling blocks
    are Glow steps (1x1 convolution and affine coupling). Output and input have the same shape;
    spatial sizes must be multiples of ``2**(len(blocks) - 1)``.

    Examples
    --------
    >>> import torch, invops
    >>> net = invops.NetworkUNet(4, 8, blocks=[1, 1, 1])
    >>> y, logdet = net(torch.randn(2, 4, 8, 8))
    >>> y.shape
    torch.Size([2, 4, 8, 8])
    """

    def __init__(
        self,
        n_in: int,
        n_hidden: int,
        blocks: Sequence[int],
        ndim: int = 2,
        *,
        subnet: Subnet | None = None,
        logdet: bool = True,
        **subnet_options: Any,
    ) -> None:
        if n_in < 2:
            raise ValueError(f"NetworkUNet: n_in must be >= 2, got {n_in}")
        if ndim not in (1, 2, 3):
            raise ValueError(f"NetworkUNet: ndim must be 1, 2 or 3, got {ndim}")
        if not blocks or any(int(b) < 1 for b in blocks):
            raise ValueError(f"NetworkUNet: blocks must be positive counts, got {blocks}")
        self_blocks = [int(b) for b in blocks]
        factory = subnet_factory(subnet, "NetworkUNet", n_hidden, ndim, GLOW_CONV, subnet_options)

        def couplings(c: int, count: int) -> list[InvertibleModule]:
            return [CouplingLayerGlow(c, ndim=ndim, subnet=factory) for _ in range(count)]

        def level(c: int, i: int) -> list[InvertibleModule]:
            layers = couplings(c, self_blocks[i])
            if i + 1 < len(self_blocks):
                down = (c + 1) // 2
                deeper = Chain(
                    _resample(down, ndim),
                    *level(down * 2**ndim, i + 1),
                    _resample(down, ndim).reverse(),
                )
                layers.append(Parallel(deeper, Identity(), sizes=(down, c - down)))
                layers += couplings(c, self_blocks[i])
            return layers

        super().__init__(*level(n_in, 0), logdet=logdet)
        self.n_in, self.levels, self.ndim = n_in, len(self_blocks), ndim

    def _validate(self, x, cond, inverse):
        check_multiscale_input(
            x,
            self.n_in,
            self.levels - 1,
            self.ndim,
            "NetworkUNet",
            "y" if inverse else "x",
            label="(levels - 1)",
        )
