"""The generic coupling: any law, any conditioner, one conditioner evaluation per reverse pass."""

from __future__ import annotations

import torch

from .._autodiff import Grads, Tangent, differentiable_copy, forward_mode, local_grads, trainable
from ..module import InvertibleModule, _has_tangent
from .laws import CouplingLaw, as_law, bounded_scale
from .subnets import Subnet, build_subnet

__all__ = ["Coupling", "bounded_scale"]

_FIXED = ("first", "second", "none")


class Coupling(InvertibleModule):
    r"""Coupling transform: a channel group is changed element-wise, conditioned on the rest.

    Parameters
    ----------
    n_channels : int
        Channels of the input.
    subnet : factory, Block or torch.nn.Module
        Conditioner. A factory ``subnet(n_in, n_out)`` (see :mod:`invops.layers.subnets`) is
        called here with the fixed group's channels (or ``condition_channels`` when
        ``fixed="none"``) and ``law.n_params`` times the changed channels; a ready module must
        have those sizes. It is called as ``subnet(x_fixed, *cond)`` (``subnet(*cond)`` when
        ``fixed="none"``).
    law : {"affine", "additive", "negate", "spline"} or CouplingLaw
        The element-wise bijection of the changed group (see :mod:`invops.layers.laws`).
    n_first : int, optional
        Channels of the first group (default ``ceil(n_channels / 2)``).
    fixed : {"first", "second", "none"}
        Which group conditions the other; ``"none"`` changes every channel and conditions on
        the condition arguments only.
    n_conditions : int
        Number of condition arguments passed on to ``subnet`` (after ``cond_transform``).
    condition_channels : int, optional
        Channels of the condition, for a factory of a conditional coupling (called as
        ``subnet(n_in, n_out, n_cond=condition_channels)``, or ``subnet(condition_channels,
        n_out)`` with ``fixed="none"``).
    cond_transform : InvertibleModule, optional
        Applied to the (single) condition before the sub-network sees it; its parameters are
        trained with the coupling's (conditional HINT's condition lane).
    ndim : int or None
        Spatial dimensions of the input (0 for dense ``(B, C)``); None skips the rank check.
    owner : str, optional
        The public layer this coupling belongs to, named in error messages (default: this
        class's name).
    logdet : bool
        Whether to report the log-determinant.

    Notes
    -----
    With :math:`x = (x_a, x_b)`, :math:`x_a` the fixed group, :math:`h = g(x_a, c)` the
    conditioner's output and :math:`\tau` the law,

    .. math::
        y_a = x_a, \qquad y_b = \tau(x_b; h), \qquad
        \log|\det \partial_x y| = \log|\det \partial_{x_b} \tau(x_b; h)|,

    and the inverse is :math:`x_b = \tau^{-1}(y_b; h)`: since :math:`y_a = x_a`, the
    conditioner's input is known from either side.

    The reverse pass (``backward``, ``vjp``, ``backward_inverse``, the autograd bridge)
    therefore evaluates the conditioner **once**, for every law: with a local autograd graph on
    :math:`x_a = y_a` it yields :math:`h`, which undoes the law without a graph
    (:math:`x_b = \tau^{-1}(y_b; h)`), and the graph of :math:`\tau(x_b; h)` is then
    backpropagated with the cotangents of :math:`y_b` and the logdet. InvertibleNetworks.jl and
    MemCNN evaluate the conditioner twice (once to invert, once to differentiate).

    Examples
    --------
    >>> import torch, invops
    >>> layer = invops.Coupling(5, invops.SubnetFactory(8, ndim=0), law="spline", ndim=0)
    >>> y, logdet = layer(torch.randn(3, 5))
    >>> layer.law
    Spline(bins=8, bound=3.0)
    """

    def __init__(
        self,
        n_channels: int,
        subnet: Subnet,
        law: str | CouplingLaw = "affine",
        *,
        n_first: int | None = None,
        fixed: str = "first",
        n_conditions: int = 0,
        condition_channels: int | None = None,
        cond_transform: InvertibleModule | None = None,
        ndim: int | None = None,
        owner: str | None = None,
        logdet: bool = True,
    ) -> None:
        super().__init__(logdet=logdet)
        owner = owner or type(self).__name__
        if fixed not in _FIXED:
            raise ValueError(f"{owner}: fixed must be one of {_FIXED}, got {fixed!r}")
        law = as_law(law, owner)
        if fixed == "none":
            if n_conditions < 1:
                raise ValueError(f"{owner}: fixed='none' needs a condition (n_conditions >= 1)")
            n_first = 0
        else:
            if n_channels < 2:
                raise ValueError(f"{owner}: needs at least 2 channels, got {n_channels}")
            n_first = (n_channels + 1) // 2 if n_first is None else int(n_first)
            if not 0 < n_first < n_channels:
                raise ValueError(f"{owner}: n_first must be in 1..{n_channels - 1}, got {n_first}")
        self.n_channels, self.n_first, self.fixed = n_channels, n_first, fixed
        self.n_conditions = n_conditions
        self.ndim = ndim
        self.owner = owner
        self.law = law
        n_fixed = n_channels - self.n_changed
        if fixed == "none":
            n_in, n_cond = condition_channels or 0, 0
        else:
            n_in, n_cond = n_fixed, (condition_channels or 0) if n_conditions else 0
        self.subnet = build_subnet(subnet, n_in, law.n_params * self.n_changed, owner, n_cond)
        self.cond_transform = cond_transform

    @property
    def n_changed(self) -> int:
        """Channels changed by the coupling."""
        if self.fixed == "none":
            return self.n_channels
        return self.n_channels - self.n_first if self.fixed == "first" else self.n_first

    def extra_repr(self) -> str:
        return f"{self.n_channels}, n_first={self.n_first}, fixed={self.fixed!r}"

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
        assert fixed is not None  # only fixed="none" has no fixed group
        parts = (fixed, changed) if self.fixed == "first" else (changed, fixed)
        return torch.cat(parts, dim=1)

    def _conditioner(self, fixed: torch.Tensor | None, cond: tuple) -> torch.Tensor:
        """Evaluate the conditioner: the law's parameters ``h``, shape-checked."""
        if self.cond_transform is not None:
            cond = (self.cond_transform._forward(cond[0])[0], *cond[1:])
        h = self.subnet(*cond) if fixed is None else self.subnet(fixed, *cond)
        self.law.check(h, self.n_changed, self.owner)
        return h

    def _transform(self, x: torch.Tensor, cond: tuple, inverse: bool):
        fixed, changed = self._split(x)
        h = self._conditioner(fixed, cond)
        out, logdet = (self.law.inverse if inverse else self.law.forward)(changed, h)
        return self._merge(fixed, out), logdet

    def _forward(self, x, *cond):
        return self._transform(x, cond, inverse=False)

    def _inverse(self, y, *cond):
        return self._transform(y, cond, inverse=True)

    # -- forward mode, by hand: the conditioner's tangent, then the law's
    _tangent_math = ("_forward", "_inverse", "_transform", "_conditioner", "_split", "_merge")

    def _tangent_rule(self, x, cond, dx, dcond, dtheta, inverse=False):
        fixed, changed = self._split(x)
        dfixed, dchanged = (None, None) if dx is None else self._split(dx)
        if self.cond_transform is not None:
            c, dc, _, _ = self.cond_transform._tangent(cond[0], (), dcond[0], (), dtheta)
            cond, dcond = (c, *cond[1:]), (dc, *dcond[1:])
        if fixed is None:
            h, dh = self.subnet._tangent(cond[0], cond[1:], dcond[0], dcond[1:], dtheta)
        else:
            h, dh = self.subnet._tangent(fixed, cond, dfixed, dcond, dtheta)
        self.law.check(h, self.n_changed, self.owner)
        out, dout, logdet, dlogdet = self._law_tangent(changed, h, dchanged, dh, dtheta, inverse)
        y = self._merge(fixed, out)
        if dout is None and dfixed is None:
            return y, None, logdet, dlogdet
        if fixed is not None:
            dfixed = torch.zeros_like(fixed) if dfixed is None else dfixed
            dout = torch.zeros_like(out) if dout is None else dout
        return y, self._merge(dfixed, dout), logdet, dlogdet

    def _law_tangent(self, x, h, dx: Tangent, dh: Tangent, dtheta: dict, inverse: bool):
        law = self.law
        if not _has_tangent(law, dtheta):
            return (law.tangent_inverse if inverse else law.tangent)(x, h, dx, dh)
        # a law with learned parameters of its own: dual tensors through its math
        (y, dy), (logdet, dlogdet) = forward_mode(
            law, _LawMath(law, inverse), "law.", (x, h), (dx, dh), dtheta
        )
        return y, dy, logdet, dlogdet

    # -- reverse mode with one conditioner evaluation
    def _one_pass(self, out, cond, dout, dlogdet, inverse: bool):
        fixed, changed_out = self._split(out)
        d_fixed, d_changed = self._split(dout)
        fixed_leaf = differentiable_copy(fixed)
        cond_leaves = tuple(differentiable_copy(c) for c in cond)
        law = self.law
        undo, redo = (law.forward, law.inverse) if inverse else (law.inverse, law.forward)
        with torch.enable_grad():
            h = self._conditioner(fixed_leaf, cond_leaves)
            with torch.no_grad():  # undo the law with the same conditioner output
                changed_in, _ = undo(changed_out, h)
            changed_leaf = changed_in.detach().requires_grad_()
            rebuilt, logdet = redo(changed_leaf, h)
            dinputs, grads = local_grads(
                (rebuilt, logdet),
                (d_changed, dlogdet),
                (changed_leaf, fixed_leaf, *cond_leaves),
                trainable(self),
            )
        d_changed_in, d_fixed_extra, *dcond = dinputs
        if d_changed_in is None:
            d_changed_in = torch.zeros_like(changed_in)
        if d_fixed is not None and d_fixed_extra is not None:
            d_fixed = d_fixed + d_fixed_extra
        inp = self._merge(fixed, changed_in)
        dinp = self._merge(d_fixed, d_changed_in)
        return inp, dinp, tuple(dcond), grads

    def _pullback(self, y, cond, dy, dlogdet) -> tuple[torch.Tensor, torch.Tensor, tuple, Grads]:
        return self._one_pass(y, cond, dy, dlogdet, inverse=False)

    def _pullback_inverse(self, x, cond, dx, dlogdet):
        return self._one_pass(x, cond, dx, dlogdet, inverse=True)


class _LawMath(torch.nn.Module):
    """Calls one direction of a law, for :func:`~invops._autodiff.forward_mode`."""

    def __init__(self, law: CouplingLaw, inverse: bool) -> None:
        super().__init__()
        self.law, self.inverse = law, inverse

    def forward(self, x, h):
        return (self.law.inverse if self.inverse else self.law.forward)(x, h)
