"""Magnetic resonance imaging: multi-coil Cartesian MRI, coil maps and sampling masks.

:class:`MultiCoilMRI2D` is the multi-coil MRI operator built from PyLops parts (coil
sensitivities as ``pylops.Diagonal``, one ``pylops.medical.MRI2D`` per coil, ``pylops.VStack``);
:class:`TorchMRI` is the same map written with ``torch.fft`` (device-agnostic, one call for a
whole batch, one mask and coil set per sample if wanted). The tests prove the two equal to
rounding. :func:`coil_sensitivities`, :func:`cartesian_mask` and :func:`radial_mask` synthesise
the ingredients.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pylops
import torch

from .._arrays import to_torch
from ..operators import BatchedOperator, register_batching_rule

__all__ = [
    "coil_sensitivities",
    "cartesian_mask",
    "radial_mask",
    "MultiCoilMRI2D",
    "TorchMRI",
    "kspace",
    "image",
]

_GOLDEN_ANGLE = math.pi * (math.sqrt(5.0) - 1.0) / 2.0  # 111.25 degrees


# ----------------------------------------------------------------------------- transforms
def kspace(x: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2D FFT over the last two axes, as ``pylops.medical.MRI2D``.

    ``fftshift(fft2(x, norm="ortho"))``: the zero frequency lands at index ``n // 2`` of each
    axis (PyLops applies no ``ifftshift`` before the transform, so the image origin stays at
    index 0).
    """
    return torch.fft.fftshift(torch.fft.fft2(x, norm="ortho"), dim=(-2, -1))


def image(k: torch.Tensor) -> torch.Tensor:
    """Adjoint (and inverse) of :func:`kspace`: ``ifft2(ifftshift(k), norm="ortho")``."""
    return torch.fft.ifft2(torch.fft.ifftshift(k, dim=(-2, -1)), norm="ortho")


# ----------------------------------------------------------------------------- ingredients
def _rng(seed: int | np.random.Generator | None) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def coil_sensitivities(
    shape: Sequence[int],
    n_coils: int,
    rng: int | np.random.Generator | None = None,
    radius: float = 1.4,
    width: float = 0.8,
    phase: float = 0.5,
) -> np.ndarray:
    r"""Smooth complex receive-coil sensitivities, normalised so :math:`\sum_c |S_c|^2 = 1`.

    Parameters
    ----------
    shape : (int, int)
        Image shape ``(ny, nx)``.
    n_coils : int
        Number of coils, spread evenly on a circle around the image.
    rng : int or numpy.random.Generator, optional
        Randomises the coils' angular offset, distances and widths (None: the regular layout).
    radius : float
        Distance of the coils from the image centre, in half field-of-view units.
    width : float
        Width of each coil's Gaussian magnitude profile, same units.
    phase : float
        Strength of each coil's linear phase ramp (radians per half field of view).

    Returns
    -------
    numpy.ndarray
        ``(n_coils, ny, nx)``, complex128.

    Notes
    -----
    Coil :math:`c` sits at :math:`p_c = \rho(\cos\phi_c, \sin\phi_c)` and has
    :math:`S_c(r) = e^{-|r - p_c|^2 / 2w^2}\, e^{i(\phi_c + \beta\, r \cdot \hat p_c)}` before
    normalisation. With :math:`\sum_c |S_c|^2 = 1` the fully sampled multi-coil operator is an
    isometry (:math:`A^H A = I`), so the zero-filled reconstruction :math:`A^H d` is the
    coil-combined image and needs no extra scaling.

    Examples
    --------
    >>> import numpy as np
    >>> from invops.physics import coil_sensitivities
    >>> S = coil_sensitivities((16, 16), 4, rng=0)
    >>> S.shape, bool(np.allclose((abs(S) ** 2).sum(0), 1.0))
    ((4, 16, 16), True)
    """
    ny, nx = (int(n) for n in shape)
    if n_coils < 1:
        raise ValueError(f"coil_sensitivities: n_coils must be >= 1, got {n_coils}")
    gen = None if rng is None else _rng(rng)
    y, x = np.meshgrid(np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), indexing="ij")
    offset = 0.0 if gen is None else gen.uniform(0, 2 * np.pi)
    maps = np.empty((n_coils, ny, nx), dtype=np.complex128)
    for c in range(n_coils):
        angle = offset + 2 * np.pi * c / n_coils
        rho = radius * (1.0 if gen is None else gen.uniform(0.9, 1.1))
        w = width * (1.0 if gen is None else gen.uniform(0.85, 1.15))
        py, px = rho * np.sin(angle), rho * np.cos(angle)
        magnitude = np.exp(-((y - py) ** 2 + (x - px) ** 2) / (2 * w**2))
        ramp = phase * (y * np.sin(angle) + x * np.cos(angle))
        maps[c] = magnitude * np.exp(1j * (angle + ramp))
    return maps / np.sqrt((np.abs(maps) ** 2).sum(axis=0, keepdims=True))


