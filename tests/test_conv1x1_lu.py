"""Operator contract checks for the LU-decomposed 1x1 convolution: every rank, odd channels."""

import numpy as np
import pytest
import torch
from conftest import SPATIAL, randomize_parameters
from torch.utils._python_dispatch import TorchDispatchMode

import invops
from invops.testing import (
    check_against_autograd,
    check_invertible,
    check_logdet,
    dottest,
    gradient_test,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [
    (rank, batch, channels)
    for rank in (0, 1, 2, 3)
    for batch in (1, 3)
    for channels in (1, 2, 3, 5, 6)
]


def prepared(rank, batch, channels):
    layer = invops.Conv1x1LU(channels).double()
    randomize_parameters(layer)  # off the orthogonal start, so log_s (and the logdet) matter
    x = 1.5 * torch.randn(batch, channels, *SPATIAL[rank], dtype=torch.float64) + 0.5
    return layer, x


@pytest.mark.parametrize("rank,batch,channels", CASES)
def test_invertible_and_derivatives(rank, batch, channels):
    layer, x = prepared(rank, batch, channels)
    assert check_invertible(layer, x, rtol=1e-10) <= 1e-10
    check_against_autograd(layer, x, rtol=1e-8)
    check_against_autograd(layer.reverse(), x, rtol=1e-8)


@pytest.mark.parametrize("rank", [0, 1, 2, 3])
@pytest.mark.parametrize("channels", [1, 3, 5])
def test_logdet_matches_slogdet(rank, channels):
    layer, x = prepared(rank, 2, channels)
    check_logdet(layer, x, rtol=1e-10)
    check_logdet(layer.reverse(), x, rtol=1e-10)
    with torch.no_grad():
        _, logdet = layer(x)
    assert float(logdet.abs().max()) > 1e-3  # the check is not vacuous


@pytest.mark.parametrize("rank", [0, 1, 2, 3])
@pytest.mark.parametrize("wrt", ["input", "params", "both"])
def test_jacobian_dottest(rank, wrt):
    layer, x = prepared(rank, 2, 3)
    assert dottest(layer.jacobian(x, wrt=wrt), rtol=1e-10, n_trials=3)
    assert dottest(layer.reverse().jacobian(x, wrt=wrt), rtol=1e-10, n_trials=3)
    layer32 = layer.float()
    assert dottest(layer32.jacobian(x.float(), wrt=wrt), rtol=1e-4, n_trials=3)


@pytest.mark.parametrize("channels", [1, 5])
def test_gradient_test_second_order(channels):
    layer, x = prepared(2, 3, channels)
    y0, _ = layer(x)
    w = torch.randn_like(y0)

    def loss_x(v):
        y, logdet = layer(v)
        return (w * y).sum() + 0.7 * logdet.sum() + (y**2).sum() * 0.1

    y, _ = layer(x)
    dy = w + 0.2 * y
    dx, _ = layer.backward(dy, y, dlogdet=0.7)
    gradient_test(loss_x, x, dx)

    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone() for p in layer.parameters()]

    def loss_p(*ps):
        y, logdet = torch.func.functional_call(layer, dict(zip(names, ps)), (x,))
        return (w * y).sum() + 0.7 * logdet.sum() + (y**2).sum() * 0.1

    _, dtheta, _ = layer.vjp(dy, y, dlogdet=0.7)
    gradient_test(loss_p, params, list(dtheta))


@pytest.mark.parametrize("channels", [1, 2, 5, 16])
def test_starts_orthogonal_with_glow_factors(channels):
    # float32 parameters, factorised in float64 and rounded: orthogonal to float32 rounding
    conv = invops.Conv1x1LU(channels)
    w = conv.matrix().detach()
    eye = torch.eye(channels)
    assert float((w @ w.T - eye).abs().max()) <= 1e-5
    with torch.no_grad():
        _, logdet = conv(torch.randn(2, channels, 3))
    assert float(logdet.abs().max()) <= 3 * 1e-5
    # W = P L (U + diag(sign exp(log_s))) with P a permutation, L unit lower triangular
    conv = conv.double()
    assert sorted(conv.perm.tolist()) == list(range(channels))
    lower, upper = (f.detach() for f in conv._factors())
    assert torch.equal(lower.diagonal(), torch.ones(channels, dtype=torch.float64))
    assert torch.equal(lower, lower.tril()) and torch.equal(upper, upper.triu())
    eye = eye.double()
    torch.testing.assert_close(conv.matrix().detach(), eye[conv.perm] @ lower @ upper)
    assert set(conv.sign_s.tolist()) <= {-1.0, 1.0}


def test_masked_entries_get_no_gradient_and_change_nothing():
    layer, x = prepared(2, 2, 4)
    y, _ = layer(x)
    _, (dlower, dupper, dlog_s), _ = layer.vjp(torch.randn_like(y), y, dlogdet=1.0)
    assert torch.equal(dlower.triu(), torch.zeros_like(dlower))
    assert torch.equal(dupper.tril(), torch.zeros_like(dupper))
    with torch.no_grad():
        layer.lower.add_(torch.triu(torch.ones(4, 4, dtype=torch.float64)))
        layer.upper.add_(torch.tril(torch.ones(4, 4, dtype=torch.float64)))
    assert torch.equal(layer(x)[0], y)


def test_logdet_scales_with_the_number_of_points():
    layer, _ = prepared(0, 1, 3)
    _, ld_dense = layer(torch.randn(2, 3, dtype=torch.float64))
    _, ld_2d = layer(torch.randn(2, 3, 4, 5, dtype=torch.float64))
    torch.testing.assert_close(ld_2d, 20 * ld_dense)
    torch.testing.assert_close(ld_dense, layer.log_s.sum().detach().expand(2))


def test_inverse_uses_triangular_solves_not_an_inverse_matrix():
    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.__name__)
            return func(*args, **(kwargs or {}))

    layer, x = prepared(2, 2, 5)
    y, _ = layer(x)
    with Ops() as ops:
        layer.inverse(y)
    assert any("solve_triangular" in n for n in ops.names), ops.names
    assert not any("inv" in n or n.startswith("linalg_solve.") for n in ops.names), ops.names


def test_state_dict_round_trip():
    layer, x = prepared(1, 2, 5)
    fresh = invops.Conv1x1LU(5).double()
    fresh.load_state_dict(layer.state_dict())
    assert set(layer.state_dict()) == {"perm", "sign_s", "lower", "upper", "log_s"}
    assert torch.equal(fresh(x)[0], layer(x)[0])


def test_numpy_in_numpy_out():
    layer, _ = prepared(2, 2, 3)
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4))
    y, logdet = layer(x)
    assert isinstance(y, np.ndarray) and isinstance(logdet, np.ndarray)
    x_back, _ = layer.inverse(y)
    np.testing.assert_allclose(x_back, x, rtol=1e-12, atol=1e-12)


def test_bad_inputs():
    layer = invops.Conv1x1LU(3)
    with pytest.raises(ValueError, match=r"x must have 3 channels \(dimension 1\), got 4"):
        layer(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match=r"y must have 3 channels \(dimension 1\), got 2"):
        layer.inverse(torch.randn(2, 2, 5))
    with pytest.raises(ValueError, match=r"layout .*got a tensor of shape \(3,\)"):
        layer(torch.randn(3))
    with pytest.raises(TypeError, match="expected dtype torch.float32"):
        layer(torch.randn(2, 3, dtype=torch.float64))
    for bad in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match="n_channels must be an integer >= 1"):
            invops.Conv1x1LU(bad)
