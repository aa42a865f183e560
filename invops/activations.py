r"""Activation functions: plain elementwise functions, invertible layers and blocks.

Three kinds of objects live here.

- Plain functions on torch tensors (:func:`relu`, :func:`leaky_relu`, :func:`sigmoid`,
  :func:`exp_clamp`, :func:`galu`), their inverses where they exist and their derivatives.
  Every ``*_derivative`` function takes the **input** :math:`x` of the activation and returns
  :math:`f'(x)`, elementwise. (InvertibleNetworks.jl mixes conventions: its ReLU and GaLU
  gradients take the input, its LeakyReLU and Sigmoid gradients take the output.)
- Invertible layers (:class:`LeakyReLU`, :class:`Sigmoid`, :class:`Sigmoid2`,
  :class:`ExpClamp`): :class:`~invops.InvertibleModule` subclasses whose log-determinant is
  the per-sample sum of :math:`\log|f'(x)|` over all non-batch entries.
- Non-invertible blocks (:class:`ReLU`, :class:`GaLU`): :class:`~invops.Block` subclasses for
  use inside coupling sub-networks.

Forward map, inverse and derivative of each activation are written from the same formula, so
they are mutually consistent (the reference's ExpClamp is not: its forward lacks the factor 2
that its inverse and gradient assume).

Examples
--------
>>> import torch, invops
>>> x = torch.tensor([[-1.0, 0.5, 2.0]], dtype=torch.float64)
>>> layer = invops.LeakyReLU(0.1)
>>> y, logdet = layer(x)
>>> y.tolist()
[[-0.1, 0.5, 2.0]]
>>> round(float(logdet), 4)  # one negative entry: log(0.1)
-2.3026
"""

from __future__ import annotations

import math

import torch

from ._autodiff import elementwise_tangent, register_elementwise_tangent
from ._checks import check_layout
from .module import Block, InvertibleModule

__all__ = [
    "relu",
    "relu_derivative",
    "leaky_relu",
    "leaky_relu_inv",
    "leaky_relu_derivative",
    "sigmoid",
    "sigmoid_inv",
    "sigmoid_derivative",
    "exp_clamp",
    "exp_clamp_inv",
    "exp_clamp_derivative",
    "galu",
    "LeakyReLU",
    "Sigmoid",
    "Sigmoid2",
    "ExpClamp",
    "ReLU",
    "GaLU",
]

_TWO_OVER_PI = 2.0 / math.pi


# ---------------------------------------------------------------------------- argument checks
def _check_tensor(x: object, name: str, owner: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(x).__name__}")


def _check_slope(slope: float, owner: str) -> float:
    slope = float(slope)
    if not (math.isfinite(slope) and slope > 0.0):
        raise ValueError(f"{owner}: slope must be a finite number > 0, got {slope}")
    return slope


def _check_range(low: float, high: float, owner: str) -> tuple[float, float]:
    low, high = float(low), float(high)
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"{owner}: expected finite low < high, got low={low}, high={high}")
    return low, high


def _check_clamp(clamp: float, owner: str) -> float:
    clamp = float(clamp)
    if not (math.isfinite(clamp) and clamp > 0.0):
        raise ValueError(f"{owner}: clamp must be a finite number > 0, got {clamp}")
    return clamp


def _raise_outside(y: torch.Tensor, inside: torch.Tensor, what: str, owner: str) -> None:
    # ``inside`` is False for NaN as well, so NaN is reported too.
    if not bool(inside.all()):
        bad = y[~inside]
        raise ValueError(
            f"{owner}: y must lie strictly inside {what} (the range of the forward map), "
            f"got {bad.numel()} value(s) outside it, e.g. {float(bad.reshape(-1)[0])!r}"
        )


# ---------------------------------------------------------------------------- ReLU
def relu(x: torch.Tensor) -> torch.Tensor:
    r"""Rectified linear unit, :math:`\max(x, 0)`, elementwise.

    Parameters
    ----------
    x : torch.Tensor
        Input.

    Returns
    -------
    torch.Tensor
        :math:`\max(x, 0)`, same shape as ``x``.

    Notes
    -----
    :math:`f(x) = \max(x, 0)` is not invertible; it is used inside coupling sub-networks
    (:class:`ReLU`).

    Examples
    --------
    >>> import torch
    >>> from invops.activations import relu
    >>> relu(torch.tensor([-1.0, 2.0])).tolist()
    [0.0, 2.0]
    """
    _check_tensor(x, "x", "relu")
    return torch.relu(x)


