"""Reversible residual network (RevNet) of additive couplings with invertible downsampling."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..layers.blocks import MLPBlock, ResidualBlock
from ..layers.coupling_additive import AdditiveCoupling
from ..layers.subnets import Subnet
from ..module import Block, Chain, InvertibleModule
from ._multiscale import check_multiscale_input, squeezer

__all__ = ["NetworkRevNet"]


class NetworkRevNet(Chain):
    r"""RevNet of Gomez et al.: stages of additive couplings, invertible downsampling between.

    Parameters
    ----------
    n_in : int
        Input channels (>= 2).
    n_hidden : int
        Hidden channels of the residual functions.
    blocks : sequence of int
        Number of :class:`~invops.AdditiveCoupling` blocks per stage.
    ndim : int
        Spatial dimensions 1, 2, 3, or 0 for dense data (no downsampling).
    squeeze : {"checkerboard", "patch", "haar"}
        Invertible downsampling between stages (channels x ``2**ndim``).
    activation : callable, optional
        Nonlinearity of the default residual functions (default SiLU).
    subnet : factory, optional
        Builds the residual functions: ``subnet(n_in, n_out)`` is called for ``F`` and for
        ``G`` of every block (see :mod:`invops.layers.subnets`). By default residual blocks of
        3x3 convolutions (an MLP for dense data) that, unlike the couplings' default
        conditioners, do not start at zero.
    logdet : bool
        Whether to report the log-determinant (always 0).

    Notes
    -----
    Each block is :math:`y_1 = x_1 + F(x_2)`, :math:`y_2 = x_2 + G(y_1)` with residual blocks
    :math:`F, G` (3x3 convolutions); stage :math:`s > 0` starts with a squeeze, so the output
    has ``n_in * 2**(ndim * (len(blocks) - 1))`` channels at ``1 / 2**(len(blocks) - 1)`` of
    the spatial size, ready for a classifier head. Activations are recomputed by inversion in
    the reverse pass, so training memory does not grow with the number of blocks.

    Examples
    --------
    >>> import torch, invops
    >>> net = invops.NetworkRevNet(4, 16, blocks=[2, 2])
    >>> y, _ = net(torch.randn(2, 4, 8, 8))
    >>> y.shape
    torch.Size([2, 16, 4, 4])
    """

    def __init__(
        self,
        n_in: int,
        n_hidden: int,
        blocks: Sequence[int],
        ndim: int = 2,
        squeeze: str = "checkerboard",
        activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
        *,
        subnet: Subnet | None = None,
        logdet: bool = True,
    ) -> None:
        if n_in < 2:
            raise ValueError(f"NetworkRevNet: n_in must be >= 2, got {n_in}")
        if not blocks or any(int(b) < 1 for b in blocks):
            raise ValueError(f"NetworkRevNet: blocks must be positive counts, got {blocks}")
        if subnet is None:
            act = F.silu if activation is None else activation

            def subnet(n_a: int, n_b: int) -> Block:
                return _residual(n_a, n_b, n_hidden, ndim, act)

        elif activation is not None:
            raise TypeError("NetworkRevNet: activation configures the default residual functions")
        layers: list[InvertibleModule] = []
        c = n_in
        for stage, count in enumerate(blocks):
            if stage and ndim > 0:
                layers.append(squeezer(squeeze))
                c *= 2**ndim
            for _ in range(int(count)):
                layers.append(AdditiveCoupling(c, ndim=ndim, subnet=subnet))
        super().__init__(*layers, logdet=logdet)
        self.n_in, self.n_out, self.ndim = n_in, c, ndim
        self.n_downsamplings = len(blocks) - 1 if ndim > 0 else 0

    def _validate(self, x, cond, inverse):
        if inverse:  # the output: n_out channels at the reduced spatial size
            if x.ndim != self.ndim + 2 or x.shape[1] != self.n_out:
                raise ValueError(
                    f"NetworkRevNet: y must have {self.n_out} channels and {self.ndim} spatial "
                    f"dimensions, got shape {tuple(x.shape)}"
                )
            return
        check_multiscale_input(
            x,
            self.n_in,
            self.n_downsamplings,
            self.ndim,
            "NetworkRevNet",
            "x",
            label="(stages - 1)",
        )


def _residual(n_in: int, n_out: int, n_hidden: int, ndim: int, act) -> Block:
    if ndim == 0:
        return MLPBlock(n_in, n_hidden, n_out, activation=act)
    return ResidualBlock(
        n_in, n_hidden, n_out=n_out, fan=True, final_activation=False, activation=act, ndim=ndim
    )
