"""Hyperbolic network: a stack of leapfrog layers with squeeze and unsqueeze actions."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..layers.hyperbolic import HyperbolicLayer
from ..layers.subnets import Subnet
from ..module import Chain

__all__ = ["NetworkHyperbolic"]


class NetworkHyperbolic(Chain):
    r"""Fully reversible hyperbolic network of Lensink, Peters and Haber.

    Parameters
    ----------
    n_in : int
        Channels of each of the two input states; the input is ``cat(x_prev, x_curr)`` with
        ``2 * n_in`` channels (``cat(x, x)`` starts the leapfrog from rest).
    architecture : sequence of (str, int)
        One ``(action, n_hidden)`` per layer, ``action`` in ``"squeeze"``, ``"none"``,
        ``"unsqueeze"`` (see :class:`~invops.HyperbolicLayer`).
    k, s, p : int
        Kernel size, stride and padding of every layer's convolution.
    alpha : float
        Leapfrog step size.
    activation : callable
        Nonlinearity (default ``torch.tanh``).
    ndim : int
        Spatial dimensions 1, 2 or 3.
    subnet : factory, optional
        Replaces every layer's :math:`\alpha K^T\sigma(K\,\cdot + b)` by a residual
        function from ``subnet(c, c)`` (see :class:`~invops.HyperbolicLayer`).
    logdet : bool
        Whether to report the log-determinant (always 0).

    Notes
    -----
    Each layer maps :math:`(x_{j-1}, x_j) \mapsto (x_j, x_{j+1})` with
    :math:`x_{j+1} = 2x_j - x_{j-1} - \alpha K_j^T\sigma(K_j x_j + b_j)`, after its squeeze
    action. The network preserves volume: its logdet is 0 (InvertibleNetworks.jl reports 1).
    Training memory does not grow with depth, which is what makes it suitable for segmenting
    large 3D volumes. The output's channels and spatial size follow the actions.

    Examples
    --------
    >>> import torch, invops
    >>> net = invops.NetworkHyperbolic(2, [("squeeze", 8), ("none", 16), ("unsqueeze", 8)])
    >>> x = torch.randn(3, 2, 8, 8)
    >>> y, logdet = net(torch.cat([x, x], dim=1))
    >>> y.shape
    torch.Size([3, 4, 8, 8])
    """

    def __init__(
        self,
        n_in: int,
        architecture: Sequence[tuple[str, int]],
        k: int = 3,
        s: int = 1,
        p: int = 1,
        alpha: float = 1.0,
        activation: Callable[[torch.Tensor], torch.Tensor] = torch.tanh,
        ndim: int = 2,
        *,
        subnet: Subnet | None = None,
        logdet: bool = True,
    ) -> None:
        if not architecture:
            raise ValueError("NetworkHyperbolic: architecture must list at least one layer")
        layers, channels = [], n_in
        for i, entry in enumerate(architecture):
            if len(entry) != 2:
                raise ValueError(
                    f"NetworkHyperbolic: architecture[{i}] must be (action, n_hidden), got {entry}"
                )
            action, n_hidden = entry
            layer = HyperbolicLayer(
                channels,
                n_hidden,
                action=action,
                alpha=alpha,
                k=k,
                s=s,
                p=p,
                activation=activation,
                ndim=ndim,
                subnet=subnet,
            )
            layers.append(layer)
            channels = layer.n_out
        super().__init__(*layers, logdet=logdet)
        self.n_in, self.n_out, self.ndim = n_in, channels, ndim
        self._valid_shapes: set[tuple[tuple[int, ...], bool]] = set()

    def _validate(self, x, cond, inverse):
        # each layer's squeeze action constrains the shape it meets: follow the shape through
        # the stack on the meta device (no data, no compute). The walk costs about as much
        # Python as a small forward pass, so a shape that passed is remembered.
        key = (tuple(x.shape), inverse)
        if key in self._valid_shapes:
            return
        probe = torch.empty(x.shape, dtype=x.dtype, device="meta")
        for layer in reversed(self.layers) if inverse else self.layers:
            layer._validate(probe, (), inverse)
            probe = (layer._inverse if inverse else layer._forward)(probe)[0]
        self._valid_shapes.add(key)
