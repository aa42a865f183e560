"""Non-invertible sub-networks used inside coupling layers.

A coupling layer's conditioner is any :class:`~invops.module.Block`: a residual block of strided
and transposed convolutions (1D/2D/3D), a multilayer perceptron for dense data, or any
``torch.nn.Module`` wrapped in :class:`TorchBlock`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F

from .._autodiff import add_tangents, conv_tangent, elementwise_tangent, linear_tangent
from ..activations import galu, galu_tangent
from ..module import Block

__all__ = ["ResidualBlock", "ConditionalResidualBlock", "TorchBlock", "MLPBlock"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _glorot(shape: tuple[int, ...], fan_in: int, fan_out: int) -> torch.nn.Parameter:
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return torch.nn.Parameter(torch.empty(shape).uniform_(-bound, bound))


def _check_ndim(ndim: int, owner: str) -> None:
    if ndim not in (1, 2, 3):
        raise ValueError(f"{owner}: ndim must be 1, 2 or 3, got {ndim}")


def check_kernel_fits(x: torch.Tensor, k: int, p: int, owner: str) -> None:
    """Raise ``ValueError`` if a kernel ``k`` with padding ``p`` is larger than a spatial size."""
    if any(n + 2 * p < k for n in x.shape[2:]):
        raise ValueError(
            f"{owner}: spatial size {tuple(x.shape[2:])} is smaller than the kernel size {k} "
            f"with padding {p}"
        )


def restoring_padding(h: torch.Tensor, size, k: int, p: int, s: int) -> tuple[int, ...]:
    """``output_padding`` that makes a transposed convolution of ``h`` return ``size``.

    For ``h`` = conv(x) with kernel ``k``, padding ``p`` and stride ``s``, the missing part
    ``(n + 2p - k) mod s`` always lies in ``[0, s)``, so every such size is restored.
    """
    return tuple(n - ((m - 1) * s - 2 * p + k) for n, m in zip(size, h.shape[2:]))


def _check_input(x: torch.Tensor, n_in: int, ndim: int, owner: str, name: str = "x") -> None:
    if x.ndim != ndim + 2 or x.shape[1] != n_in:
        raise ValueError(
            f"{owner}: {name} must have shape (B, {n_in}, {', '.join('*' * ndim)}) "
            f"({ndim}D, {n_in} channels), got {tuple(x.shape)}"
        )


class ResidualBlock(Block):
    r"""Strided convolution, inner residual convolution, transposed convolution back.

    Parameters
    ----------
    n_in, n_hidden : int
        Input and hidden channels.
    n_out : int, optional
        Channels of the transposed convolution's output (default ``2 * n_in``).
    k1, k2, p1, p2, s1, s2 : int
        Kernel sizes, paddings and strides of the outer (1) and inner (2) convolutions.
    activation : callable
        Element-wise nonlinearity (default ``torch.relu``).
    fan : bool
        If True the block outputs :math:`\sigma(Y_3)` (or :math:`Y_3` when
        ``final_activation=False``) with ``n_out`` channels; if False it outputs
        :math:`\mathrm{GaLU}(Y_3)` with ``n_out / 2`` channels, as in InvertibleNetworks.jl.
    final_activation : bool
        Only with ``fan=True``: apply ``activation`` to the output. invops' coupling layers use
        ``False``: a final ReLU (the reference's choice) forces the log-scale and shift of every
        coupling to be non-negative.
    zero_init : bool
        Start the transposed convolution at zero, so a coupling built on this block starts as the
        identity (the Glow initialisation).
    ndim : int
        Spatial dimensions, 1, 2 or 3.

    Notes
    -----
    With :math:`*` a convolution and :math:`*^T` its transpose,

    .. math::
        Y_1 = W_1 *_{s_1} X + b_1,\quad X_2 = \sigma(Y_1),\quad
        Y_2 = X_2 + W_2 *_{s_2} X_2 + b_2,\quad X_3 = \sigma(Y_2),\quad
        Y_3 = W_3 *^T_{s_1} X_3,

    where the transposed convolution restores the spatial size of :math:`X` (the inner
    convolution must preserve the size of :math:`X_2`).

    Examples
    --------
    >>> import torch, invops
    >>> rb = invops.ResidualBlock(3, 8, n_out=4, k1=4, p1=0, s1=2, fan=True)
    >>> rb(torch.randn(2, 3, 8, 8)).shape
    torch.Size([2, 4, 8, 8])
    """

    def __init__(
        self,
        n_in: int,
        n_hidden: int,
        n_out: int | None = None,
        k1: int = 3,
        k2: int = 3,
        p1: int = 1,
        p2: int = 1,
        s1: int = 1,
        s2: int = 1,
        activation: Callable[[torch.Tensor], torch.Tensor] = torch.relu,
        fan: bool = False,
        final_activation: bool = True,
        zero_init: bool = False,
        ndim: int = 2,
    ) -> None:
        super().__init__()
        _check_ndim(ndim, "ResidualBlock")
        n_out = 2 * n_in if n_out is None else n_out
        if min(n_in, n_hidden, n_out) < 1:
            raise ValueError(
                f"ResidualBlock: channel counts must be >= 1, got n_in={n_in}, "
                f"n_hidden={n_hidden}, n_out={n_out}"
            )
        if not fan and n_out % 2:
            raise ValueError(
                f"ResidualBlock: fan=False (GaLU output) needs an even n_out, got {n_out}"
            )
        self.n_in, self.n_hidden, self.n_out, self.ndim = n_in, n_hidden, n_out, ndim
        self.k1, self.k2, self.p1, self.p2, self.s1, self.s2 = k1, k2, p1, p2, s1, s2
        self.activation, self.fan, self.final_activation = activation, fan, final_activation
        kd1, kd2 = (k1,) * ndim, (k2,) * ndim
        self.W1 = _glorot((n_hidden, n_in, *kd1), n_in * k1**ndim, n_hidden * k1**ndim)
        self.W2 = _glorot((n_hidden, n_hidden, *kd2), n_hidden * k2**ndim, n_hidden * k2**ndim)
        self.W3 = _glorot((n_hidden, n_out, *kd1), n_hidden * k1**ndim, n_out * k1**ndim)
        if zero_init:
            with torch.no_grad():
                self.W3.zero_()
        self.b1 = torch.nn.Parameter(torch.zeros(n_hidden))
        self.b2 = torch.nn.Parameter(torch.zeros(n_hidden))

    def extra_repr(self) -> str:
        return f"{self.n_in}, {self.n_hidden}, n_out={self.n_out}, ndim={self.ndim}, fan={self.fan}"

    def _inner_fits(self, x2: torch.Tensor) -> bool:
        return all(n + 2 * self.p2 >= self.k2 for n in x2.shape[2:])

    def _check_inner(self, x2: torch.Tensor, inner: torch.Tensor | None) -> None:
        if inner is None or inner.shape != x2.shape:
            raise ValueError(
                f"{type(self).__name__}: the inner convolution (k2={self.k2}, p2={self.p2}, "
                f"s2={self.s2}) must preserve the hidden shape {tuple(x2.shape)}"
                + ("" if inner is None else f", got {tuple(inner.shape)}")
            )

    def _hidden(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        check_kernel_fits(x, self.k1, self.p1, type(self).__name__)
        conv = _CONV[self.ndim]
        y1 = conv(x, self.W1, self.b1, stride=self.s1, padding=self.p1)
        if extra is not None:
            y1 = y1 + extra
        x2 = self.activation(y1)
        inner = (
            conv(x2, self.W2, self.b2, stride=self.s2, padding=self.p2)
            if self._inner_fits(x2)
            else None
        )
        self._check_inner(x2, inner)
        assert inner is not None  # _check_inner raised otherwise
        return self.activation(x2 + inner)

    def _output(self, x3: torch.Tensor, size: torch.Size) -> torch.Tensor:
        y3 = _CONV_T[self.ndim](
            x3,
            self.W3,
            stride=self.s1,
            padding=self.p1,
            output_padding=restoring_padding(x3, size, self.k1, self.p1, self.s1),
        )
        if not self.fan:
            return galu(y3)
        return self.activation(y3) if self.final_activation else y3

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.n_in, self.ndim, "ResidualBlock")
        return self._output(self._hidden(x), x.shape[2:])

    # -- forward mode, by hand: every convolution with its tangent, activations by their kernels
    _tangent_math = ("_forward", "_hidden", "_output")

    def _hidden_tangent(self, x, dx, dtheta, extra=None, dextra=None):
        check_kernel_fits(x, self.k1, self.p1, type(self).__name__)
        conv, act, get = _CONV[self.ndim], self.activation, dtheta.get
        W1, W2, b1, b2 = self.W1, self.W2, self.b1, self.b2
        y1, dy1 = conv_tangent(
            conv, x, dx, W1, get(W1), b1, get(b1), stride=self.s1, padding=self.p1
        )
        if extra is not None:
            y1, dy1 = y1.add_(extra), add_tangents(dy1, dextra)
        x2, dx2 = elementwise_tangent(act, y1, dy1)
        inner, dinner = None, None
        if self._inner_fits(x2):
            inner, dinner = conv_tangent(
                conv, x2, dx2, W2, get(W2), b2, get(b2), stride=self.s2, padding=self.p2
            )
        self._check_inner(x2, inner)
        return elementwise_tangent(act, inner.add_(x2), add_tangents(dinner, dx2))

    def _output_tangent(self, x3, dx3, size, dtheta):
        y3, dy3 = conv_tangent(
            _CONV_T[self.ndim],
            x3,
            dx3,
            self.W3,
            dtheta.get(self.W3),
            transposed=True,
            stride=self.s1,
            padding=self.p1,
            output_padding=restoring_padding(x3, size, self.k1, self.p1, self.s1),
        )
        if not self.fan:
            return galu_tangent(y3, dy3)
        if self.final_activation:
            return elementwise_tangent(self.activation, y3, dy3)
        return y3, dy3

    def _tangent_rule(self, x, cond, dx, dcond, dtheta):
        _check_input(x, self.n_in, self.ndim, "ResidualBlock")
        x3, dx3 = self._hidden_tangent(x, dx, dtheta)
        return self._output_tangent(x3, dx3, x.shape[2:], dtheta)


class ConditionalResidualBlock(ResidualBlock):
    r"""A :class:`ResidualBlock` whose first hidden layer also sees a condition.

    Parameters
    ----------
    n_in, n_cond, n_hidden : int
        Channels of the input, of the condition and of the hidden layers.
    **kwargs
        As for :class:`ResidualBlock`.

    Notes
    -----
    The condition :math:`c` enters the first pre-activation,
    :math:`Y_1 = W_1 *_{s_1} X + b_1 + W_0 *_{s_1} c`, with :math:`W_0` a convolution like
    :math:`W_1`. It is either an image with the input's spatial size ``(B, n_cond, *spatial)``,
    or a dense vector ``(B, n_cond)``, which is broadcast to a constant image of that size first.
    One weight serves both, so no parameter is left unused (DistributedDataParallel requires
    that without ``find_unused_parameters``). Unlike InvertibleNetworks.jl, nothing depends on
    the batch size.

    Examples
    --------
    >>> import torch, invops
    >>> rb = invops.ConditionalResidualBlock(2, 5, 8, n_out=4, fan=True)
    >>> rb(torch.randn(3, 2, 6, 6), torch.randn(3, 5)).shape
    torch.Size([3, 4, 6, 6])
    """

    def __init__(self, n_in: int, n_cond: int, n_hidden: int, **kwargs) -> None:
        super().__init__(n_in, n_hidden, **kwargs)
        if n_cond < 1:
            raise ValueError(f"ConditionalResidualBlock: n_cond must be >= 1, got {n_cond}")
        self.n_cond = n_cond
        k = self.k1**self.ndim
        self.W0 = _glorot((n_hidden, n_cond, *(self.k1,) * self.ndim), n_cond * k, n_hidden * k)

    def _condition_image(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The condition as an image of ``x``'s spatial size (a dense one is broadcast)."""
        owner = "ConditionalResidualBlock"
        if c.ndim == 2 and c.shape[1] == self.n_cond and c.shape[0] == x.shape[0]:
            return c.reshape(*c.shape, *([1] * self.ndim)).expand(*c.shape, *x.shape[2:])
        if (
            c.ndim == x.ndim
            and c.shape[:2] == (x.shape[0], self.n_cond)
            and c.shape[2:] == x.shape[2:]
        ):
            return c
        raise ValueError(
            f"{owner}: condition must have shape ({x.shape[0]}, {self.n_cond}) or "
            f"({x.shape[0]}, {self.n_cond}, {', '.join(map(str, x.shape[2:]))}), "
            f"got {tuple(c.shape)}"
        )

    def _forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.n_in, self.ndim, "ConditionalResidualBlock")
        image = self._condition_image(x, c)
        extra = _CONV[self.ndim](image, self.W0, stride=self.s1, padding=self.p1)
        return self._output(self._hidden(x, extra), x.shape[2:])

    def _tangent_rule(self, x, cond, dx, dcond, dtheta):
        _check_input(x, self.n_in, self.ndim, "ConditionalResidualBlock")
        (c,), (dc,) = cond, dcond
        image = self._condition_image(x, c)
        dimage = None if dc is None else self._condition_image(x, dc)
        extra, dextra = conv_tangent(
            _CONV[self.ndim],
            image,
            dimage,
            self.W0,
            dtheta.get(self.W0),
            stride=self.s1,
            padding=self.p1,
        )
        x3, dx3 = self._hidden_tangent(x, dx, dtheta, extra, dextra)
        return self._output_tangent(x3, dx3, x.shape[2:], dtheta)


