"""The i-RIM's proximal iteration: ``NetworkLoop(type="proximal")``.

Each iteration takes a gradient step on the data fit, ``z = eta - tau g``, and updates a damped
velocity ``v <- S(a) v + (z - eta) + t`` from a full-resolution conditioner ``(a, t) = R(z)``
(an affine coupling of ``v`` conditioned on ``eta``), then ``eta <- eta + w v`` (an additive
coupling of ``eta`` conditioned on ``v``). It must keep the loop's whole contract, with the
data ``d`` differentiated too, and start as the heavy-ball method it generalises.
"""

from __future__ import annotations

import numpy as np
import pylops
import pytest
import torch
from conftest import randomize_parameters
from test_irim import (
    H0,
    cotangents_of,
    loss_of,
    make_inputs,
    make_physics,
    memory_free_grads,
    parameter_taylor_test,
    rel,
)

import invops
from invops import NetworkLoop
from invops.layers.laws import bounded_scale
from invops.operators import as_operator
from invops.testing import check_against_autograd, check_invertible, dottest, gradient_test

pytestmark = pytest.mark.usefixtures("one_thread")

N = 8
CONFIGS = {
    "steepest": dict(init="steepest"),
    "tied": dict(tied=True),
}


def _loop(J, eta, s, d, maxiter=3, **options) -> NetworkLoop:
    torch.manual_seed(0)
    loop = NetworkLoop(2, 4, maxiter=maxiter, link="softplus", type="proximal", **options)
    loop = loop.double()
    randomize_parameters(loop, 0.1)
    return loop


@pytest.fixture(params=list(CONFIGS))
def setup(request):
    J, _, ds = make_physics("pylops")
    eta, s, d = make_inputs(ds)
    s = s[:, :1]  # one velocity channel per model channel
    options = CONFIGS[request.param]
    return J, eta, s, d, _loop(J, eta, s, d, **options), options


def test_contract_with_the_data(setup):
    J, eta, s, d, loop, _ = setup
    bound, x = loop.bind(J), torch.cat((eta, s), 1)
    check_invertible(bound, x, d)
    errors = check_against_autograd(bound, x, d, rtol=1e-8, jvp_oracle="forward_ad")
    assert errors["backward:cond0"] <= 1e-8
    for wrt in ("input", "params", "both"):
        assert dottest(loop.jacobian(eta, s, d, J, wrt=wrt), rtol=1e-10)


def test_taylor_in_every_input_and_the_parameters(setup):
    """With SiLU conditioners: a ReLU's kinks, crossed by the larger Taylor steps, spoil the
    second-order rate that the test reads (the derivatives themselves are exact either way)."""
    J, eta, s, d, _, options = setup
    loop = _loop(J, eta, s, d, activation=torch.nn.functional.silu, **options)
    w = torch.randn_like(eta)
    (deta, ds, dd, *_), _ = memory_free_grads(loop, J, eta, s, d, w)

    def f(eta_, s_, d_):
        return loss_of(*loop(eta_, s_, d_, J), w)

    gradient_test(f, [eta, s, d], [deta, ds, dd], h0=H0)
    only_d = [torch.zeros_like(eta), torch.zeros_like(s), torch.randn_like(d)]
    with pytest.raises(AssertionError, match="convergence rates"):  # the test has teeth
        gradient_test(f, [eta, s, d], [deta, ds, 1.1 * dd], direction=only_d, h0=H0)

    with torch.no_grad():
        eta_out, s_out = loop(eta, s, d, J)
    *_, dtheta, _, _, _ = loop.vjp(*cotangents_of(eta_out, s_out, w), eta_out, s_out, d, J)
    parameter_taylor_test(loop, J, eta, s, d, w, dtheta)


def test_a_fresh_loop_is_the_heavy_ball_method():
    """Conditioners start at zero: gradient steps of size ``step_size`` with momentum
    ``S(-3)``, the damping of the gate's first offset."""
    J, _, ds = make_physics("matrix")
    eta, s, d = make_inputs(ds)
    v = torch.zeros_like(eta)
    loop = NetworkLoop(2, 4, maxiter=3, type="proximal", step_size=0.25).double()
    with torch.no_grad():
        got_eta, got_v = loop(eta, v, d, J)
    momentum = float(bounded_scale(torch.tensor(-3.0, dtype=torch.float64), 0.5, 2.0)[0])
    assert abs(momentum - 0.5364) < 1e-4  # the damping the docs state
    op = as_operator(J)
    for _ in range(3):
        grad = op.adjoint(op.apply(eta[:, 0]) - d).reshape(eta.shape)
        v = momentum * v - 0.25 * grad
        eta = eta + v
    assert rel(got_eta, eta) < 1e-12 and rel(got_v, v) < 1e-12


