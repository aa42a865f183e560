"""Sparse-view parallel-beam CT from PyLops' ``Radon2D`` slant stacks, and a torch twin.

A parallel-beam projection at angle :math:`\\theta` sums the image along parallel lines. With
the lines written as :math:`z = t_0 + p\\,x` (:math:`p = \\tan\\theta`, :math:`|p| \\le 1`) this is
the adjoint of ``pylops.signalprocessing.Radon2D`` in linear mode (a slant stack with linear
interpolation between pixels); the steeper half of the angles is the same slant stack of the
transposed image. :func:`ct_operator` builds the projector from these PyLops parts,
:func:`ct_matrix` the same matrix directly as a scipy sparse matrix (fast in PyLops solvers
through ``pylops.MatrixMult``), and :class:`TorchCT` applies it with torch sparse products on
any device. The tests prove the three equal to rounding.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pylops
import scipy.sparse
import torch

from ..operators import Operator

__all__ = ["ct_angles", "ct_operator", "ct_matrix", "TorchCT"]


def ct_angles(n_views: int) -> np.ndarray:
    """Projection angles (radians) of :func:`ct_operator`: ``n_views`` equispaced over 180°.

    Angle :math:`\\theta_k = -\\pi/4 + k\\pi/n` for :math:`k = 0, \\dots, n - 1`; views with
    :math:`\\theta < \\pi/4` are slant stacks along the first image axis, the others along the
    second.
    """
    if n_views < 1:
        raise ValueError(f"ct_angles: n_views must be >= 1, got {n_views}")
    return -np.pi / 4 + np.pi * np.arange(n_views) / n_views


def _slopes(n_views: int) -> tuple[np.ndarray, np.ndarray]:
    theta = ct_angles(n_views)
    first = theta < np.pi / 4
    return np.tan(theta[first]), np.tan(theta[~first] - np.pi / 2)


def ct_operator(n: int, n_views: int, dtype: str = "float64") -> pylops.LinearOperator:
    r"""Parallel-beam projector of ``n x n`` images built from ``pylops.signalprocessing.Radon2D``.

    Parameters
    ----------
    n : int
        Image side.
    n_views : int
        Number of projection angles (:func:`ct_angles`).
    dtype : str
        Operator dtype.

    Returns
    -------
    pylops.LinearOperator
        ``dims = (n, n)``, ``dimsd = (n_views, n)``: one row of ``n`` detector bins per view,
        views in increasing angle.

    Notes
    -----
    View :math:`p` sums :math:`I(x, t_0 + p\,x_c)` over the ``n`` columns :math:`x` (centred
    coordinate :math:`x_c`), linearly interpolated along the second axis, for each bin
    :math:`t_0 = 0, \dots, n - 1`: ``Radon2D(t, h, p, kind="linear").H``. Views steeper than
    45° apply the same stack to the transposed image. Lines leaving the image are truncated,
    so an object inside the disc of radius :math:`n / (2\sqrt2)` around the centre is seen
    whole by every view. The projector is slow in pure numpy (a Python loop per bin and view);
    :func:`ct_matrix` and :class:`TorchCT` are the fast equivalents.
    """
    p1, p2 = _slopes(n_views)
    axis = np.arange(n, dtype=np.float64)
    parts = []
    if p1.size:
        parts.append(pylops.signalprocessing.Radon2D(axis, axis, p1, dtype=dtype).H)
    if p2.size:
        stack = pylops.signalprocessing.Radon2D(axis, axis, p2, dtype=dtype).H
        parts.append(stack @ pylops.Transpose((n, n), (1, 0), dtype=dtype))
    op = pylops.VStack(parts, dtype=dtype) if len(parts) > 1 else parts[0]
    op.dims, op.dimsd = (n, n), (n_views, n)
    return op


def _stack_entries(n: int, slopes: np.ndarray, transpose: bool):
    """Rows, columns and weights of the slant stack of ``Radon2D`` (same float operations)."""
    h = np.arange(n) - n // 2 + ((n + 1) % 2) / 2  # Radon2D's centred spatial axis
    rows, cols, vals = [], [], []
    for ip, p in enumerate(slopes):
        t0 = np.arange(n)[:, None]
        tdec = t0 + p * h[None, :]  # (bin, column): pylops' ``t + px * x``
        valid = (tdec >= 0) & (tdec < n - 1)
        b, x = np.nonzero(valid)
        t = tdec[valid].astype(int)
        w = tdec[valid] - t
        for shift, weight in ((0, 1 - w), (1, w)):
            pix_a, pix_b = x, t + shift
            col = pix_b * n + pix_a if transpose else pix_a * n + pix_b
            rows.append(ip * n + b)
            cols.append(col)
            vals.append(weight)
    if not rows:
        return np.empty(0, int), np.empty(0, int), np.empty(0)
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)


def ct_matrix(n: int, n_views: int) -> scipy.sparse.csr_matrix:
    """The matrix of :func:`ct_operator` as a scipy CSR matrix ``(n_views * n, n * n)``.

    Built directly from the slant-stack formula of ``Radon2D`` (no operator applications), in
    milliseconds; ``pylops.MatrixMult(ct_matrix(n, v))`` (with ``dims = (n, n)`` and
    ``dimsd = (v, n)`` set on it) is the fast PyLops form of the projector.

    Examples
    --------
    >>> import numpy as np
    >>> from invops.physics import ct_matrix, ct_operator
    >>> A = ct_matrix(8, 4)
    >>> x = np.random.default_rng(0).standard_normal(64)
    >>> bool(np.allclose(A @ x, ct_operator(8, 4) @ x))
    True
    """
    p1, p2 = _slopes(n_views)
    r1, c1, v1 = _stack_entries(n, p1, transpose=False)
    r2, c2, v2 = _stack_entries(n, p2, transpose=True)
    rows = np.concatenate([r1, r2 + p1.size * n])
    mat = scipy.sparse.coo_matrix(
        (np.concatenate([v1, v2]), (rows, np.concatenate([c1, c2]))),
        shape=(n_views * n, n * n),
    )
    return mat.tocsr()  # duplicate entries (none expected) would be summed


class TorchCT(Operator):
    """:func:`ct_operator` applied with torch sparse matrix products on the tensors' device.

    Parameters
    ----------
    n : int
        Image side.
    n_views : int
        Number of projection angles.

    Notes
    -----
    Holds :func:`ct_matrix` and its transpose as torch sparse (COO) tensors, moved to the
    input's device and precision on first use; a batch ``(B, n, n)`` is projected by one
    sparse-dense product to ``(B, n_views, n)``, and the adjoint (back-projection) likewise.

    Examples
    --------
    >>> import torch
    >>> from invops.physics import TorchCT
    >>> op = TorchCT(16, 6)
    >>> op.apply(torch.ones(2, 16, 16, dtype=torch.float64)).shape
    torch.Size([2, 6, 16])
    """

    def __init__(self, n: int, n_views: int) -> None:
        mat = ct_matrix(n, n_views)
        self.n, self.n_views = int(n), int(n_views)
        self._matrix = _sparse_tensor(mat)
        self._matrix_t = _sparse_tensor(mat.T.tocsr())
        self._cache: dict = {}
        super().__init__(
            self._project, self._backproject, (n, n), (n_views, n), False, f"TorchCT({n_views})"
        )

    def _on(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = torch.float32 if like.dtype in (torch.float32, torch.complex64) else torch.float64
        key = (like.device, dtype)
        if key not in self._cache:
            self._cache[key] = (
                self._matrix.to(device=like.device, dtype=dtype),
                self._matrix_t.to(device=like.device, dtype=dtype),
            )
        return self._cache[key]

    @staticmethod
    def _product(mat: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cols = v.reshape(v.shape[0], -1).T  # (n_in, B)
        if v.is_complex():
            return torch.complex(mat @ cols.real.contiguous(), mat @ cols.imag.contiguous()).T
        return (mat @ cols.contiguous()).T

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        mat, _ = self._on(x)
        return self._product(mat, x).reshape(x.shape[0], self.n_views, self.n)

    def _backproject(self, y: torch.Tensor) -> torch.Tensor:
        _, mat_t = self._on(y)
        return self._product(mat_t, y).reshape(y.shape[0], self.n, self.n)


def _sparse_tensor(mat: Any) -> torch.Tensor:
    coo = scipy.sparse.coo_matrix(mat)
    indices = torch.from_numpy(np.vstack((coo.row, coo.col)).astype(np.int64))
    values = torch.from_numpy(coo.data.astype(np.float64))
    return torch.sparse_coo_tensor(indices, values, coo.shape, check_invariants=True).coalesce()
