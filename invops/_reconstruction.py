"""Opt-in check that the memory-free reverse pass recomputes layer inputs accurately.

The reverse pass recomputes each layer's input from its output by inversion. In a network that
has become numerically non-invertible (in float32, a trained network whose couplings scale and
shift strongly), the inverses amplify rounding errors, the recomputed inputs drift from the true
ones, and the gradients computed at them drift from those of plain autograd without any error.
Each layer on its own may still invert to rounding: the damage is the amplification along the
chain of inverses. The check measures it the way rounding-error analysis does: it perturbs the
output of one sample by one unit of rounding per element, recomputes the input from the
perturbed output as the reverse pass does, and compares. If the two recomputed inputs differ by
more than the tolerance, so can the recomputed input and the true one.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["ReconstructionError", "ReconstructionWarning", "set_reconstruction_check"]

# (tolerance, action) while the check is on. A global, not a context variable, because autograd
# may run the bridge's backward on threads of its own.
SETTING: tuple[float, str] | None = None


class ReconstructionWarning(RuntimeWarning):
    """The reverse pass's recomputed input failed the reconstruction check (``"warn"``)."""


class ReconstructionError(FloatingPointError):
    """The reverse pass's recomputed input failed the reconstruction check (``"raise"``)."""


def set_reconstruction_check(tol: float | None, action: str = "warn") -> tuple[float, str] | None:
    r"""Check the inputs that memory-free reverse passes recompute (off by default).

    Parameters
    ----------
    tol : float or None
        Largest relative error of the recomputed input accepted; ``None`` turns the check off.
        ``1e-3`` suits float32 (a healthy network stays near ``1e-6``), ``1e-9`` float64.
    action : {"warn", "raise"}
        Issue a ``ReconstructionWarning`` (a ``RuntimeWarning``) or raise a
        ``ReconstructionError`` (a ``FloatingPointError``), naming the layer where the error
        grows past ``tol``.

    Returns
    -------
    tuple or None
        The previous setting ``(tol, action)``, or None if the check was off.

    Notes
    -----
    After each memory-free reverse pass (``backward``, ``vjp``, ``backward_inverse``, and
    ``loss.backward()`` through the autograd bridge) of a module :math:`f` with output
    :math:`y` and recomputed input :math:`\tilde x = f^{-1}(y)`, the first sample's output is
    perturbed by one unit of rounding per element, :math:`y_\delta = y\,(1 + \varepsilon s)`
    with random signs :math:`s`, and

    .. math::
        e = \frac{\|f^{-1}(y_\delta) - \tilde x\|_\infty}{\|\tilde x\|_\infty}

    is compared with ``tol``. :math:`e` estimates how far rounding moved the recomputed input:
    a well-conditioned network keeps it near :math:`\varepsilon`; where the inverses amplify
    rounding errors, :math:`e` grows with the true error (within a small factor, measured on
    float32 HINT stacks). If :math:`e > \mathrm{tol}` (or is not finite), the layers of a
    :class:`~invops.Chain` (or network) are walked from the output to name the first one at
    which the error exceeds ``tol``. The cost is one inverse of the module on one sample per
    reverse pass (on the whole batch for the i-RIM loop, whose physics operator may hold one
    map per sample); with the check off (the default) nothing is computed.

    Examples
    --------
    >>> import torch, invops
    >>> previous = invops.set_reconstruction_check(1e-3, action="raise")
    >>> net = invops.NetworkGlow(2, 8, L=1, K=2, ndim=1)
    >>> z, logdet = net(torch.randn(4, 2, 8))
    >>> dx, x = net.backward(torch.ones_like(z), z)  # passes: a fresh network inverts well
    >>> _ = invops.set_reconstruction_check(None)
    """
    global SETTING
    if action not in ("warn", "raise"):
        raise ValueError(
            f"set_reconstruction_check: action must be 'warn' or 'raise', got {action!r}"
        )
    previous = SETTING
    if tol is None:
        SETTING = None
    else:
        tol = float(tol)
        if not tol > 0:
            raise ValueError(f"set_reconstruction_check: tol must be > 0 or None, got {tol}")
        SETTING = (tol, action)
    return previous


def _rounding_perturbed(y: torch.Tensor) -> torch.Tensor:
    # a fixed generator: the check must not draw from (and so change) the global random stream
    gen = torch.Generator(device=y.device).manual_seed(0)
    signs = torch.randint(0, 2, y.shape, generator=gen, device=y.device).to(y.dtype) * 2 - 1
    return y * (1 + torch.finfo(y.dtype).eps * signs)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = torch.clamp(b.abs().max(), min=torch.finfo(b.dtype).tiny)
    return float((a - b).abs().max() / scale)


def _leaves(module: Any, path: str, n_conditions: int) -> Iterator[tuple[str, Any, int]]:
    """``(path, layer, n_conditions)`` for the layers of nested Chains, in application order."""
    from .module import Chain

    if not isinstance(module, Chain):
        yield path, module, n_conditions
        return
    layers: Any = module.layers
    for i, m in enumerate(layers):
        n = min(m.n_conditions, n_conditions)
        yield from _leaves(m, f"{path}.layers.{i}" if path else f"layers.{i}", n)


def check(module, out: torch.Tensor, inp: torch.Tensor, cond: tuple, inverse: bool) -> None:
    """Check the input ``inp`` that ``module``'s reverse pass recomputed from its output ``out``.

    ``inverse`` says that the module's inverse map was pulled back (``backward_inverse``), so
    the input was recomputed by the forward map.
    """
    setting = SETTING
    if setting is None:
        return
    tol, action = setting
    # one sample, unless the module's samples are coupled (the i-RIM loop's operator may hold one
    # map per sample, and then accepts the whole batch only)
    rows = slice(None) if getattr(module, "reconstruction_whole_batch", False) else slice(0, 1)
    with torch.no_grad():
        y = out[rows].detach()
        x = inp[rows].detach()
        c = tuple(t[rows].detach() for t in cond)
        recompute = module._forward if inverse else module._inverse
        err = _relative(recompute(_rounding_perturbed(y), *c)[0], x)
        if err <= tol:  # False for NaN
            return
        where = _locate(module, y, c, inverse, tol)
    name = getattr(module, "display_name", type(module).__name__)
    message = (
        f"invops reconstruction check: {name} is numerically non-invertible at this batch: "
        f"a rounding-size change of its output moves the input recomputed by the memory-free "
        f"reverse pass by {err:.2e} (relative; tolerance {tol:.0e}){where}, so the gradients of "
        "this step may be wrong. Compare with invops.plain_autograd(), train in float64, or "
        "lower the learning rate"
    )
    if action == "raise":
        raise ReconstructionError(message)
    warnings.warn(message, ReconstructionWarning, stacklevel=3)


def _locate(module, y: torch.Tensor, cond: tuple, inverse: bool, tol: float) -> str:
    """Walk a Chain's layers from the output; name the first one past ``tol``."""
    leaves = list(_leaves(module, "", len(cond)))
    if len(leaves) < 2:
        return ""
    if not inverse:
        leaves.reverse()
    exact, perturbed = y, _rounding_perturbed(y)
    for path, layer, n_conditions in leaves:
        recompute = layer._forward if inverse else layer._inverse
        exact = recompute(exact, *cond[:n_conditions])[0]
        perturbed = recompute(perturbed, *cond[:n_conditions])[0]
        err = _relative(perturbed, exact)
        if not err <= tol:
            return f"; it first exceeds the tolerance at layer {path!r} ({type(layer).__name__})"
    return ""
