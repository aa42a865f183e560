r"""Squeeze layers (space-to-depth) and channel split / concatenation helpers.

:class:`Squeeze` and :class:`HaarSqueeze` halve every spatial size and multiply the channel count
by :math:`2^d` (:math:`d` = 1, 2 or 3 spatial dimensions). Both are orthogonal linear maps, so
their log-determinant is zero and their inverse is their transpose. The unsqueeze (depth-to-space)
is the inverse map as a module: ``Squeeze(...).reverse()`` / ``HaarSqueeze().reverse()``.

:func:`split` and :func:`cat` cut and join tensors along the channel dimension, as couplings and
multiscale networks do.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch

from ._arrays import array_kind, from_torch, to_torch
from ._autodiff import Grads
from ._checks import check_layout
from .module import InvertibleModule

__all__ = ["Squeeze", "HaarSqueeze", "split", "cat"]

_PATTERNS = ("checkerboard", "patch")
_SPATIAL_NAMES = {1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}
_SQRT_HALF = math.sqrt(0.5)


# ---------------------------------------------------------------------- rearrangements
def _space_to_depth_perm(d: int, pattern: str) -> tuple[list[int], list[int]]:
    """Permutation taking the split view of ``x`` to ``(B, 2, ..., 2, C, S_1/2, ..., S_d/2)``.

    Returns ``(perm, inverse_perm)``. For ``"checkerboard"`` the view of ``x`` is
    ``(B, C, S_1/2, 2, ..., S_d/2, 2)`` (spatial index ``2 m + o``); for ``"patch"`` it is
    ``(B, C, 2, S_1/2, ..., 2, S_d/2)`` (spatial index ``o S_i/2 + m``).
    """
    if pattern == "checkerboard":
        half_axes = [2 + 2 * i for i in range(d)]
        offset_axes = [3 + 2 * i for i in range(d)]
    else:
        offset_axes = [2 + 2 * i for i in range(d)]
        half_axes = [3 + 2 * i for i in range(d)]
    perm = [0, *offset_axes, 1, *half_axes]
    inverse_perm = sorted(range(len(perm)), key=perm.__getitem__)
    return perm, inverse_perm


def _split_view_shape(x: torch.Tensor, pattern: str) -> list[int]:
    shape = [x.shape[0], x.shape[1]]
    for s in x.shape[2:]:
        shape += [s // 2, 2] if pattern == "checkerboard" else [2, s // 2]
    return shape


def _space_to_depth(x: torch.Tensor, pattern: str) -> torch.Tensor:
    """``(B, C, S_1, ..., S_d)`` to the offset-major view ``(B, 2, ..., 2, C, S_1/2, ...)``."""
    perm, _ = _space_to_depth_perm(x.ndim - 2, pattern)
    return x.reshape(_split_view_shape(x, pattern)).permute(perm)


def _depth_to_space(z: torch.Tensor, pattern: str, d: int) -> torch.Tensor:
    """Inverse of :func:`_space_to_depth`: ``(B, 2, ..., 2, C, S_1/2, ...)`` to ``(B, C, S)``."""
    _, inverse_perm = _space_to_depth_perm(d, pattern)
    batch, channels, halves = z.shape[0], z.shape[1 + d], z.shape[2 + d :]
    return z.permute(inverse_perm).reshape(batch, channels, *(2 * h for h in halves))


def _offsets_to_channels(z: torch.Tensor, d: int) -> torch.Tensor:
    """Merge the ``d`` offset axes and the channel axis: ``k * C + c``, ``k`` row-major."""
    return z.reshape(z.shape[0], -1, *z.shape[2 + d :])


def _channels_to_offsets(y: torch.Tensor) -> torch.Tensor:
    d = y.ndim - 2
    return y.reshape(y.shape[0], *([2] * d), y.shape[1] >> d, *y.shape[2:])


def _haar_mix(z: torch.Tensor, d: int) -> torch.Tensor:
    """Apply ``[[1, 1], [1, -1]] / sqrt(2)`` along each offset axis ``1..d`` (self-inverse)."""
    for axis in range(1, d + 1):
        a0, a1 = z.unbind(axis)
        z = torch.stack(((a0 + a1) * _SQRT_HALF, (a0 - a1) * _SQRT_HALF), dim=axis)
    return z


# ---------------------------------------------------------------------- shared validation
def _validate_squeeze(x: torch.Tensor, inverse: bool, owner: str) -> None:
    name = "y" if inverse else "x"
    if x.ndim == 2:
        raise ValueError(
            f"{owner}: {name} must have spatial dimensions, layout (B, C, L), (B, C, H, W) or "
            f"(B, C, D, H, W); a dense (B, C) input has nothing to squeeze, got a tensor of "
            f"shape {tuple(x.shape)}"
        )
    check_layout(x, None, name, owner, ranks=(3, 4, 5))
    d = x.ndim - 2
    if inverse:
        if x.shape[1] % 2**d:
            raise ValueError(
                f"{owner}: y must have a channel count divisible by {2**d} (2**{d} for {d} "
                f"spatial dimension(s)), got {x.shape[1]} channels (shape {tuple(x.shape)})"
            )
        return
    for i, (size, dim_name) in enumerate(zip(x.shape[2:], _SPATIAL_NAMES[d])):
        if size % 2:
            raise ValueError(
                f"{owner}: x must have even spatial sizes (squeeze by a factor 2), got size "
                f"{size} in spatial dimension {dim_name} (tensor dimension {i + 2}) of shape "
                f"{tuple(x.shape)}"
            )


class _OrthogonalRearrangement(InvertibleModule):
    """Parameterless orthogonal linear map: zero logdet, reverse mode by the inverse map."""

    def __init__(self, logdet: bool = True) -> None:
        super().__init__(logdet=logdet)

    def _validate(self, x: torch.Tensor, cond: tuple, inverse: bool) -> None:
        _validate_squeeze(x, inverse, type(self).__name__)

    # The map A is linear and orthogonal, so A^T = A^{-1}: the cotangent of the input is the
    # inverse map applied to the cotangent of the output, and the logdet (constant 0) adds
    # nothing. This replaces the generic inversion + local graph + autograd.grad.
    def _pullback(
        self, y: torch.Tensor, cond: tuple, dy: torch.Tensor, dlogdet: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, Grads]:
        x, _ = self._inverse(y)
        dx, _ = self._inverse(dy)
        return x, dx, (), {}

    def _pullback_inverse(
        self, x: torch.Tensor, cond: tuple, dx: torch.Tensor, dlogdet: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, Grads]:
        y, _ = self._forward(x)
        dy, _ = self._forward(dx)
        return y, dy, (), {}


class Squeeze(_OrthogonalRearrangement):
    r"""Invertible space-to-depth by a factor 2 along every spatial dimension.

    Input ``(B, C, S_1, ..., S_d)`` (``d`` = 1, 2, 3, every :math:`S_i` even) becomes
    ``(B, 2^d C, S_1/2, ..., S_d/2)``. The unsqueeze is ``Squeeze(pattern).reverse()``.

    Parameters
    ----------
    pattern : {"checkerboard", "patch"}
        Which pixels go to which output block: stride-2 sub-sampling (``"checkerboard"``) or
        contiguous halves / quadrants / octants (``"patch"``).
    logdet : bool
        Whether to return the log-determinant (always zero).

    Notes
    -----
    Write the spatial offset as :math:`o = (o_1, \dots, o_d) \in \{0, 1\}^d` and number the
    :math:`2^d` offsets in row-major order, :math:`k = \sum_i o_i 2^{d-i}` (the last spatial
    dimension varies fastest; in 2D: :math:`k = 2 o_H + o_W`). The output channels are
    **offset-major**, the same for both patterns:

    .. math::
        y_{b,\,kC + c,\,m_1,\dots,m_d} = x_{b,\,c,\,n_1,\dots,n_d}, \qquad
        n_i = \begin{cases} 2 m_i + o_i & \text{checkerboard} \\
        o_i S_i/2 + m_i & \text{patch,} \end{cases}

    so output block :math:`k` (channels :math:`kC, \dots, kC + C - 1`) is
    ``x[:, :, o_1::2, o_2::2]`` for the checkerboard and the contiguous block
    ``x[:, :, o_1*H/2:(o_1+1)*H/2, o_2*W/2:(o_2+1)*W/2]`` for the patch pattern (2D shown). In
    2D the blocks are, in order, offsets :math:`(0,0), (0,1), (1,0), (1,1)` in :math:`(H, W)`.

    The map is a permutation of the entries, computed by one reshape and one permute for every
    rank: orthogonal, log-determinant 0, inverse equal to the transpose. The reverse pass is the
    inverse permutation of the cotangent; no graph is built. Odd spatial sizes raise
    ``ValueError`` (no padding); the inverse needs a channel count divisible by :math:`2^d`.
    The reference (InvertibleNetworks.jl) also has a ``"column"`` pattern, a bare column-major
    reshape that is not a spatial block shuffle; it is deliberately not provided.

    Examples
    --------
    >>> import torch, invops
    >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
    >>> y, logdet = invops.Squeeze("checkerboard")(x)
    >>> y.shape
    torch.Size([1, 4, 2, 2])
    >>> y[0, 1].tolist()  # block k = 1: offset (0, 1), i.e. x[..., 0::2, 1::2]
    [[1.0, 3.0], [9.0, 11.0]]
    >>> invops.Squeeze("patch")(x)[0][0, 1].tolist()  # top-right quadrant
    [[2.0, 3.0], [6.0, 7.0]]
    >>> unsqueeze = invops.Squeeze("checkerboard").reverse()
    >>> torch.equal(unsqueeze(y)[0], x), logdet.tolist()
    (True, [0.0])
    """

    def __init__(self, pattern: str = "checkerboard", logdet: bool = True) -> None:
        super().__init__(logdet=logdet)
        if pattern not in _PATTERNS:
            raise ValueError(f"Squeeze: pattern must be one of {_PATTERNS}, got {pattern!r}")
        self.pattern = pattern

    def extra_repr(self) -> str:
        return f"pattern={self.pattern!r}, logdet={self.logdet}"

    def _forward(self, x: torch.Tensor, *cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = _space_to_depth(x, self.pattern)
        return _offsets_to_channels(z, x.ndim - 2), x.new_zeros(x.shape[0])

    def _inverse(self, y: torch.Tensor, *cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = _depth_to_space(_channels_to_offsets(y), self.pattern, y.ndim - 2)
        return x, y.new_zeros(y.shape[0])


class HaarSqueeze(_OrthogonalRearrangement):
    r"""Orthonormal one-level Haar wavelet transform along every spatial dimension.

    Input ``(B, C, S_1, ..., S_d)`` (``d`` = 1, 2, 3, every :math:`S_i` even) becomes
    ``(B, 2^d C, S_1/2, ..., S_d/2)``: the approximation band first, then the detail bands. The
    inverse transform is ``HaarSqueeze().reverse()``.

    Parameters
    ----------
    logdet : bool
        Whether to return the log-determinant (always zero).

    Notes
    -----
    Along one dimension, each pair of neighbours :math:`(a, b) = (x_{2m}, x_{2m+1})` becomes
    the lowpass :math:`(a + b)/\sqrt 2` and the highpass :math:`(a - b)/\sqrt 2`. The
    :math:`d`-dimensional transform applies this along every spatial dimension: with the
    :class:`Squeeze` checkerboard blocks :math:`z_o = x[\dots, o_1{::}2, \dots, o_d{::}2]`,

    .. math::
        y_{b,\,kC + c} = \sum_{o \in \{0,1\}^d} \Bigl(\prod_{i=1}^d
        \frac{(-1)^{\beta_i o_i}}{\sqrt 2}\Bigr)\, (z_o)_{b,c},

    where :math:`\beta = (\beta_1, \dots, \beta_d) \in \{0, 1\}^d` is the band (0 = lowpass,
    1 = highpass along dimension :math:`i`) and :math:`k = \sum_i \beta_i 2^{d-i}` numbers the
    bands in row-major order (last spatial dimension fastest). The channels are **band-major**:
    channel :math:`kC + c` is band :math:`k` of input channel :math:`c`. In 2D the bands are, in
    order, LL (approximation), LH (lowpass along H, highpass along W), HL, HH.

    It is computed as the checkerboard rearrangement followed by the orthogonal, symmetric
    mixing :math:`\frac{1}{\sqrt 2}\begin{pmatrix}1 & 1\\ 1 & -1\end{pmatrix}` along each offset
    axis (:math:`d` vectorized sums and differences). The map is orthonormal: norms are
    preserved, the inverse is the transpose (the same mixing, then the inverse rearrangement)
    and the log-determinant is 0. Unlike the reference's Haar lifting, this works in 1D, 2D and
    3D and its band order is fixed by the formula above.

    Examples
    --------
    >>> import torch, invops
    >>> x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    >>> y, logdet = invops.HaarSqueeze()(x)
    >>> [round(v, 5) for v in y.flatten().tolist()]  # LL, LH, HL, HH
    [5.0, -1.0, -2.0, 0.0]
    >>> bool(torch.allclose(invops.HaarSqueeze().reverse()(y)[0], x))
    True
    """

    def extra_repr(self) -> str:
        return f"logdet={self.logdet}"

    def _forward(self, x: torch.Tensor, *cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = x.ndim - 2
        z = _haar_mix(_space_to_depth(x, "checkerboard"), d)
        return _offsets_to_channels(z, d), x.new_zeros(x.shape[0])

    def _inverse(self, y: torch.Tensor, *cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = y.ndim - 2
        z = _haar_mix(_channels_to_offsets(y), d)
        return _depth_to_space(z, "checkerboard", d), y.new_zeros(y.shape[0])


# ---------------------------------------------------------------------- split / cat
def split(x: Any, n_first: int | None = None) -> tuple[Any, Any]:
    """Split along the channel dimension (dimension 1) into two non-empty parts.

    Parameters
    ----------
    x : torch.Tensor, numpy.ndarray or cupy.ndarray
        Array of shape ``(B, C, ...)`` (dense or with spatial dimensions), ``C >= 2``.
    n_first : int, optional
        Number of channels of the first part, ``1 <= n_first <= C - 1``. Default
        ``ceil(C / 2)``.

    Returns
    -------
    x1, x2 : arrays of the kind of ``x``
        ``x[:, :n_first]`` and ``x[:, n_first:]``. They are views of ``x`` (no copy), and
        differentiable for torch input.

    Notes
    -----
    For an odd channel count the first part gets the extra channel: ``C = 5`` gives ``3 + 2``.
    The Julia reference (``tensor_split``) uses ``round(C / 2)``, which rounds half to even: it
    agrees for ``C = 3, 7, 11, ...`` but gives one channel fewer for ``C = 5, 9, 13, ...``
    (``5 -> 2 + 3`` there, ``3 + 2`` here). Pass ``n_first`` to reproduce it.

    Examples
    --------
    >>> import torch, invops
    >>> x1, x2 = invops.split(torch.zeros(2, 5, 8))
    >>> x1.shape[1], x2.shape[1]
    (3, 2)
    >>> invops.cat(x1, x2).shape
    torch.Size([2, 5, 8])
    """
    kind = array_kind(x, "x")
    t = to_torch(x, name="x")
    if t.ndim < 2:
        raise ValueError(
            f"split: x must have layout (B, C, ...) with channels in dimension 1, got a tensor "
            f"of shape {tuple(t.shape)}"
        )
    n = t.shape[1]
    if n < 2:
        raise ValueError(
            f"split: x must have at least 2 channels (dimension 1) to split, got {n} "
            f"(shape {tuple(t.shape)})"
        )
    if n_first is None:
        k = (n + 1) // 2
    else:
        if isinstance(n_first, bool):
            raise TypeError(f"split: n_first must be an integer, got {n_first!r}")
        try:
            k = operator.index(n_first)
        except TypeError:
            raise TypeError(
                f"split: n_first must be an integer, got {type(n_first).__name__}"
            ) from None
        if not 1 <= k <= n - 1:
            raise ValueError(
                f"split: n_first must be between 1 and {n - 1} (x has {n} channels), got {k}"
            )
    x1, x2 = t.split((k, n - k), dim=1)
    return from_torch(x1, kind), from_torch(x2, kind)


def cat(x1: Any, x2: Any) -> Any:
    """Concatenate two arrays along the channel dimension (dimension 1); inverse of :func:`split`.

    Parameters
    ----------
    x1, x2 : torch.Tensor, numpy.ndarray or cupy.ndarray
        Arrays of the same kind, dtype and device, with equal batch size and spatial shape
        (any channel counts).

    Returns
    -------
    array of the kind of ``x1``
        ``(B, C1 + C2, ...)``, a new array (``torch.cat``), differentiable for torch input.

    Examples
    --------
    >>> import torch, invops
    >>> invops.cat(torch.zeros(2, 3, 4), torch.ones(2, 1, 4)).shape
    torch.Size([2, 4, 4])
    """
    kind1, kind2 = array_kind(x1, "x1"), array_kind(x2, "x2")
    if kind1 != kind2:
        raise TypeError(f"cat: x1 and x2 must be arrays of the same kind, got {kind1} and {kind2}")
    t1, t2 = to_torch(x1, name="x1"), to_torch(x2, name="x2")
    for name, t in (("x1", t1), ("x2", t2)):
        if t.ndim < 2:
            raise ValueError(
                f"cat: {name} must have layout (B, C, ...) with channels in dimension 1, got a "
                f"tensor of shape {tuple(t.shape)}"
            )
    if t1.ndim != t2.ndim or t1.shape[0] != t2.shape[0] or t1.shape[2:] != t2.shape[2:]:
        raise ValueError(
            f"cat: x1 and x2 must have the same batch size and spatial shape (all dimensions but "
            f"1), got shapes {tuple(t1.shape)} and {tuple(t2.shape)}"
        )
    if t1.dtype != t2.dtype:
        raise TypeError(f"cat: x1 and x2 must have the same dtype, got {t1.dtype} and {t2.dtype}")
    if t1.device != t2.device:
        raise ValueError(
            f"cat: x1 and x2 must be on the same device, got {t1.device} and {t2.device}"
        )
    return from_torch(torch.cat((t1, t2), dim=1), kind1)
