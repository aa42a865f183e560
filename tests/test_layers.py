"""Operator contract checks for the primitive parametric layers, on every rank and odd channels."""

import numpy as np
import pytest
import torch
from conftest import SPATIAL, randomize_parameters

import invops
from invops.testing import (
    check_against_autograd,
    check_invertible,
    check_logdet,
    dottest,
    gradient_test,
)

CASES = [
    (rank, batch, channels) for rank in (0, 1, 2, 3) for batch in (1, 3) for channels in (1, 3, 6)
]


def build(name: str, channels: int, rank: int) -> invops.InvertibleModule:
    if name == "actnorm":
        return invops.ActNorm(channels)
    if name == "conv1x1":
        return invops.Conv1x1(channels, n_reflections=min(channels, 3))
    if name == "affine":
        return invops.AffineLayer((channels, *SPATIAL[rank]))
    if name == "chain":
        return invops.Chain(
            invops.ActNorm(channels),
            invops.Conv1x1(channels),
            invops.AffineLayer((channels, *SPATIAL[rank])),
            invops.Conv1x1(channels).reverse(),
        )
    raise KeyError(name)


LAYERS = ["actnorm", "conv1x1", "affine", "chain"]


def prepared(name, rank, batch, channels):
    if name in ("conv1x1", "chain") and channels == 1:
        # one channel makes every reflection the constant -1: nothing to mix or learn
        channels = 2
    layer = build(name, channels, rank).double()
    x = 1.5 * torch.randn(batch, channels, *SPATIAL[rank], dtype=torch.float64) + 0.5
    layer(x)  # data-dependent initialisation first, then move the parameters off it
    randomize_parameters(layer)
    return layer, x


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("rank,batch,channels", CASES)
def test_invertible_and_derivatives(name, rank, batch, channels):
    layer, x = prepared(name, rank, batch, channels)
    assert check_invertible(layer, x, rtol=1e-10) <= 1e-10
    check_against_autograd(layer, x, rtol=1e-8)
    check_against_autograd(layer.reverse(), x, rtol=1e-8)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("rank", [0, 1, 2, 3])
def test_logdet_matches_slogdet(name, rank):
    layer, x = prepared(name, rank, 2, 3)
    check_logdet(layer, x, rtol=1e-10)
    check_logdet(layer.reverse(), x, rtol=1e-10)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("rank", [0, 2, 3])
@pytest.mark.parametrize("wrt", ["input", "params", "both"])
def test_jacobian_dottest(name, rank, wrt):
    layer, x = prepared(name, rank, 2, 3)
    J = layer.jacobian(x, wrt=wrt)
    assert dottest(J, rtol=1e-10, n_trials=3)
    layer32 = layer.float()
    J32 = layer32.jacobian(x.float(), wrt=wrt)
    assert dottest(J32, rtol=1e-4, n_trials=3)


@pytest.mark.parametrize("name", LAYERS)
def test_gradient_test_second_order(name):
    layer, x = prepared(name, 2, 3, 3)
    y0, _ = layer(x)
    w = torch.randn_like(y0)

    def loss_x(v):
        y, logdet = layer(v)
        return (w * y).sum() + 0.7 * logdet.sum() + (y**2).sum() * 0.1

    y, logdet = layer(x)
    dy = w + 0.2 * y
    dx, _ = layer.backward(dy, y, dlogdet=0.7)
    _, r1 = gradient_test(loss_x, x, dx)
    assert abs(r1 - 2) < 0.25

    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone() for p in layer.parameters()]

    def loss_p(*ps):
        y, logdet = torch.func.functional_call(layer, dict(zip(names, ps)), (x,))
        return (w * y).sum() + 0.7 * logdet.sum() + (y**2).sum() * 0.1

    _, dtheta, _ = layer.vjp(dy, y, dlogdet=0.7)
    gradient_test(loss_p, params, list(dtheta))


def test_gradient_test_fails_on_wrong_gradient():
    x = torch.randn(6, dtype=torch.float64)
    with pytest.raises(AssertionError, match="convergence rates"):
        gradient_test(lambda v: (v**3).sum(), x, 1.05 * 3 * x**2)
    with pytest.raises(AssertionError, match="convergence rates"):
        gradient_test(lambda v: (v**3).sum(), x, 3 * x**2 + 1e-3)


# ---------------------------------------------------------------- ActNorm specifics
@pytest.mark.parametrize("rank", [0, 1, 2, 3])
def test_actnorm_initialises_to_zero_mean_unit_variance(rank):
    x = 4.0 + 3.0 * torch.randn(7, 5, *SPATIAL[rank], dtype=torch.float64)
    layer = invops.ActNorm(5).double()
    y, _ = layer(x)
    dims = [d for d in range(y.ndim) if d != 1]
    torch.testing.assert_close(y.mean(dim=dims), torch.zeros(5, dtype=torch.float64))
    torch.testing.assert_close(y.var(dim=dims, unbiased=False), torch.ones(5, dtype=torch.float64))
    # a second batch does not re-initialise
    before = [p.clone() for p in layer.parameters()]
    layer(x + 1)
    for a, b in zip(before, layer.parameters()):
        assert torch.equal(a, b)


