"""Gauss–Newton / Levenberg–Marquardt and L-BFGS on invops operators.

Convergence is checked where the theory says what to expect: the observed order of plain
Gauss–Newton near a zero-residual solution is 2, the latent of ``d = A(G(z))`` is recovered from a
nearby start, adaptive damping saves a far start on which plain Gauss–Newton diverges, and
Tikhonov regularization gives the closed-form solution on a linear problem.
"""

from __future__ import annotations

import math

import numpy as np
import pylops
import pytest
import torch
from conftest import randomize_parameters

import invops
from invops.operators import as_operator
from invops.solvers import gauss_newton, lbfgs

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def _sigmoid_problem(n_batch=1, seed=0):
    """F(x) = A sigmoid(x) with a well-conditioned, overdetermined A (8 x 6)."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((8, 6)))
    A = Q @ np.diag(np.linspace(1.0, 2.0, 6))
    F = as_operator(A) @ invops.Sigmoid(logdet=False).double()
    x_true = torch.from_numpy(rng.uniform(-1, 1, (n_batch, 6)))
    return F, A, x_true


def _glow_problem(reverse=False, seed=0):
    torch.manual_seed(seed)
    G = invops.NetworkGlow(1, 4, L=1, K=2).double()
    G(torch.randn(8, 1, 4, 4, dtype=F64))
    randomize_parameters(G, scale=0.2)
    A = np.random.default_rng(seed).standard_normal((24, 16)) / 4
    F = as_operator(A, model_shape=(1, 4, 4)) @ (G.reverse() if reverse else G)
    return F, G


# ----------------------------------------------------------------------------------- rates
def test_gauss_newton_converges_quadratically():
    F, _, x_true = _sigmoid_problem()
    d = F.apply(x_true)
    x0 = x_true + 0.3 * torch.from_numpy(np.random.default_rng(1).standard_normal(x_true.shape))
    errors = [float((x0 - x_true).norm())]

    def record(k, x, info):
        errors.append(float((x - x_true).norm()))

    x, info = gauss_newton(
        F, d, x0, niter=8, inner_iter=30, inner_tol=1e-16, tol=0.0, callback=record
    )
    e = np.array(errors)
    # orders log(e_{k+1}/e_k) / log(e_k/e_{k-1}) while the error is far above rounding
    usable = [k for k in range(1, len(e) - 1) if e[k + 1] > 1e-13]
    orders = [math.log(e[k + 1] / e[k]) / math.log(e[k] / e[k - 1]) for k in usable]
    assert len(orders) >= 2, e
    assert min(orders[1:]) > 1.8, (orders, e)
    assert max(e[k + 1] / e[k] ** 2 for k in usable) < 10, e
    assert e[-1] < 1e-13, e
    # info: residual and step norms per iteration
    assert info["residual_norm"].shape == (info["niter"] + 1, 1)
    assert info["step_norm"].shape == (info["niter"], 1)
    assert np.all(info["accepted"])


@pytest.mark.parametrize("reverse", [False, True], ids=["A@G", "A@G.reverse()"])
def test_recovers_the_latent_of_a_network(reverse):
    F, _ = _glow_problem(reverse)
    z_true = torch.randn(1, 1, 4, 4, dtype=F64)
    d = F.apply(z_true)
    z0 = z_true + 0.05 * torch.randn_like(z_true)
    z, info = gauss_newton(F, d, z0, niter=6, inner_iter=20, inner_tol=1e-14)
    assert float((z - z_true).norm() / z_true.norm()) < 1e-6, info["residual_norm"]
    assert info["converged"].all() and info["message"] == "converged"


class Atan(invops.NonlinearOperator):
    """Element-wise arctan: Newton's method on it diverges from |x0 - x*| large."""

    def _forward(self, x):
        return torch.atan(x)