def cartesian_mask(
    shape: Sequence[int],
    acceleration: float,
    center_fraction: float | None = None,
    pattern: str = "random",
    rng: int | np.random.Generator | None = None,
) -> np.ndarray:
    """Cartesian undersampling: whole k-space columns (phase-encoding lines) kept or dropped.

    Parameters
    ----------
    shape : (int, int)
        k-space shape ``(ny, nx)``; columns (the last axis) are the phase-encoding lines.
    acceleration : float
        Ratio of all lines to sampled lines (4 keeps a quarter of the columns).
    center_fraction : float, optional
        Fraction of the columns sampled fully around the zero frequency (default
        ``0.32 / acceleration``, the fastMRI choice: 8% at 4x, 4% at 8x).
    pattern : {"random", "equispaced"}
        How the other lines are chosen.
    rng : int or numpy.random.Generator, optional
        Seed or generator for ``pattern="random"`` (and the offset of ``"equispaced"``).

    Returns
    -------
    numpy.ndarray
        ``(ny, nx)`` float64 mask of zeros and ones, zero frequency at column ``nx // 2`` (the
        layout of ``pylops.medical.MRI2D``: use it as ``MRI2D(..., mask=mask)``).

    Examples
    --------
    >>> from invops.physics import cartesian_mask
    >>> m = cartesian_mask((64, 64), 4, rng=0)
    >>> int(m[0].sum()), float(m.mean())
    (16, 0.25)
    """
    ny, nx = (int(n) for n in shape)
    if acceleration < 1:
        raise ValueError(f"cartesian_mask: acceleration must be >= 1, got {acceleration}")
    if pattern not in ("random", "equispaced"):
        raise ValueError(
            f"cartesian_mask: pattern must be 'random' or 'equispaced', got {pattern!r}"
        )
    gen = _rng(rng)
    n_lines = max(1, round(nx / acceleration))
    frac = 0.32 / acceleration if center_fraction is None else center_fraction
    n_center = min(n_lines, max(1, round(nx * frac)))
    start = nx // 2 - n_center // 2
    center = np.arange(start, start + n_center)
    others = np.setdiff1d(np.arange(nx), center)
    n_more = n_lines - n_center
    if pattern == "random":
        more = gen.choice(others, n_more, replace=False)
    else:
        offset = gen.uniform(0, len(others) / max(n_more, 1))
        more = others[(offset + np.arange(n_more) * len(others) / max(n_more, 1)).astype(int)]
    mask = np.zeros((ny, nx))
    mask[:, np.concatenate([center, more]).astype(int)] = 1.0
    return mask