def relu_derivative(x: torch.Tensor) -> torch.Tensor:
    r"""Derivative of :func:`relu` with respect to its input, evaluated at the input ``x``.

    Parameters
    ----------
    x : torch.Tensor
        The input of the activation (not its output).

    Returns
    -------
    torch.Tensor
        :math:`f'(x)`, same shape and dtype as ``x``.

    Notes
    -----
    :math:`f'(x) = 1` for :math:`x > 0` and :math:`0` for :math:`x \le 0`; the value 0 at the
    kink matches torch autograd.
    """
    _check_tensor(x, "x", "relu_derivative")
    return (x > 0).to(x.dtype)


# ---------------------------------------------------------------------------- leaky ReLU
def leaky_relu(x: torch.Tensor, slope: float = 0.01) -> torch.Tensor:
    r"""Leaky ReLU: :math:`x` for :math:`x > 0`, :math:`\mathrm{slope}\cdot x` otherwise.

    Parameters
    ----------
    x : torch.Tensor
        Input.
    slope : float
        Slope for negative inputs.

    Returns
    -------
    torch.Tensor
        Same shape as ``x``.

    Notes
    -----
    .. math:: f(x) = \begin{cases} x & x > 0 \\ a x & x \le 0 \end{cases}

    with :math:`a` = ``slope``. For :math:`a > 0` it is a bijection of :math:`\mathbb{R}`
    whose inverse is :func:`leaky_relu_inv`.

    Examples
    --------
    >>> import torch
    >>> from invops.activations import leaky_relu
    >>> leaky_relu(torch.tensor([-2.0, 3.0]), slope=0.5).tolist()
    [-1.0, 3.0]
    """
    _check_tensor(x, "x", "leaky_relu")
    return torch.where(x > 0, x, float(slope) * x)


def leaky_relu_inv(y: torch.Tensor, slope: float = 0.01) -> torch.Tensor:
    r"""Inverse of :func:`leaky_relu`: :math:`y` for :math:`y > 0`, :math:`y/a` otherwise.

    Parameters
    ----------
    y : torch.Tensor
        Output of :func:`leaky_relu`.
    slope : float
        Slope :math:`a > 0` for negative inputs.

    Returns
    -------
    torch.Tensor
        The input :math:`x` with ``leaky_relu(x, slope) == y``.

    Raises
    ------
    ValueError
        If ``slope <= 0`` (the map is then not invertible).

    Notes
    -----
    For :math:`a > 0` the sign of :math:`y` is the sign of :math:`x`, so
    :math:`f^{-1}(y) = y` for :math:`y > 0` and :math:`y / a` otherwise.
    """
    _check_tensor(y, "y", "leaky_relu_inv")
    slope = _check_slope(slope, "leaky_relu_inv")
    return torch.where(y > 0, y, y / slope)


def leaky_relu_derivative(x: torch.Tensor, slope: float = 0.01) -> torch.Tensor:
    r"""Derivative of :func:`leaky_relu` with respect to its input, evaluated at the input ``x``.

    Parameters
    ----------
    x : torch.Tensor
        The input of the activation (not its output). For ``slope > 0`` the output has the
        same sign, so passing the output gives the same result, but the convention here is
        the input for every activation.
    slope : float
        Slope for negative inputs.

    Returns
    -------
    torch.Tensor
        :math:`f'(x)`: 1 where :math:`x > 0`, ``slope`` elsewhere (matching torch autograd at
        :math:`x = 0`).

    Notes
    -----
    :math:`f'(x) = 1` for :math:`x > 0` and :math:`a` for :math:`x \le 0`.
    """
    _check_tensor(x, "x", "leaky_relu_derivative")
    return torch.where(x > 0, torch.ones_like(x), torch.full_like(x, float(slope)))