def test_adaptive_damping_saves_a_start_where_gauss_newton_diverges():
    _, A, _ = _sigmoid_problem()
    F = as_operator(A) @ Atan()
    x_true = torch.full((1, 6), 0.5, dtype=F64)
    d = F.apply(x_true)
    x0 = torch.full((1, 6), 4.0, dtype=F64)
    e0 = float((x0 - x_true).norm())
    x_gn, info_gn = gauss_newton(F, d, x0, niter=6, inner_iter=20)
    errors = float((x_gn - x_true).abs().max())
    assert not math.isfinite(errors) or errors > 1e3 * e0, info_gn["step_norm"]
    assert np.all(np.diff(info_gn["step_norm"][:, 0]) > 0)  # ever larger steps
    x_lm, info = gauss_newton(F, d, x0, niter=60, damp="adaptive", inner_iter=20)
    assert float((x_lm - x_true).norm()) < 1e-8, info["objective"][-5:]
    objective = info["objective"][:, 0]
    assert np.all(np.diff(objective) <= 0)  # rejected steps keep the objective
    assert not info["accepted"].all()  # and some steps were rejected


class Exp(invops.NonlinearOperator):
    def _forward(self, x):
        return torch.exp(x)


def test_an_overflowing_sample_does_not_spoil_the_batch():
    _, A, _ = _sigmoid_problem()
    F = as_operator(A) @ Exp()
    x_true = torch.full((2, 6), 0.5, dtype=F64)
    d = F.apply(x_true)
    x0 = torch.stack([torch.full((6,), -12.0, dtype=F64), torch.full((6,), 0.4, dtype=F64)])
    x, info = gauss_newton(F, d, x0, niter=10, inner_iter=20)
    assert info["diverged"].tolist() == [True, False]
    assert info["converged"].tolist() == [False, True]
    assert torch.isfinite(x).all() and torch.equal(x[0], x0[0])
    assert float((x[1] - x_true[1]).abs().max()) < 1e-10
    # adaptive damping rejects the overflowing steps; sample 1 still converges, on its own
    x, info = gauss_newton(F, d, x0, niter=20, damp="adaptive", inner_iter=20)
    assert torch.isfinite(x).all() and not info["diverged"].any()
    assert float((x[1] - x_true[1]).abs().max()) < 1e-10 and info["converged"][1]
    assert np.all(np.diff(info["objective"][:, 0]) <= 0) and np.isfinite(info["damp"]).all()
    with pytest.raises(ValueError, match=r"not finite for samples \[0\]"):
        gauss_newton(F, d, torch.stack([torch.full((6,), 800.0, dtype=F64), x0[1]]))


def test_fixed_damping_and_cgls():
    F, _, x_true = _sigmoid_problem(seed=2)
    d = F.apply(x_true)
    x0 = torch.zeros_like(x_true)
    x, info = gauss_newton(F, d, x0, niter=40, damp=1e-3, solver="cgls", inner_iter=20)
    assert float((x - x_true).norm()) < 1e-8
    assert np.all(info["damp"] == 1e-3)


# ----------------------------------------------------------------------------------- objective
def test_tikhonov_on_a_linear_problem_is_the_closed_form():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((4, 7))  # underdetermined
    F = as_operator(A)
    d = torch.from_numpy(rng.standard_normal((2, 4)))
    prior = torch.from_numpy(rng.standard_normal((2, 7)))
    lam = 0.3
    x, info = gauss_newton(
        F, d, torch.zeros(2, 7, dtype=F64), niter=2, regularization=(lam, prior), inner_iter=50
    )
    M = A.T @ A + lam * np.eye(7)
    expected = np.linalg.solve(M, A.T @ d.numpy().T + lam * prior.numpy().T).T
    assert np.abs(x.numpy() - expected).max() < 1e-10
    r = d.numpy() - expected @ A.T
    phi = (r**2).sum(1) + lam * ((expected - prior.numpy()) ** 2).sum(1)
    assert np.allclose(info["objective"][-1], phi, rtol=1e-10)


