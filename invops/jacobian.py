"""The Jacobian of an invertible module as a ``pylops.LinearOperator``."""

from __future__ import annotations

from typing import Any

import pylops
import torch

from ._arrays import array_kind, from_torch, to_torch, torch_to_numpy_dtype

__all__ = ["JacobianOperator"]

_WRT = ("input", "params", "both")


class JacobianOperator(pylops.LinearOperator):
    r"""Linearization of an invertible module at a point, as a PyLops operator.

    Parameters
    ----------
    module : InvertibleModule
        The (possibly conditional) module to linearize.
    x : array
        The linearization point (torch, numpy or cupy), with the module's dtype.
    *cond : array
        Conditions, held fixed.
    wrt : {"input", "params", "both"}
        Differentiate with respect to the input, the trainable parameters (flattened in
        ``parameters()`` order) or both (input first).

    Notes
    -----
    For :math:`y = f_\theta(x)` the operator is :math:`J = \partial_x f` (``"input"``),
    :math:`\partial_\theta f` (``"params"``) or :math:`[\partial_x f,\ \partial_\theta f]`
    (``"both"``). ``J @ v`` runs the module's forward mode (``jvp``) and ``J.H @ w`` its
    memory-free reverse mode (``vjp`` from the stored output, the input being recomputed by
    inversion). ``dims`` is the input shape (``(n_params,)`` for ``"params"``,
    ``(x.size + n_params,)`` for ``"both"``) and ``dimsd`` the output shape. Vectors given by
    solvers are cast to the operator's dtype at the boundary; results are numpy or cupy arrays
    like the vector given. The log-determinant is not part of the operator's output.

    Examples
    --------
    >>> import torch, invops, pylops
    >>> layer = invops.ActNorm(3).double()
    >>> x = torch.randn(2, 3, 4, dtype=torch.float64)
    >>> J = layer.jacobian(x, wrt="both")
    >>> J.shape
    (24, 30)
    >>> bool(pylops.utils.dottest(J, rtol=1e-10))
    True
    """

    __array_ufunc__ = None  # keep ``ndarray * J`` from building object arrays

    def __init__(self, module, x: Any, *cond: Any, wrt: str = "input") -> None:
        if wrt not in _WRT:
            raise ValueError(f"wrt: expected one of {_WRT}, got {wrt!r}")
        _, x_t, cond_t = module._prepare(x, cond, inverse=False)
        module._ensure_initialized(x_t, cond_t, inverse=False)
        with torch.no_grad():
            y, _ = module._forward(x_t, *cond_t)
        self.module = module
        self.wrt = wrt
        self._x = x_t.detach()
        self._y = y.detach()
        self._cond = tuple(c.detach() for c in cond_t)
        self._params = [p for p in module.parameters() if p.requires_grad]
        self.n_params = sum(p.numel() for p in self._params)
        n_x = self._x.numel()
        dims = {
            "input": tuple(self._x.shape),
            "params": (self.n_params,),
            "both": (n_x + self.n_params,),
        }[wrt]
        super().__init__(
            dtype=torch_to_numpy_dtype(self._x.dtype),
            dims=dims,
            dimsd=tuple(self._y.shape),
            name="J",
        )

    # -- boundary conversions
    def _in(self, v: Any) -> tuple[torch.Tensor, str]:
        kind = array_kind(v, "vector")
        t = to_torch(v, device=self._x.device, name="vector")
        return t.reshape(-1).to(self._x.dtype), kind

    def _split(self, v: torch.Tensor):
        n_x = self._x.numel()
        if self.wrt == "input":
            return v.reshape(self._x.shape), None
        vx = v[:n_x].reshape(self._x.shape) if self.wrt == "both" else None
        vp = v[n_x:] if self.wrt == "both" else v
        tangents, offset = {}, 0
        for p in self._params:
            tangents[p] = vp[offset : offset + p.numel()].reshape(p.shape)
            offset += p.numel()
        return vx, tangents

    def _matvec(self, v):
        t, kind = self._in(v)
        dx, dtheta = self._split(t)
        with torch.no_grad():
            _, dy, _, _ = self.module._jvp(self._x, self._cond, dx, None, dtheta)
        return from_torch(dy.reshape(-1).contiguous(), kind)

    def _rmatvec(self, w):
        t, kind = self._in(w)
        with torch.no_grad():
            _, dx, _, grads = self.module._pullback(
                self._y, self._cond, t.reshape(self._y.shape), None
            )
        parts = []
        if self.wrt in ("input", "both"):
            parts.append(dx.reshape(-1))
        if self.wrt in ("params", "both"):
            parts += [grads.get(p, torch.zeros_like(p)).reshape(-1) for p in self._params]
        flat = torch.cat(parts) if parts else self._y.new_zeros(0)
        return from_torch(flat.contiguous(), kind)

    @property
    def point(self) -> torch.Tensor:
        """The linearization point (torch tensor)."""
        return self._x
