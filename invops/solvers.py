r"""Solvers for nonlinear inverse problems :math:`F(x) = d` with invops operators.

:func:`gauss_newton` linearizes any :class:`~invops.NonlinearOperator` (a network, a physics
operator, a composite such as ``A @ G.reverse()``) with ``F.jacobian(x)`` and solves each
Gauss–Newton / Levenberg–Marquardt step with PyLops' ``lsqr`` or ``cgls``. :func:`lbfgs` minimises
the same objective with ``torch.optim.LBFGS`` through torch autograd of ``F.apply``.

Both minimise, for every sample :math:`b` of the batch,

.. math::
    \phi_b(x) = \|F(x)_b - d_b\|^2 + \lambda \|x_b - x_{\mathrm{prior},b}\|^2 .

A batch holds independent problems: the Jacobian of a batched operator is block diagonal, and
the objectives add. See :func:`gauss_newton` for how a batch is solved.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pylops
import torch
from pylops.optimization.basic import cgls, lsqr
from pylops.utils.backend import get_array_module

from ._arrays import array_kind, from_torch, to_torch, torch_to_numpy_dtype
from .nonlinear import NonlinearOperator, _reference

__all__ = ["gauss_newton", "lbfgs"]

_SOLVERS = ("lsqr", "cgls")


# ---------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _constant_parameters(F: torch.nn.Module) -> Iterator[None]:
    """Hold F's parameters constant: the solvers differentiate with respect to x only, and a
    frozen parameter costs no weight gradients in the reverse passes. Restored afterwards."""
    frozen = [p for p in F.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _vector_kind(t: torch.Tensor) -> str:
    """numpy vectors on the CPU, cupy vectors on a CUDA device where cupy is installed."""
    if t.device.type == "cuda":
        try:
            import cupy  # noqa: F401
        except ImportError:
            return "numpy"
        return "cupy"
    return "numpy"


def _per_sample_sq(t: torch.Tensor) -> torch.Tensor:
    return t.abs().pow(2).reshape(t.shape[0], -1).sum(1)


class _RealView(pylops.LinearOperator):
    r"""A complex-valued Jacobian of a real model as a real operator: ``[Re Jv, Im Jv]``
    interleaved (``torch.view_as_real`` layout); adjoint :math:`\mathrm{Re}(J^H w)`."""

    __array_ufunc__ = None

    def __init__(self, J: pylops.LinearOperator, dtype) -> None:
        self.J = J
        super().__init__(dtype=dtype, dims=(J.shape[1],), dimsd=(2 * J.shape[0],), name="ReJ")

    def _matvec(self, v):
        ncp = get_array_module(v)
        y = self.J.matvec(v)
        return ncp.stack((y.real, y.imag), axis=-1).ravel().astype(self.dtype)

    def _rmatvec(self, w):
        c = w[0::2] + 1j * w[1::2]
        return self.J.rmatvec(c).real.astype(self.dtype)


class _Problem:
    """Conversions, checks and the objective shared by the solvers."""

    def __init__(self, F, d, x0, cond, regularization, owner: str) -> None:
        if not isinstance(F, NonlinearOperator):
            raise TypeError(
                f"{owner}: F must be an invops.NonlinearOperator (wrap linear operators with "
                f"invops.operators.as_operator), got {type(F).__name__}"
            )
        self.F, self.owner = F, owner
        self.kind = array_kind(x0, "x0")
        array_kind(d, "d")
        ref = _reference(F)
        x = to_torch(x0, device=ref.device if ref is not None else None, name="x0")
        if not x.is_floating_point():
            raise TypeError(f"{owner}: x0 must be a real floating-point array, got {x.dtype}")
        if ref is not None and x.dtype != ref.dtype:
            raise TypeError(
                f"{owner}: x0 has dtype {x.dtype} but F's parameters are {ref.dtype}; "
                "convert one of them"
            )
        if ref is not None and x.device != ref.device:
            raise ValueError(f"{owner}: x0 is on {x.device} but F's parameters on {ref.device}")
        if x.ndim < 1:
            raise ValueError(f"{owner}: x0 must be a batch (B, ...), got a scalar")
        self.x0 = x.detach().clone()
        d_t = to_torch(d, device=x.device, name="d")
        if not (d_t.is_floating_point() or d_t.is_complex()):
            raise TypeError(f"{owner}: d must be a real or complex array, got {d_t.dtype}")
        if d_t.is_complex() and not F.is_complex:
            raise TypeError(
                f"{owner}: d is complex ({d_t.dtype}) but F has real outputs; give real data or "
                "a complex operator"
            )
        if F.is_complex and not d_t.is_complex():
            raise TypeError(f"{owner}: F's outputs are complex, so d must be, got {d_t.dtype}")
        if d_t.ndim < 1 or d_t.shape[0] != x.shape[0]:
            raise ValueError(
                f"{owner}: d must have x0's batch size {x.shape[0]} (batch first), got shape "
                f"{tuple(d_t.shape)}"
            )
        if F.model_shape is not None and tuple(x.shape[1:]) != tuple(F.model_shape):
            raise ValueError(
                f"{owner}: x0 must have shape (B, {', '.join(map(str, F.model_shape))}) for F, "
                f"got {tuple(x.shape)}"
            )
        if F.data_shape is not None and tuple(d_t.shape[1:]) != tuple(F.data_shape):
            raise ValueError(
                f"{owner}: d must have shape (B, {', '.join(map(str, F.data_shape))}) (F's "
                f"output), got {tuple(d_t.shape)}"
            )
        precision = torch.complex128 if x.dtype == torch.float64 else torch.complex64
        self.d = d_t.detach().to(precision if d_t.is_complex() else x.dtype)
        self.cond = tuple(
            to_torch(c, device=x.device, name=f"cond[{i}]").detach() for i, c in enumerate(cond)
        )
        self.lam, self.prior = self._regularization(regularization, x)

    def _regularization(self, reg, x):
        if reg is None:
            return 0.0, None
        if isinstance(reg, (tuple, list)) and len(reg) == 2:
            lam, prior = reg
        else:
            lam, prior = reg, None
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0:
            raise ValueError(
                f"{self.owner}: regularization must be lam >= 0 or (lam, x_prior), got {reg!r}"
            )
        if prior is not None:
            prior = to_torch(prior, device=x.device, name="x_prior").detach().to(x.dtype)
            try:
                prior = torch.broadcast_to(prior, x.shape).clone()
            except RuntimeError:
                raise ValueError(
                    f"{self.owner}: x_prior must have x0's shape {tuple(x.shape)} (or broadcast "
                    f"to it), got {tuple(prior.shape)}"
                ) from None
        return float(lam), prior

    def residual(self, y: torch.Tensor) -> torch.Tensor:
        if y.shape != self.d.shape:
            raise ValueError(
                f"{self.owner}: F(x0) has shape {tuple(y.shape)} but d has shape "
                f"{tuple(self.d.shape)}"
            )
        return y - self.d

    def penalty(self, x: torch.Tensor) -> torch.Tensor:
        if self.lam == 0:
            return x.new_zeros(x.shape[0])
        e = x if self.prior is None else x - self.prior
        return self.lam * _per_sample_sq(e)


# ---------------------------------------------------------------------------------- Gauss-Newton
def gauss_newton(
    F: NonlinearOperator,
    d: Any,
    x0: Any,
    niter: int = 10,
    damp: float | str = 0.0,
    solver: str = "lsqr",
    inner_iter: int = 20,
    callback: Callable | None = None,
    regularization: float | tuple | None = None,
    *,
    cond: Sequence[Any] = (),
    tol: float = 1e-10,
    inner_tol: float = 1e-10,
    batch: str = "joint",
) -> tuple[Any, dict]:
    r"""Gauss–Newton / Levenberg–Marquardt for :math:`F(x) = d`, inner solves with PyLops.

    Parameters
    ----------
    F : NonlinearOperator
        The forward map (e.g. ``as_operator(A) @ G.reverse()``); its parameters are held
        constant during the solve.
    d : array
        Data, batch first, shape ``F(x0).shape``; complex for a complex ``F``.
    x0 : array
        Starting point (torch, numpy or cupy; the result has the same kind), real.
    niter : int
        Outer (Gauss–Newton) iterations.
    damp : float or "adaptive"
        Levenberg–Marquardt parameter :math:`\mu \ge 0` (``0``: plain Gauss–Newton; every step
        is taken), or ``"adaptive"``: :math:`\mu` starts at :math:`10^{-3}` times the curvature of
        :math:`J^TJ` along the gradient and adapts per sample to the gain ratio (Nielsen's rule);
        steps that do not lower the objective are rejected.
    solver : {"lsqr", "cgls"}
        PyLops solver for the linear least-squares step.
    inner_iter : int
        Iterations of the inner solver per step.
    callback : callable, optional
        ``callback(k, x, info)`` after iteration ``k`` (x as a torch tensor); returning True
        stops.
    regularization : float or (float, array), optional
        Tikhonov weight :math:`\lambda`, or :math:`(\lambda, x_{\mathrm{prior}})` (prior
        default 0): the objective is
        :math:`\|F(x) - d\|^2 + \lambda \|x - x_{\mathrm{prior}}\|^2` per sample.
    cond : sequence of arrays
        Conditions passed to ``F`` (held fixed).
    tol : float
        A sample has converged when its accepted step satisfies
        :math:`\|\delta\| \le \mathrm{tol}\,(\|x\| + \mathrm{tol})`; the solver stops when all
        have.
    inner_tol : float
        ``atol`` / ``btol`` of ``lsqr``; for ``cgls``, the decrease of the normal-equation
        residual :math:`\|A^T(b - A\delta)\|` relative to its start.
    batch : {"joint", "separate"}
        How a batch is solved (see Notes).

    Returns
    -------
    x : array
        The estimate, same kind and shape as ``x0``.
    info : dict
        Arrays with one row per iteration and one column per sample: ``residual_norm`` and
        ``objective`` (row 0 at ``x0``), ``step_norm`` (0 for a rejected step), ``damp``,
        ``accepted``; and ``inner_iterations``, ``niter``, ``converged`` and ``diverged`` (per
        sample: a plain step made the objective non-finite, and the sample stopped at its last
        finite point), ``message``.

    Notes
    -----
    Each iteration solves, with :math:`J = \partial_x F(x)` and :math:`r = F(x) - d`,

    .. math::
        \min_\delta\ \|J\delta + r\|^2 + \lambda\|x + \delta - x_{\mathrm{prior}}\|^2
        + \mu\|\delta\|^2

    as the stacked least-squares problem ``VStack([J, sqrt(lam) I, sqrt(mu) I])`` with
    ``inner_iter`` iterations of ``lsqr`` / ``cgls``, and takes :math:`x \leftarrow x + \delta`.
    With ``damp="adaptive"`` the gain ratio :math:`\rho` of actual to predicted decrease
    updates :math:`\mu` (:math:`\rho > 0`: accept, :math:`\mu \leftarrow \mu \max(1/3,
    1 - (2\rho - 1)^3)`; otherwise reject and :math:`\mu \leftarrow \nu\mu`,
    :math:`\nu \leftarrow 2\nu`). Near a zero-residual solution with a full-rank Jacobian and
    an exact inner solve, plain Gauss–Newton converges quadratically.

    Batches: the samples are independent problems and the Jacobian is block diagonal.
    ``batch="joint"`` (default) solves all of them with ONE inner Krylov run per iteration on
    the block-diagonal system, so every network evaluation is batched; damping, step
    acceptance and convergence are per sample, the minimiser of the joint step problem is
    every sample's own step, and samples that have converged (or diverged) get a zero
    right-hand side, so they drop out of the Krylov solve. The Krylov space of the active
    samples is shared, though, so with a small ``inner_iter`` a sample's step is less
    converged than in its own solve.
    ``batch="separate"`` runs the solver on one sample at a time (exactly independent, B times
    the network calls at batch size 1); ``info`` then stacks the samples' columns (padded
    with NaN where a sample stopped earlier).

    Examples
    --------
    >>> import numpy as np, torch, invops
    >>> from invops.operators import as_operator
    >>> from invops.solvers import gauss_newton
    >>> A = as_operator(np.array([[2.0, 1.0], [1.0, 3.0], [0.0, 1.0]]))
    >>> F = A @ invops.LeakyReLU(0.5, logdet=False).double()
    >>> x_true = torch.tensor([[0.7, -0.4]], dtype=torch.float64)
    >>> x, info = gauss_newton(F, F.apply(x_true), torch.zeros_like(x_true), niter=5)
    >>> bool(torch.allclose(x, x_true)), bool(info["converged"][0])
    (True, True)
    """
    if solver not in _SOLVERS:
        raise ValueError(f"gauss_newton: solver must be one of {_SOLVERS}, got {solver!r}")
    if batch not in ("joint", "separate"):
        raise ValueError(f"gauss_newton: batch must be 'joint' or 'separate', got {batch!r}")
    for name, value, low in (("niter", niter, 0), ("inner_iter", inner_iter, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"gauss_newton: {name} must be an integer >= {low}, got {value!r}")
    adaptive = isinstance(damp, str)
    if adaptive and damp != "adaptive":
        raise ValueError(f"gauss_newton: damp must be a number >= 0 or 'adaptive', got {damp!r}")
    if not adaptive and (
        isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp >= 0
    ):
        raise ValueError(f"gauss_newton: damp must be a number >= 0 or 'adaptive', got {damp!r}")
    problem = _Problem(F, d, x0, cond, regularization, "gauss_newton")
    options = dict(
        niter=niter,
        damp=damp,
        solver=solver,
        inner_iter=inner_iter,
        callback=callback,
        tol=tol,
        inner_tol=inner_tol,
    )
    with _constant_parameters(F):
        if batch == "joint" or problem.x0.shape[0] == 1:
            x, info = _gauss_newton(problem, **options)
        else:
            x, info = _separately(problem, options)
    return from_torch(x, problem.kind), info


def _separately(problem: _Problem, options: dict) -> tuple[torch.Tensor, dict]:
    xs, infos = [], []
    for b in range(problem.x0.shape[0]):
        sub = _Problem.__new__(_Problem)
        sub.__dict__.update(problem.__dict__)
        sub.x0, sub.d = problem.x0[b : b + 1], problem.d[b : b + 1]
        sub.cond = tuple(c[b : b + 1] for c in problem.cond)
        sub.prior = None if problem.prior is None else problem.prior[b : b + 1]
        x, info = _gauss_newton(sub, **options)
        xs.append(x)
        infos.append(info)
    merged: dict = {}
    for key in ("residual_norm", "objective", "step_norm", "damp", "accepted"):
        rows = max(len(i[key]) for i in infos)
        out = np.full((rows, len(infos)), np.nan)
        for b, i in enumerate(infos):
            out[: len(i[key]), b] = i[key][:, 0]
        merged[key] = out
    merged["accepted"] = np.nan_to_num(merged["accepted"]).astype(bool)
    merged["inner_iterations"] = [i["inner_iterations"] for i in infos]
    merged["niter"] = max(i["niter"] for i in infos)
    merged["converged"] = np.concatenate([i["converged"] for i in infos])
    merged["diverged"] = np.concatenate([i["diverged"] for i in infos])
    merged["message"] = "; ".join(f"sample {b}: {i['message']}" for b, i in enumerate(infos))
    return torch.cat(xs), merged


def _gauss_newton(problem, niter, damp, solver, inner_iter, callback, tol, inner_tol):
    F, cond = problem.F, problem.cond
    x = problem.x0.clone()
    n_batch = x.shape[0]
    kind = _vector_kind(x)
    dtype = torch_to_numpy_dtype(x.dtype)
    adaptive = damp == "adaptive"

    def linearize(x):
        with torch.no_grad():
            J, y = F._linearize(x, cond, "input")
        r = problem.residual(y)
        if r.is_complex():
            return _RealView(J, dtype), torch.view_as_real(r)
        return J, r

    def objective(x, r):
        return _per_sample_sq(r) + problem.penalty(x)

    def vec(t: torch.Tensor):
        return from_torch(t.reshape(-1).contiguous(), kind)

    def per_sample(values: torch.Tensor) -> torch.Tensor:
        """Broadcast a (B,) tensor to every entry of x, flattened."""
        return values.reshape(-1, *([1] * (x.ndim - 1))).expand(x.shape).reshape(-1)

    J, r = linearize(x)
    phi = objective(x, r)
    if not bool(torch.isfinite(phi).all()):
        # one sample's NaN would spread to all in the joint Krylov solve
        bad = torch.nonzero(~torch.isfinite(phi)).flatten().tolist()
        raise ValueError(f"gauss_newton: the objective at x0 is not finite for samples {bad}")
    mu = torch.full((n_batch,), float(0.0 if adaptive else damp), dtype=x.dtype, device=x.device)
    nu = torch.full_like(mu, 2.0)
    if adaptive:
        # mu_0 = 1e-3 x the Rayleigh quotient of J^T J along the gradient J^T r, per sample
        g = to_torch(J.rmatvec(vec(r)), device=x.device).reshape(x.shape)
        Jg = to_torch(J.matvec(vec(g)), device=x.device).reshape(r.shape)
        gg, JgJg = _per_sample_sq(g), _per_sample_sq(Jg)
        curvature = torch.where(gg > 0, JgJg / gg.clamp_min(1e-300), torch.ones_like(gg))
        mu = 1e-3 * torch.where(curvature > 0, curvature, torch.ones_like(curvature))

    history: dict[str, list] = {k: [] for k in ("residual_norm", "objective", "step_norm", "damp")}
    history["accepted"] = []
    history["residual_norm"].append(_per_sample_sq(r).sqrt())
    history["objective"].append(phi)
    inner_counts: list[int] = []
    converged = torch.zeros(n_batch, dtype=torch.bool, device=x.device)
    diverged = torch.zeros_like(converged)  # a plain step overflowed: stopped where finite
    message, k = "reached niter", 0
    sqrt_lam = math.sqrt(problem.lam)
    for k in range(1, niter + 1):
        # the step problem: VStack([J, sqrt(lam) I, sqrt(mu) I]) delta = [-r, -sqrt(lam) e, 0].
        # The system is block diagonal over the batch, so a sample whose right-hand side is zero
        # (converged or diverged) keeps a zero step and takes no part in the Krylov solve.
        n = x.numel()
        active = ~converged & ~diverged
        keep_r = active.reshape(-1, *([1] * (r.ndim - 1))).to(r.dtype)
        keep_x = per_sample(active.to(x.dtype)).reshape(x.shape)
        ops, rhs = [J], [vec(-r * keep_r)]
        if problem.lam > 0:
            e = x if problem.prior is None else x - problem.prior
            ops.append(pylops.Identity(n, dtype=dtype) * sqrt_lam)
            rhs.append(vec(-sqrt_lam * e * keep_x))
        if bool((mu > 0).any()):
            ops.append(pylops.Diagonal(vec(per_sample(mu.sqrt())), dtype=dtype))
            rhs.append(vec(torch.zeros_like(x)))
        ncp = get_array_module(rhs[0])
        system = ops[0] if len(ops) == 1 else pylops.VStack(ops)
        b = rhs[0] if len(rhs) == 1 else ncp.concatenate(rhs)
        start = ncp.zeros(n, dtype=dtype)
        if solver == "lsqr":
            out = lsqr(
                system,
                b,
                x0=start,
                niter=inner_iter,
                atol=inner_tol,
                btol=inner_tol,
                calc_var=False,
            )
            sol, its = out[0], int(out[2])
        else:
            # cgls stops on the squared norm of the normal-equation residual, absolute: make
            # it relative to its starting value, as lsqr's tolerances are
            g0 = float(ncp.linalg.norm(system.rmatvec(b)))
            out = cgls(system, b, x0=start, niter=inner_iter, tol=(inner_tol * g0) ** 2)
            sol, its = out[0], int(out[2])
        inner_counts.append(its)
        delta = to_torch(sol, device=x.device).reshape(x.shape).to(x.dtype) * keep_x
        if adaptive:
            Jd = to_torch(J.matvec(vec(delta)), device=x.device).reshape(r.shape)
            predicted = phi - (_per_sample_sq(Jd + r) + problem.penalty(x + delta))
            x_try = x + delta
            with torch.no_grad():
                y_try = F._apply_t(x_try, cond)
            r_try = problem.residual(y_try)
            r_try = torch.view_as_real(r_try) if r_try.is_complex() else r_try
            phi_try = objective(x_try, r_try)
            rho = (phi - phi_try) / predicted.clamp_min(1e-300)
            accepted = active & torch.isfinite(phi_try) & (phi_try < phi) & (predicted > 0)
            shrink = torch.clamp(1 - (2 * rho - 1) ** 3, min=1 / 3)
            mu_used = mu.clone()
            # samples out of the solve keep their damping
            mu = torch.where(accepted, mu * shrink, torch.where(active, mu * nu, mu))
            nu = torch.where(accepted, torch.full_like(nu, 2.0), torch.where(active, nu * 2, nu))
            mask = per_sample(accepted.to(x.dtype)).reshape(x.shape)
            x = x + mask * delta
            if bool(accepted.any()):
                J, r = linearize(x)
                phi = objective(x, r)
        else:
            mu_used = mu.clone()
            x_before = x
            x = x + per_sample(active.to(x.dtype)).reshape(x.shape) * delta
            J, r = linearize(x)
            phi = objective(x, r)
            overflow = active & ~torch.isfinite(phi)
            if bool(overflow.any()):
                # keep every sample at a finite point: NaN would spread through the joint solve
                diverged = diverged | overflow
                x = torch.where(per_sample(overflow).reshape(x.shape), x_before, x)
                J, r = linearize(x)
                phi = objective(x, r)
            accepted = active & ~overflow
        step = torch.where(accepted, _per_sample_sq(delta).sqrt(), torch.zeros_like(phi))
        x_norm = _per_sample_sq(x).sqrt()
        converged = converged | (accepted & (step <= tol * (x_norm + tol)))
        converged = converged | (phi == 0)
        if adaptive:
            # a damping this large makes the step vanish: no descent is left to find
            converged = converged | (mu > 1e16 * (1 + phi))
        history["residual_norm"].append(_per_sample_sq(r).sqrt())
        history["objective"].append(phi)
        history["step_norm"].append(step)
        history["damp"].append(mu_used)
        history["accepted"].append(accepted)
        state = (inner_counts, k, converged, diverged)
        if callback is not None and callback(k, x, _info(history, *state, "")):
            message = "stopped by callback"
            break
        if bool(converged.all()):
            message = "converged"
            break
        if bool((converged | diverged).all()):
            message = "diverged (a plain Gauss-Newton step overflowed; try damp='adaptive')"
            break
    return x, _info(history, inner_counts, k, converged, diverged, message)


def _info(history, inner_counts, k, converged, diverged, message) -> dict:
    info: dict[str, Any] = {
        key: torch.stack(rows).cpu().numpy()
        if rows
        else np.zeros((0, converged.numel()), dtype=bool if key == "accepted" else float)
        for key, rows in history.items()
    }
    info.update(
        inner_iterations=list(inner_counts),
        niter=k,
        converged=converged.cpu().numpy(),
        diverged=diverged.cpu().numpy(),
        message=message,
    )
    return info


# ---------------------------------------------------------------------------------- L-BFGS
class _Stop(Exception):
    """Raised by the L-BFGS closure when the callback asks to stop."""


def lbfgs(
    F: NonlinearOperator,
    d: Any,
    x0: Any,
    niter: int = 50,
    regularization: float | tuple | None = None,
    callback: Callable | None = None,
    *,
    cond: Sequence[Any] = (),
    lr: float = 1.0,
    history_size: int = 10,
    tolerance_grad: float = 1e-10,
    tolerance_change: float = 1e-12,
) -> tuple[Any, dict]:
    r"""Minimise :math:`\|F(x) - d\|^2 + \lambda\|x - x_{\mathrm{prior}}\|^2` with
    ``torch.optim.LBFGS`` (strong Wolfe line search), gradients by torch autograd of
    ``F.apply`` (memory-free through invertible parts).

    Parameters are those of :func:`gauss_newton` where they share a name; ``niter`` is L-BFGS'
    ``max_iter``, and ``lr``, ``history_size``, ``tolerance_grad``, ``tolerance_change`` go to
    ``torch.optim.LBFGS``. ``callback(n, x, info)`` runs after every objective evaluation;
    returning True stops there (``x`` is the point just evaluated).

    Returns
    -------
    x : array
        Same kind as ``x0``.
    info : dict
        ``objective`` (one row per evaluation, one column per sample), ``n_evaluations``,
        ``niter`` (L-BFGS iterations), ``residual_norm`` (final, per sample).

    Notes
    -----
    L-BFGS minimises the SUM of the samples' objectives as one problem: its curvature pairs
    and line search are shared by the batch, unlike :func:`gauss_newton`'s per-sample steps.

    Examples
    --------
    >>> import numpy as np, torch, invops
    >>> from invops.operators import as_operator
    >>> from invops.solvers import lbfgs
    >>> F = as_operator(np.array([[2.0, 1.0], [1.0, 3.0], [0.0, 1.0]]))
    >>> x_true = torch.tensor([[0.7, -0.4]], dtype=torch.float64)
    >>> x, info = lbfgs(F, F.apply(x_true), torch.zeros_like(x_true), niter=20)
    >>> bool(torch.allclose(x, x_true, atol=1e-6))
    True
    """
    if isinstance(niter, bool) or not isinstance(niter, int) or niter < 1:
        raise ValueError(f"lbfgs: niter must be an integer >= 1, got {niter!r}")
    problem = _Problem(F, d, x0, cond, regularization, "lbfgs")
    x = problem.x0.clone().requires_grad_()
    opt = torch.optim.LBFGS(
        [x],
        lr=lr,
        max_iter=niter,
        history_size=history_size,
        tolerance_grad=tolerance_grad,
        tolerance_change=tolerance_change,
        line_search_fn="strong_wolfe",
    )
    objectives: list[torch.Tensor] = []
    stopped = False

    def closure():
        with torch.enable_grad():
            r = problem.residual(F._apply_t(x, problem.cond))
            phi = _per_sample_sq(r) + problem.penalty(x)
            loss = phi.sum()
            (x.grad,) = torch.autograd.grad(loss, [x])
        objectives.append(phi.detach())
        if callback is not None and callback(len(objectives), x.detach(), {"objective": phi}):
            raise _Stop
        return loss.detach()

    with _constant_parameters(F):
        try:
            opt.step(closure)
        except _Stop:
            stopped = True
        with torch.no_grad():
            r = problem.residual(F._apply_t(x.detach(), problem.cond))
    info = {
        "objective": torch.stack(objectives).cpu().numpy(),
        "n_evaluations": len(objectives),
        "niter": int(opt.state[x].get("n_iter", 0)),
        "residual_norm": _per_sample_sq(r).sqrt().cpu().numpy(),
        "stopped_by_callback": stopped,
    }
    return from_torch(x.detach(), problem.kind), info
