"""Orthogonal 1x1 convolution parametrised by Householder reflections."""

from __future__ import annotations

import torch

from .._checks import check_layout
from ..module import InvertibleModule

__all__ = ["Conv1x1"]


class Conv1x1(InvertibleModule):
    r"""Orthogonal channel mixing :math:`y = Wx` with :math:`W = H_1 H_2 \cdots H_m`.

    Parameters
    ----------
    n_channels : int
        Number of channels.
    n_reflections : int
        Number of Householder reflections :math:`m` (3 as in InvertibleNetworks.jl; ``n_channels``
        reflections reach every orthogonal matrix).
    freeze : bool
        If True the reflection vectors are constants (``requires_grad=False``): they get no
        gradient and are excluded from the parameter Jacobian.
    logdet : bool
        Whether to return the log-determinant (always zero).

    Notes
    -----
    Each reflection is :math:`H_i = I - 2 v_i v_i^T / (v_i^T v_i)`. The mixing matrix is built once
    per call by :math:`m` rank-one updates, :math:`W \leftarrow W - 2 (W v_i) v_i^T/(v_i^Tv_i)`,
    in :math:`O(m k^2)` for :math:`k` channels, and applied to every pixel of every sample as one
    batched contraction. :math:`W` is orthogonal, so :math:`W^{-1} = W^T` and the log-determinant
    is 0. The parameter gradient follows by reverse mode through the rank-one updates, which costs
    :math:`O(m k^2)` plus the contraction and never forms the :math:`k \times k \times k` tensor
    of derivatives of :math:`v v^T / v^T v` that the reference builds.

    Examples
    --------
    >>> import torch, invops
    >>> conv = invops.Conv1x1(5).double()
    >>> W = conv.matrix()
    >>> torch.allclose(W @ W.T, torch.eye(5, dtype=torch.float64))
    True
    """

    def __init__(
        self, n_channels: int, n_reflections: int = 3, freeze: bool = False, logdet: bool = True
    ) -> None:
        super().__init__(logdet=logdet)
        if n_channels < 1:
            raise ValueError(f"Conv1x1: n_channels must be >= 1, got {n_channels}")
        if n_reflections < 1:
            raise ValueError(f"Conv1x1: n_reflections must be >= 1, got {n_reflections}")
        self.n_channels = n_channels
        bound = (6.0 / (n_channels + 1)) ** 0.5  # glorot-uniform for a k x 1 vector
        self.vectors = torch.nn.Parameter(
            torch.empty(n_reflections, n_channels).uniform_(-bound, bound)
        )
        self.freeze = freeze
        if freeze:
            self.vectors.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"{self.n_channels}, n_reflections={self.vectors.shape[0]}, freeze={self.freeze}"

    def _validate(self, x, cond, inverse):
        check_layout(x, self.n_channels, "y" if inverse else "x", "Conv1x1")

    def matrix(self) -> torch.Tensor:
        """The orthogonal mixing matrix :math:`W` (``n_channels x n_channels``)."""
        return self._partial_products()[-1]

    def _partial_products(self) -> list[torch.Tensor]:
        """:math:`W_0 = I, W_i = W_{i-1} H_i` (:math:`H_i = I - c_i v_i v_i^T`), all of them."""
        v = self.vectors
        products = [torch.eye(self.n_channels, dtype=v.dtype, device=v.device)]
        for vi in v:
            w = products[-1]
            products.append(w - (2.0 / vi.dot(vi)) * torch.outer(w @ vi, vi))
        return products

    def _matrix_vjp(self, products: list[torch.Tensor], dw: torch.Tensor) -> torch.Tensor:
        r"""The cotangent of the reflection vectors for a cotangent ``dw`` of :math:`W`.

        Backwards through :math:`W_i = W_{i-1} H_i`: with :math:`M = W_{i-1}^T G` the cotangent
        of :math:`H_i = I - 2 v v^T / n` (:math:`n = v^T v`),
        :math:`dv = -2\,[(M + M^T) v / n - 2 (v^T M v)\, v / n^2]`, and
        :math:`G \leftarrow G H_i`.
        """
        g = dw
        dv = torch.empty_like(self.vectors)
        for i in range(self.vectors.shape[0] - 1, -1, -1):
            v = self.vectors.detach()[i]
            n = v.dot(v)
            m = products[i].T @ g
            mv = m @ v + m.T @ v
            dv[i] = (-2.0 / n) * mv + (4.0 * v.dot(m @ v) / (n * n)) * v
            g = g - (2.0 / n) * torch.outer(g @ v, v)
        return dv

    @staticmethod
    def _mix(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # one batched matrix product over the flattened space (faster than einsum here)
        return (w @ x.reshape(x.shape[0], x.shape[1], -1)).view(x.shape)

    def _forward(self, x, *cond):
        return self._mix(self.matrix(), x), x.new_zeros(x.shape[0])

    def _inverse(self, y, *cond):
        return self._mix(self.matrix().T, y), y.new_zeros(y.shape[0])

    # -- reverse mode, by hand: W and its cotangent without an autograd graph
    def _reverse_matrix(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.no_grad():
            products = self._partial_products()
        return products[-1], products

    def _matrix_grads(self, products: list[torch.Tensor], dw: torch.Tensor) -> dict:
        if not self.vectors.requires_grad:
            return {}
        with torch.no_grad():
            return {self.vectors: self._matrix_vjp(products, dw)}

    @staticmethod
    def _outer_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        r""":math:`\sum a\, b^T` over the batch and space: ``(C, C)`` from two ``(B, C, ...)``."""
        a = a.reshape(a.shape[0], a.shape[1], -1)
        return (a @ b.reshape(b.shape[0], b.shape[1], -1).mT).sum(0)

    def _pullback(self, y, cond, dy, dlogdet):
        r""":math:`x = W^T y`, :math:`dx = W^T dy`, :math:`dW = \sum dy\, x^T` (the
        log-determinant is 0: ``dlogdet`` does not contribute)."""
        w, products = self._reverse_matrix()
        x = self._mix(w.T, y)
        grads = self._matrix_grads(products, self._outer_sum(dy, x))
        return x, self._mix(w.T, dy), tuple(None for _ in cond), grads

    def _pullback_inverse(self, x, cond, dx, dlogdet):
        r"""The inverse map :math:`x = W^T y`: :math:`y = W x`, :math:`dy = W dx`,
        :math:`dW = \sum y\, dx^T`."""
        w, products = self._reverse_matrix()
        y = self._mix(w, x)
        grads = self._matrix_grads(products, self._outer_sum(y, dx))
        return y, self._mix(w, dx), tuple(None for _ in cond), grads

    # -- forward mode, by hand
    def _matrix_tangent(self, dv: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        r""":math:`W` and its tangent :math:`dW` for reflection tangents ``dv`` (None: 0).

        Each rank-one update :math:`W \leftarrow W - c\,(Wv)v^T`, :math:`c = 2/v^Tv`, has the
        tangent :math:`dW \leftarrow dW - dc\,(Wv)v^T - c\,(dW\,v + W\,dv)v^T -
        c\,(Wv)\,dv^T` with :math:`dc = -2c\,v^T dv / v^Tv`: :math:`O(m k^2)`, like ``matrix``.
        """
        if dv is None:
            return self.matrix(), None
        v = self.vectors
        w = torch.eye(self.n_channels, dtype=v.dtype, device=v.device)
        dw = torch.zeros_like(w)
        for vi, dvi in zip(v, dv):
            norm = vi.dot(vi)
            c = 2.0 / norm
            dc = -2.0 * c * vi.dot(dvi) / norm
            a = w @ vi
            da = dw @ vi + w @ dvi
            dw = dw - dc * torch.outer(a, vi) - c * (torch.outer(da, vi) + torch.outer(a, dvi))
            w = w - c * torch.outer(a, vi)
        return w, dw

    def _tangent_rule(self, x, cond, dx, dcond, dtheta, inverse=False):
        w, dw = self._matrix_tangent(dtheta.get(self.vectors))
        if inverse:
            w, dw = w.T, None if dw is None else dw.T
        y = self._mix(w, x)
        dy = None if dx is None else self._mix(w, dx)
        if dw is not None:
            dy = self._mix(dw, x) if dy is None else dy.add_(self._mix(dw, x))
        return y, dy, x.new_zeros(x.shape[0]), None
