r"""Conditioner factories: how coupling layers and networks build their sub-networks.

Every coupling layer and network takes ``subnet=``, a *factory*: a callable
``subnet(n_in, n_out) -> Block`` (or any ``torch.nn.Module``, wrapped in
:class:`~invops.TorchBlock`) that the layer calls once per conditioner it needs, each call
giving a sub-network with its own weights. Conditional layers call it as
``subnet(n_in, n_out, n_cond=c)``; the sub-network is then called as ``net(x, cond)``.
``n_in`` and ``n_out`` are channels (features, for dense data), and the output is read by the
coupling's law (for the affine law: scale logits, then shifts).

Without ``subnet`` a layer uses :class:`SubnetFactory`, configured by the layer's ``n_hidden``
and the keyword arguments ``k1, k2, p1, p2, s1, s2, activation``, documented here once.

Examples
--------
A user conditioner, one per coupling of a HINT tree:

>>> import torch, invops
>>> def small_cnn(n_in, n_out):
...     return torch.nn.Sequential(torch.nn.Conv2d(n_in, 16, 3, padding=1), torch.nn.SiLU(),
...                                torch.nn.Conv2d(16, n_out, 3, padding=1))
>>> hint = invops.CouplingLayerHINT(6, subnet=small_cnn)
>>> y, logdet = hint(torch.randn(2, 6, 8, 8))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..module import Block
from .blocks import ConditionalResidualBlock, MLPBlock, ResidualBlock, TorchBlock

__all__ = ["SubnetFactory", "as_block", "build_subnet", "require_factory", "subnet_factory"]

_CONV_KEYS = ("k1", "k2", "p1", "p2", "s1", "s2")

# The default convolutions of each layer family (InvertibleNetworks.jl's choices)
GLOW_CONV = dict(k1=3, k2=1, p1=1, p2=0, s1=1, s2=1)
RESIDUAL_CONV = dict(k1=3, k2=3, p1=1, p2=1, s1=1, s2=1)
IRIM_CONV = dict(k1=4, k2=3, p1=0, p2=1, s1=4, s2=1)  # downsamples by 4
_OPTION_KEYS = (*_CONV_KEYS, "activation")


def as_block(subnet: Block | torch.nn.Module, owner: str = "subnet") -> Block:
    """Wrap a plain ``torch.nn.Module`` in :class:`~invops.TorchBlock`; pass blocks through."""
    if isinstance(subnet, Block):
        return subnet
    if isinstance(subnet, torch.nn.Module):
        return TorchBlock(subnet)
    raise TypeError(
        f"{owner}: a sub-network must be a Block or torch.nn.Module, got {type(subnet).__name__}"
    )


class SubnetFactory:
    r"""The default conditioner factory: residual blocks for images, MLPs for dense data.

    Parameters
    ----------
    n_hidden : int
        Hidden channels (features, for dense data).
    k1, k2, p1, p2, s1, s2 : int
        Kernel sizes, paddings and strides of the outer (1) and inner (2) convolutions of
        :class:`~invops.ResidualBlock` (``Y1 = W1 *_{s1} X``, an inner residual convolution,
        and the transposed ``W3`` restoring the input's size). Layers have their own defaults
        (InvertibleNetworks.jl's), e.g. ``(3, 1, 1, 0, 1, 1)`` for Glow steps and
        ``(4, 3, 0, 1, 4, 1)`` for the i-RIM, which downsamples by 4.
    ndim : int
        Spatial dimensions 1, 2, 3, or 0 for dense data (an :class:`~invops.MLPBlock` with two
        hidden layers).
    activation : callable, optional
        Element-wise nonlinearity, default SiLU. Not ReLU: the reverse pass recomputes
        activations by inversion, and in float32 a pre-activation recomputed within rounding of
        a ReLU kink can flip its mask and move the gradient by a finite amount (seen up to 3e-3
        relative in 64-layer HINT stacks); with a smooth nonlinearity the difference stays at
        rounding level.

    Notes
    -----
    ``factory(n_in, n_out)`` builds a :class:`~invops.ResidualBlock` (``fan=True``, no final
    activation) whose last layer starts at zero, so the coupling built on it starts as the
    identity; ``factory(n_in, n_out, n_cond=c)`` builds a
    :class:`~invops.ConditionalResidualBlock` (image or vector conditions) or, for dense data,
    an MLP on the concatenation of input and condition.

    Examples
    --------
    >>> import torch, invops
    >>> make = invops.SubnetFactory(16, ndim=1, k1=5, p1=2)
    >>> block = make(3, 4)
    >>> block(torch.randn(2, 3, 10)).shape
    torch.Size([2, 4, 10])
    """

    def __init__(
        self,
        n_hidden: int = 32,
        k1: int = 3,
        k2: int = 3,
        p1: int = 1,
        p2: int = 1,
        s1: int = 1,
        s2: int = 1,
        ndim: int = 2,
        activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if ndim not in (0, 1, 2, 3):
            raise ValueError(f"SubnetFactory: ndim must be 0, 1, 2 or 3, got {ndim}")
        if int(n_hidden) < 1:
            raise ValueError(f"SubnetFactory: n_hidden must be >= 1, got {n_hidden}")
        self.n_hidden, self.ndim = int(n_hidden), ndim
        self.conv = dict(k1=k1, k2=k2, p1=p1, p2=p2, s1=s1, s2=s2)
        self.activation = F.silu if activation is None else activation

    def __repr__(self) -> str:
        conv = ", ".join(f"{k}={v}" for k, v in self.conv.items())
        return f"SubnetFactory({self.n_hidden}, {conv}, ndim={self.ndim})"

    def __call__(self, n_in: int, n_out: int, n_cond: int = 0) -> Block:
        if self.ndim == 0:
            return MLPBlock(
                n_in + n_cond, self.n_hidden, n_out, activation=self.activation, zero_init=True
            )
        kwargs: dict[str, Any] = dict(
            n_out=n_out,
            fan=True,
            final_activation=False,
            zero_init=True,
            ndim=self.ndim,
            activation=self.activation,
            **self.conv,
        )
        if n_cond:
            return ConditionalResidualBlock(n_in, n_cond, self.n_hidden, **kwargs)
        return ResidualBlock(n_in, self.n_hidden, **kwargs)


Subnet = Callable[..., torch.nn.Module] | torch.nn.Module


def subnet_factory(
    subnet: Subnet | None,
    owner: str,
    n_hidden: int,
    ndim: int,
    defaults: dict[str, Any],
    options: dict[str, Any],
) -> Subnet:
    """``subnet`` itself, or the :class:`SubnetFactory` a layer builds from its own arguments.

    ``defaults`` are the layer's convolution defaults; ``options`` the keyword arguments the user
    gave (``k1`` ... ``s2``, ``activation``), which only configure the default factory.
    """
    unknown = sorted(set(options) - set(_OPTION_KEYS))
    if unknown:
        raise TypeError(
            f"{owner}: unexpected keyword argument(s) {unknown}; the default conditioner takes "
            f"{list(_OPTION_KEYS)}"
        )
    if subnet is not None:
        if options:
            raise TypeError(
                f"{owner}: {sorted(options)} configure the default conditioner and cannot be "
                "combined with subnet= (configure your factory instead)"
            )
        if not callable(subnet):
            raise TypeError(
                f"{owner}: subnet must be a factory (n_in, n_out) -> Block or a "
                f"torch.nn.Module, got {type(subnet).__name__}"
            )
        return subnet
    return SubnetFactory(n_hidden, ndim=ndim, **{**defaults, **options})


def require_factory(subnet: Subnet, owner: str) -> Subnet:
    """``subnet`` if it is a factory; a layer with several conditioners cannot take one module.

    Passing one module object to several couplings would silently tie their weights.
    """
    if isinstance(subnet, torch.nn.Module):
        raise TypeError(
            f"{owner}: needs several conditioners, so subnet must be a factory "
            f"(n_in, n_out) -> Block called once per conditioner, got a "
            f"{type(subnet).__name__} instance"
        )
    return subnet


def build_subnet(subnet: Subnet, n_in: int, n_out: int, owner: str, n_cond: int = 0) -> Block:
    """Call a factory (``subnet(n_in, n_out)``, or with ``n_cond=``), or take a ready module."""
    if isinstance(subnet, torch.nn.Module):
        return as_block(subnet, owner)
    built = subnet(n_in, n_out, n_cond=n_cond) if n_cond else subnet(n_in, n_out)
    return as_block(built, owner)