# ---------------------------------------------------------------------------- sigmoid
def sigmoid(x: torch.Tensor, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    r"""Scaled logistic sigmoid with range :math:`(\mathrm{low}, \mathrm{high})`.

    Parameters
    ----------
    x : torch.Tensor
        Input.
    low, high : float
        Bounds of the range, ``low < high``.

    Returns
    -------
    torch.Tensor
        :math:`\mathrm{low} + (\mathrm{high} - \mathrm{low})\,\sigma(x)`.

    Raises
    ------
    ValueError
        If ``low >= high``.

    Notes
    -----
    .. math:: f(x) = l + (h - l)\,\sigma(x), \qquad \sigma(x) = \frac{1}{1 + e^{-x}},

    a bijection from :math:`\mathbb{R}` onto :math:`(l, h)`.

    Examples
    --------
    >>> import torch
    >>> from invops.activations import sigmoid
    >>> sigmoid(torch.zeros(2), low=0.5, high=1.0).tolist()
    [0.75, 0.75]
    """
    _check_tensor(x, "x", "sigmoid")
    low, high = _check_range(low, high, "sigmoid")
    return low + (high - low) * torch.sigmoid(x)


def sigmoid_inv(y: torch.Tensor, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    r"""Inverse of :func:`sigmoid`: :math:`\log(y - \mathrm{low}) - \log(\mathrm{high} - y)`.

    Parameters
    ----------
    y : torch.Tensor
        Values strictly inside ``(low, high)``.
    low, high : float
        Bounds of the range, ``low < high``.

    Returns
    -------
    torch.Tensor
        The input :math:`x` with ``sigmoid(x, low, high) == y``.

    Raises
    ------
    ValueError
        If ``low >= high``, or if any entry of ``y`` is not strictly inside ``(low, high)``
        (including NaN). The bounds themselves are excluded: they are the images of
        :math:`\pm\infty`, which is what a saturated forward pass (large :math:`|x|` in
        float32) produces.

    Notes
    -----
    With :math:`u = (y - l)/(h - l) \in (0, 1)`,
    :math:`f^{-1}(y) = \operatorname{logit}(u) = \log(y - l) - \log(h - y)`.

    Examples
    --------
    >>> import torch
    >>> from invops.activations import sigmoid_inv
    >>> sigmoid_inv(torch.tensor([0.75]), low=0.5, high=1.0).tolist()
    [0.0]
    """
    _check_tensor(y, "y", "sigmoid_inv")
    low, high = _check_range(low, high, "sigmoid_inv")
    return _sigmoid_inv(y, low, high, "sigmoid_inv")


def _sigmoid_inv(y: torch.Tensor, low: float, high: float, owner: str) -> torch.Tensor:
    _raise_outside(y, (y > low) & (y < high), f"({low}, {high})", owner)
    return torch.log(y - low) - torch.log(high - y)


def sigmoid_derivative(x: torch.Tensor, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    r"""Derivative of :func:`sigmoid` with respect to its input, evaluated at the input ``x``.

    Parameters
    ----------
    x : torch.Tensor
        The input of the activation (not its output; the reference's ``SigmoidGrad`` takes
        the output).
    low, high : float
        Bounds of the range, ``low < high``.

    Returns
    -------
    torch.Tensor
        :math:`f'(x)`, same shape as ``x``.

    Notes
    -----
    :math:`f'(x) = (h - l)\,\sigma(x)\,(1 - \sigma(x)) = (h - l)\,\sigma(x)\,\sigma(-x)`.
    """
    _check_tensor(x, "x", "sigmoid_derivative")
    low, high = _check_range(low, high, "sigmoid_derivative")
    return (high - low) * torch.sigmoid(x) * torch.sigmoid(-x)


def _sigmoid_log_derivative(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    # log f'(x) = log(h - l) + log sigma(x) + log sigma(-x)
    #           = log(h - l) - |x| - 2 log(1 + exp(-|x|)),
    # finite for every finite x and exact in floating point (no 1 - sigma cancellation).
    # Its autograd derivative at x = 0 is 0 (sign(0) = 0), the true value.
    # (F.logsigmoid gives the same but costs milliseconds per call on small CPU tensors.)
    a = x.abs()
    return math.log(high - low) - a - 2.0 * torch.log1p(torch.exp(-a))


# ---------------------------------------------------------------------------- ExpClamp
def exp_clamp(x: torch.Tensor, clamp: float = 2.0) -> torch.Tensor:
    r"""Soft-clamped exponential :math:`\exp(c \cdot \tfrac{2}{\pi} \arctan x)`.

    Parameters
    ----------
    x : torch.Tensor
        Input.
    clamp : float
        The bound :math:`c > 0`: outputs lie in :math:`(e^{-c}, e^{c})`.

    Returns
    -------
    torch.Tensor
        Same shape as ``x``, strictly positive.

    Raises
    ------
    ValueError
        If ``clamp <= 0``.

    Notes
    -----
    .. math:: f(x) = \exp\!\Big(\frac{2c}{\pi}\arctan x\Big) \in (e^{-c}, e^{c}),

    a smooth increasing bijection onto that interval with :math:`f(0) = 1` and
    :math:`f'(0) = 2c/\pi` (so with :math:`c = \pi/2` it agrees with :math:`e^x` to first
    order at 0). Used as a bounded coupling scale.

    Examples
    --------
    >>> import torch
    >>> from invops.activations import exp_clamp
    >>> exp_clamp(torch.tensor([0.0])).tolist()
    [1.0]
    >>> bool(exp_clamp(torch.tensor([1e6]), clamp=2.0) < torch.exp(torch.tensor(2.0)))
    True
    """
    _check_tensor(x, "x", "exp_clamp")
    clamp = _check_clamp(clamp, "exp_clamp")
    return torch.exp((clamp * _TWO_OVER_PI) * torch.atan(x))


def exp_clamp_inv(y: torch.Tensor, clamp: float = 2.0) -> torch.Tensor:
    r"""Inverse of :func:`exp_clamp`: :math:`\tan(\tfrac{\pi}{2c} \log y)`.

    Parameters
    ----------
    y : torch.Tensor
        Values strictly inside :math:`(e^{-c}, e^{c})`.
    clamp : float
        The bound :math:`c > 0`.

    Returns
    -------
    torch.Tensor
        The input :math:`x` with ``exp_clamp(x, clamp) == y``.

    Raises
    ------
    ValueError
        If ``clamp <= 0``, or if any entry of ``y`` is not strictly inside
        :math:`(e^{-c}, e^{c})` (including NaN and non-positive values).

    Notes
    -----
    :math:`f^{-1}(y) = \tan\!\big(\frac{\pi}{2c}\log y\big)`, defined for
    :math:`|\log y| < c`.
    """
    _check_tensor(y, "y", "exp_clamp_inv")
    clamp = _check_clamp(clamp, "exp_clamp_inv")
    return _exp_clamp_inv(y, clamp, "exp_clamp_inv")


def _exp_clamp_inv(y: torch.Tensor, clamp: float, owner: str) -> torch.Tensor:
    log_y = torch.log(y)
    _raise_outside(y, log_y.abs() < clamp, f"(exp(-{clamp}), exp({clamp}))", owner)
    return torch.tan(log_y / (clamp * _TWO_OVER_PI))


def exp_clamp_derivative(x: torch.Tensor, clamp: float = 2.0) -> torch.Tensor:
    r"""Derivative of :func:`exp_clamp` with respect to its input, evaluated at the input ``x``.

    Parameters
    ----------
    x : torch.Tensor
        The input of the activation (not its output).
    clamp : float
        The bound :math:`c > 0`.

    Returns
    -------
    torch.Tensor
        :math:`f'(x)`, same shape as ``x``.

    Notes
    -----
    :math:`f'(x) = f(x)\,\dfrac{2c}{\pi}\,\dfrac{1}{1 + x^2}`.
    """
    _check_tensor(x, "x", "exp_clamp_derivative")
    clamp = _check_clamp(clamp, "exp_clamp_derivative")
    return exp_clamp(x, clamp) * (clamp * _TWO_OVER_PI) / (1.0 + x * x)


def _exp_clamp_log_derivative(x: torch.Tensor, clamp: float) -> torch.Tensor:
    # log f'(x) = (2c/pi) atan(x) + log(2c/pi) - log(1 + x^2)
    a = clamp * _TWO_OVER_PI
    return a * torch.atan(x) + math.log(a) - torch.log1p(x * x)


# ---------------------------------------------------------------------------- GaLU
def galu(x: torch.Tensor) -> torch.Tensor:
    r"""Gated linear unit with a sigmoid gate: :math:`x_1 \odot \sigma(x_2)`.

    Parameters
    ----------
    x : torch.Tensor
        Batch-first input ``(B, C, ...)`` with an even number of channels ``C``.

    Returns
    -------
    torch.Tensor
        ``(B, C // 2, ...)``.

    Raises
    ------
    ValueError
        If ``x`` has fewer than 2 dimensions or an odd number of channels.

    Notes
    -----
    With :math:`x_1` the first and :math:`x_2` the second half of the channels (dimension 1),
    :math:`f(x) = x_1 \odot \sigma(x_2)`. Its derivatives are
    :math:`\partial f/\partial x_1 = \sigma(x_2)` and
    :math:`\partial f/\partial x_2 = x_1\,\sigma(x_2)(1 - \sigma(x_2))`. Not invertible.

    Examples
    --------
    >>> import torch
    >>> from invops.activations import galu
    >>> galu(torch.tensor([[3.0, 0.0]])).tolist()
    [[1.5]]
    """
    x1, x2 = torch.chunk(_galu_checked(x), 2, dim=1)
    return x1 * torch.sigmoid(x2)


def galu_tangent(
    x: torch.Tensor, dx: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r""":func:`galu` and its tangent :math:`dx_1\,\sigma(x_2) + x_1\,\sigma'(x_2)\,dx_2`."""
    x1, x2 = torch.chunk(_galu_checked(x), 2, dim=1)
    gate = torch.sigmoid(x2)
    y = x1 * gate
    if dx is None:
        return y, None
    dx1, dx2 = torch.chunk(dx, 2, dim=1)
    return y, torch.ops.aten.sigmoid_backward(dx2, gate).mul_(x1).addcmul_(dx1, gate)


def _galu_checked(x: torch.Tensor) -> torch.Tensor:
    """``x`` after :func:`galu`'s input checks."""
    _check_tensor(x, "x", "galu")
    if x.ndim < 2 or x.shape[1] % 2 != 0:
        raise ValueError(
            "galu: x must be batch-first (B, C, ...) with an even number of channels C, "
            f"got shape {tuple(x.shape)}"
        )
    return x


# ---------------------------------------------------------------------------- invertible layers
class _Elementwise(InvertibleModule):
    """Shared base of the elementwise invertible activations.

    Subclasses define ``_f``, ``_f_inv`` (which raises ``ValueError`` outside the range) and
    ``_log_derivative`` (:math:`\\log|f'(x)|` at the input). The log-determinant of a sample is
    the sum of ``_log_derivative`` over its entries; the inverse reports its negative at the
    recomputed input.
    """

    def _f(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _f_inv(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _log_derivative(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _slopes(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:math:`f'(x)` and :math:`(\\log|f'|)'(x)` (None where it is zero), given ``y = f(x)``."""
        raise NotImplementedError

    def _validate(self, x, cond, inverse):
        check_layout(x, None, "y" if inverse else "x", type(self).__name__)

    def _sum_per_sample(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], -1).sum(dim=1)

    def _forward(self, x, *cond):
        return self._f(x), self._sum_per_sample(self._log_derivative(x))

    def _inverse(self, y, *cond):
        x = self._f_inv(y)
        return x, -self._sum_per_sample(self._log_derivative(x))

    # forward mode, by hand: the Jacobian is diagonal, f'(x); the logdet's tangent is the sum of
    # (log|f'|)'(x) dx. A subclass provides the two derivatives in ``_slopes``.
    _tangent_math = ("_forward", "_inverse", "_f", "_f_inv", "_log_derivative")
    _tangent_rule_names = ("_tangent_rule", "_slopes")

    def _tangent_rule(self, x, cond, dx, dcond, dtheta, inverse=False):
        if inverse:
            y, x = x, self._f_inv(x)
            slope, curvature = self._slopes(x, y)
            dx = dx / slope
            logdet = -self._sum_per_sample(self._log_derivative(x))
            dlogdet = None if curvature is None else -self._sum_per_sample(curvature * dx)
            return x, dx, logdet, dlogdet
        y = self._f(x)
        slope, curvature = self._slopes(x, y)
        logdet = self._sum_per_sample(self._log_derivative(x))
        dlogdet = None if curvature is None else self._sum_per_sample(curvature * dx)
        return y, slope * dx, logdet, dlogdet


class LeakyReLU(_Elementwise):
    r"""Invertible leaky ReLU layer.

    Parameters
    ----------
    slope : float
        Slope :math:`a > 0` for negative inputs.
    logdet : bool
        Whether to return the log-determinant.

    Raises
    ------
    ValueError
        If ``slope <= 0``.

    Notes
    -----
    :math:`y = x` for :math:`x > 0` and :math:`a x` otherwise (:func:`leaky_relu`). The
    Jacobian is diagonal with entries 1 or :math:`a`, so the log-determinant of a sample is
    :math:`n_{\le 0}\,\log a`, with :math:`n_{\le 0}` its number of entries :math:`\le 0`
    (piecewise constant in :math:`x`). The inverse uses that :math:`y` has the sign of
    :math:`x`.

    Examples
    --------
    >>> import torch, invops
    >>> layer = invops.LeakyReLU(0.5)
    >>> y, logdet = layer(torch.tensor([[-2.0, 1.0], [3.0, 4.0]]))
    >>> y.tolist(), [round(v, 4) for v in logdet.tolist()]
    ([[-1.0, 1.0], [3.0, 4.0]], [-0.6931, 0.0])
    >>> layer.inverse(y)[0].tolist()
    [[-2.0, 1.0], [3.0, 4.0]]
    """

    def __init__(self, slope: float = 0.01, logdet: bool = True) -> None:
        super().__init__(logdet=logdet)
        self.slope = _check_slope(slope, "LeakyReLU")

    def extra_repr(self) -> str:
        return f"slope={self.slope}, logdet={self.logdet}"

    def _f(self, x):
        return leaky_relu(x, self.slope)

    def _f_inv(self, y):
        return leaky_relu_inv(y, self.slope)

    def _log_derivative(self, x):
        return (x <= 0).to(x.dtype) * math.log(self.slope)

    def _slopes(self, x, y):
        return leaky_relu_derivative(x, self.slope), None  # piecewise constant logdet


class Sigmoid(_Elementwise):
    r"""Invertible scaled sigmoid layer with range :math:`(\mathrm{low}, \mathrm{high})`.

    Parameters
    ----------
    low, high : float
        Bounds of the range, ``low < high``.
    logdet : bool
        Whether to return the log-determinant.

    Raises
    ------
    ValueError
        If ``low >= high``; from ``inverse`` (and ``backward``, which inverts), if an entry is
        not strictly inside ``(low, high)``.

    Notes
    -----
    :math:`y = l + (h - l)\,\sigma(x)` (:func:`sigmoid`). The log-determinant of a sample is

    .. math:: \sum_i \log f'(x_i) = \sum_i \big[\log(h - l) + \log\sigma(x_i)
              + \log\sigma(-x_i)\big],

    evaluated as :math:`\log(h - l) - |x_i| - 2\log(1 + e^{-|x_i|})`, which stays finite and
    accurate for large :math:`|x|`. The inverse
    is :math:`x = \log(y - l) - \log(h - y)` (:func:`sigmoid_inv`). In float32 the forward
    map saturates to exactly ``low`` or ``high`` for :math:`|x| \gtrsim 17`; such outputs
    cannot be inverted and ``inverse`` raises rather than returning infinities.

    Examples
    --------
    >>> import torch, invops
    >>> layer = invops.Sigmoid(low=0.5, high=1.0).double()
    >>> x = torch.randn(2, 3, 4, dtype=torch.float64)
    >>> y, logdet = layer(x)
    >>> bool(((y > 0.5) & (y < 1.0)).all())
    True
    >>> torch.allclose(layer.inverse(y)[0], x)
    True
    """

    def __init__(self, low: float = 0.0, high: float = 1.0, logdet: bool = True) -> None:
        super().__init__(logdet=logdet)
        self.low, self.high = _check_range(low, high, type(self).__name__)

    def extra_repr(self) -> str:
        return f"low={self.low}, high={self.high}, logdet={self.logdet}"

    def _f(self, x):
        return sigmoid(x, self.low, self.high)

    def _f_inv(self, y):
        return _sigmoid_inv(y, self.low, self.high, f"{type(self).__name__}.inverse")

    def _log_derivative(self, x):
        return _sigmoid_log_derivative(x, self.low, self.high)

    def _slopes(self, x, y):
        # f' = (y - l)(h - y) / (h - l), and (log f')' = 1 - 2 sigma(x)
        low, high = self.low, self.high
        return (y - low) * (high - y) / (high - low), 1.0 - 2.0 * torch.sigmoid(x)


class Sigmoid2(Sigmoid):
    r"""Invertible :math:`2\sigma(x)` layer, i.e. ``Sigmoid(low=0, high=2)``.

    Parameters
    ----------
    logdet : bool
        Whether to return the log-determinant.

    Notes
    -----
    :math:`y = 2\sigma(x) \in (0, 2)`, with log-derivative
    :math:`\log 2 + \log\sigma(x) + \log\sigma(-x)` and inverse
    :math:`x = \log y - \log(2 - y)`. See :class:`Sigmoid`.

    Examples
    --------
    >>> import torch, invops
    >>> invops.Sigmoid2()(torch.zeros(1, 2))[0].tolist()
    [[1.0, 1.0]]
    """

    def __init__(self, logdet: bool = True) -> None:
        super().__init__(low=0.0, high=2.0, logdet=logdet)

    def extra_repr(self) -> str:
        return f"logdet={self.logdet}"


class ExpClamp(_Elementwise):
    r"""Invertible soft-clamped exponential layer with range :math:`(e^{-c}, e^{c})`.

    Parameters
    ----------
    clamp : float
        The bound :math:`c > 0`.
    logdet : bool
        Whether to return the log-determinant.

    Raises
    ------
    ValueError
        If ``clamp <= 0``; from ``inverse`` (and ``backward``), if an entry is not strictly
        inside :math:`(e^{-c}, e^{c})`.

    Notes
    -----
    :math:`y = \exp(\tfrac{2c}{\pi}\arctan x)` (:func:`exp_clamp`), inverse
    :math:`x = \tan(\tfrac{\pi}{2c}\log y)`. The log-determinant of a sample is

    .. math:: \sum_i \Big[\frac{2c}{\pi}\arctan x_i + \log\frac{2c}{\pi}
              - \log(1 + x_i^2)\Big].

    Unlike the reference's ``ExpClampLayer``, forward, inverse and derivative use the same
    constant :math:`2c/\pi`.

    Examples
    --------
    >>> import torch, invops
    >>> layer = invops.ExpClamp(clamp=2.0).double()
    >>> x = torch.randn(3, 2, dtype=torch.float64)
    >>> y, _ = layer(x)
    >>> torch.allclose(layer.inverse(y)[0], x)
    True
    """

    def __init__(self, clamp: float = 2.0, logdet: bool = True) -> None:
        super().__init__(logdet=logdet)
        self.clamp = _check_clamp(clamp, "ExpClamp")

    def extra_repr(self) -> str:
        return f"clamp={self.clamp}, logdet={self.logdet}"

    def _f(self, x):
        return exp_clamp(x, self.clamp)

    def _f_inv(self, y):
        return _exp_clamp_inv(y, self.clamp, "ExpClamp.inverse")

    def _log_derivative(self, x):
        return _exp_clamp_log_derivative(x, self.clamp)

    def _slopes(self, x, y):
        # f' = a y / (1 + x^2) and (log f')' = (a - 2x) / (1 + x^2), a = 2c / pi
        a = self.clamp * _TWO_OVER_PI
        denom = 1.0 + x * x
        return a * y / denom, (a - 2.0 * x) / denom


# ---------------------------------------------------------------------------- blocks
class ReLU(Block):
    r"""ReLU as a non-invertible :class:`~invops.Block` (for coupling sub-networks).

    Notes
    -----
    :math:`y = \max(x, 0)` elementwise; ``backward(dy, x)`` takes the block's **input**
    :math:`x` and returns :math:`\bar x = \bar y \odot \mathbb{1}[x > 0]`.

    Examples
    --------
    >>> import torch, invops
    >>> block = invops.ReLU()
    >>> x = torch.tensor([[-1.0, 2.0]])
    >>> block(x).tolist(), block.backward(torch.ones(1, 2), x).tolist()
    ([[0.0, 2.0]], [[0.0, 1.0]])
    """

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return relu(x)

    def _tangent_rule(self, x, cond, dx, dcond, dtheta):
        _check_tensor(x, "x", "relu")
        return elementwise_tangent(torch.relu, x, dx)


class GaLU(Block):
    r"""Sigmoid-gated linear unit as a non-invertible :class:`~invops.Block`.

    Notes
    -----
    :math:`y = x_1 \odot \sigma(x_2)` with :math:`x_1, x_2` the two channel halves of the
    input (:func:`galu`); the output has half the channels. ``backward(dy, x)`` takes the
    block's **input**.

    Examples
    --------
    >>> import torch, invops
    >>> invops.GaLU()(torch.zeros(2, 4, 3)).shape
    torch.Size([2, 2, 3])
    """

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return galu(x)

    def _tangent_rule(self, x, cond, dx, dcond, dtheta):
        return galu_tangent(x, dx)


register_elementwise_tangent(relu, lambda z, dz, y: torch.ops.aten.threshold_backward(dz, z, 0))