def test_batch_joint_and_separate_solve_every_sample():
    F, _, x_true = _sigmoid_problem(n_batch=3, seed=4)
    d = F.apply(x_true)
    x0 = torch.zeros_like(x_true)
    for batch in ("joint", "separate"):
        x, info = gauss_newton(F, d, x0, niter=30, damp="adaptive", inner_iter=30, batch=batch)
        assert float((x - x_true).abs().max()) < 1e-8, batch
        assert info["converged"].shape == (3,) and info["converged"].all()
        assert info["damp"].shape[1] == 3


def test_numpy_in_numpy_out_and_parameters_untouched():
    F, G = _glow_problem()
    z_true = np.random.default_rng(0).standard_normal((2, 1, 4, 4))
    d = F.apply(z_true)
    assert isinstance(d, np.ndarray)
    z, info = gauss_newton(F, d, z_true + 0.01, niter=4, inner_iter=20)
    assert isinstance(z, np.ndarray) and z.shape == z_true.shape
    assert np.abs(z - z_true).max() < 1e-6
    assert all(p.requires_grad and p.grad is None for p in G.parameters())
    z2, info2 = lbfgs(F, d, z_true + 0.01, niter=30)
    assert isinstance(z2, np.ndarray) and z2.shape == z_true.shape
    assert info2["residual_norm"].shape == (2,) and info2["n_evaluations"] > 1
    assert np.all(info2["objective"][-1] < 1e-3 * info2["objective"][0])
    assert all(p.requires_grad and p.grad is None for p in G.parameters())


def test_complex_data_of_a_complex_operator():
    rng = np.random.default_rng(3)
    M = rng.standard_normal((6, 5)) + 1j * rng.standard_normal((6, 5))
    F = (
        as_operator(pylops.MatrixMult(M, dtype="complex128"))
        @ invops.Sigmoid(logdet=False).double()
    )
    x_true = torch.from_numpy(rng.uniform(-1, 1, (2, 5)))
    d = F.apply(x_true)
    assert d.is_complex()
    x, info = gauss_newton(F, d, torch.zeros_like(x_true), niter=30, damp="adaptive")
    assert float((x - x_true).abs().max()) < 1e-8
    x, _ = lbfgs(F, d, torch.zeros_like(x_true), niter=200)
    assert float((x - x_true).abs().max()) < 1e-5


def test_callbacks_stop():
    F, _, x_true = _sigmoid_problem()
    d = F.apply(x_true)
    seen = []
    _, info = gauss_newton(
        F, d, torch.zeros_like(x_true), niter=10, callback=lambda k, x, i: k == 2
    )
    assert info["niter"] == 2 and info["message"] == "stopped by callback"
    _, info = lbfgs(
        F, d, torch.zeros_like(x_true), callback=lambda n, x, i: seen.append(n) or n == 3
    )
    assert info["stopped_by_callback"] and info["n_evaluations"] == 3 and seen == [1, 2, 3]


# ----------------------------------------------------------------------------------- bad input
class _Counting(invops.NonlinearOperator):
    """Counts its evaluations, to show that bad input is refused before any compute."""

    model_shape = (4,)

    def __init__(self):
        super().__init__()
        self.calls = 0

    def _forward(self, x):
        self.calls += 1
        return torch.tanh(x)


@pytest.fixture()
def counted():
    inner = _Counting()
    F = as_operator(np.random.default_rng(0).standard_normal((5, 4))) @ inner
    return F, inner


def test_wrong_data_shape_raises_before_computing(counted):
    F, inner = counted
    x0 = torch.zeros(2, 4, dtype=F64)
    for d in (torch.zeros(2, 6, dtype=F64), torch.zeros(3, 5, dtype=F64), torch.zeros(5)):
        with pytest.raises(ValueError, match="d must have"):
            gauss_newton(F, d, x0)
        with pytest.raises(ValueError, match="d must have"):
            lbfgs(F, d, x0)
    with pytest.raises(ValueError, match="x0 must have shape"):
        gauss_newton(F, torch.zeros(2, 5, dtype=F64), torch.zeros(2, 3, dtype=F64))
    assert inner.calls == 0


