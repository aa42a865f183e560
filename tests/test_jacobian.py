"""JacobianOperator: a real pylops operator usable in PyLops solvers."""

import numpy as np
import pylops
import pytest
import torch
from conftest import randomize_parameters
from pylops.optimization.basic import cgls, lsqr

import invops
from invops.testing import dottest


def chain(channels=3):
    net = invops.Chain(
        invops.ActNorm(channels), invops.Conv1x1(channels), invops.AffineLayer((channels, 5))
    ).double()
    net(torch.randn(4, channels, 5, dtype=torch.float64))
    randomize_parameters(net)
    return net


def test_is_pylops_operator_with_documented_dims():
    net = chain()
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    n_params = sum(p.numel() for p in net.parameters())
    J = net.jacobian(x)
    assert isinstance(J, pylops.LinearOperator)
    assert J.dims == (2, 3, 5) and J.dimsd == (2, 3, 5) and J.dtype == np.float64
    assert net.jacobian(x, wrt="params").dims == (n_params,)
    assert net.jacobian(x, wrt="both").dims == (30 + n_params,)


def test_matvec_is_jvp_and_rmatvec_is_vjp():
    net = chain()
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    v = torch.randn_like(x)
    J = net.jacobian(x)
    _, dy, _, _ = net.jvp(x, dx=v)
    np.testing.assert_allclose(J @ v.numpy().ravel(), dy.numpy().ravel(), rtol=1e-12)
    y, _ = net(x)
    dx, _, _ = net.vjp(dy, y)
    np.testing.assert_allclose(J.H @ dy.numpy().ravel(), dx.numpy().ravel(), rtol=1e-12)
    # N-d application through pylops' ndarray support
    assert (J @ v.numpy()).shape == (2, 3, 5)


def test_dense_jacobian_matches_autograd():
    net = chain()
    x = torch.randn(1, 3, 5, dtype=torch.float64)
    J = net.jacobian(x).todense()
    ref = torch.autograd.functional.jacobian(lambda v: net._forward(v)[0], x)
    np.testing.assert_allclose(J, ref.reshape(15, 15).numpy(), rtol=1e-12, atol=1e-14)


def test_solvers_recover_a_perturbation():
    net = chain()
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    J = net.jacobian(x)
    dx_true = np.random.default_rng(0).standard_normal(J.shape[1])
    dy = J @ dx_true
    dx_cgls = cgls(J, dy, x0=np.zeros_like(dx_true), niter=200, tol=1e-20)[0]
    dx_lsqr = lsqr(J, dy, x0=np.zeros_like(dx_true), niter=200, atol=1e-14, btol=1e-14)[0]
    np.testing.assert_allclose(dx_cgls.ravel(), dx_true, rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(dx_lsqr.ravel(), dx_true, rtol=1e-7, atol=1e-8)


def test_casts_vectors_at_the_boundary():
    net = chain().float()
    x = torch.randn(2, 3, 5)
    J = net.jacobian(x, wrt="both")
    v64 = np.random.default_rng(0).standard_normal(J.shape[1])  # solvers hand float64 vectors
    out = J @ v64
    assert out.dtype == np.float32
    assert dottest(J, rtol=1e-4, n_trials=5)
    dy = J @ v64.astype(np.float32)
    sol = cgls(J.H @ J, J.H @ dy, x0=np.zeros(J.shape[1], dtype=np.float32), niter=5)[0]
    assert np.isfinite(sol).all()


def test_composes_with_pylops_operators():
    net = chain()
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    D = pylops.FirstDerivative(dims=(2, 3, 5), axis=-1, dtype="float64")
    assert dottest(D @ net.jacobian(x), rtol=1e-10, n_trials=3)


@pytest.mark.parametrize("wrt", ["input", "params", "both"])
def test_reversed_module_jacobian(wrt):
    net = chain()
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    assert dottest(net.reverse().jacobian(x, wrt=wrt), n_trials=3)
