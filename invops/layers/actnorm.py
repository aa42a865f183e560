"""Activation normalization: a per-channel affine map with data-dependent initialisation."""

from __future__ import annotations

import math

import torch
from torch import distributed

from .._checks import channel_view, check_layout
from ..module import InvertibleModule

__all__ = ["ActNorm"]


def _sum_over_processes(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the default process group when training is distributed, else ``t``.

    Every process of a data-parallel run initialises its ActNorm layers in the same (first)
    call, so summing the statistics gives every process the initialisation a single process
    would compute from the whole global batch, and keeps the replicas identical.
    """
    if distributed.is_available() and distributed.is_initialized():
        if distributed.get_world_size() > 1:
            t = t.clone()
            distributed.all_reduce(t)
    return t


def _sync_ready_flag(module: ActNorm, _incompatible_keys) -> None:
    module._ready = bool(module.initialized)


class ActNorm(InvertibleModule):
    r"""Per-channel scale and bias, initialised from the first batch it sees.

    Parameters
    ----------
    n_channels : int
        Number of channels (dimension 1 of the input).
    logdet : bool
        Whether to return the log-determinant.

    Notes
    -----
    The map is :math:`y_{b,c,\cdot} = e^{s_c}\,x_{b,c,\cdot} + t_c` with log-scale :math:`s`
    and bias :math:`t`; parametrising the scale by its logarithm keeps the map invertible for
    every parameter value. Its log-determinant per sample is :math:`P \sum_c s_c`, with
    :math:`P` the number of spatial points (1 for dense ``(B, C)`` input).

    The first call initialises the parameters from the data it receives so that the output of
    that call has zero mean and unit (biased) variance per channel: through ``forward`` this
    gives :math:`s_c = -\log\sigma_c`, :math:`t_c = -\mu_c/\sigma_c`; through ``inverse`` (for
    instance as part of ``reverse()``, where the inverse is the direction used) it gives
    :math:`s_c = \log\sigma_c`, :math:`t_c = \mu_c`, so the *inverse's* output is normalised.

    The statistics are computed in float64. A channel is *degenerate*, and keeps unit scale and
    is only centred, when its values differ only by rounding: :math:`\sigma_c \le 8\,
    \varepsilon\,|\mu_c|`, with :math:`\varepsilon` the machine epsilon of the data's dtype
    (``torch.finfo(x.dtype).eps``), or when :math:`\sigma_c` is zero or below the dtype's
    smallest normal number. The test is relative, so data of any scale (seismic data in SI
    units, of order :math:`10^{-7}`, as well as data of order :math:`10^{7}`) is normalised, and
    constant channels never give NaN or Inf.

    A first batch that is empty or holds NaN or Inf raises ``ValueError`` naming the layer and
    leaves it uninitialised (inside a network, the whole first call is rolled back: no layer
    keeps statistics of a batch that did not go through). The ``initialized`` buffer is part of
    ``state_dict()``.

    Under ``torch.distributed`` (an initialised default process group with more than one
    process) the statistics are summed over all processes, so data-parallel replicas start from
    the initialisation of the global batch and stay identical. Every process must therefore
    make its first call at the same time, as data-parallel training does.

    Examples
    --------
    >>> import torch, invops
    >>> an = invops.ActNorm(2)
    >>> x = 3.0 + 2.0 * torch.randn(64, 2, 8)
    >>> y, logdet = an(x)
    >>> bool(y.mean(dim=(0, 2)).abs().max() < 1e-5)
    True
    """

    initialized: torch.Tensor

    def __init__(self, n_channels: int, logdet: bool = True) -> None:
        super().__init__(logdet=logdet)
        if n_channels < 1:
            raise ValueError(f"ActNorm: n_channels must be >= 1, got {n_channels}")
        self.n_channels = n_channels
        self.log_scale = torch.nn.Parameter(torch.zeros(n_channels))
        self.bias = torch.nn.Parameter(torch.zeros(n_channels))
        self.register_buffer("initialized", torch.tensor(False))
        # A Python mirror of the buffer: branching on a tensor would break torch.compile graphs
        # at every ActNorm, while a Python bool is a guard. Loading a state_dict resyncs it.
        self._ready = False
        self.register_load_state_dict_post_hook(_sync_ready_flag)

    def extra_repr(self) -> str:
        return f"{self.n_channels}, logdet={self.logdet}"

    def _pending_init(self) -> bool:
        return not self._ready

    def _validate(self, x, cond, inverse):
        check_layout(x, self.n_channels, "y" if inverse else "x", "ActNorm")

    def _init_restore(self, snapshot) -> None:
        super()._init_restore(snapshot)
        self._ready = bool(self.initialized)

    def _init_error(self, what: str, data: torch.Tensor) -> ValueError:
        err = ValueError(
            f"ActNorm({self.n_channels}): {what}; the layer initialises its scale and bias from "
            f"its first batch (shape {tuple(data.shape)}) and was left uninitialised"
        )
        err.invops_layer = self  # type: ignore[attr-defined]  # the network names it by path
        return err

    @torch.no_grad()
    def _initialize(self, data: torch.Tensor, inverse: bool) -> None:
        dims = [d for d in range(data.ndim) if d != 1]
        # float64 statistics: float32 sums of squares overflow above ~1e19 and lose the
        # variance of data far from zero (MPS has no float64)
        acc = data.dtype if data.device.type == "mps" else torch.float64
        values = data.to(acc)
        count = values.new_full((1,), data.numel() // max(data.shape[1], 1))
        # two passes (mean, then centred squares) so large offsets do not cancel the variance;
        # the checks read the summed statistics, so every process of a data-parallel run
        # reaches the same decision (a NaN on any process makes every sum NaN)
        sums = _sum_over_processes(torch.cat((values.sum(dim=dims), count)))
        count = sums[-1]
        if count.item() == 0:
            raise self._init_error("the first batch is empty", data)
        if not torch.isfinite(sums).all():
            bad = ~torch.isfinite(data)
            where = sorted({int(c) for c in bad.nonzero()[:, 1].tolist()}) if bad.any() else None
            detail = (
                f"{int(torch.isnan(data).sum())} NaN and {int(torch.isinf(data).sum())} Inf "
                f"values, in channel(s) {where}"
                if where is not None
                else "non-finite values on another process"
            )
            raise self._init_error(f"the first batch holds {detail}", data)
        mean = sums[:-1] / count
        centred = values - channel_view(mean, values.ndim)
        std = (_sum_over_processes(centred.square().sum(dim=dims)) / count).sqrt()
        if not torch.isfinite(std).all():
            raise self._init_error("the first batch's variance overflows", data)
        info = torch.finfo(data.dtype)
        degenerate = (std <= 8 * info.eps * mean.abs()) | (std < info.tiny)
        std = torch.where(degenerate, torch.ones_like(std), std)
        if inverse:
            self.log_scale.copy_(std.log())
            self.bias.copy_(mean)
        else:
            self.log_scale.copy_(-std.log())
            self.bias.copy_(-mean / std)
        self.initialized.fill_(True)
        self._ready = True

    def _logdet(self, x: torch.Tensor) -> torch.Tensor:
        n_points = math.prod(x.shape[2:])
        return (n_points * self.log_scale.sum()).expand(x.shape[0])

    def _forward(self, x, *cond):
        if not self._ready:
            self._initialize(x.detach(), inverse=False)
        s = channel_view(self.log_scale, x.ndim)
        t = channel_view(self.bias, x.ndim)
        return x * s.exp() + t, self._logdet(x)

    def _inverse(self, y, *cond):
        if not self._ready:
            self._initialize(y.detach(), inverse=True)
        s = channel_view(self.log_scale, y.ndim)
        t = channel_view(self.bias, y.ndim)
        return (y - t) * (-s).exp(), -self._logdet(y)

    # -- forward mode, by hand
    def _tangent_rule(self, x, cond, dx, dcond, dtheta, inverse=False):
        r""":math:`dy = e^{s}(dx + ds\,x) + dt`; inverse :math:`dx = e^{-s}(dy - dt) - ds\,x`."""
        if not self._ready:
            self._initialize(x.detach(), inverse=inverse)
        ds, dt = dtheta.get(self.log_scale), dtheta.get(self.bias)
        out, dout, logdet, dlogdet = scale_shift_tangent(
            x,
            dx,
            channel_view(self.log_scale, x.ndim),
            channel_view(self.bias, x.ndim),
            None if ds is None else channel_view(ds, x.ndim),
            None if dt is None else channel_view(dt, x.ndim),
            inverse,
        )
        n_points = math.prod(x.shape[2:])
        logdet = (n_points * self.log_scale.sum()).expand(x.shape[0])
        dlogdet = None if ds is None else (n_points * ds.sum()).expand(x.shape[0])
        if inverse:
            return out, dout, -logdet, None if dlogdet is None else -dlogdet
        return out, dout, logdet, dlogdet


def scale_shift_tangent(x, dx, s, t, ds, dt, inverse: bool):
    r"""``y = x e^s + t`` (or its inverse ``(x - t) e^{-s}``) with its tangent.

    ``s``, ``t`` and their tangents ``ds``, ``dt`` (None: zero) broadcast against ``x``. Returns
    ``(y, dy, None, None)``; the caller adds the log-determinant, which depends on the layout.
    """
    has_params = ds is not None or dt is not None
    if inverse:
        scale = (-s).exp()
        out = (x - t) * scale
    else:
        scale = s.exp()
        out = x * scale + t
    if dx is not None:
        dout = dx * scale
    elif has_params:
        dout = torch.zeros_like(out)
    else:
        return out, None, None, None
    if inverse:  # dx = e^{-s} (dy - dt) - ds x
        if dt is not None:
            dout.sub_(dt * scale)
        if ds is not None:
            dout.sub_(ds * out)
    else:  # dy = e^{s} (dx + ds x) + dt
        if ds is not None:
            dout.addcmul_(ds * scale, x)
        if dt is not None:
            dout.add_(dt)
    return out, dout, None, None
    scale = s.exp()
    out = x * scale + t
    dout = None if dx is None else dx * scale
    if ds is not None:
        dout = ds * scale * x if dout is None else dout.add_(ds * scale * x)
    if dt is not None:
        dout = dt.expand_as(out).clone() if dout is None else dout.add_(dt)
    return out, dout, None, None