def test_actnorm_constant_channel_is_finite():
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    x[:, 1] = 2.5
    y, logdet = invops.ActNorm(3).double()(x)
    assert torch.isfinite(y).all() and torch.isfinite(logdet).all()
    torch.testing.assert_close(y[:, 1], torch.zeros_like(y[:, 1]))
    # batch of one dense sample: every channel is constant
    y1, ld1 = invops.ActNorm(3).double()(torch.randn(1, 3, dtype=torch.float64))
    assert torch.isfinite(y1).all() and torch.isfinite(ld1).all()


def test_actnorm_reversed_initialises_its_own_output():
    x = 2.0 + 5.0 * torch.randn(16, 3, 6, dtype=torch.float64)
    layer = invops.ActNorm(3).double()
    rev = layer.reverse()
    z, _ = rev(x)  # the first call goes through the inverse direction
    torch.testing.assert_close(z.mean(dim=(0, 2)), torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(
        z.var(dim=(0, 2), unbiased=False), torch.ones(3, dtype=torch.float64)
    )
    assert bool(layer.initialized)
    x_back, _ = layer(z)
    torch.testing.assert_close(x_back, x)


def test_actnorm_state_dict_round_trip():
    x = torch.randn(5, 2, 4)
    layer = invops.ActNorm(2)
    y, _ = layer(x)
    fresh = invops.ActNorm(2)
    fresh.load_state_dict(layer.state_dict())
    assert bool(fresh.initialized)
    torch.testing.assert_close(fresh(x)[0], y)


# ---------------------------------------------------------------- Conv1x1 specifics
def test_conv1x1_orthogonal_and_logdet_zero():
    conv = invops.Conv1x1(7, n_reflections=7).double()
    w = conv.matrix()
    torch.testing.assert_close(w @ w.T, torch.eye(7, dtype=torch.float64))
    _, logdet = conv(torch.randn(2, 7, 3, dtype=torch.float64))
    assert torch.equal(logdet, torch.zeros(2, dtype=torch.float64))


def test_conv1x1_freeze():
    conv = invops.Conv1x1(4, freeze=True).double()
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    y, _ = conv(x)
    conv.backward(torch.randn_like(y), y)
    assert conv.vectors.grad is None
    _, dtheta, _ = conv.vjp(torch.randn_like(y), y)
    assert torch.equal(dtheta[0], torch.zeros_like(conv.vectors))
    assert conv.jacobian(x, wrt="params").shape == (y.numel(), 0)


def test_conv1x1_gradient_builds_no_cubic_tensor():
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class LargestTensor(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    LargestTensor.largest = max(LargestTensor.largest, t.numel())
            return out

    k = 64
    conv = invops.Conv1x1(k, n_reflections=k).double()
    x = torch.randn(1, k, 2, dtype=torch.float64)
    y, _ = conv(x)
    with LargestTensor():
        conv.backward(torch.randn_like(y), y)
    assert LargestTensor.largest <= 4 * k * k < k**3
    assert conv.vectors.grad is not None


# ---------------------------------------------------------------- AffineLayer specifics
def test_affine_rejects_wrong_sample_shape():
    layer = invops.AffineLayer((3, 4))
    with pytest.raises(ValueError, match=r"must have shape \(B, 3, 4\)"):
        layer(torch.randn(2, 3, 5))


def test_numpy_in_numpy_out_for_layers():
    x = np.random.default_rng(0).standard_normal((2, 3, 4))
    for layer in (invops.ActNorm(3), invops.Conv1x1(3), invops.AffineLayer((3, 4))):
        layer = layer.double()
        y, logdet = layer(x)
        assert isinstance(y, np.ndarray) and isinstance(logdet, np.ndarray)
        x_rec, _ = layer.inverse(y)
        np.testing.assert_allclose(x_rec, x, rtol=1e-12, atol=1e-12)
        dx, x_again = layer.backward(np.ones_like(y), y)
        assert isinstance(dx, np.ndarray) and isinstance(x_again, np.ndarray)


@pytest.mark.parametrize("shape", [(3, 5), (2, 5, 4), (1, 5, 3, 2), (2, 5, 2, 3, 2)])
def test_conv1x1_reverse_by_hand_matches_autograd(shape):
    """The hand-written reverse mode (no autograd graph through the Householder product)."""
    torch.manual_seed(0)
    conv = invops.Conv1x1(5, n_reflections=4).double()
    x = torch.randn(shape, dtype=torch.float64)
    dy = torch.randn(shape, dtype=torch.float64)
    xr = x.clone().requires_grad_()
    y = conv._mix(conv.matrix(), xr)
    ref = torch.autograd.grad(y, [xr, conv.vectors], dy)
    x_again, dx, _, grads = conv._pullback(y.detach(), (), dy, None)
    torch.testing.assert_close(x_again, x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx, ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[conv.vectors], ref[1], rtol=1e-12, atol=1e-12)
    # the inverse map, from its output, on a non-contiguous cotangent
    dx_in = torch.randn(shape[::-1], dtype=torch.float64).permute(*range(len(shape) - 1, -1, -1))
    yr = y.detach().clone().requires_grad_()
    x_out = conv._mix(conv.matrix().T, yr)
    ref = torch.autograd.grad(x_out, [yr, conv.vectors], dx_in)
    y_again, dy_in, _, grads = conv._pullback_inverse(x_out.detach(), (), dx_in, None)
    torch.testing.assert_close(y_again, y.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dy_in, ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[conv.vectors], ref[1], rtol=1e-12, atol=1e-12)
