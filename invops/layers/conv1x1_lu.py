"""Invertible 1x1 convolution with an LU-decomposed weight (Glow)."""

from __future__ import annotations

import math

import torch

from .._checks import check_layout
from ..module import InvertibleModule
from .conv1x1 import Conv1x1

__all__ = ["Conv1x1LU"]


class Conv1x1LU(InvertibleModule):
    r"""Channel mixing :math:`y = Wx` with :math:`W = P L (U + \mathrm{diag}(\sigma\, e^{s}))`.

    Parameters
    ----------
    n_channels : int
        Number of channels.
    logdet : bool
        Whether to return the log-determinant.

    Notes
    -----
    The LU-decomposed invertible 1x1 convolution of Glow (Kingma and Dhariwal, 2018, section
    3.2). :math:`P` is a fixed permutation (buffer ``perm``: row :math:`i` of :math:`PA` is row
    ``perm[i]`` of :math:`A`), :math:`L` is unit lower-triangular with learned strictly-lower
    part (``lower``), :math:`U` is strictly upper-triangular (``upper``), :math:`s` is the
    learned ``log_s`` and :math:`\sigma` the fixed signs ``sign_s``. Only the strictly lower
    (upper) part of ``lower`` (``upper``) is used; the other entries get zero gradients.

    As in Glow, the parameters start from the LU factorisation, with partial pivoting, of a
    random orthogonal matrix (the Q factor of a Gaussian matrix), so :math:`W` starts
    orthogonal and the log-determinant starts at zero. The map is applied to every pixel:

    .. math::
        y_{b,:,p} = W x_{b,:,p}, \qquad
        \log|\det \partial_x y| = N \textstyle\sum_i s_i,

    with :math:`N` the number of spatial points (1 for dense input), in :math:`O(k)` instead of
    the :math:`O(k^3)` of a determinant. The inverse
    :math:`x = (U + \mathrm{diag}(\sigma e^s))^{-1} L^{-1} P^T y` takes two triangular solves
    (``torch.linalg.solve_triangular``) and forms no inverse matrix. Unlike
    :class:`~invops.Conv1x1`, :math:`W` is not constrained to be orthogonal, so the layer can
    also rescale.

    Examples
    --------
    >>> import torch, invops
    >>> conv = invops.Conv1x1LU(5)
    >>> W = conv.matrix()
    >>> torch.allclose(W @ W.T, torch.eye(5), atol=1e-6)
    True
    >>> x = torch.randn(2, 5, 4, 4)
    >>> y, logdet = conv(x)
    >>> x_back, _ = conv.inverse(y)
    >>> torch.allclose(x_back, x, atol=1e-5)
    True
    """

    perm: torch.Tensor
    sign_s: torch.Tensor

    def __init__(self, n_channels: int, logdet: bool = True) -> None:
        super().__init__(logdet=logdet)
        if isinstance(n_channels, bool) or not isinstance(n_channels, int) or n_channels < 1:
            raise ValueError(f"Conv1x1LU: n_channels must be an integer >= 1, got {n_channels!r}")
        self.n_channels = n_channels
        dtype = torch.get_default_dtype()
        # the factorisation runs in float64 so that W starts orthogonal to rounding in float32
        q, _ = torch.linalg.qr(torch.randn(n_channels, n_channels, dtype=torch.float64))
        p, lower, upper = torch.linalg.lu(q)
        diag = upper.diagonal()
        self.register_buffer("perm", p.argmax(dim=1))
        self.register_buffer("sign_s", diag.sign().to(dtype))
        self.lower = torch.nn.Parameter(lower.tril(-1).to(dtype))
        self.upper = torch.nn.Parameter(upper.triu(1).to(dtype))
        self.log_s = torch.nn.Parameter(diag.abs().log().to(dtype))

    def extra_repr(self) -> str:
        return f"{self.n_channels}, logdet={self.logdet}"

    def _validate(self, x, cond, inverse):
        check_layout(x, self.n_channels, "y" if inverse else "x", "Conv1x1LU")

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit lower-triangular :math:`L` and upper-triangular :math:`U + diag(\\sigma e^s)`."""
        eye = torch.eye(self.n_channels, dtype=self.lower.dtype, device=self.lower.device)
        lower = self.lower.tril(-1) + eye
        upper = self.upper.triu(1) + torch.diag(self.sign_s * self.log_s.exp())
        return lower, upper

    def matrix(self) -> torch.Tensor:
        """The mixing matrix :math:`W = PLU` (``n_channels x n_channels``)."""
        lower, upper = self._factors()
        return (lower @ upper)[self.perm]

    def _logdet(self, x: torch.Tensor) -> torch.Tensor:
        n_points = math.prod(x.shape[2:])
        return (n_points * self.log_s.sum()).expand(x.shape[0])

    def _forward(self, x, *cond):
        return _mix(self.matrix(), x), self._logdet(x)

    def _solve(self, lower: torch.Tensor, upper: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """:math:`W^{-1} y` by two triangular solves."""
        # (B, C, points): one broadcast triangular solve for every rank, dense included
        z = y.reshape(y.shape[0], self.n_channels, -1)[:, torch.argsort(self.perm)]
        z = torch.linalg.solve_triangular(lower, z, upper=False, unitriangular=True)
        return torch.linalg.solve_triangular(upper, z, upper=True).reshape(y.shape)

    def _inverse(self, y, *cond):
        lower, upper = self._factors()
        return self._solve(lower, upper, y), -self._logdet(y)

    # -- forward mode, by hand
    def _tangent_rule(self, x, cond, dx, dcond, dtheta, inverse=False):
        r"""``y = Wx``, ``dy = W dx + dW x``; inverse ``dx = W^{-1}(dy - dW x)``.

        :math:`dW = P(dL\,U + L\,dU)` with :math:`dL`, :math:`dU` the strictly triangular
        parts of the tangents and :math:`dU` also holding :math:`\mathrm{diag}(\sigma e^s
        ds)`; the logdet's tangent is :math:`N \sum ds`.
        """
        lower, upper = self._factors()
        get = dtheta.get
        dl, du, ds = get(self.lower), get(self.upper), get(self.log_s)
        dw = None
        if dl is not None or du is not None or ds is not None:
            dlow = torch.zeros_like(lower) if dl is None else dl.tril(-1)
            dup = torch.zeros_like(upper) if du is None else du.triu(1)
            if ds is not None:
                dup = dup + torch.diag(self.sign_s * self.log_s.exp() * ds)
            dw = (dlow @ upper + lower @ dup)[self.perm]
        n_points = math.prod(x.shape[2:])
        dlogdet = None if ds is None else (n_points * ds.sum()).expand(x.shape[0])
        mix = _mix
        if inverse:
            out = self._solve(lower, upper, x)
            rhs = dx
            if dw is not None:
                rhs = -mix(dw, out) if rhs is None else rhs - mix(dw, out)
            dout = None if rhs is None else self._solve(lower, upper, rhs)
            return out, dout, -self._logdet(x), None if dlogdet is None else -dlogdet
        w = (lower @ upper)[self.perm]
        out = mix(w, x)
        dout = None if dx is None else mix(w, dx)
        if dw is not None:
            dout = mix(dw, x) if dout is None else dout.add_(mix(dw, x))
        return out, dout, self._logdet(x), dlogdet


def _mix(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return Conv1x1._mix(w, x)
