"""Two-sided additive coupling of reversible residual networks (RevNet)."""

from __future__ import annotations

from ..module import Chain
from .coupling import Coupling
from .subnets import Subnet, require_factory

__all__ = ["AdditiveCoupling"]


class AdditiveCoupling(Chain):
    r"""RevNet block of Gomez et al.: :math:`y_1 = x_1 + F(x_2)`, :math:`y_2 = x_2 + G(y_1)`.

    Parameters
    ----------
    n_channels : int
        Channels of the input (>= 2).
    F, G : Block, torch.nn.Module or factory, optional
        Residual functions; ``F`` maps the second group to the first group's channels and ``G``
        the first group to the second's. Plain torch modules are wrapped in
        :class:`~invops.TorchBlock`; factories ``(n_in, n_out) -> Block`` are called with those
        sizes.
    n_first : int, optional
        Channels of the first group (default ``ceil(n_channels / 2)``).
    ndim : int or None
        Spatial dimensions (0 for dense) for input checks; None accepts any rank.
    subnet : factory, optional
        Builds both ``F`` and ``G`` (each call gives its own weights) when they are not given.
    logdet : bool
        Whether to report the log-determinant (always 0).

    Notes
    -----
    The inverse is :math:`x_2 = y_2 - G(y_1)`, :math:`x_1 = y_1 - F(x_2)`. The reverse pass
    evaluates ``G`` and ``F`` once each.

    Examples
    --------
    >>> import torch, invops
    >>> F = torch.nn.Conv2d(2, 2, 3, padding=1)
    >>> G = torch.nn.Conv2d(2, 2, 3, padding=1)
    >>> block = invops.AdditiveCoupling(4, F, G, ndim=2)
    >>> x = torch.randn(3, 4, 5, 5)
    >>> bool((block.inverse(block(x)[0])[0] - x).abs().max() < 1e-5)
    True
    """

    def __init__(
        self,
        n_channels: int,
        F: Subnet | None = None,
        G: Subnet | None = None,
        n_first: int | None = None,
        ndim: int | None = None,
        *,
        subnet: Subnet | None = None,
        logdet: bool = True,
    ) -> None:
        owner = type(self).__name__
        if F is None and G is None:
            if subnet is None:
                raise TypeError(f"{owner}: give the residual functions F and G, or subnet=")
            F = G = require_factory(subnet, owner)
        elif F is None or G is None or subnet is not None:
            raise TypeError(f"{owner}: give both F and G, or a subnet factory, not a mix")
        first = Coupling(
            n_channels, F, "additive", n_first=n_first, fixed="second", ndim=ndim, owner=owner
        )
        second = Coupling(
            n_channels,
            G,
            "additive",
            n_first=first.n_first,
            fixed="first",
            ndim=ndim,
            owner=owner,
        )
        super().__init__(first, second, logdet=logdet)

    def _validate(self, x, cond, inverse):
        self.layers[0]._validate(x, cond, inverse)
