"""Checks for users and for invops' own test suite.

Each check raises ``AssertionError`` with the measured figure when it fails and returns the figure
when it passes, so it can be used in a test or printed in a notebook.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pylops
import torch
import torch.autograd.forward_ad as fwAD
import torch.utils._pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ._autodiff import functional_state
from .module import InvertibleModule, _Oriented, plain_autograd
from .operators import Operator

__all__ = [
    "gradient_test",
    "check_invertible",
    "dottest",
    "check_against_autograd",
    "check_logdet",
    "TensorMemoryTracker",
    "default_rtol",
]


def default_rtol(dtype: torch.dtype | np.dtype | str) -> float:
    """Tolerance used by the checks: 1e-10 for float64, 1e-4 for float32 and lower."""
    name = str(dtype).replace("torch.", "")
    return 1e-10 if name in ("float64", "complex128") else 1e-4


def _rel(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-300) -> float:
    """Max-norm error of ``a`` relative to ``b``; ``floor`` bounds the scale from below.

    The floor matters for quantities that vanish mathematically (a gradient that is zero for
    every input), where relative rounding noise would otherwise look like a large error.
    """
    if not a.numel():
        return 0.0
    scale = max(float(b.abs().max()), floor)
    return float((a - b).abs().max()) / scale


def _slope(hs: np.ndarray, errs: np.ndarray) -> float:
    return float(np.polyfit(np.log(hs), np.log(errs), 1)[0])


def gradient_test(
    fun: Callable[..., torch.Tensor],
    x: torch.Tensor | Sequence[torch.Tensor],
    grad: torch.Tensor | Sequence[torch.Tensor],
    direction: torch.Tensor | Sequence[torch.Tensor] | None = None,
    h0: float | None = None,
    n_steps: int = 12,
    order_tol: float = 0.25,
) -> tuple[float, float]:
    r"""Taylor test of a claimed gradient, asserting the convergence rates.

    For step sizes :math:`h_k = h_0 2^{-k}` it measures
    :math:`e_0(h) = |f(x + h\,d) - f(x)|` and
    :math:`e_1(h) = |f(x + h\,d) - f(x) - h \langle g, d\rangle|`, fits the slopes of
    :math:`\log e` against :math:`\log h`, and asserts that :math:`e_0` decays at first order and
    :math:`e_1` at second order (each within ``order_tol``). Points where :math:`e_1` has reached
    the rounding floor of the dtype are left out, and the slopes are fitted on the smaller half
    of the remaining steps, where the asymptotic rate shows. A wrong gradient gives a slope of 1
    for :math:`e_1` and fails.

    Parameters
    ----------
    fun : callable
        Scalar function of ``x`` (one tensor, or several passed as separate arguments).
    x, grad : tensor or sequence of tensors
        Point and claimed gradient, with matching shapes.
    direction : tensor or sequence of tensors, optional
        Perturbation direction (random normal by default).
    h0 : float, optional
        Largest step, relative to the norm of ``x`` over the norm of the direction
        (default: ``1e-1`` in float64, ``1e-1`` in float32 with fewer usable steps).
    n_steps : int
        Number of step sizes.
    order_tol : float
        Allowed deviation of the fitted slopes from 1 and 2.

    Returns
    -------
    (rate0, rate1) : tuple of float
        The fitted convergence rates.

    Examples
    --------
    >>> import torch
    >>> from invops.testing import gradient_test
    >>> x = torch.randn(5, dtype=torch.float64)
    >>> r0, r1 = gradient_test(lambda v: (v ** 3).sum(), x, 3 * x ** 2)
    >>> round(r1)
    2
    """

    def as_list(t: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [t] if isinstance(t, torch.Tensor) else list(t)

    xs, gs = as_list(x), as_list(grad)
    ds = [torch.randn_like(t) for t in xs] if direction is None else as_list(direction)
    with torch.no_grad():
        f0 = float(fun(*xs))
        slope_dir = sum(float((g * d).sum()) for g, d in zip(gs, ds))
        xnorm = math.sqrt(sum(float((t**2).sum()) for t in xs)) or 1.0
        dnorm = math.sqrt(sum(float((d**2).sum()) for d in ds)) or 1.0
        scale = (h0 if h0 is not None else 1e-1) * xnorm / dnorm
        steps, errors0, errors1 = [], [], []
        for k in range(n_steps):
            h = scale * 2.0**-k
            fh = float(fun(*[t + h * d for t, d in zip(xs, ds)]))
            steps.append(h)
            errors0.append(abs(fh - f0))
            errors1.append(abs(fh - f0 - h * slope_dir))
    hs, e0, e1 = np.asarray(steps), np.asarray(errors0), np.asarray(errors1)
    eps = torch.finfo(xs[0].dtype).eps
    floor = 1e3 * eps * max(abs(f0), 1.0)
    usable = e1 > floor
    if usable.sum() < 3:
        raise AssertionError(
            f"gradient_test: fewer than 3 steps above the rounding floor ({floor:.2e}); "
            f"errors {e1.tolist()}; use a larger h0"
        )
    # judge the asymptotic regime: the smaller half of the usable steps (at least three)
    idx0 = np.flatnonzero(e0 > floor)
    idx1 = np.flatnonzero(usable)
    idx0 = idx0[-max(3, len(idx0) // 2) :]
    idx1 = idx1[-max(3, len(idx1) // 2) :]
    rate0 = _slope(hs[idx0], e0[idx0])
    rate1 = _slope(hs[idx1], e1[idx1])
    if abs(rate0 - 1.0) > order_tol or abs(rate1 - 2.0) > order_tol:
        raise AssertionError(
            f"gradient_test: convergence rates {rate0:.3f} (expected 1) and {rate1:.3f} "
            f"(expected 2); first-order errors {e0.tolist()}, second-order errors {e1.tolist()}"
        )
    return rate0, rate1


def check_invertible(
    module: InvertibleModule, x: Any, *cond: Any, rtol: float | None = None
) -> float:
    """Assert ``inverse(forward(x)) == x`` and ``forward(inverse(y)) == y`` for ``y = forward(x)``.

    Returns the larger relative error.

    Also checks that the inverse's log-determinant is minus the forward's.
    """
    with torch.no_grad():
        x = torch.as_tensor(x)
        rtol = default_rtol(x.dtype) if rtol is None else rtol
        out = module(x, *cond)
        y = out[0] if module.logdet else out
        back = module.inverse(y, *cond)
        x_rec = back[0] if module.logdet else back
        err = _rel(x_rec, x)
        if module.logdet:
            ld_scale = max(float(out[1].abs().max()), 1.0)
            err = max(err, float((back[1] + out[1]).abs().max()) / ld_scale)
        # the other order, from a point of the output space (x itself may not be one when the
        # module changes shape or range)
        fwd = module(x_rec, *cond)
        err = max(err, _rel(fwd[0] if module.logdet else fwd, y))
    if not err <= rtol:
        raise AssertionError(f"check_invertible: relative error {err:.3e} > {rtol:.1e}")
    return err


def dottest(
    op: pylops.LinearOperator | Operator,
    rtol: float | None = None,
    n_trials: int = 1,
    seed: int | None = 0,
    *,
    dtype: torch.dtype = torch.float64,
    batch: int = 2,
) -> bool:
    """``pylops.utils.dottest`` with a tolerance chosen from the operator's dtype.

    1e-10 for float64 operators, 1e-4 for float32; ``n_trials`` random pairs are tried.

    ``op`` may also be an :class:`invops.operators.Operator` (what ``as_operator`` returns),
    tested on a batch of ``batch`` random models and data of ``dtype`` (data complex for a
    complex operator): ``Re <J x, y> = <x, Re J^H y>`` for real models. Its ``model_shape``
    and ``data_shape`` must be known (give them to ``as_operator`` for torch callables).

    Examples
    --------
    >>> import numpy as np, pylops
    >>> from invops.operators import as_operator
    >>> dottest(as_operator(pylops.FirstDerivative(7)))
    True
    """
    if isinstance(op, Operator):
        return _dottest_operator(op, rtol, n_trials, seed, dtype, batch)
    rtol = default_rtol(op.dtype) if rtol is None else rtol
    if seed is not None:
        np.random.seed(seed)  # noqa: NPY002 - pylops.utils.dottest draws from the global state
    for _ in range(n_trials):
        pylops.utils.dottest(op, rtol=rtol, atol=0.0, raiseerror=True)
    return True


def _dottest_operator(op, rtol, n_trials, seed, dtype, batch) -> bool:
    if op.model_shape is None or op.data_shape is None:
        raise ValueError(
            f"dottest: the operator {op.name} has no declared shapes; give model_shape and "
            "data_shape to as_operator"
        )
    rtol = default_rtol(dtype) if rtol is None else rtol
    gen = torch.Generator().manual_seed(0 if seed is None else seed)
    complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    for _ in range(n_trials):
        x = torch.randn(batch, *op.model_shape, generator=gen, dtype=dtype)
        y = torch.randn(
            batch, *op.data_shape, generator=gen, dtype=complex_dtype if op.is_complex else dtype
        )
        jx, jhy = op.apply(x), op.adjoint(y)
        lhs = float(torch.real(torch.sum(jx * y.conj())))
        rhs = float(torch.sum(x * torch.real(jhy)))
        err = abs(lhs - rhs) / max(abs(lhs), abs(rhs), 1e-300)
        if err > rtol:
            raise AssertionError(
                f"dottest: the operator {op.name} fails the dot test: <Jx, y> = {lhs:.12g}, "
                f"<x, J^H y> = {rhs:.12g}, relative error {err:.2e} > {rtol:.0e}"
            )
    return True


def _plain_outputs(module, x, cond, inverse):
    fn = module._inverse if inverse else module._forward
    return fn(x, *cond)


def check_against_autograd(
    module: InvertibleModule,
    x: torch.Tensor,
    *cond: torch.Tensor,
    rtol: float | None = None,
    with_logdet: bool = True,
    seed: int = 0,
    jvp_oracle: str = "torch.func",
    jvp_rtol: float | None = None,
) -> dict[str, float]:
    """Compare every derivative mode of ``module`` with plain torch autograd and ``torch.func``.

    Checks ``backward``, ``vjp`` and ``backward_inverse`` (input, parameter and condition
    cotangents, with a non-zero ``dlogdet`` when ``with_logdet`` and the module reports a
    log-determinant) against autograd of the plain forward/inverse, the autograd bridge
    (``loss.backward()``) against :func:`invops.plain_autograd`, and ``jvp`` against
    ``torch.func.jvp`` (``jvp_oracle="forward_ad"``: dual tensors, for modules that call
    physics operators on numpy arrays), in both directions: ``jvp`` at ``x`` and the inverse's
    tangent (``_jvp(..., inverse=True)``) at ``y = forward(x)``. Returns the relative errors by
    name and raises ``AssertionError`` if any
    exceeds ``rtol`` (default 1e-8 in float64, 1e-3 in float32); tangents are held to
    ``jvp_rtol`` (default 1e-10 in float64, 1e-4 in float32), since forward mode involves no
    recomputation by inversion.
    """
    rtol = (1e-8 if x.dtype == torch.float64 else 1e-3) if rtol is None else rtol
    jvp_rtol = default_rtol(x.dtype) if jvp_rtol is None else jvp_rtol
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand_like(t):
        return torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)

    params = [p for p in module.parameters() if p.requires_grad]
    all_params = list(module.parameters())
    use_ld = with_logdet and module.logdet
    errors: dict[str, float] = {}
    limits: dict[str, float] = {}  # where not rtol

    module._ensure_initialized(x, tuple(cond), inverse=False)
    with torch.no_grad():
        y_point, _ = module._forward(x, *cond)
    for inverse in (False, True):
        # the inverse map is checked at y = forward(x), a valid point of its domain
        inp = (y_point if inverse else x).detach()
        with torch.no_grad():
            out, _ = _plain_outputs(module, inp, cond, inverse)
        dout = rand_like(out)
        dld = rand_like(out.new_empty(out.shape[0])) if use_ld else None

        # oracle: plain autograd through the same math
        inp_r = inp.clone().requires_grad_()
        cond_r = [c.detach().clone().requires_grad_() for c in cond]
        with torch.enable_grad():
            o, ld = _plain_outputs(module, inp_r, cond_r, inverse)
            loss = (o * dout).sum() + ((ld * dld).sum() if dld is not None else 0.0)
            ref = list(torch.autograd.grad(loss, [inp_r, *cond_r, *params], allow_unused=True))
        ref = [
            torch.zeros_like(t) if g is None else g for g, t in zip(ref, [inp_r, *cond_r, *params])
        ]
        ref_dx, ref_dc, ref_dp = ref[0], ref[1 : 1 + len(cond)], ref[1 + len(cond) :]
        floor = 1e-6 * max(float(g.abs().max()) for g in ref if g.numel())

        tag = "backward_inverse" if inverse else "backward"
        saved = [None if p.grad is None else p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        res = (module.backward_inverse if inverse else module.backward)(
            dout, out, *cond, dlogdet=dld
        )
        got_dx, got_inp = res[0], res[1]
        errors[f"{tag}:recomputed"] = _rel(got_inp, inp)
        errors[f"{tag}:input"] = _rel(got_dx, ref_dx, floor)
        if cond:
            dcs = res[2] if len(cond) > 1 else (res[2],)
            for i, (a, b) in enumerate(zip(dcs, ref_dc)):
                errors[f"{tag}:cond{i}"] = _rel(a, b, floor)
        for i, (p, g) in enumerate(zip(params, ref_dp)):
            errors[f"{tag}:param{i}"] = _rel(
                p.grad if p.grad is not None else torch.zeros_like(p), g, floor
            )
        for p, s in zip(params, saved):
            p.grad = s

        if not inverse:
            dx, dtheta, x_rec, *rest = module.vjp(dout, out, *cond, dlogdet=dld)
            errors["vjp:input"] = _rel(dx, ref_dx, floor)
            by_param = dict(zip(all_params, dtheta))
            for i, (p, g) in enumerate(zip(params, ref_dp)):
                errors[f"vjp:param{i}"] = _rel(by_param[p], g, floor)

            # the autograd bridge against plain autograd
            inp_b = inp.clone().requires_grad_()
            cond_b = [c.detach().clone().requires_grad_() for c in cond]
            with torch.enable_grad():
                res_b = module(inp_b, *cond_b)
                o_b, ld_b = res_b if module.logdet else (res_b, None)
                loss_b = (o_b * dout).sum() + ((ld_b * dld).sum() if dld is not None else 0.0)
                got = list(
                    torch.autograd.grad(loss_b, [inp_b, *cond_b, *params], allow_unused=True)
                )
            got = [
                torch.zeros_like(t) if g is None else g
                for g, t in zip(got, [inp_b, *cond_b, *params])
            ]
            for i, (a, b) in enumerate(zip(got, ref)):
                errors[f"bridge:{i}"] = _rel(a, b, floor)

    # forward mode against torch.func.jvp of the plain forward, and of the plain inverse at
    # y = forward(x) (the hand-written tangent rules of both directions)
    dx = rand_like(x)
    dtheta = [rand_like(p) for p in all_params]
    dcond = [rand_like(c) for c in cond]
    tangents = [d for p, d in zip(all_params, dtheta) if p.requires_grad]
    res = module.jvp(x, *cond, dx=dx, dtheta=dtheta, dcond=dcond or None)
    if not module.logdet:
        res = (*res, None, None)

    def f(x_, cond_, params_):
        with plain_autograd():
            state = functional_state(module, dict(zip(params, params_)))
            out = torch.func.functional_call(
                module, state, (x_, *cond_), strict=False, tie_weights=False
            )
        return out if module.logdet else (out, out.new_zeros(out.shape[0]))

    def f_inverse(y_, cond_, params_):
        oriented = _Oriented(module, inverse=True)
        with plain_autograd():
            state = functional_state(oriented, dict(zip(params, params_)))
            return torch.func.functional_call(
                oriented, state, (y_, *cond_), strict=False, tie_weights=False
            )

    dy = rand_like(y_point)
    inv = module._jvp(y_point, tuple(cond), dy, tuple(dcond), dict(zip(params, tangents)), True)
    for tag, fn, point, direction, outputs in (
        ("jvp", f, x, dx, res),
        ("jvp_inverse", f_inverse, y_point, dy, inv),
    ):
        primals = (point, tuple(cond), tuple(p.detach() for p in params))
        tangents_all = (direction, tuple(dcond), tuple(tangents))
        ref = _forward_ad_oracle(fn, primals, tangents_all, jvp_oracle)
        (y_ref, ld_ref), (dy_ref, dld_ref) = ref
        errors[f"{tag}:output"] = _rel(outputs[0], y_ref)
        errors[f"{tag}:tangent"] = _rel(outputs[1], dy_ref)
        limits[f"{tag}:tangent"] = jvp_rtol
        if module.logdet:
            ld_scale = max(float(dld_ref.abs().max()), float(dy_ref.abs().max()), 1e-300)
            errors[f"{tag}:dlogdet"] = float((outputs[3] - dld_ref).abs().max()) / ld_scale
            limits[f"{tag}:dlogdet"] = jvp_rtol

    bad = {k: v for k, v in errors.items() if not v <= limits.get(k, rtol)}
    if bad:
        raise AssertionError(
            f"check_against_autograd: errors above {rtol:.1e} (tangents: {jvp_rtol:.1e}): {bad}"
        )
    return errors


def _forward_ad_oracle(fn, primals, tangents, oracle: str):
    """``(outputs, output tangents)`` of ``fn`` by ``torch.func.jvp`` or dual tensors."""
    if oracle == "torch.func":
        return torch.func.jvp(fn, primals, tangents)
    if oracle != "forward_ad":
        raise ValueError(f"jvp_oracle: expected 'torch.func' or 'forward_ad', got {oracle!r}")
    with fwAD.dual_level():
        duals = torch.utils._pytree.tree_map(fwAD.make_dual, primals, tangents)
        y_d, ld_d = fn(*duals)
        y_ref, dy_ref = fwAD.unpack_dual(y_d)
        ld_ref, dld_ref = fwAD.unpack_dual(ld_d)
    dy_ref = torch.zeros_like(y_ref) if dy_ref is None else dy_ref
    dld_ref = torch.zeros_like(ld_ref) if dld_ref is None else dld_ref
    return (y_ref, ld_ref), (dy_ref, dld_ref)


def check_logdet(
    module: InvertibleModule, x: torch.Tensor, *cond: torch.Tensor, rtol: float | None = None
) -> float:
    """Compare the module's per-sample logdet with ``torch.linalg.slogdet`` of the dense Jacobian.

    Samples are independent, so the Jacobian of sample ``b`` is taken with the other samples held
    fixed. Use tiny inputs: the dense Jacobian has ``(C * P)**2`` entries per sample.
    """
    rtol = default_rtol(x.dtype) * 100 if rtol is None else rtol
    module._ensure_initialized(x, tuple(cond), inverse=False)
    with torch.no_grad():
        _, logdet = module._forward(x, *cond)
    errs = []
    for b in range(x.shape[0]):
        sample_cond = tuple(c[b : b + 1] for c in cond)

        def f(v, b=b, sample_cond=sample_cond):
            y, _ = module._forward(v.reshape(x[b : b + 1].shape), *sample_cond)
            return y.reshape(-1)

        jac = torch.autograd.functional.jacobian(f, x[b].reshape(-1))
        _, ref = torch.linalg.slogdet(jac)
        errs.append(abs(float(logdet[b]) - float(ref)) / max(abs(float(ref)), 1.0))
    err = max(errs)
    if not err <= rtol:
        raise AssertionError(f"check_logdet: relative error {err:.3e} > {rtol:.1e}")
    return err


class TensorMemoryTracker(TorchDispatchMode):
    """Track the bytes of tensor storage alive while a block runs, and their peak.

    Counts every storage created by a torch operation inside the block, from its creation until
    the last tensor using it is freed, wherever it is held (Python variables or autograd's saved
    tensors). Works on every device, which makes it a deterministic stand-in for
    ``torch.cuda.max_memory_allocated`` on CPU. Storages created before the block are not counted.

    Examples
    --------
    >>> import torch
    >>> from invops.testing import TensorMemoryTracker
    >>> with TensorMemoryTracker() as mem:
    ...     y = torch.ones(1000).exp()
    >>> mem.peak >= 8000
    True
    """

    def __init__(self) -> None:
        super().__init__()
        self._refs: dict[int, int] = {}
        self._sizes: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.current -= self._sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0:
                continue
            if key not in self._refs:
                self._refs[key] = 0
                self._sizes[key] = storage.nbytes()
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
            self._refs[key] += 1
            weakref.finalize(t, self._release, key)
        return out