def radial_mask(
    shape: Sequence[int],
    acceleration: float,
    rng: int | np.random.Generator | None = None,
) -> np.ndarray:
    """Radial undersampling on the Cartesian grid: golden-angle spokes through the centre.

    Spokes are added (each rotated by the golden angle from the last) until at least
    ``1 / acceleration`` of the grid is sampled; each spoke is rasterised to its nearest grid
    points, so the mask works with ``pylops.medical.MRI2D(..., mask=mask)`` and
    :class:`TorchMRI`.

    Parameters
    ----------
    shape : (int, int)
        k-space shape ``(ny, nx)``.
    acceleration : float
        Target ratio of all grid points to sampled points.
    rng : int or numpy.random.Generator, optional
        Randomises the angle of the first spoke (None: 0).

    Returns
    -------
    numpy.ndarray
        ``(ny, nx)`` float64 mask of zeros and ones, zero frequency at ``(ny // 2, nx // 2)``.

    Examples
    --------
    >>> from invops.physics import radial_mask
    >>> m = radial_mask((64, 64), 8)
    >>> 1 / 8 <= float(m.mean()) < 1 / 7
    True
    """
    ny, nx = (int(n) for n in shape)
    if acceleration < 1:
        raise ValueError(f"radial_mask: acceleration must be >= 1, got {acceleration}")
    angle = 0.0 if rng is None else _rng(rng).uniform(0, np.pi)
    half = math.hypot(ny, nx) / 2
    t = np.arange(-half, half + 0.25, 0.25)
    mask = np.zeros((ny, nx))
    while mask.mean() < 1.0 / acceleration:
        iy = np.rint(ny // 2 + t * np.sin(angle)).astype(int)
        ix = np.rint(nx // 2 + t * np.cos(angle)).astype(int)
        inside = (iy >= 0) & (iy < ny) & (ix >= 0) & (ix < nx)
        mask[iy[inside], ix[inside]] = 1.0
        angle += _GOLDEN_ANGLE
    return mask


# ----------------------------------------------------------------------------- PyLops operator
class MultiCoilMRI2D(pylops.LinearOperator):
    r"""Multi-coil 2D MRI from PyLops parts: :math:`A = [F_M S_1; \dots; F_M S_C]`.

    Parameters
    ----------
    coils : array, (n_coils, ny, nx)
        Complex coil sensitivities (e.g. from :func:`coil_sensitivities`).
    mask : array, (ny, nx)
        Sampling mask in the centred k-space layout of ``pylops.medical.MRI2D``.
    dtype : str
        Complex dtype of the operator.
    name : str
        Name of the operator (``pylops.utils.describe``).

    Notes
    -----
    Coil :math:`c` sees the image through its sensitivity, a ``pylops.Diagonal``
    :math:`S_c`, and is sampled by ``pylops.medical.MRI2D(dims, mask=mask)``:
    :math:`F_M = \mathrm{diag}(M)\,\mathrm{fftshift}\,\mathcal{F}` with the orthonormal 2D
    FFT :math:`\mathcal{F}`. The coils are stacked with ``pylops.VStack``. The model is the
    complex image ``(ny, nx)`` and the data ``(n_coils, ny, nx)``, zero where the mask is zero.
    The adjoint is :math:`A^H d = \sum_c \bar S_c\, F_M^H d_c`.

    :meth:`torch_operator` returns the same map as a :class:`TorchMRI` (torch FFTs, any
    device); a list of these operators given to :class:`invops.NetworkLoop` or
    :func:`invops.operators.per_sample` is applied as one stacked :class:`TorchMRI`.

    Examples
    --------
    >>> import numpy as np, pylops
    >>> from invops.physics import MultiCoilMRI2D, cartesian_mask, coil_sensitivities
    >>> A = MultiCoilMRI2D(coil_sensitivities((16, 16), 4), cartesian_mask((16, 16), 4, rng=0))
    >>> A.dims, A.dimsd
    ((16, 16), (4, 16, 16))
    >>> _ = pylops.utils.dottest(A, complexflag=3, raiseerror=True)
    """

    def __init__(self, coils: Any, mask: Any, dtype: str = "complex128", name: str = "S") -> None:
        coils = np.asarray(coils)
        mask = np.asarray(mask)
        if coils.ndim != 3:
            raise ValueError(
                f"MultiCoilMRI2D: coils must be (n_coils, ny, nx), got shape {coils.shape}"
            )
        if mask.shape != coils.shape[1:]:
            raise ValueError(
                f"MultiCoilMRI2D: mask must have the image shape {coils.shape[1:]}, "
                f"got {mask.shape}"
            )
        dims = tuple(int(n) for n in coils.shape[1:])
        mri = pylops.medical.MRI2D(dims, mask=mask, dtype=dtype)
        per_coil = [mri @ pylops.Diagonal(coils[c], dtype=dtype) for c in range(coils.shape[0])]
        super().__init__(
            Op=pylops.VStack(per_coil, dtype=dtype),
            dims=dims,
            dimsd=(coils.shape[0], *dims),
            name=name,
        )
        self.coils, self.mask = coils, mask

    def torch_operator(self, real_model: bool = False) -> TorchMRI:
        """The same operator as a :class:`TorchMRI` (torch FFTs, follows the tensors' device)."""
        return TorchMRI(self.mask, self.coils, real_model=real_model)


# ----------------------------------------------------------------------------- torch operator
class TorchMRI(BatchedOperator):
    r"""Single- or multi-coil Cartesian MRI with torch FFTs, optionally one mask per sample.

    Parameters
    ----------
    mask : array, (ny, nx) or (B, ny, nx)
        Sampling mask(s) in the centred k-space layout of ``pylops.medical.MRI2D``; a stack
        gives one mask per sample.
    coils : array, (n_coils, ny, nx) or (B, n_coils, ny, nx), optional
        Coil sensitivities (None: single coil, the operator of ``MRI2D(dims, mask=mask)``).
    real_model : bool
        Return :math:`\mathrm{Re}\,A^H y` from the adjoint (for real models); by default the
        adjoint is complex, as a complex image needs.

    Notes
    -----
    :math:`A x = [M \odot \mathrm{fftshift}\,\mathcal{F}(S_c x)]_c` with the orthonormal FFT
    (:func:`kspace`), and :math:`A^H y = \sum_c \bar S_c\, \mathcal{F}^{-1}
    \mathrm{ifftshift}(\bar M \odot y_c)` (:func:`image`): exactly
    :class:`MultiCoilMRI2D` (or ``MRI2D`` for one coil). A batch is transformed by one batched
    FFT call whatever the number of masks; with stacked masks or coils the operator holds one
    map per sample (``batch_size = B``) and accepts only batches of ``B``. Masks and coils are
    torch tensors moved to the input's device and precision on first use, so the operator runs
    on any device without numpy.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from invops.physics import TorchMRI, cartesian_mask
    >>> masks = np.stack([cartesian_mask((8, 8), 2, rng=i) for i in range(3)])
    >>> op = TorchMRI(masks)  # one mask per sample
    >>> op.batch_size, op.apply(torch.randn(3, 8, 8, dtype=torch.float64)).dtype
    (3, torch.complex128)
    """

    def __init__(self, mask: Any, coils: Any = None, real_model: bool = False) -> None:
        mask_t = _as_tensor(mask, "mask")
        if mask_t.ndim not in (2, 3):
            raise ValueError(
                f"TorchMRI: mask must be (ny, nx) or (B, ny, nx), got shape {tuple(mask_t.shape)}"
            )
        dims = tuple(mask_t.shape[-2:])
        batch = mask_t.shape[0] if mask_t.ndim == 3 else None
        coils_t = None
        if coils is not None:
            coils_t = _as_tensor(coils, "coils")
            if coils_t.ndim not in (3, 4) or tuple(coils_t.shape[-2:]) != dims:
                raise ValueError(
                    f"TorchMRI: coils must be (n_coils, {dims[0]}, {dims[1]}) or "
                    f"(B, n_coils, {dims[0]}, {dims[1]}) to match the mask, got shape "
                    f"{tuple(coils_t.shape)}"
                )
            if coils_t.ndim == 4:
                if batch is not None and coils_t.shape[0] != batch:
                    raise ValueError(
                        f"TorchMRI: {batch} masks but {coils_t.shape[0]} coil sets; give one "
                        "coil set per mask, or one shared"
                    )
                batch = coils_t.shape[0]
        self.mask, self.coils = mask_t, coils_t
        self.real_model = bool(real_model)
        self._cache: dict = {}
        n_coils = None if coils_t is None else coils_t.shape[-3]
        data_shape = dims if n_coils is None else (n_coils, *dims)
        super().__init__(
            self._apply_forward,
            self._apply_adjoint,
            dims,
            data_shape,
            True,
            "TorchMRI" if n_coils is None else f"TorchMRI({n_coils} coils)",
            batch_size=batch,
        )

    def _on(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mask (broadcastable to the k-space batch) and coils on ``like``'s device/precision."""
        single = like.dtype in (torch.float32, torch.complex64)
        key = (like.device, single)
        if key not in self._cache:
            cplx = torch.complex64 if single else torch.complex128
            real = torch.float32 if single else torch.float64
            mask = self.mask.to(like.device, cplx if self.mask.is_complex() else real)
            coils = None
            if self.coils is not None:
                coils = self.coils.to(like.device, cplx)
                if mask.ndim == 3:
                    mask = mask[:, None]  # (B, 1, ny, nx): one mask for all coils of a sample
            self._cache[key] = (mask, coils)
        return self._cache[key]

    def _apply_forward(self, x: torch.Tensor) -> torch.Tensor:
        mask, coils = self._on(x)
        if coils is not None:
            x = x[:, None] * coils  # (B, n_coils, ny, nx)
        return kspace(x) * mask

    def _apply_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        mask, coils = self._on(y)
        x = image(y * mask.conj())
        if coils is not None:
            x = (x * coils.conj()).sum(dim=1)
        return x.real if self.real_model else x


def _as_tensor(a: Any, name: str) -> torch.Tensor:
    if isinstance(a, (list, tuple)):
        a = np.asarray(a)
    if isinstance(a, np.ndarray) and a.dtype == bool:
        a = a.astype(np.float64)
    t = to_torch(a, name=name)
    return t.to(torch.float64) if t.dtype == torch.bool else t


# ----------------------------------------------------------------------------- batching rules
def _stack(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """One stacked tensor at the promoted dtype, or None when every entry is None (callers
    check that the entries are all tensors or all None)."""
    present = [t for t in tensors if t is not None]
    if not present:
        return None
    dtype = present[0].dtype
    for t in present[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.stack([t.to(dtype) for t in present])


@register_batching_rule
def _stack_mri(raw: list, ops: list, real_model: bool) -> BatchedOperator | None:
    """Per-sample MRI operators as ONE :class:`TorchMRI` with stacked masks (and coils)."""
    coils: list[torch.Tensor | None]
    if all(isinstance(J, MultiCoilMRI2D) for J in raw):
        masks = [_as_tensor(J.mask, "mask") for J in raw]
        coils = [_as_tensor(J.coils, "coils") for J in raw]
    elif all(isinstance(J, TorchMRI) and J.batch_size is None for J in raw):
        if len({J.coils is None for J in raw}) > 1 or len({J.real_model for J in raw}) > 1:
            return None
        real_model = raw[0].real_model  # TorchMRI parts keep their own adjoint convention
        masks = [J.mask for J in raw]
        coils = [J.coils for J in raw]
    elif all(isinstance(J, pylops.medical.MRI2D) and J._mask_type == "mask" for J in raw):
        masks = [_as_tensor(J.mask, "mask") for J in raw]
        coils = [None for _ in raw]
    elif all(
        isinstance(J, pylops.medical.MRI2D) and J._mask_type.startswith("vertical") for J in raw
    ):
        return _stack_vertical_mri(raw, ops, real_model)
    else:
        return None
    if any(m.shape != masks[0].shape for m in masks) or any(
        c is not None and (coils[0] is None or c.shape != coils[0].shape) for c in coils
    ):
        return None
    op = TorchMRI(_stack(masks), _stack(coils), real_model=real_model)
    op.parts = ops
    op.name = f"per-sample {op.name}"
    return op


def _stack_vertical_mri(raw: list, ops: list, real_model: bool) -> BatchedOperator | None:
    """``MRI2D`` with vertical-line masks: one FFT of the batch, then a per-sample gather."""
    lines = [to_torch(np.asarray(J.ROp.iava)) for J in raw]
    if any(idx.shape != lines[0].shape for idx in lines):
        return None
    index = torch.stack(lines).long()  # (B, n_lines)
    ms, ds = ops[0].model_shape, ops[0].data_shape
    ny = ms[0]

    def idx_on(t: torch.Tensor) -> torch.Tensor:
        return index.to(t.device)[:, None, :].expand(t.shape[0], ny, index.shape[1])

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.take_along_dim(kspace(x.reshape(x.shape[0], *ms)), idx_on(x), dim=-1)

    def adjoint(y: torch.Tensor) -> torch.Tensor:
        full = y.new_zeros(y.shape[0], *ms).scatter(-1, idx_on(y), y.reshape(y.shape[0], *ds))
        out = image(full)
        return out.real if real_model else out

    return BatchedOperator(
        forward, adjoint, ms, ds, True, "per-sample MRI2D (vertical)", len(raw), parts=ops
    )
