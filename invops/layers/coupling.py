"""The coupling transform shared by every coupling layer, with a one-evaluation reverse pass."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..module import Block, Grads, InvertibleModule, _differentiable_copy, _local_grads, _trainable

__all__ = ["Coupling", "bounded_scale"]

_KINDS = ("affine", "additive", "negate")
_FIXED = ("first", "second", "none")


def bounded_scale(
    logit: torch.Tensor, low: float, high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Scale :math:`S = l + (h - l)\,\sigma(a + a_0)` in :math:`(l, h)` with :math:`S(0) = 1`.

    Returns ``(S, log S)``. The offset :math:`a_0` puts :math:`S = 1` at :math:`a = 0`, so a
    coupling whose sub-network outputs zeros is the identity.
    """
    offset = math.log((1.0 - low) / (high - 1.0))
    z = logit + offset
    if low == 0.0:
        return high * torch.sigmoid(z), math.log(high) - F.softplus(-z)
    s = low + (high - low) * torch.sigmoid(z)
    return s, torch.log(s)


class Coupling(InvertibleModule):
    r"""Coupling transform: a channel group is changed element-wise, conditioned on the rest.

    Parameters
    ----------
    n_channels : int
        Channels of the input.
    subnet : Block or torch.nn.Module
        Conditioner. Called as ``subnet(x_fixed, *cond)`` (``subnet(*cond)`` when
        ``fixed="none"``); for ``kind="affine"`` it returns ``2 * n_changed`` channels (scale
        logits, then shifts), otherwise ``n_changed`` channels (shifts).
    n_first : int, optional
        Channels of the first group (default ``ceil(n_channels / 2)``).
    fixed : {"first", "second", "none"}
        Which group conditions the other; ``"none"`` changes every channel and conditions on
        the condition arguments only.
    kind : {"affine", "additive", "negate"}
        ``"affine"``: :math:`y_b = S \odot x_b + T`; ``"additive"``: :math:`y_b = x_b + T`;
        ``"negate"``: :math:`y_b = T - x_b` (the leapfrog step of hyperbolic layers).
    scale : (float, float)
        Bounds ``(low, high)`` of the affine scale, ``0 <= low < 1 < high``.
    n_cond : int
        Number of condition arguments passed on to ``subnet`` (after ``cond_transform``).
    cond_transform : InvertibleModule, optional
        Applied to the (single) condition before the sub-network sees it; its parameters are
        trained with the coupling's (conditional HINT's condition lane).
    ndim : int or None
        Spatial dimensions of the input (0 for dense ``(B, C)``); None skips the rank check.
    logdet : bool
        Whether to report the log-determinant.
    owner : str, optional
        Name of the public layer built around this coupling (e.g. ``"CouplingLayerGlow"``),
        used in error messages; default the class name.

    Notes
    -----
    With :math:`x = (x_a, x_b)`, :math:`x_a` the fixed group, and :math:`(a, T) = g(x_a, c)`
    the conditioner's output, the affine coupling is

    .. math::
        y_a = x_a, \qquad y_b = S(a) \odot x_b + T, \qquad
        \log|\det \partial_x y| = \textstyle\sum \log S(a),

    with :math:`S` from :func:`bounded_scale`. Its inverse is :math:`x_b = (y_b - T) / S`, and
    since :math:`y_a = x_a` the conditioner's input is known from either side.

    The reverse pass (``backward``, ``vjp``, ``backward_inverse``) therefore evaluates the
    conditioner **once**: with a local autograd graph on :math:`x_a = y_a`, it yields
    :math:`(S, T)`, which undo the coupling (:math:`x_b`, computed without a graph), and the same
    graph is then backpropagated with the cotangents of :math:`y_b` and the logdet. No other
    evaluation happens, unlike InvertibleNetworks.jl and MemCNN, which evaluate the conditioner
    twice (once to invert, once to differentiate).
    """

    def __init__(
        self,
        n_channels: int,
        subnet: Block | torch.nn.Module,
        n_first: int | None = None,
        fixed: str = "first",
        kind: str = "affine",
        scale: tuple[float, float] = (0.5, 2.0),
        n_cond: int = 0,
        cond_transform: InvertibleModule | None = None,
        ndim: int | None = None,
        logdet: bool = True,
        owner: str | None = None,
    ) -> None:
        super().__init__(logdet=logdet)
        self.owner = owner = owner or type(self).__name__
        if kind not in _KINDS:
            raise ValueError(f"{owner}: kind must be one of {_KINDS}, got {kind!r}")
        if fixed not in _FIXED:
            raise ValueError(f"{owner}: fixed must be one of {_FIXED}, got {fixed!r}")
        low, high = float(scale[0]), float(scale[1])
        if not 0.0 <= low < 1.0 < high:
            raise ValueError(f"{owner}: scale bounds must satisfy 0 <= low < 1 < high, got {scale}")
        if fixed == "none":
            if n_cond < 1:
                raise ValueError(f"{owner}: fixed='none' needs a condition (n_cond >= 1)")
            n_first = 0
        else:
            if n_channels < 2:
                raise ValueError(f"{owner}: needs at least 2 channels, got {n_channels}")
            n_first = (n_channels + 1) // 2 if n_first is None else int(n_first)
            if not 0 < n_first < n_channels:
                raise ValueError(f"{owner}: n_first must be in 1..{n_channels - 1}, got {n_first}")
        self.n_channels, self.n_first, self.fixed, self.kind = n_channels, n_first, fixed, kind
        self.low, self.high = low, high
        self.n_cond = n_cond
        self.ndim = ndim
        self.subnet = subnet
        self.cond_transform = cond_transform

    @property
    def n_changed(self) -> int:
        """Channels changed by the coupling."""
        if self.fixed == "none":
            return self.n_channels
        return self.n_channels - self.n_first if self.fixed == "first" else self.n_first

    def extra_repr(self) -> str:
        return (
            f"{self.n_channels}, n_first={self.n_first}, fixed={self.fixed!r}, kind={self.kind!r}"
        )

    def _validate(self, x, cond, inverse):
        name = "y" if inverse else "x"
        owner = self.owner
        if self.ndim is not None and x.ndim != self.ndim + 2:
            layout = "(B, C)" if self.ndim == 0 else f"(B, C, {', '.join('*' * self.ndim)})"
            raise ValueError(
                f"{owner}: {name} must have layout {layout} ({self.ndim} spatial dimensions), "
                f"got shape {tuple(x.shape)}"
            )
        if x.ndim < 2 or x.shape[1] != self.n_channels:
            raise ValueError(
                f"{owner}: {name} must have {self.n_channels} channels (dimension 1), "
                f"got shape {tuple(x.shape)}"
            )
        for i, c in enumerate(cond):
            if c.shape[0] != x.shape[0]:
                raise ValueError(
                    f"{owner}: cond[{i}] must have batch size {x.shape[0]} (the input's), "
                    f"got shape {tuple(c.shape)}"
                )
            if self.ndim == 0 and c.ndim != 2:
                raise ValueError(
                    f"{owner}: cond[{i}] must be dense (B, C) like the input, "
                    f"got shape {tuple(c.shape)}"
                )

    # -- the pieces of the transform
    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        if self.fixed == "none":
            return None, x
        first, second = x[:, : self.n_first], x[:, self.n_first :]
        return (first, second) if self.fixed == "first" else (second, first)

    def _merge(self, fixed: torch.Tensor | None, changed: torch.Tensor) -> torch.Tensor:
        if self.fixed == "none":
            return changed
        parts = (fixed, changed) if self.fixed == "first" else (changed, fixed)
        return torch.cat(parts, dim=1)

    def _coefficients(self, fixed: torch.Tensor | None, cond: tuple):
        """Evaluate the conditioner: ``(S, logS, T)``; ``S`` and ``logS`` are floats if constant."""
        if self.cond_transform is not None:
            cond = (self.cond_transform._forward(cond[0])[0], *cond[1:])
        h = self.subnet(*cond) if fixed is None else self.subnet(fixed, *cond)
        n = self.n_changed
        expected = 2 * n if self.kind == "affine" else n
        if h.shape[1] != expected:
            raise ValueError(
                f"{self.owner}: the sub-network must return {expected} channels, got {h.shape[1]}"
            )
        if self.kind == "affine":
            s, log_s = bounded_scale(h[:, :n], self.low, self.high)
            return s, log_s, h[:, n:]
        return (1.0 if self.kind == "additive" else -1.0), 0.0, h

    @staticmethod
    def _per_sample(log_s, like: torch.Tensor) -> torch.Tensor:
        if isinstance(log_s, float):
            return like.new_zeros(like.shape[0])
        return log_s.flatten(1).sum(1)

    def _transform(self, x: torch.Tensor, cond: tuple, inverse: bool):
        fixed, changed = self._split(x)
        s, log_s, t = self._coefficients(fixed, cond)
        out = (changed - t) / s if inverse else s * changed + t
        logdet = self._per_sample(log_s, x)
        return self._merge(fixed, out), -logdet if inverse else logdet

    def _forward(self, x, *cond):
        return self._transform(x, cond, inverse=False)

    def _inverse(self, y, *cond):
        return self._transform(y, cond, inverse=True)

    # -- reverse mode with one conditioner evaluation
    def _one_pass(self, out, cond, dout, dlogdet, inverse: bool):
        fixed, changed_out = self._split(out)
        d_fixed, d_changed = self._split(dout)
        fixed_leaf = _differentiable_copy(fixed)
        cond_leaves = tuple(_differentiable_copy(c) for c in cond)
        params = _trainable(self)
        with torch.enable_grad():
            s, log_s, t = self._coefficients(fixed_leaf, cond_leaves)
            with torch.no_grad():  # undo the coupling with the same coefficients
                if inverse:  # out = x, recover y
                    changed_in = s * changed_out + t
                else:
                    changed_in = (changed_out - t) / s
            changed_leaf = changed_in.detach().requires_grad_()
            if inverse:
                rebuilt = (changed_leaf - t) / s
                logdet = -self._per_sample(log_s, out)
            else:
                rebuilt = s * changed_leaf + t
                logdet = self._per_sample(log_s, out)
            dinputs, grads = _local_grads(
                (rebuilt, logdet),
                (d_changed, dlogdet),
                (changed_leaf, fixed_leaf, *cond_leaves),
                params,
            )
        d_changed_in, d_fixed_extra, *dcond = dinputs
        if d_changed_in is None:
            d_changed_in = torch.zeros_like(changed_in)
        if fixed is not None and d_fixed_extra is not None:
            d_fixed = d_fixed + d_fixed_extra
        inp = self._merge(fixed, changed_in)
        dinp = self._merge(d_fixed, d_changed_in)
        return inp, dinp, tuple(dcond), grads

    def _pullback(self, y, cond, dy, dlogdet) -> tuple[torch.Tensor, torch.Tensor, tuple, Grads]:
        return self._one_pass(y, cond, dy, dlogdet, inverse=False)

    def _pullback_inverse(self, x, cond, dx, dlogdet):
        return self._one_pass(x, cond, dx, dlogdet, inverse=True)
