"""Element-wise affine layer with a learned scale and bias for every entry."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..module import InvertibleModule
from .actnorm import scale_shift_tangent

__all__ = ["AffineLayer"]


class AffineLayer(InvertibleModule):
    r"""Element-wise :math:`y = e^{s} \odot x + t` with a parameter per entry of a sample.

    Parameters
    ----------
    shape : sequence of int
        Shape of one sample, ``(C,)`` for dense data or ``(C, *spatial)``.
    logdet : bool
        Whether to return the log-determinant.

    Notes
    -----
    :math:`s` and :math:`t` have the shape of one sample and are shared across the batch.
    The scale is parametrised by its logarithm so that the layer is invertible for every
    parameter value; it starts at the identity (:math:`s = 0, t = 0`). The log-determinant per
    sample is :math:`\sum s`.

    Examples
    --------
    >>> import torch, invops
    >>> layer = invops.AffineLayer((3, 4, 4))
    >>> y, logdet = layer(torch.randn(2, 3, 4, 4))
    >>> logdet.tolist()
    [0.0, 0.0]
    """

    def __init__(self, shape: Sequence[int] | int, logdet: bool = True) -> None:
        super().__init__(logdet=logdet)
        shape = (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)
        if not shape or any(s < 1 for s in shape):
            raise ValueError(
                f"AffineLayer: shape must be a non-empty tuple of sizes >= 1, got {shape}"
            )
        self.shape = shape
        self.log_scale = torch.nn.Parameter(torch.zeros(shape))
        self.bias = torch.nn.Parameter(torch.zeros(shape))

    def extra_repr(self) -> str:
        return f"shape={self.shape}, logdet={self.logdet}"

    def _validate(self, x, cond, inverse):
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(
                f"AffineLayer: {'y' if inverse else 'x'} must have shape "
                f"(B, {', '.join(map(str, self.shape))}), got {tuple(x.shape)}"
            )

    def _forward(self, x, *cond):
        return x * self.log_scale.exp() + self.bias, self.log_scale.sum().expand(x.shape[0])

    def _inverse(self, y, *cond):
        return (y - self.bias) * (-self.log_scale).exp(), -self.log_scale.sum().expand(y.shape[0])

    def _tangent_rule(self, x, cond, dx, dcond, dtheta, inverse=False):
        ds, dt = dtheta.get(self.log_scale), dtheta.get(self.bias)
        out, dout, _, _ = scale_shift_tangent(x, dx, self.log_scale, self.bias, ds, dt, inverse)
        sign = -1.0 if inverse else 1.0
        logdet = sign * self.log_scale.sum().expand(x.shape[0])
        dlogdet = None if ds is None else sign * ds.sum().expand(x.shape[0])
        return out, dout, logdet, dlogdet
