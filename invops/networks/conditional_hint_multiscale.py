"""Multiscale conditional HINT: both lanes squeezed and split per scale."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..layers._subnets import conv_kwargs
from ._multiscale import check_multiscale_input, check_scale_args
from .conditional_hint import TwoLane, TwoLaneNetwork, conditional_hint_steps

__all__ = ["NetworkMultiScaleConditionalHINT"]


class NetworkMultiScaleConditionalHINT(TwoLaneNetwork):
    r"""Multiscale conditional HINT: :math:`x` given :math:`y`, both squeezed and split per scale.

    Parameters
    ----------
    n_in, n_cond : int
        Channels of :math:`x` and of :math:`y` (same spatial size).
    n_hidden, L, K : int
        Conditioner width, scales, steps per scale.
    split_scales : bool
        Factor out half of both lanes' channels after every scale but the last.
    permute : bool
        Orthogonal 1x1 convolutions before each lane's HINT block.
    ndim : int
        Spatial dimensions 1, 2, 3, or 0 for dense data (no squeeze).
    squeeze : {"checkerboard", "patch", "haar"}
        Squeeze per scale, the same for both lanes.
    k1, k2, p1, p2, s1, s2 : int
        Conditioner convolutions.
    activation : callable, optional
        Conditioner nonlinearity (default SiLU).
    logdet : bool
        Whether to report the log-determinant.

    Notes
    -----
    Scale :math:`i` squeezes both lanes, applies :math:`K` steps of
    :class:`~invops.NetworkConditionalHINT` (condition lane first, then the input lane
    conditioned on it), hands the first ``ceil(c/2)`` channels of both lanes to scale
    :math:`i+1` (``split_scales``; all of them otherwise) and unsqueezes, so both latents keep
    their inputs' shapes. ``forward(x, y)`` gives :math:`z_x` and the logdet of
    :math:`x \mapsto z_x` given :math:`y`; :meth:`forward_y` / :meth:`inverse_y` are the
    condition lane, and the joint logdet is the sum. Reverse passes in both directions recover
    the condition lane by inversion; their memory does not grow with depth, except that
    ``backward_inverse`` keeps one cotangent of the condition's size per step of a scale.

    Examples
    --------
    >>> import torch, invops
    >>> net = invops.NetworkMultiScaleConditionalHINT(1, 1, 8, L=2, K=1, split_scales=True)
    >>> x, y = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    >>> zx, logdet = net(x, y)
    >>> zx.shape
    torch.Size([2, 1, 8, 8])
    """

    def __init__(
        self,
        n_in: int,
        n_cond: int,
        n_hidden: int,
        L: int,
        K: int,
        split_scales: bool = False,
        permute: bool = True,
        ndim: int = 2,
        squeeze: str = "checkerboard",
        k1: int = 3,
        k2: int = 3,
        p1: int = 1,
        p2: int = 1,
        s1: int = 1,
        s2: int = 1,
        activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
        logdet: bool = True,
    ) -> None:
        super().__init__(logdet=logdet)
        owner = "NetworkMultiScaleConditionalHINT"
        check_scale_args(owner, L, K, ndim)
        step_kwargs = dict(
            n_hidden=n_hidden,
            ndim=ndim,
            conv=conv_kwargs(k1, k2, p1, p2, s1, s2),
            activation=activation,
            permute=permute,
        )

        def level(cx: int, cy: int, i: int) -> TwoLane:
            factor = 2**ndim if ndim else 1
            cx, cy = cx * factor, cy * factor
            if min(cx, cy) < 2:
                raise ValueError(
                    f"{owner}: scale {i} would have {cx} and {cy} channels; HINT needs 2 "
                    "(use fewer scales or split_scales=False)"
                )
            x_steps, y_steps = conditional_hint_steps(cx, cy, K, **step_kwargs)
            deeper = None
            if i + 1 < L:
                if split_scales:
                    deeper = level((cx + 1) // 2, (cy + 1) // 2, i + 1)
                else:
                    deeper = level(cx, cy, i + 1)
            return TwoLane(
                x_steps, y_steps, deeper, squeeze if ndim else None, split_scales, logdet
            )

        self._set_top(level(n_in, n_cond, 0))
        self.n_in, self.n_cond_channels, self.L, self.ndim = n_in, n_cond, L, ndim

    def _validate(self, x, cond, inverse):
        owner = "NetworkMultiScaleConditionalHINT"
        check_multiscale_input(x, self.n_in, self.L, self.ndim, owner, "zx" if inverse else "x")
        self._check_observation(x, cond, owner)
