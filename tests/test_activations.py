"""Tests of invops.activations: functions, invertible activation layers and blocks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import invops
from invops import activations as act
from invops.testing import (
    check_against_autograd,
    check_invertible,
    check_logdet,
    dottest,
    gradient_test,
)

DT = torch.float64

# (name, factory); every module is parameter-free
MODULES = {
    "leaky0.1": lambda: invops.LeakyReLU(0.1),
    "leaky2": lambda: invops.LeakyReLU(2.0),
    "sigmoid": lambda: invops.Sigmoid(),
    "sigmoid(-2,3)": lambda: invops.Sigmoid(-2.0, 3.0),
    "sigmoid2": lambda: invops.Sigmoid2(),
    "expclamp": lambda: invops.ExpClamp(),
    "expclamp0.7": lambda: invops.ExpClamp(0.7),
}

# per-sample shapes with odd channel counts: dense, 1D, 2D, 3D
SAMPLE_SHAPES = {
    "dense": (3,),
    "1d": (5, 4),
    "2d": (3, 3, 2),
    "3d": (3, 2, 2, 2),
}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sample(module, shape, seed: int = 0) -> torch.Tensor:
    """Points in the domain AND the range of ``module`` (``check_*`` also invert them)."""
    g = _gen(seed)
    u = torch.rand(shape, generator=g, dtype=DT) * 0.9 + 0.05  # in (0.05, 0.95)
    if isinstance(module, invops.Sigmoid):
        return module.low + (module.high - module.low) * u
    if isinstance(module, invops.ExpClamp):
        return torch.exp(module.clamp * (2 * u - 1))
    # LeakyReLU: the whole real line; keep away from the kink at 0
    x = torch.randn(shape, generator=g, dtype=DT)
    return torch.where(x >= 0, x + 0.3, x - 0.3)


def domain_sample(shape, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    x = scale * torch.randn(shape, generator=_gen(seed), dtype=DT)
    return torch.where(x >= 0, x + 0.3, x - 0.3)


def _deriv(module, x):
    if isinstance(module, invops.LeakyReLU):
        return act.leaky_relu_derivative(x, module.slope)
    if isinstance(module, invops.Sigmoid):
        return act.sigmoid_derivative(x, module.low, module.high)
    return act.exp_clamp_derivative(x, module.clamp)


module_params = pytest.mark.parametrize("name", list(MODULES))
shape_params = pytest.mark.parametrize("layout", list(SAMPLE_SHAPES))
batch_params = pytest.mark.parametrize("batch", [1, 3])


# ============================================================================ invertible layers
@module_params
@shape_params
@batch_params
def test_invertible(name, layout, batch):
    m = MODULES[name]()
    x = sample(m, (batch, *SAMPLE_SHAPES[layout]))
    assert check_invertible(m, x, rtol=1e-10) <= 1e-10


@module_params
@shape_params
@batch_params
def test_against_autograd(name, layout, batch):
    m = MODULES[name]()
    x = sample(m, (batch, *SAMPLE_SHAPES[layout]))
    errors = check_against_autograd(m, x)
    assert "jvp:dlogdet" in errors and "backward_inverse:input" in errors


@module_params
def test_reversed_against_autograd(name):
    m = MODULES[name]().reverse()
    x = sample(m.reverse(), (2, 3, 4))
    check_against_autograd(m, x)
    check_invertible(m, x, rtol=1e-10)


@module_params
@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 2), (1, 3, 2, 2)])
def test_logdet_dense_jacobian(name, shape):
    m = MODULES[name]()
    check_logdet(m, domain_sample(shape, scale=1.0))
    check_logdet(m, sample(m, shape))


@module_params
def test_logdet_formula(name):
    m = MODULES[name]()
    x = domain_sample((3, 5, 2))
    _, logdet = m(x)
    ref = torch.log(_deriv(m, x).abs()).reshape(3, -1).sum(1)
    torch.testing.assert_close(logdet, ref, rtol=1e-12, atol=1e-12)
    _, logdet_inv = m.inverse(m(x)[0])
    torch.testing.assert_close(logdet_inv, -ref, rtol=1e-12, atol=1e-12)


@module_params
@pytest.mark.parametrize("wrt", ["input", "params", "both"])
@pytest.mark.parametrize("shape", [(1, 3), (3, 5, 2), (2, 3, 2, 2)])
def test_jacobian_dottest(name, wrt, shape):
    m = MODULES[name]()
    x = sample(m, shape)
    J = m.jacobian(x, wrt=wrt)
    n = x.numel()
    assert dottest(J, n_trials=2)
    if wrt == "params":
        # no parameters: an (n, 0) operator
        assert J.shape == (n, 0) and J.dims == (0,)
        np.testing.assert_array_equal(J.matvec(np.zeros(0)), np.zeros(n))
        assert J.rmatvec(np.ones(n)).shape == (0,)
        return
    assert J.shape == (n, n)
    # the Jacobian of an elementwise map is diag(f'(x))
    d = _deriv(m, x).reshape(-1).numpy()
    v = np.random.default_rng(1).standard_normal(n)
    np.testing.assert_allclose(J.matvec(v), d * v, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(J.rmatvec(v), d * v, rtol=1e-12, atol=1e-14)


@module_params
@pytest.mark.parametrize("shape", [(3, 3), (2, 5, 3, 2)])
def test_gradient_test_second_order(name, shape):
    m = MODULES[name]()
    x = domain_sample(shape, seed=2, scale=1.0)
    w = torch.randn(shape, generator=_gen(3), dtype=DT)
    c = torch.randn(shape[0], generator=_gen(4), dtype=DT)

    def phi(v):
        y, ld = m(v)
        return (w * y * y).sum() + (c * ld).sum()

    y, _ = m(x)
    grad, x_rec = m.backward(2 * w * y, y, dlogdet=c)
    torch.testing.assert_close(x_rec, x, rtol=1e-10, atol=1e-12)
    d = torch.randn(shape, generator=_gen(5), dtype=DT)
    _, rate1 = gradient_test(phi, x, grad, direction=d, h0=1e-2)
    assert abs(rate1 - 2) < 0.25
    # a wrong gradient must fail the test
    with pytest.raises(AssertionError):
        gradient_test(phi, x, 1.1 * grad, direction=d, h0=1e-2)


@module_params
def test_numpy_in_numpy_out(name):
    m = MODULES[name]()
    x_t = sample(m, (2, 3, 4))
    x = x_t.numpy().copy()
    x_before = x.copy()
    y, logdet = m(x)
    assert isinstance(y, np.ndarray) and isinstance(logdet, np.ndarray)
    assert y.dtype == np.float64 and logdet.shape == (2,)
    y_t, logdet_t = m(x_t)
    np.testing.assert_array_equal(y, y_t.numpy())
    np.testing.assert_array_equal(logdet, logdet_t.numpy())
    x_rec, logdet_inv = m.inverse(y)
    assert isinstance(x_rec, np.ndarray)
    np.testing.assert_allclose(x_rec, x, rtol=1e-12)
    dy = np.ones_like(y)
    dx, x_back = m.backward(dy, y, dlogdet=np.ones(2))
    assert isinstance(dx, np.ndarray) and isinstance(x_back, np.ndarray)
    dx2, dtheta, _ = m.vjp(dy, y)
    assert isinstance(dx2, np.ndarray) and dtheta == ()
    out = m.jvp(x, dx=np.ones_like(x))
    assert all(isinstance(o, np.ndarray) for o in out)
    np.testing.assert_array_equal(x, x_before)  # inputs are never mutated


@module_params
def test_float32(name):
    m = MODULES[name]()
    x = sample(m, (2, 3, 4)).float()
    check_invertible(m, x)
    check_against_autograd(m, x)


@module_params
def test_logdet_false(name):
    mod = MODULES[name]()
    mod_nold = MODULES[name]()
    mod_nold.logdet = False
    x = sample(mod, (2, 3))
    y = mod_nold(x)
    assert isinstance(y, torch.Tensor)
    torch.testing.assert_close(y, mod(x)[0])
    torch.testing.assert_close(mod_nold.inverse(y), x)
    check_against_autograd(mod_nold, x)


def test_logdet_false_constructor():
    for m in (
        invops.LeakyReLU(0.2, logdet=False),
        invops.Sigmoid(0.0, 1.0, logdet=False),
        invops.Sigmoid2(logdet=False),
        invops.ExpClamp(1.0, logdet=False),
    ):
        assert m.logdet is False
        assert isinstance(m(sample(m, (2, 3))), torch.Tensor)


def test_chain_of_activations():
    flow = invops.Chain(invops.LeakyReLU(0.3), invops.Sigmoid(-1.0, 1.0), invops.ExpClamp(1.5))
    # in the domain of every layer and, read backwards, in the range of every inverse
    x = torch.exp(1.2 * (torch.rand(3, 5, 2, generator=_gen(6), dtype=DT) - 0.5))
    check_invertible(flow, x, rtol=1e-10)
    check_against_autograd(flow, x)
    check_logdet(flow, x[:2, :, :1])


def test_constructor_validation():
    for bad in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="slope"):
            invops.LeakyReLU(bad)
    for low, high in ((1.0, 1.0), (2.0, 1.0), (0.0, float("inf"))):
        with pytest.raises(ValueError, match="low < high"):
            invops.Sigmoid(low, high)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="clamp"):
            invops.ExpClamp(bad)
    assert "slope=0.1" in repr(invops.LeakyReLU(0.1))
    assert "high=2.0" in repr(invops.Sigmoid(0.5, 2.0))


@pytest.mark.parametrize(
    "module, bad",
    [
        (invops.Sigmoid(), [0.5, 1.0]),
        (invops.Sigmoid(), [0.5, 0.0]),
        (invops.Sigmoid(), [0.5, 1.5]),
        (invops.Sigmoid(0.5, 1.0), [0.7, 0.25]),
        (invops.Sigmoid(), [0.5, float("nan")]),
        (invops.Sigmoid2(), [1.0, 2.0]),
        (invops.ExpClamp(2.0), [1.0, math.exp(2.0) + 1e-9]),
        (invops.ExpClamp(2.0), [1.0, 0.0]),
        (invops.ExpClamp(2.0), [1.0, -1.0]),
        (invops.ExpClamp(1.0), [1.0, math.exp(-1.0)]),
    ],
)
def test_inverse_outside_range_raises(module, bad):
    y = torch.tensor([bad], dtype=DT)
    with pytest.raises(ValueError, match=r"strictly inside \(") as info:
        module.inverse(y)
    assert type(module).__name__ in str(info.value)
    # the reverse pass also inverts, so it must raise as well, not return NaN
    with pytest.raises(ValueError, match="strictly inside"):
        module.backward(torch.ones_like(y), y)
    with pytest.raises(ValueError, match="strictly inside"):
        module.reverse()(y)


def test_inverse_range_message_names_range():
    with pytest.raises(ValueError, match=r"\(0\.5, 1\.0\)"):
        invops.Sigmoid(0.5, 1.0).inverse(torch.tensor([[0.2]], dtype=DT))
    with pytest.raises(ValueError, match=r"exp\(-2\.0\), exp\(2\.0\)"):
        invops.ExpClamp(2.0).inverse(torch.tensor([[10.0]], dtype=DT))


def test_wrong_rank_raises():
    for m in (invops.LeakyReLU(), invops.Sigmoid(), invops.ExpClamp()):
        with pytest.raises(ValueError, match="layout"):
            m(torch.ones(3, dtype=DT) * 0.5)
        with pytest.raises(ValueError, match="layout"):
            m(torch.ones(1, 1, 1, 1, 1, 2, dtype=DT) * 0.5)


def test_sigmoid_logdet_stable():
    m = invops.Sigmoid(0.5, 1.0)
    x = torch.tensor([[-800.0, 800.0, 0.0]], dtype=DT)
    _, logdet = m(x)
    assert torch.isfinite(logdet).all()
    ref = 3 * math.log(0.5) - 1600.0 + math.log(0.25)  # log sigma(+-800) ~ -800, 0 at x=0
    assert abs(float(logdet) - ref) < 1e-9


def test_exp_clamp_logdet_large_input():
    m = invops.ExpClamp(2.0)
    x = torch.tensor([[1e8, -1e8]], dtype=DT)
    _, logdet = m(x)
    assert torch.isfinite(logdet).all()


def test_layers_match_functions():
    x = domain_sample((4, 3, 2))
    torch.testing.assert_close(invops.LeakyReLU(0.2)(x)[0], act.leaky_relu(x, 0.2))
    torch.testing.assert_close(invops.Sigmoid(1.0, 4.0)(x)[0], act.sigmoid(x, 1.0, 4.0))
    torch.testing.assert_close(invops.Sigmoid2()(x)[0], 2 * torch.sigmoid(x))
    torch.testing.assert_close(invops.ExpClamp(0.5)(x)[0], act.exp_clamp(x, 0.5))


# ============================================================================ plain functions
FUNCS = [
    ("relu", act.relu, None, act.relu_derivative, {}),
    ("leaky", act.leaky_relu, act.leaky_relu_inv, act.leaky_relu_derivative, {}),
    ("leaky0.3", act.leaky_relu, act.leaky_relu_inv, act.leaky_relu_derivative, {"slope": 0.3}),
    ("leaky3", act.leaky_relu, act.leaky_relu_inv, act.leaky_relu_derivative, {"slope": 3.0}),
    ("sigmoid", act.sigmoid, act.sigmoid_inv, act.sigmoid_derivative, {}),
    (
        "sigmoid(-1,4)",
        act.sigmoid,
        act.sigmoid_inv,
        act.sigmoid_derivative,
        {"low": -1.0, "high": 4.0},
    ),
    ("expclamp", act.exp_clamp, act.exp_clamp_inv, act.exp_clamp_derivative, {}),
    (
        "expclamp0.3",
        act.exp_clamp,
        act.exp_clamp_inv,
        act.exp_clamp_derivative,
        {"clamp": 0.3},
    ),
]
func_params = pytest.mark.parametrize(
    "f, f_inv, df, kw", [t[1:] for t in FUNCS], ids=[t[0] for t in FUNCS]
)


@func_params
def test_derivative_matches_autograd(f, f_inv, df, kw):
    x = domain_sample((3, 4, 5)).requires_grad_()
    (g,) = torch.autograd.grad(f(x, **kw).sum(), x)
    torch.testing.assert_close(df(x.detach(), **kw), g, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize(
    "f, f_inv, df, kw",
    [t[1:] for t in FUNCS if t[2] is not None],
    ids=[t[0] for t in FUNCS if t[2] is not None],
)
def test_function_inverse(f, f_inv, df, kw):
    x = domain_sample((3, 4, 5), scale=1.5)
    y = f(x, **kw)
    torch.testing.assert_close(f_inv(y, **kw), x, rtol=1e-10, atol=1e-12)
    # the inverse's derivative is the reciprocal of the forward's (consistency of all three)
    y_r = y.clone().requires_grad_()
    (g,) = torch.autograd.grad(f_inv(y_r, **kw).sum(), y_r)
    torch.testing.assert_close(g, 1 / df(x, **kw), rtol=1e-9, atol=1e-12)


def test_function_values():
    x = torch.tensor([-2.0, -0.5, 0.0, 1.5], dtype=DT)
    assert act.relu(x).tolist() == [0.0, 0.0, 0.0, 1.5]
    assert act.relu_derivative(x).tolist() == [0.0, 0.0, 0.0, 1.0]
    assert act.leaky_relu(x, 0.5).tolist() == [-1.0, -0.25, 0.0, 1.5]
    assert act.leaky_relu_derivative(x, 0.5).tolist() == [0.5, 0.5, 0.5, 1.0]
    assert act.leaky_relu_inv(torch.tensor([-1.0, 2.0]), 0.5).tolist() == [-2.0, 2.0]
    torch.testing.assert_close(act.sigmoid(x, 1.0, 3.0), 1.0 + 2.0 * torch.sigmoid(x))
    torch.testing.assert_close(act.sigmoid(x), torch.sigmoid(x))
    torch.testing.assert_close(
        act.sigmoid_inv(torch.tensor([0.75], dtype=DT), 0.5, 1.0), torch.tensor([0.0], dtype=DT)
    )


@pytest.mark.parametrize("clamp", [0.5, 2.0, 3.0])
def test_exp_clamp_constants(clamp):
    # atan(1) = pi/4, so f(1) = exp(c/2); f(0) = 1, f'(0) = 2c/pi; range (e^-c, e^c).
    # The reference's ExpClamp breaks the first identity between forward and inverse.
    one = torch.tensor([1.0], dtype=DT)
    torch.testing.assert_close(act.exp_clamp(one, clamp), torch.exp(one * clamp / 2))
    torch.testing.assert_close(act.exp_clamp_inv(torch.exp(one * clamp / 2), clamp), one)
    zero = torch.zeros(1, dtype=DT)
    assert float(act.exp_clamp(zero, clamp)) == 1.0
    assert abs(float(act.exp_clamp_derivative(zero, clamp)) - 2 * clamp / math.pi) < 1e-15
    big = torch.tensor([-1e12, 1e12], dtype=DT)
    y = act.exp_clamp(big, clamp)
    assert float(y[0]) > math.exp(-clamp) * (1 - 1e-9) and float(y[1]) < math.exp(clamp)


def test_sigmoid_inv_raises_outside_range():
    for bad in ([0.0], [1.0], [-0.1], [1.2], [float("nan")]):
        with pytest.raises(ValueError, match=r"\(0\.0, 1\.0\)"):
            act.sigmoid_inv(torch.tensor(bad, dtype=DT))
    with pytest.raises(ValueError, match=r"\(0\.5, 1\.0\)"):
        act.sigmoid_inv(torch.tensor([0.3], dtype=DT), low=0.5, high=1.0)
    with pytest.raises(ValueError, match="low < high"):
        act.sigmoid(torch.zeros(2), low=1.0, high=0.0)
    with pytest.raises(ValueError, match="low < high"):
        act.sigmoid_inv(torch.full((2,), 0.5), low=1.0, high=1.0)


def test_exp_clamp_inv_raises_outside_range():
    for bad in ([0.0], [-1.0], [math.exp(2.0)], [math.exp(-2.5)], [float("nan")]):
        with pytest.raises(ValueError, match="strictly inside"):
            act.exp_clamp_inv(torch.tensor(bad, dtype=DT), clamp=2.0)
    with pytest.raises(ValueError, match="clamp"):
        act.exp_clamp(torch.zeros(2), clamp=0.0)


def test_leaky_relu_inv_rejects_bad_slope():
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="slope"):
            act.leaky_relu_inv(torch.zeros(2), slope=bad)


def test_functions_reject_non_tensors():
    with pytest.raises(TypeError, match="torch.Tensor"):
        act.relu(np.zeros(3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        act.galu([1.0, 2.0])


def test_galu_values_and_errors():
    x = torch.randn(2, 6, 3, generator=_gen(7), dtype=DT)
    y = act.galu(x)
    assert y.shape == (2, 3, 3)
    torch.testing.assert_close(y, x[:, :3] * torch.sigmoid(x[:, 3:]))
    torch.testing.assert_close(act.galu(torch.tensor([[3.0, 0.0]])), torch.tensor([[1.5]]))
    for bad in (torch.zeros(2, 3), torch.zeros(2, 5, 4), torch.zeros(4)):
        with pytest.raises(ValueError, match="even number of channels"):
            act.galu(bad)
    with pytest.raises(ValueError, match="even number of channels"):
        invops.GaLU()(torch.zeros(1, 3, 2))


# ============================================================================ blocks
BLOCK_CASES = [
    ("relu-dense", invops.ReLU, (3, 5)),
    ("relu-2d", invops.ReLU, (2, 3, 4, 3)),
    ("relu-3d", invops.ReLU, (1, 3, 2, 2, 2)),
    ("galu-dense", invops.GaLU, (3, 4)),
    ("galu-1d", invops.GaLU, (2, 6, 5)),
    ("galu-2d", invops.GaLU, (1, 2, 3, 3)),
]


@pytest.mark.parametrize(
    "cls, shape", [c[1:] for c in BLOCK_CASES], ids=[c[0] for c in BLOCK_CASES]
)
def test_block_derivatives(cls, shape):
    block = cls()
    assert isinstance(block, invops.Block) and not isinstance(block, invops.InvertibleModule)
    x = domain_sample(shape, seed=8, scale=1.0)
    y = block(x)
    dy = torch.randn(y.shape, generator=_gen(9), dtype=DT)
    x_r = x.clone().requires_grad_()
    (ref,) = torch.autograd.grad(block(x_r), x_r, dy)

    torch.testing.assert_close(block.backward(dy, x), ref, rtol=1e-13, atol=1e-15)
    dx, dtheta = block.vjp(dy, x)
    torch.testing.assert_close(dx, ref, rtol=1e-13, atol=1e-15)
    assert dtheta == ()

    v = torch.randn(shape, generator=_gen(10), dtype=DT)
    y_j, dy_j = block.jvp(x, dx=v)
    y_ref, dy_ref = torch.func.jvp(block._forward, (x,), (v,))
    torch.testing.assert_close(y_j, y_ref)
    torch.testing.assert_close(dy_j, dy_ref, rtol=1e-13, atol=1e-15)
    # adjointness of jvp and vjp: <J v, w> = <v, J^T w>
    lhs = float((dy_j * dy).sum())
    rhs = float((v * dx).sum())
    assert abs(lhs - rhs) <= 1e-12 * max(abs(lhs), 1.0)


def test_relu_block_backward_hand():
    x = torch.tensor([[-1.0, 2.0, -3.0, 0.5]], dtype=DT)
    dy = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=DT)
    assert invops.ReLU().backward(dy, x).tolist() == [[0.0, 2.0, 0.0, 4.0]]


def test_galu_block_backward_hand():
    x1 = torch.tensor([[0.7, -1.2]], dtype=DT)
    x2 = torch.tensor([[0.3, 2.0]], dtype=DT)
    x = torch.cat([x1, x2], dim=1)
    dy = torch.tensor([[1.5, -0.5]], dtype=DT)
    s = torch.sigmoid(x2)
    ref = torch.cat([dy * s, dy * x1 * s * (1 - s)], dim=1)
    torch.testing.assert_close(invops.GaLU().backward(dy, x), ref)


@module_params
@pytest.mark.parametrize("wrt", ["input", "params", "both"])
def test_float32_jacobian_dottest(name, wrt):
    m = MODULES[name]()
    x = sample(m, (2, 3, 4)).float()
    assert dottest(m.jacobian(x, wrt=wrt), rtol=1e-4, n_trials=3)