class TorchBlock(Block):
    """Turn any ``torch.nn.Module`` into a coupling sub-network.

    The module is called as ``module(x, *cond)``; its parameters become the block's. Reverse
    mode runs autograd through one evaluation, forward mode runs ``torch.func.jvp`` through
    ``torch.func.functional_call``, so the module must be written in differentiable torch ops
    (no in-place updates of its own parameters, no data-dependent Python control flow for jvp).

    Examples
    --------
    >>> import torch, invops
    >>> net = torch.nn.Sequential(torch.nn.Conv1d(2, 8, 3, padding=1), torch.nn.Tanh(),
    ...                           torch.nn.Conv1d(8, 4, 3, padding=1))
    >>> coupling = invops.CouplingLayerBasic(4, subnet=invops.TorchBlock(net), ndim=1)
    >>> y, logdet = coupling(torch.randn(3, 4, 10))
    """

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"TorchBlock: expected a torch.nn.Module, got {type(module).__name__}")
        self.module = module

    def _forward(self, x: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        return self.module(x, *cond)


class MLPBlock(Block):
    r"""Multilayer perceptron for dense ``(B, n_in)`` data.

    Parameters
    ----------
    n_in, n_hidden, n_out : int
        Input, hidden and output features.
    n_layers : int
        Number of hidden layers (each ``Linear`` followed by ``activation``).
    activation : callable
        Element-wise nonlinearity (default ``torch.relu``).
    zero_init : bool
        Start the last layer at zero (identity coupling at initialisation).

    Notes
    -----
    :math:`h_0 = x`, :math:`h_{i} = \sigma(A_i h_{i-1} + a_i)`, output
    :math:`A_{L+1} h_L + a_{L+1}` (no final nonlinearity).

    Examples
    --------
    >>> import torch, invops
    >>> invops.MLPBlock(3, 16, 4)(torch.randn(5, 3)).shape
    torch.Size([5, 4])
    """

    def __init__(
        self,
        n_in: int,
        n_hidden: int,
        n_out: int,
        n_layers: int = 2,
        activation: Callable[[torch.Tensor], torch.Tensor] = torch.relu,
        zero_init: bool = False,
    ) -> None:
        super().__init__()
        if min(n_in, n_hidden, n_out, n_layers) < 1:
            raise ValueError(
                f"MLPBlock: sizes must be >= 1, got n_in={n_in}, n_hidden={n_hidden}, "
                f"n_out={n_out}, n_layers={n_layers}"
            )
        sizes = [n_in] + [n_hidden] * n_layers + [n_out]
        self.layers = torch.nn.ModuleList(
            torch.nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])
        )
        if zero_init:
            last = cast(torch.nn.Linear, self.layers[-1])
            with torch.no_grad():
                last.weight.zero_()
                last.bias.zero_()
        self.n_in, self.activation = n_in, activation

    def _forward(self, x: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x, *cond], dim=1) if cond else x
        if h.ndim != 2 or h.shape[1] != self.n_in:
            raise ValueError(
                f"MLPBlock: input (with conditions concatenated) must have shape (B, {self.n_in}), "
                f"got {tuple(h.shape)}"
            )
        for layer in self.layers[:-1]:
            h = self.activation(layer(h))
        return self.layers[-1](h)

    _tangent_math = ("_forward",)

    def _tangent_rule(self, x, cond, dx, dcond, dtheta):
        h = torch.cat([x, *cond], dim=1) if cond else x
        dh = dx
        if cond and not (dx is None and all(d is None for d in dcond)):
            parts = [x, *cond]
            dh = torch.cat(
                [torch.zeros_like(t) if d is None else d for t, d in zip(parts, (dx, *dcond))], 1
            )
        if h.ndim != 2 or h.shape[1] != self.n_in:
            raise ValueError(
                f"MLPBlock: input (with conditions concatenated) must have shape (B, {self.n_in}), "
                f"got {tuple(h.shape)}"
            )
        get = dtheta.get
        for i, layer in enumerate(self.layers):
            w, b = layer.weight, layer.bias
            h, dh = linear_tangent(h, dh, w, get(w), b, None if b is None else get(b))
            if i < len(self.layers) - 1:
                h, dh = elementwise_tangent(self.activation, h, dh)
        return h, dh
