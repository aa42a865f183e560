r"""Training objectives and their gradients, per sample.

Every function takes torch tensors, numpy arrays or cupy arrays (batch first, ``(B, ...)``) and
returns the kind of its first argument. Losses are returned **per sample**, with shape ``(B,)``;
reduce them as you like (``.sum()``, ``.mean()``). Every ``*_grad`` function returns the
gradient of the **sum** of the per-sample losses with respect to the first argument, which is
also the per-sample gradient because samples are independent. (InvertibleNetworks.jl returns
batch means instead, and its Gaussian log-likelihood drops the normalising constant.)

Examples
--------
>>> import numpy as np, invops
>>> z = np.zeros((2, 3))
>>> nll = invops.gaussian_nll(z)
>>> type(nll).__name__, nll.shape
('ndarray', (2,))
>>> bool(np.allclose(nll, 0.5 * 3 * np.log(2 * np.pi)))
True
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ._arrays import array_kind, from_torch, to_torch

__all__ = [
    "gaussian_nll",
    "gaussian_nll_grad",
    "mse",
    "mse_grad",
    "huber",
    "huber_grad",
    "flow_nll",
    "flow_nll_grad",
]

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


# ---------------------------------------------------------------------------- helpers
def _tensor(a: Any, name: str, owner: str) -> tuple[str, torch.Tensor]:
    kind = array_kind(a, f"{owner}: {name}")
    t = to_torch(a, name=name)
    if not t.is_floating_point():
        raise TypeError(f"{owner}: {name} must be a floating-point array, got dtype {t.dtype}")
    if t.ndim < 1:
        raise ValueError(
            f"{owner}: {name} must be batch-first with at least one dimension (B, ...), "
            f"got a 0-d array"
        )
    return kind, t


def _pair(x: Any, y: Any, owner: str) -> tuple[str, torch.Tensor, torch.Tensor]:
    kind, xt = _tensor(x, "x", owner)
    array_kind(y, f"{owner}: y")
    yt = to_torch(y, device=xt.device, name="y")
    if tuple(yt.shape) != tuple(xt.shape):
        raise ValueError(
            f"{owner}: x and y must have the same shape, got {tuple(xt.shape)} and "
            f"{tuple(yt.shape)}"
        )
    if yt.dtype != xt.dtype:
        raise TypeError(f"{owner}: x and y must have the same dtype, got {xt.dtype} and {yt.dtype}")
    if yt.device != xt.device:
        yt = yt.to(xt.device)
    return kind, xt, yt


def _per_sample_sum(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).sum(dim=1)


def _gaussian_args(
    z: Any, mean: Any, std: Any, owner: str
) -> tuple[str, torch.Tensor, torch.Tensor | float, torch.Tensor | float]:
    kind, zt = _tensor(z, "z", owner)

    def as_param(v: Any, name: str) -> torch.Tensor | float:
        if isinstance(v, (int, float)):
            return float(v)
        array_kind(v, f"{owner}: {name}")
        t = to_torch(v, name=name).to(device=zt.device, dtype=zt.dtype)
        try:
            shape = torch.broadcast_shapes(t.shape, zt.shape)
        except RuntimeError:
            shape = None
        if shape != zt.shape:
            raise ValueError(
                f"{owner}: {name} must broadcast to the shape of z {tuple(zt.shape)}, "
                f"got shape {tuple(t.shape)}"
            )
        return t

    mean_t = as_param(mean, "mean")
    std_t = as_param(std, "std")
    positive = std_t > 0 if isinstance(std_t, float) else bool((std_t > 0).all())
    finite = math.isfinite(std_t) if isinstance(std_t, float) else bool(std_t.isfinite().all())
    if not (positive and finite):
        raise ValueError(f"{owner}: std must be finite and > 0, got {std}")
    return kind, zt, mean_t, std_t


# ---------------------------------------------------------------------------- Gaussian
def gaussian_nll(z: Any, mean: Any = 0.0, std: Any = 1.0) -> Any:
    r"""Per-sample negative log-likelihood of an isotropic Gaussian, normalising constant included.

    Parameters
    ----------
    z : array, shape (B, ...)
        Samples (torch, numpy or cupy).
    mean : float or array
        Mean, broadcastable to the shape of ``z``.
    std : float or array
        Standard deviation (> 0), broadcastable to the shape of ``z``.

    Returns
    -------
    array, shape (B,)
        :math:`-\log p(z_b)` for each sample, the same kind as ``z``.

    Raises
    ------
    ValueError
        If ``std`` is not finite and positive, ``mean``/``std`` do not broadcast to ``z``, or
        ``z`` is 0-d.

    Notes
    -----
    For a sample with :math:`N` entries,

    .. math:: -\log p(z) = \frac12 \sum_{i=1}^N \Big(\frac{z_i - \mu_i}{\sigma_i}\Big)^2
              + \sum_{i=1}^N \log\sigma_i + \frac N2 \log(2\pi),

    which for scalar :math:`\sigma` is :math:`\tfrac12\|(z - \mu)/\sigma\|^2 + N\log\sigma +
    \tfrac N2\log 2\pi`. The constant :math:`\tfrac N2 \log 2\pi` does not change gradients
    but makes the value a true negative log-density (comparable across models, convertible to
    bits per dimension). InvertibleNetworks.jl's ``log_likelihood`` omits it and the
    :math:`\log\sigma` term, and averages over the batch.

    Examples
    --------
    >>> import torch, math, invops
    >>> z = torch.zeros(2, 4, dtype=torch.float64)
    >>> nll = invops.gaussian_nll(z)  # N = 4 entries per sample: 0.5 * 4 * log(2 pi)
    >>> bool(torch.allclose(nll, torch.full_like(nll, 2 * math.log(2 * math.pi))))
    True
    """
    kind, zt, mean_t, std_t = _gaussian_args(z, mean, std, "gaussian_nll")
    r = (zt - mean_t) / std_t
    log_std = math.log(std_t) if isinstance(std_t, float) else torch.log(std_t)
    per_entry = 0.5 * r * r + log_std + _HALF_LOG_2PI
    return from_torch(_per_sample_sum(per_entry), kind)


def gaussian_nll_grad(z: Any, mean: Any = 0.0, std: Any = 1.0) -> Any:
    r"""Gradient of ``gaussian_nll(z, mean, std).sum()`` with respect to ``z``.

    Parameters
    ----------
    z : array, shape (B, ...)
        Samples (torch, numpy or cupy).
    mean, std : float or array
        As in :func:`gaussian_nll`.

    Returns
    -------
    array
        :math:`(z - \mu)/\sigma^2`, the shape and kind of ``z``.

    Notes
    -----
    :math:`\partial_{z_i}(-\log p) = (z_i - \mu_i)/\sigma_i^2`.

    Examples
    --------
    >>> import numpy as np, invops
    >>> invops.gaussian_nll_grad(np.array([[1.0, -2.0]]), std=2.0).tolist()
    [[0.25, -0.5]]
    """
    kind, zt, mean_t, std_t = _gaussian_args(z, mean, std, "gaussian_nll_grad")
    g = (zt - mean_t) / (std_t * std_t)
    return from_torch(g, kind)


# ---------------------------------------------------------------------------- MSE
def mse(x: Any, y: Any) -> Any:
    r"""Per-sample half squared error :math:`\tfrac12\|x_b - y_b\|^2`.

    Parameters
    ----------
    x, y : array, shape (B, ...)
        Prediction and target, same shape and dtype (torch, numpy or cupy; ``y`` is moved to
        ``x``'s device).

    Returns
    -------
    array, shape (B,)
        The kind of ``x``.

    Raises
    ------
    ValueError
        If the shapes differ.
    TypeError
        If the dtypes differ.

    Notes
    -----
    :math:`L_b = \tfrac12 \sum_i (x_{b,i} - y_{b,i})^2`. Not divided by the batch size
    (the reference's ``mse`` is :math:`\tfrac1{2B}\|X - Y\|^2`).

    Examples
    --------
    >>> import torch, invops
    >>> invops.mse(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])).tolist()
    [2.5]
    """
    kind, xt, yt = _pair(x, y, "mse")
    r = xt - yt
    return from_torch(_per_sample_sum(0.5 * r * r), kind)


def mse_grad(x: Any, y: Any) -> Any:
    r"""Gradient of ``mse(x, y).sum()`` with respect to ``x``: :math:`x - y`.

    Parameters
    ----------
    x, y : array, shape (B, ...)
        As in :func:`mse`.

    Returns
    -------
    array
        :math:`x - y`, the shape and kind of ``x``.

    Notes
    -----
    :math:`\partial_{x_i} \tfrac12 \sum_j (x_j - y_j)^2 = x_i - y_i`.
    """
    kind, xt, yt = _pair(x, y, "mse_grad")
    return from_torch(xt - yt, kind)


# ---------------------------------------------------------------------------- Huber
def _check_delta(delta: float, owner: str) -> float:
    delta = float(delta)
    if not (math.isfinite(delta) and delta > 0.0):
        raise ValueError(f"{owner}: delta must be a finite number > 0, got {delta}")
    return delta


def huber(x: Any, y: Any, delta: float = 1.0) -> Any:
    r"""Per-sample sum of the Huber function of the residual :math:`x - y`.

    Parameters
    ----------
    x, y : array, shape (B, ...)
        Prediction and target, same shape and dtype.
    delta : float
        Threshold :math:`\delta > 0` between the quadratic and the linear regime.

    Returns
    -------
    array, shape (B,)
        The kind of ``x``.

    Raises
    ------
    ValueError
        If the shapes differ or ``delta <= 0``.
    TypeError
        If the dtypes differ.

    Notes
    -----
    With :math:`r = x - y`,

    .. math:: h_\delta(r) = \begin{cases} \tfrac12 r^2 & |r| \le \delta \\
              \delta\,(|r| - \tfrac12\delta) & |r| > \delta \end{cases},
              \qquad L_b = \sum_i h_\delta(r_{b,i}).

    :math:`h_\delta` is continuously differentiable; it equals the half squared error for
    small residuals and grows linearly for large ones.

    Examples
    --------
    >>> import torch, invops
    >>> invops.huber(torch.tensor([[0.5, 3.0]]), torch.zeros(1, 2)).tolist()
    [2.625]
    """
    kind, xt, yt = _pair(x, y, "huber")
    delta = _check_delta(delta, "huber")
    r = xt - yt
    a = r.abs()
    h = torch.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))
    return from_torch(_per_sample_sum(h), kind)


def huber_grad(x: Any, y: Any, delta: float = 1.0) -> Any:
    r"""Gradient of ``huber(x, y, delta).sum()`` with respect to ``x``.

    Parameters
    ----------
    x, y : array, shape (B, ...)
        As in :func:`huber`.
    delta : float
        Threshold :math:`\delta > 0`.

    Returns
    -------
    array
        :math:`\operatorname{clip}(x - y, -\delta, \delta)`, the shape and kind of ``x``.

    Notes
    -----
    :math:`h_\delta'(r) = r` for :math:`|r| \le \delta` and
    :math:`\delta\operatorname{sign}(r)` otherwise, i.e. :math:`r` clipped to
    :math:`[-\delta, \delta]`.
    """
    kind, xt, yt = _pair(x, y, "huber_grad")
    delta = _check_delta(delta, "huber_grad")
    return from_torch(torch.clamp(xt - yt, -delta, delta), kind)


# ---------------------------------------------------------------------------- flow loss
def _flow_args(z: Any, logdet: Any, owner: str) -> tuple[str, torch.Tensor, torch.Tensor]:
    kind, zt = _tensor(z, "z", owner)
    array_kind(logdet, f"{owner}: logdet")
    ld = to_torch(logdet, device=zt.device, name="logdet")
    if tuple(ld.shape) != (zt.shape[0],):
        raise ValueError(
            f"{owner}: logdet must have shape ({zt.shape[0]},) (one value per sample of z), "
            f"got {tuple(ld.shape)}"
        )
    if ld.dtype != zt.dtype:
        raise TypeError(
            f"{owner}: z and logdet must have the same dtype, got {zt.dtype} and {ld.dtype}"
        )
    return kind, zt, ld.to(zt.device)


def flow_nll(z: Any, logdet: Any) -> Any:
    r"""Per-sample normalising-flow loss :math:`-\log p_x(x) = -\log \mathcal N(z; 0, I) - \ell`.

    Parameters
    ----------
    z : array, shape (B, ...)
        Latent output of the flow, :math:`z = f(x)`.
    logdet : array, shape (B,)
        The flow's log-determinant :math:`\ell = \log|\det \partial_x f(x)|` per sample.

    Returns
    -------
    array, shape (B,)
        ``gaussian_nll(z) - logdet``, the kind of ``z``.

    Raises
    ------
    ValueError
        If ``logdet`` does not have shape ``(B,)``.
    TypeError
        If the dtypes differ.

    Notes
    -----
    By the change of variables :math:`\log p_x(x) = \log p_z(f(x)) + \ell(x)`, so with a
    standard normal base

    .. math:: L_b = \tfrac12\|z_b\|^2 + \tfrac N2 \log(2\pi) - \ell_b .

    Its gradients are :math:`\partial L / \partial z = z` and
    :math:`\partial L / \partial \ell = -1` (see :func:`flow_nll_grad`). These are exactly
    the cotangents to feed a flow's reverse pass:
    ``flow.backward(z, z, dlogdet=-1.0)`` returns the gradient of ``flow_nll(...).sum()``
    with respect to the flow's input and accumulates it into the parameters' ``.grad``.

    Examples
    --------
    >>> import torch, invops
    >>> flow = invops.ActNorm(3).double()
    >>> x = torch.randn(4, 3, 5, dtype=torch.float64)
    >>> z, logdet = flow(x)
    >>> invops.flow_nll(z, logdet).shape
    torch.Size([4])
    """
    kind, zt, ld = _flow_args(z, logdet, "flow_nll")
    nll = _per_sample_sum(0.5 * zt * zt + _HALF_LOG_2PI)
    return from_torch(nll - ld, kind)


def flow_nll_grad(z: Any, logdet: Any) -> tuple[Any, Any]:
    r"""Gradients of ``flow_nll(z, logdet).sum()`` with respect to ``z`` and ``logdet``.

    Parameters
    ----------
    z, logdet : array
        As in :func:`flow_nll`.

    Returns
    -------
    dz : array
        :math:`z` (a copy), the shape and kind of ``z``.
    dlogdet : array, shape (B,)
        :math:`-1` for every sample, the kind of ``z``.

    Notes
    -----
    :math:`\partial_z(\tfrac12\|z\|^2 - \ell) = z`, :math:`\partial_\ell(\cdot) = -1`.

    Examples
    --------
    >>> import numpy as np, invops
    >>> dz, dld = invops.flow_nll_grad(np.ones((2, 3)), np.zeros(2))
    >>> dld.tolist()
    [-1.0, -1.0]
    """
    kind, zt, ld = _flow_args(z, logdet, "flow_nll_grad")
    return from_torch(zt.clone(), kind), from_torch(torch.full_like(ld, -1.0), kind)
