"""The i-RIM's start from the data, tied conditioners, and physics objects as operators.

``NetworkLoop(init=...)`` adds a start :math:`\\eta_0(d)` to the state (``"adjoint"``:
:math:`w J^H d`; ``"steepest"``: the exact line search along :math:`J^H d`; or a callable), and
``tied=True`` shares one set of conditioner weights between the iterations. Both must keep the
loop's whole contract, with the data ``d`` differentiated too. Physics objects with ``A`` and
``A_adjoint`` (deepinv's ``LinearPhysics``, duck-typed) are operators like any other.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pylops
import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_parameters
from test_irim import (
    F64,
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
from invops.operators import as_operator
from invops.testing import check_against_autograd, check_invertible, dottest, gradient_test

pytestmark = pytest.mark.usefixtures("one_thread")

N = 8


def _loop(J, eta, s, d, **options) -> NetworkLoop:
    torch.manual_seed(0)
    loop = NetworkLoop(3, 4, maxiter=3, link="softplus", **options).double()
    with torch.no_grad():
        loop(eta, s, d, J)  # data-dependent (ActNorm) initialisation
    randomize_parameters(loop, 0.1)
    return loop


CONFIGS = {
    "adjoint": dict(init="adjoint"),
    "steepest": dict(init="steepest"),
    "steepest-tied": dict(init="steepest", tied=True),
    "zero-tied-hint": dict(tied=True, type="hint"),
}


@pytest.fixture(params=list(CONFIGS))
def setup(request):
    J, _, ds = make_physics("pylops")
    eta, s, d = make_inputs(ds)
    return J, eta, s, d, _loop(J, eta, s, d, **CONFIGS[request.param])


# ------------------------------------------------------------------------------ the contract
def test_contract_with_the_data(setup):
    J, eta, s, d, loop = setup
    bound, x = loop.bind(J), torch.cat((eta, s), 1)
    check_invertible(bound, x, d)
    errors = check_against_autograd(bound, x, d, rtol=1e-8, jvp_oracle="forward_ad")
    assert errors["backward:cond0"] <= 1e-8
    for wrt in ("input", "params", "both"):
        assert dottest(loop.jacobian(eta, s, d, J, wrt=wrt), rtol=1e-10)


def test_taylor_in_every_input_and_the_parameters(setup):
    J, eta, s, d, loop = setup
    w = torch.randn_like(eta)
    (deta, ds, dd, *_), _ = memory_free_grads(loop, J, eta, s, d, w)

    def f(eta_, s_, d_):
        return loss_of(*loop(eta_, s_, d_, J), w)

    gradient_test(f, [eta, s, d], [deta, ds, dd], h0=H0)
    only_d = [torch.zeros_like(eta), torch.zeros_like(s), torch.randn_like(d)]
    gradient_test(f, [eta, s, d], [deta, ds, dd], direction=only_d, h0=H0)
    with pytest.raises(AssertionError, match="convergence rates"):  # the test has teeth
        gradient_test(f, [eta, s, d], [deta, ds, 1.1 * dd], direction=only_d, h0=H0)

    with torch.no_grad():
        eta_out, s_out = loop(eta, s, d, J)
    *_, dtheta, _, _, _ = loop.vjp(*cotangents_of(eta_out, s_out, w), eta_out, s_out, d, J)
    parameter_taylor_test(loop, J, eta, s, d, w, dtheta)


# ------------------------------------------------------------------------------ the starts
def test_adjoint_start_is_the_scaled_adjoint():
    J, _, ds = make_physics("pylops")
    eta, s, d = make_inputs(ds)
    loop = NetworkLoop(3, 4, maxiter=1, init="adjoint").double()
    start = loop.steps.layers[0]
    with torch.no_grad():
        start.subnet.weight.fill_(0.7)
        x = torch.cat((torch.zeros_like(eta), s), 1)
        with invops.networks.irim._bound(as_operator(J)):
            y = start._forward(x, d)[0]
    atd = as_operator(J).adjoint(d).reshape(eta.shape)
    assert rel(y[:, :1], 0.7 * atd) < 1e-12
    assert torch.equal(y[:, 1:], s)  # the memory is not touched


def test_steepest_start_is_the_exact_line_search():
    J, _, ds = make_physics("matrix")
    eta, s, d = make_inputs(ds)
    loop = NetworkLoop(3, 4, maxiter=1, init="steepest").double()
    start = loop.steps.layers[0]
    with torch.no_grad(), invops.networks.irim._bound(J):
        y = start._forward(torch.cat((torch.zeros_like(eta), s), 1), d)[0][:, 0]
    # the residual is orthogonal to J applied to the search direction: the misfit is minimal
    direction = J.adjoint(d)
    residual = J.apply(y) - d
    along = J.apply(direction)
    for i in range(d.shape[0]):
        assert abs(float(residual[i] @ along[i])) < 1e-12 * float(along[i].norm() * d[i].norm())
    # and it improves on the zero start
    assert bool((residual.norm(dim=1) < d.norm(dim=1)).all())


def test_callable_start_is_differentiated():
    J, _, ds = make_physics("callables")
    eta, s, d = make_inputs(ds)

    def init(d, A, A_adjoint):  # two steps of Landweber iteration from zero
        m = 0.5 * A_adjoint(d)
        m = m - 0.5 * A_adjoint(A(m) - d)
        return m[:, None]

    loop = _loop(J, eta, s, d, init=init)
    errors = check_against_autograd(
        loop.bind(J), torch.cat((eta, s), 1), d, rtol=1e-8, jvp_oracle="forward_ad"
    )
    assert errors["backward:cond0"] <= 1e-8
    with pytest.raises(ValueError, match=r"init\(d, A, A_adjoint\) must return"):
        bad = NetworkLoop(3, 4, maxiter=1, init=lambda d, A, AH: AH(d)).double()
        bad(eta, s, d, J)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(init="lsq"), ValueError, "init must be one of"),
        (dict(init=3), ValueError, "init must be one of"),
        (dict(tied=1), TypeError, "tied must be a bool"),
    ],
)
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        NetworkLoop(3, 4, maxiter=2, **kwargs)


def test_start_works_for_a_complex_model():
    J = pylops.medical.MRI2D((N, N), mask="vertical-reg", nlines=4, perc_center=0.0)
    ds = tuple(int(n) for n in J.dimsd)
    eta, s, d = make_inputs(ds, complex_data=True)
    eta = torch.cat((eta, eta), 1)
    torch.manual_seed(0)
    loop = NetworkLoop(4, 4, maxiter=2, n_model=2, complex_model=True, init="steepest")
    loop = loop.double()
    with torch.no_grad():
        loop(eta, s, d, J)
    randomize_parameters(loop, 0.1)
    errors = check_against_autograd(
        loop.bind(J), torch.cat((eta, s), 1), d, rtol=1e-8, jvp_oracle="forward_ad"
    )
    assert errors["backward:cond0"] <= 1e-8


# ------------------------------------------------------------------------------ tied weights
def test_tied_gradients_are_the_sums_of_the_untied_ones():
    """The tied loop is the untied loop with equal conditioners; its gradient is their sum."""
    J, _, ds = make_physics("pylops")
    eta, s, d = make_inputs(ds)
    tied = _loop(J, eta, s, d, tied=True)
    untied = NetworkLoop(3, 4, maxiter=3, link="softplus").double()
    shared = tied.steps.layers[1].coupling.subnet
    for layer, source in zip(untied.steps.layers, tied.steps.layers):
        layer.load_state_dict(source.state_dict())  # each iteration: a copy of the shared weights
    n_shared = sum(p.numel() for p in shared.parameters())
    n_tied, n_untied = (sum(p.numel() for p in m.parameters()) for m in (tied, untied))
    assert n_untied - n_tied == 2 * n_shared  # three iterations, one set of weights
    with torch.no_grad():
        assert rel(untied(eta, s, d, J)[0], tied(eta, s, d, J)[0]) < 1e-14
    w = torch.randn_like(eta)
    tied_grads = dict(zip(tied.parameters(), memory_free_grads(tied, J, eta, s, d, w)[0][3:]))
    untied_grads = memory_free_grads(untied, J, eta, s, d, w)[0][3:]
    untied_by_param = dict(zip(untied.parameters(), untied_grads))
    copies = [list(m.coupling.subnet.parameters()) for m in untied.steps.layers[1::2]]
    for j, p in enumerate(shared.parameters()):
        summed = sum(untied_by_param[params[j]] for params in copies)
        assert rel(tied_grads[p], summed) < 1e-12
    # and plain autograd of the tied model agrees with the memory-free pass
    leaves = [t.clone().requires_grad_() for t in (eta, s, d)]
    with invops.plain_autograd():
        plain = torch.autograd.grad(loss_of(*tied(*leaves, J), w), list(tied.parameters()))
    for p, g in zip(tied.parameters(), plain):
        assert rel(tied_grads[p], g) < 1e-10


def test_tied_loop_shares_conditioners_and_keeps_its_own_normalisations():
    loop = NetworkLoop(4, 6, maxiter=4, tied=True, type="hint")
    couplings = [m for m in loop.steps.layers[1::2]]
    first = [id(m) for m in couplings[0].modules() if isinstance(m, invops.ResidualBlock)]
    assert first
    for step in couplings[1:]:
        assert [id(m) for m in step.modules() if isinstance(m, invops.ResidualBlock)] == first
    data_fits = {id(m.subnet.normalize) for m in loop.steps.layers[0::2]}
    assert len(data_fits) == 4
    state = loop.state_dict()
    clone = NetworkLoop(4, 6, maxiter=4, tied=True, type="hint")
    clone.load_state_dict(state)  # a checkpoint of a tied loop loads into a tied loop


# ------------------------------------------------------------------------------ physics objects
class BlurPhysics(torch.nn.Module):
    """A deepinv-like linear physics: ``A``/``A_adjoint`` on ``(B, C, H, W)`` images, a float32
    filter buffer (deepinv's convention), no dependency on deepinv."""

    def __init__(self, kernel: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("filter", torch.as_tensor(kernel, dtype=torch.float32)[None, None])

    def A(self, x):
        return F.conv2d(x, self.filter.expand(x.shape[1], 1, -1, -1), padding=1, groups=x.shape[1])

    def A_adjoint(self, y):
        weight = self.filter.expand(y.shape[1], 1, -1, -1)
        return F.conv_transpose2d(y, weight, padding=1, groups=y.shape[1])


def _kernel():
    return np.random.default_rng(11).standard_normal((3, 3)) / 3


def test_physics_object_in_every_mode():
    physics = BlurPhysics(_kernel())
    before = physics.filter.clone()
    eta, s, _ = make_inputs((N, N))
    d = torch.randn(2, 1, N, N, dtype=F64)  # deepinv's data keep their channel axis
    loop = _loop(physics, eta, s, d, init="adjoint")
    bound, x = loop.bind(physics), torch.cat((eta, s), 1)
    check_invertible(bound, x, d)
    errors = check_against_autograd(bound, x, d, rtol=1e-8, jvp_oracle="forward_ad")
    assert errors["backward:cond0"] <= 1e-8
    for wrt in ("input", "params", "both"):
        assert dottest(loop.jacobian(eta, s, d, physics, wrt=wrt), rtol=1e-10)
    # the float32 filter was matched to the float64 loop on a copy; the physics is unchanged
    assert physics.filter.dtype == torch.float32 and torch.equal(physics.filter, before)
    # the same numbers as the operator given as a pair of callables at float64
    k64 = torch.as_tensor(_kernel())[None, None]
    pair = (
        lambda m: F.conv2d(m[:, None], k64.to(m), padding=1),
        lambda r: F.conv_transpose2d(r, k64.to(r), padding=1)[:, 0],
    )
    with torch.no_grad():
        ref = loop(eta, s, d, pair)
        got = loop(eta, s, d, physics)
    assert rel(got[0], ref[0]) < 1e-6  # the filter itself is float32


def test_physics_object_operator_dottest_and_errors():
    physics = BlurPhysics(_kernel())
    op = as_operator(physics, model_shape=(N, N), data_shape=(1, N, N), ndim=2)
    assert op.name == "BlurPhysics" and not op.is_complex
    m = torch.randn(3, N, N, dtype=F64)
    assert op.apply(m).shape == (3, 1, N, N) and op.apply(m).dtype == F64
    assert op.adjoint(torch.randn(3, 1, N, N, dtype=F64)).shape == (3, N, N)
    assert invops.testing.dottest(op, rtol=1e-10)  # float64 throughout, after the cast

    class Plain:  # not a torch module: it cannot be cast, so a precision mismatch is an error
        kernel = torch.as_tensor(_kernel(), dtype=torch.float32)[None, None]

        def A(self, x):
            return F.conv2d(x.to(self.kernel.dtype), self.kernel, padding=1)

        def A_adjoint(self, y):
            return F.conv_transpose2d(y.to(self.kernel.dtype), self.kernel, padding=1)

    with pytest.raises(TypeError, match=r"Plain: its A returned torch.float32 for a"):
        as_operator(Plain(), ndim=2).apply(m)

    class ComplexPhysics(torch.nn.Module):  # a complex buffer: flagged complex
        def __init__(self):
            super().__init__()
            self.register_buffer("phase", torch.exp(1j * torch.linspace(0, 1, N * N)))

        def A(self, x):
            return x.reshape(x.shape[0], 1, -1) * self.phase

        def A_adjoint(self, y):
            return (y * self.phase.conj()).reshape(y.shape[0], 1, N, N)

    cop = as_operator(ComplexPhysics(), ndim=2)
    assert cop.is_complex
    loop = NetworkLoop(3, 4, maxiter=1).double()
    eta, s, _ = make_inputs((N, N))
    with pytest.raises(TypeError, match="ComplexPhysics is complex, so the data must be complex"):
        loop(eta, s, torch.randn(2, 1, N * N, dtype=F64), ComplexPhysics())
    out = loop(eta, s, torch.randn(2, 1, N * N, dtype=torch.complex128), ComplexPhysics())
    assert out[0].dtype == F64


def test_callables_flagged_complex_check_the_data_first():
    M = torch.randn(5, N * N, dtype=torch.complex128)
    pair = (
        lambda x: x.reshape(x.shape[0], -1).to(M.dtype) @ M.T,
        lambda y: (y @ M.conj()).reshape(y.shape[0], N, N),
    )
    op = as_operator(pair, is_complex=True)
    assert op.is_complex and not as_operator(pair).is_complex
    with pytest.raises(TypeError, match="callables is complex, so the data must be complex"):
        op.adjoint(torch.randn(2, 5, dtype=F64))


# ------------------------------------------------------------------------------ deepinv
def _import_deepinv():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "_deepinv.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("_invops_bench_deepinv", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module.import_deepinv()


def test_deepinv_physics_inside_the_loop():
    dinv = _import_deepinv()
    if dinv is None:
        pytest.skip("deepinv is not installed (an optional benchmark peer)")
    from deepinv.physics.functional.blur import gaussian_blur

    physics = dinv.physics.Blur(gaussian_blur(sigma=(1.0, 1.0)), padding="circular")
    eta, s, _ = make_inputs((N, N))
    truth = torch.rand(2, 1, N, N, dtype=F64)
    d = physics.A(truth.float()).double()
    loop = _loop(physics, eta, s, d, init="steepest", tied=True)
    bound, x = loop.bind(physics), torch.cat((eta, s), 1)
    check_invertible(bound, x, d)
    check_against_autograd(bound, x, d, rtol=1e-8, jvp_oracle="forward_ad")
    assert dottest(loop.jacobian(eta, s, d, physics, wrt="both"), rtol=1e-10)
    # deepinv's MRI works on real and imaginary parts as two channels: a two-channel real model
    mask = torch.zeros(N, N)
    mask[:, ::2] = 1
    mri = dinv.physics.MRI(mask=mask, img_size=(2, N, N))
    y = mri.A(torch.rand(2, 2, N, N))
    loop2 = NetworkLoop(4, 4, maxiter=2, n_model=2, init="adjoint")
    eta2, s2 = torch.zeros(2, 2, N, N), torch.zeros(2, 2, N, N)
    out = loop2(eta2, s2, y, copy.deepcopy(mri))
    assert out[0].shape == (2, 2, N, N) and torch.isfinite(out[0]).all()


def test_data_consistent_start_does_not_blow_up_the_normalisation():
    """A start from J^T d with J J^T = I (a sampling of an orthonormal transform, as a Cartesian
    MRI mask is) makes the first data-fit gradient zero up to rounding. Normalising rounding
    errors to unit variance made the loss infinite after one Adam step (the deblur/MRI benchmark
    of issue 19); the normalisation now takes the data's scale for such a gradient."""
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(64, 64, dtype=F64))
    A = q[::2].float()  # half the rows of an orthonormal matrix: A A^T = I, rounding aside
    truth = torch.rand(8, 1, 8, 8)
    d = truth.reshape(8, 64) @ A.T
    A_op = as_operator(A, model_shape=(8, 8))
    loop = NetworkLoop(3, 8, maxiter=2, init="adjoint", k1=3, p1=1, s1=1)
    optimizer = torch.optim.Adam(loop.parameters(), lr=1e-2)
    eta, s = torch.zeros(8, 1, 8, 8), torch.zeros(8, 2, 8, 8)
    for _ in range(3):
        optimizer.zero_grad()
        loss = (loop(eta, s, d, A_op)[0] - truth).pow(2).mean()
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
    data_scale = float((d @ A).std())
    for step in loop.steps.layers[1::2]:  # the data-fit couplings
        scale = float(torch.exp(step.subnet.normalize.log_scale.detach()))
        assert 0.1 / data_scale < scale < 10 / data_scale