def test_complex_data_with_a_real_composite_raises(counted):
    F, inner = counted
    with pytest.raises(TypeError, match="d is complex"):
        gauss_newton(F, torch.zeros(2, 5, dtype=torch.complex128), torch.zeros(2, 4, dtype=F64))
    with pytest.raises(TypeError, match="d is complex"):
        lbfgs(F, torch.zeros(2, 5, dtype=torch.complex128), torch.zeros(2, 4, dtype=F64))
    M = np.ones((5, 4)) * (1 + 1j)
    with pytest.raises(TypeError, match="must be"):
        gauss_newton(as_operator(M) @ inner, torch.zeros(2, 5, dtype=F64), torch.zeros(2, 4))
    assert inner.calls == 0


def test_unknown_output_shape_is_checked_after_one_evaluation():
    inner = _Counting()
    with pytest.raises(ValueError, match=r"F\(x0\) has shape \(2, 4\) but d has shape \(2, 3\)"):
        gauss_newton(inner, torch.zeros(2, 3, dtype=F64), torch.zeros(2, 4, dtype=F64))
    assert inner.calls == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(solver="cg"), "solver"),
        (dict(damp=-1.0), "damp"),
        (dict(damp="auto"), "damp"),
        (dict(niter=-1), "niter"),
        (dict(inner_iter=0), "inner_iter"),
        (dict(regularization=-0.5), "regularization"),
        (dict(regularization=(0.1, np.zeros((2, 3)))), "x_prior"),
        (dict(batch="each"), "batch"),
    ],
)
def test_bad_options_raise(counted, kwargs, match):
    F, inner = counted
    with pytest.raises(ValueError, match=match):
        gauss_newton(F, torch.zeros(2, 5, dtype=F64), torch.zeros(2, 4, dtype=F64), **kwargs)
    assert inner.calls == 0


def test_non_operators_and_dtype_mismatch_raise():
    with pytest.raises(TypeError, match="NonlinearOperator"):
        gauss_newton(np.eye(3), np.zeros((1, 3)), np.zeros((1, 3)))
    with pytest.raises(TypeError, match="NonlinearOperator"):
        lbfgs(lambda x: x, np.zeros((1, 3)), np.zeros((1, 3)))
    F, _ = _glow_problem()
    with pytest.raises(TypeError, match="dtype"):
        gauss_newton(F, torch.zeros(1, 24), torch.zeros(1, 1, 4, 4))
    with pytest.raises(TypeError, match="x0"):
        gauss_newton(F, torch.zeros(1, 24), [[0.0]])


# ----------------------------------------------------------------------------------- devices
# the device suite's --devices option (see tests/test_devices.py): ``device`` runs over it
from test_devices import (  # noqa: E402, F401
    _single_thread_ieee_float32,
    pytest_generate_tests,
)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
def test_gauss_newton_on_device(device, dtype):
    F, _ = _glow_problem(reverse=True)
    F = F.to(device=device, dtype=dtype)
    z_true = torch.randn(3, 1, 4, 4, dtype=dtype, device=device)
    d = F.apply(z_true).detach()
    z0 = z_true + 0.05 * torch.randn_like(z_true)
    z, info = gauss_newton(F, d, z0, niter=8, inner_iter=40)
    assert z.device == z_true.device and z.dtype == dtype
    tol = 1e-6 if dtype == F64 else 1e-3
    assert float((z - z_true).norm() / z_true.norm()) < tol, info["residual_norm"]
    z2, _ = lbfgs(F, d, z0, niter=100)
    assert z2.device == z_true.device
    assert float((z2 - z_true).norm() / z_true.norm()) < 10 * tol