def test_tied_proximal_loop_shares_its_conditioner():
    loop = NetworkLoop(2, 6, maxiter=4, type="proximal", tied=True)
    steps = [m.subnet for m in loop.steps.layers if hasattr(m.subnet, "conditioner")]
    assert len(steps) == 4
    assert all(step.conditioner is steps[0].conditioner for step in steps)
    assert len({id(step.step) for step in steps}) == 4  # each iteration its own step size
    untied = NetworkLoop(2, 6, maxiter=4, type="proximal")
    shared = sum(p.numel() for p in steps[0].conditioner.parameters())
    assert (
        sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in loop.parameters())
        == 3 * shared
    )


def test_complex_model_under_mri():
    J = pylops.medical.MRI2D((N, N), mask="vertical-reg", nlines=4, perc_center=0.0)
    ds = tuple(int(n) for n in J.dimsd)
    eta, s, d = make_inputs(ds, complex_data=True)
    eta, s = torch.cat((eta, eta), 1), s
    torch.manual_seed(0)
    loop = NetworkLoop(4, 4, maxiter=2, n_model=2, complex_model=True, type="proximal").double()
    randomize_parameters(loop, 0.1)
    bound, x = loop.bind(J), torch.cat((eta, s), 1)
    check_invertible(bound, x, d)
    errors = check_against_autograd(bound, x, d, rtol=1e-8, jvp_oracle="forward_ad")
    assert errors["backward:cond0"] <= 1e-8
    for wrt in ("input", "params"):
        assert dottest(loop.jacobian(eta, s, d, J, wrt=wrt), rtol=1e-10)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(n_in=3), ValueError, r"type='proximal' .* n_in must be 2 \* n_model = 2"),
        (dict(step_size="1"), TypeError, "step_size must be a real number"),
        (dict(type="gradient"), ValueError, "type must be one of"),
    ],
)
def test_constructor_errors(kwargs, error, match):
    options = dict(n_in=2, type="proximal") | kwargs
    with pytest.raises(error, match=match):
        NetworkLoop(options.pop("n_in"), 4, maxiter=2, **options)


def test_default_conditioner_is_full_resolution_relu():
    loop = NetworkLoop(2, 5, maxiter=1, type="proximal")
    conditioner = loop.steps.layers[0].subnet.conditioner
    assert isinstance(conditioner, invops.ResidualBlock)
    assert conditioner.W1.shape[-2:] == (3, 3) and conditioner.s1 == 1
    assert conditioner.activation is torch.nn.functional.relu
    x = torch.randn(1, 1, 4, 4)
    assert conditioner(x).shape == (1, 2, 4, 4)  # works at any size, no downsampling


def test_physical_model_and_input_errors():
    loop = NetworkLoop(2, 4, maxiter=2, link="softplus", type="proximal").double()
    eta = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    assert rel(loop.physical_model(eta), torch.nn.functional.softplus(eta[:, 0])) < 1e-15
    with pytest.raises(TypeError, match=r"without tied=True\): needs several conditioners"):
        NetworkLoop(2, 4, maxiter=2, type="proximal", subnet=torch.nn.Conv2d(1, 2, 3, padding=1))
    one = NetworkLoop(2, 4, maxiter=2, type="proximal", tied=True, subnet=torch.nn.Conv2d(1, 3, 1))
    J, _, ds = make_physics("matrix")
    eta, s, d = make_inputs(ds)
    with pytest.raises(ValueError, match=r"must return 2 \* n_model = 2 channels"):
        one.double()(eta, s[:, :1], d, J)
    for bad, error in ((0.0, ValueError), (float("nan"), ValueError), ("1", TypeError)):
        with pytest.raises(error, match="step_size must be"):
            NetworkLoop(2, 4, maxiter=2, type="proximal", step_size=bad)
    with pytest.raises(ValueError, match="step_size is the proximal iteration's"):
        NetworkLoop(3, 4, maxiter=2, step_size=0.5)


@pytest.mark.parametrize("shape", [(6,), (2, 3, 2)], ids=["1d", "3d"])
def test_one_and_three_dimensional_models_with_one_operator_per_sample(shape):
    rng = np.random.default_rng(2)
    n = int(np.prod(shape))
    J = [
        as_operator(pylops.MatrixMult(rng.standard_normal((5, n))), model_shape=shape)
        for _ in range(2)
    ]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, *shape, generator=gen, dtype=torch.float64)
    d = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    torch.manual_seed(0)
    loop = NetworkLoop(2, 3, maxiter=2, type="proximal", ndim=len(shape), init="adjoint")
    loop = loop.double()
    randomize_parameters(loop, 0.1)
    bound = loop.bind(J)
    check_invertible(bound, x, d)
    errors = check_against_autograd(bound, x, d, rtol=1e-8, jvp_oracle="forward_ad")
    assert errors["backward:cond0"] <= 1e-8
    assert dottest(loop.jacobian(x[:, :1], x[:, 1:], d, J, wrt="both"), rtol=1e-10)
