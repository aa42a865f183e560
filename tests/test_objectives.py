"""Tests of invops.objectives: values, gradients, array kinds and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import invops
from invops.testing import check_against_autograd, gradient_test

DT = torch.float64
LOG2PI = math.log(2 * math.pi)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=_gen(seed), dtype=DT)


SHAPES = [(1, 3), (3, 5), (2, 3, 4), (2, 3, 2, 2), (1, 3, 2, 2, 2)]


def _autograd(fun, *args):
    args = [a.clone().requires_grad_() for a in args]
    return torch.autograd.grad(fun(*args).sum(), args)


# ============================================================================ Gaussian NLL
@pytest.mark.parametrize("shape", SHAPES)
def test_gaussian_nll_constant_at_zero(shape):
    z = torch.zeros(shape, dtype=DT)
    n = math.prod(shape[1:])
    nll = invops.gaussian_nll(z)
    assert nll.shape == (shape[0],)
    torch.testing.assert_close(nll, torch.full((shape[0],), 0.5 * n * LOG2PI, dtype=DT))


def test_gaussian_nll_hand_value():
    z = torch.tensor([[1.0, 2.0], [0.0, -1.0]], dtype=DT)
    nll = invops.gaussian_nll(z, mean=1.0, std=2.0)
    # 0.5 * sum(((z - 1) / 2)^2) + 2 log 2 + log(2 pi)
    ref = [
        0.5 * (0 + 0.25) + 2 * math.log(2) + LOG2PI,
        0.5 * (0.25 + 1.0) + 2 * math.log(2) + LOG2PI,
    ]
    torch.testing.assert_close(nll, torch.tensor(ref, dtype=DT), rtol=1e-14, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_gaussian_nll_matches_torch_distributions(shape):
    z = randn(shape)
    mean = randn((1, *shape[1:]), seed=1)  # per-entry mean, broadcast over the batch
    std = torch.exp(0.3 * randn((1, shape[1], *([1] * (len(shape) - 2))), seed=2))
    ref = -torch.distributions.Normal(mean, std).log_prob(z).reshape(shape[0], -1).sum(1)
    torch.testing.assert_close(invops.gaussian_nll(z, mean, std), ref, rtol=1e-13, atol=1e-13)
    scalars = torch.tensor(0.5, dtype=DT), torch.tensor(1.7, dtype=DT)
    ref_scalar = -torch.distributions.Normal(*scalars).log_prob(z).reshape(shape[0], -1).sum(1)
    torch.testing.assert_close(invops.gaussian_nll(z, 0.5, 1.7), ref_scalar, rtol=1e-13, atol=0)


@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (0.3, 0.5), ("array", "array")])
def test_gaussian_nll_grad_matches_autograd(mean, std):
    z = randn((3, 2, 4))
    if mean == "array":
        mean = randn((1, 2, 4), seed=3)
        std = torch.exp(randn((1, 2, 1), seed=4))
    (ref,) = _autograd(lambda v: invops.gaussian_nll(v, mean, std), z)
    got = invops.gaussian_nll_grad(z, mean, std)
    assert got.shape == z.shape
    torch.testing.assert_close(got, ref, rtol=1e-13, atol=1e-15)
    r0, r1 = gradient_test(lambda v: invops.gaussian_nll(v, mean, std).sum(), z, got)
    assert abs(r1 - 2) < 0.25


def test_gaussian_nll_numpy():
    z = np.random.default_rng(0).standard_normal((3, 4))
    z0 = z.copy()
    nll = invops.gaussian_nll(z, mean=0.5, std=np.full((1, 4), 2.0))
    assert isinstance(nll, np.ndarray) and nll.shape == (3,)
    ref = 0.5 * (((z - 0.5) / 2) ** 2).sum(1) + 4 * math.log(2.0) + 2 * LOG2PI
    np.testing.assert_allclose(nll, ref, rtol=1e-14)
    g = invops.gaussian_nll_grad(z, mean=0.5, std=2.0)
    assert isinstance(g, np.ndarray)
    np.testing.assert_allclose(g, (z - 0.5) / 4, rtol=1e-15)
    np.testing.assert_array_equal(z, z0)
    # float32 stays float32
    assert invops.gaussian_nll(z.astype(np.float32)).dtype == np.float32


def test_gaussian_nll_errors():
    z = torch.zeros(2, 3, dtype=DT)
    for bad in (0.0, -1.0, float("nan"), float("inf"), torch.tensor([1.0, 0.0, 1.0])):
        with pytest.raises(ValueError, match="std"):
            invops.gaussian_nll(z, std=bad)
        with pytest.raises(ValueError, match="std"):
            invops.gaussian_nll_grad(z, std=bad)
    with pytest.raises(ValueError, match="broadcast"):
        invops.gaussian_nll(z, mean=torch.zeros(4))
    with pytest.raises(ValueError, match="broadcast"):
        invops.gaussian_nll(z, mean=torch.zeros(5, 2, 3))  # would enlarge z's shape
    with pytest.raises(ValueError, match="at least one dimension"):
        invops.gaussian_nll(torch.tensor(1.0))
    with pytest.raises(TypeError, match="floating-point"):
        invops.gaussian_nll(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="numpy.ndarray"):
        invops.gaussian_nll([[0.0, 1.0]])


# ============================================================================ MSE
def test_mse_hand_value():
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=DT)
    y = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=DT)
    assert invops.mse(x, y).tolist() == [2.5, 4.0]
    assert invops.mse_grad(x, y).tolist() == [[1.0, 2.0], [2.0, -2.0]]


@pytest.mark.parametrize("shape", SHAPES)
def test_mse_grad_matches_autograd(shape):
    x, y = randn(shape, 0), randn(shape, 1)
    assert invops.mse(x, y).shape == (shape[0],)
    (ref,) = _autograd(lambda v: invops.mse(v, y), x)
    torch.testing.assert_close(invops.mse_grad(x, y), ref, rtol=1e-14, atol=0)
    gradient_test(lambda v: invops.mse(v, y).sum(), x, invops.mse_grad(x, y))


def test_mse_numpy_and_mixed():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 4))
    out = invops.mse(x, y)
    assert isinstance(out, np.ndarray) and out.shape == (2,)
    np.testing.assert_allclose(out, 0.5 * ((x - y) ** 2).reshape(2, -1).sum(1), rtol=1e-14)
    g = invops.mse_grad(x, y)
    assert isinstance(g, np.ndarray)
    np.testing.assert_array_equal(g, x - y)
    # mixed kinds: the result has the kind of the first argument
    assert isinstance(invops.mse(torch.from_numpy(x), y), torch.Tensor)
    assert isinstance(invops.mse(x, torch.from_numpy(y)), np.ndarray)
    # negative-stride views are accepted (copied before DLPack)
    np.testing.assert_allclose(invops.mse(x[:, ::-1], y[:, ::-1]), out, rtol=1e-14)


def test_mse_errors():
    with pytest.raises(ValueError, match="same shape"):
        invops.mse(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="same shape"):
        invops.mse_grad(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="same shape"):
        invops.mse(torch.zeros(2, 3), torch.zeros(3))  # no silent broadcasting
    with pytest.raises(TypeError, match="same dtype"):
        invops.mse(torch.zeros(2, 3), torch.zeros(2, 3, dtype=DT))
    with pytest.raises(TypeError):
        invops.mse(torch.zeros(2, 3), [[0.0] * 3] * 2)


# ============================================================================ Huber
def test_huber_hand_values():
    r = torch.tensor([[0.5, -3.0, 1.0], [2.0, 0.0, -0.2]], dtype=DT)
    y = torch.zeros_like(r)
    # delta = 1: 0.125 + (3 - 0.5) + 0.5 ;  (2 - 0.5) + 0 + 0.02
    torch.testing.assert_close(
        invops.huber(r, y), torch.tensor([3.125, 1.52], dtype=DT), rtol=1e-14, atol=0
    )
    # delta = 2: 0.125 + 2 * (3 - 1) + 0.5 ; 2 + 0 + 0.02
    torch.testing.assert_close(
        invops.huber(r, y, delta=2.0), torch.tensor([4.625, 2.02], dtype=DT), rtol=1e-14, atol=0
    )
    g = invops.huber_grad(r, y)
    assert g.tolist() == [[0.5, -1.0, 1.0], [1.0, 0.0, -0.2]]


def test_huber_limits():
    x, y = randn((3, 4), 0), randn((3, 4), 1)
    # a large delta is the half squared error
    torch.testing.assert_close(invops.huber(x, y, delta=1e3), invops.mse(x, y))
    # continuity at |r| = delta
    for delta in (0.5, 1.0, 3.0):
        eps = 1e-9
        a = invops.huber(
            torch.tensor([[delta - eps]], dtype=DT), torch.zeros(1, 1, dtype=DT), delta
        )
        b = invops.huber(
            torch.tensor([[delta + eps]], dtype=DT), torch.zeros(1, 1, dtype=DT), delta
        )
        assert abs(float(a) - 0.5 * delta**2) < 1e-8 and abs(float(b) - float(a)) < 1e-8


@pytest.mark.parametrize("delta", [0.3, 1.0, 2.5])
@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 4), (1, 3, 2, 2)])
def test_huber_grad_matches_autograd(delta, shape):
    x, y = randn(shape, 2), randn(shape, 3)
    # keep residuals away from the switch at |r| = delta (measure zero, but keeps the Taylor
    # test clean)
    r = x - y
    x = torch.where((r.abs() - delta).abs() < 0.1, y + r * 1.2, x)
    (ref,) = _autograd(lambda v: invops.huber(v, y, delta), x)
    g = invops.huber_grad(x, y, delta)
    torch.testing.assert_close(g, ref, rtol=1e-14, atol=0)
    assert float(g.abs().max()) <= delta
    gradient_test(lambda v: invops.huber(v, y, delta).sum(), x, g, h0=1e-3)


def test_huber_numpy_and_errors():
    x = np.array([[0.5, -3.0]])
    y = np.zeros((1, 2))
    out = invops.huber(x, y)
    assert isinstance(out, np.ndarray) and out.tolist() == [2.625]
    assert isinstance(invops.huber_grad(x, y), np.ndarray)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="delta"):
            invops.huber(x, y, delta=bad)
        with pytest.raises(ValueError, match="delta"):
            invops.huber_grad(x, y, delta=bad)
    with pytest.raises(ValueError, match="same shape"):
        invops.huber(x, np.zeros((2, 2)))


# ============================================================================ flow NLL
def test_flow_nll_value_and_grads():
    z, logdet = randn((3, 2, 4), 0), randn((3,), 1)
    nll = invops.flow_nll(z, logdet)
    torch.testing.assert_close(nll, invops.gaussian_nll(z) - logdet, rtol=1e-15, atol=0)
    ref = 0.5 * (z**2).reshape(3, -1).sum(1) + 0.5 * 8 * LOG2PI - logdet
    torch.testing.assert_close(nll, ref, rtol=1e-14, atol=0)
    ref_dz, ref_dld = _autograd(invops.flow_nll, z, logdet)
    dz, dld = invops.flow_nll_grad(z, logdet)
    torch.testing.assert_close(dz, ref_dz, rtol=1e-15, atol=0)
    torch.testing.assert_close(dld, ref_dld, rtol=0, atol=0)
    assert dld.tolist() == [-1.0, -1.0, -1.0]
    gradient_test(lambda a, b: invops.flow_nll(a, b).sum(), [z, logdet], [dz, dld])


def test_flow_nll_drives_a_flow_backward():
    """flow.backward(dz, z, dlogdet) with flow_nll_grad equals autograd of the loss."""
    flow = invops.Chain(
        invops.ActNorm(3), invops.LeakyReLU(0.2), invops.Sigmoid(-3.0, 3.0)
    ).double()
    x = randn((4, 3, 5), 5)
    flow(x)  # data-dependent initialisation of ActNorm
    z, logdet = flow(x)
    dz, dld = invops.flow_nll_grad(z, logdet)
    dx, x_rec = flow.backward(dz, z, dlogdet=dld)
    torch.testing.assert_close(x_rec, x, rtol=1e-10, atol=1e-12)
    grads_invops = [p.grad.clone() for p in flow.parameters()]
    flow.zero_grad()
    x_r = x.clone().requires_grad_()
    with invops.plain_autograd():
        loss = invops.flow_nll(*flow(x_r)).sum()
    loss.backward()
    torch.testing.assert_close(dx, x_r.grad, rtol=1e-10, atol=1e-12)
    for a, p in zip(grads_invops, flow.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-10, atol=1e-12)
    check_against_autograd(flow, x)


def test_flow_nll_numpy_and_errors():
    z = np.zeros((2, 3))
    out = invops.flow_nll(z, np.array([1.0, -1.0]))
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, [1.5 * LOG2PI - 1.0, 1.5 * LOG2PI + 1.0], rtol=1e-15)
    dz, dld = invops.flow_nll_grad(z, np.zeros(2))
    assert isinstance(dz, np.ndarray) and isinstance(dld, np.ndarray)
    with pytest.raises(ValueError, match=r"logdet must have shape \(2,\)"):
        invops.flow_nll(z, np.zeros(3))
    with pytest.raises(ValueError, match=r"logdet must have shape \(2,\)"):
        invops.flow_nll_grad(z, np.zeros((2, 1)))
    with pytest.raises(TypeError, match="same dtype"):
        invops.flow_nll(z, np.zeros(2, dtype=np.float32))


def test_inputs_not_mutated():
    x, y = randn((2, 3), 0), randn((2, 3), 1)
    x0, y0 = x.clone(), y.clone()
    for f in (invops.mse, invops.mse_grad, invops.huber, invops.huber_grad):
        f(x, y)
    invops.gaussian_nll_grad(x)
    dz, _ = invops.flow_nll_grad(x, y[:, 0])
    dz += 1.0  # the returned gradient is not a view of z
    assert torch.equal(x, x0) and torch.equal(y, y0)
