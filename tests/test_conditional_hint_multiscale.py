"""NetworkMultiScaleConditionalHINT: the operator contract, both lanes, bad input."""

import pytest
import torch
from conftest import randomize_parameters

import invops
from invops.testing import check_against_autograd, check_invertible, check_logdet, dottest

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


CASES = {
    "2d-split": (dict(n_in=1, n_cond=1, L=2, K=1, split_scales=True), (2, 1, 4, 4), (2, 1, 4, 4)),
    "2d-haar-nosplit": (
        dict(n_in=1, n_cond=2, L=2, K=1, squeeze="haar", permute=False),
        (1, 1, 4, 4),
        (1, 2, 4, 4),
    ),
    "1d-split-odd": (
        dict(n_in=3, n_cond=1, L=2, K=2, split_scales=True, ndim=1),
        (3, 3, 4),
        (3, 1, 4),
    ),
    "3d": (dict(n_in=1, n_cond=1, L=1, K=1, ndim=3), (1, 1, 2, 2, 2), (1, 1, 2, 2, 2)),
    "dense-split": (dict(n_in=5, n_cond=4, L=2, K=1, split_scales=True, ndim=0), (3, 5), (3, 4)),
}


def build(name):
    kwargs, xs, ys = CASES[name]
    net = invops.NetworkMultiScaleConditionalHINT(n_hidden=3, **kwargs).double()
    x, y = torch.randn(*xs, dtype=F64), torch.randn(*ys, dtype=F64)
    net(x, y)
    net.forward_y(y)
    randomize_parameters(net, 0.2)
    return net, x, y


@pytest.mark.parametrize("name", CASES)
def test_contract(name):
    net, x, y = build(name)
    assert check_invertible(net, x, y) <= 1e-9
    errors = check_against_autograd(net, x, y, rtol=1e-8)
    assert "backward:cond0" in errors and "backward_inverse:cond0" in errors
    check_logdet(net, x, y, rtol=1e-9)
    for wrt in ("input", "params", "both"):
        assert dottest(net.jacobian(x, y, wrt=wrt), rtol=1e-10, n_trials=2)


@pytest.mark.parametrize("name", ["2d-split", "dense-split"])
def test_condition_lane_and_joint_logdet(name):
    net, x, y = build(name)
    zy, logdet_y = net.forward_y(y)
    assert zy.shape == y.shape
    torch.testing.assert_close(net.inverse_y(zy)[0], y)
    n_x = x[0].numel()

    def joint(v):
        xv = v[:n_x].reshape(1, *x.shape[1:])
        yv = v[n_x:].reshape(1, *y.shape[1:])
        zx, _ = net._forward(xv, yv)
        zyv, _ = net.y_lane._forward(yv)
        return torch.cat((zx.reshape(-1), zyv.reshape(-1)))

    v = torch.cat((x[0].reshape(-1), y[0].reshape(-1)))
    _, ref = torch.linalg.slogdet(torch.autograd.functional.jacobian(joint, v))
    with torch.no_grad():
        total = net(x[:1], y[:1])[1] + net.forward_y(y[:1])[1]
    assert abs(float(total) - float(ref)) <= 1e-9 * max(1.0, abs(float(ref)))


def test_bridge_equals_explicit_backward():
    net, x, y = build("2d-split")
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    zx, logdet = net(xr, yr)
    (0.5 * (zx**2).sum() - logdet.sum()).backward()
    bridge = [xr.grad, yr.grad] + [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    with torch.no_grad():
        zx, _ = net(x, y)
    dx, _, dy = net.backward(zx, zx, y, dlogdet=-1.0)
    explicit = [dx, dy] + [p.grad for p in net.parameters()]
    for a, b in zip(bridge, explicit):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_bad_input():
    net, x, y = build("2d-split")
    with pytest.raises(ValueError, match=r"multiple of 2\*\*L = 4"):
        net(torch.randn(2, 1, 6, 4, dtype=F64), torch.randn(2, 1, 6, 4, dtype=F64))
    with pytest.raises(ValueError, match=r"cond\[0\].*must have shape \(2, 1, 4, 4\)"):
        net(x, torch.randn(2, 2, 4, 4, dtype=F64))
    with pytest.raises(TypeError, match="condition argument"):
        net(x)
    with pytest.raises(ValueError, match="HINT needs 2"):
        invops.NetworkMultiScaleConditionalHINT(2, 2, 3, L=3, K=1, split_scales=True, ndim=0)
