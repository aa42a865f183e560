"""i-RIM loop unrolling (``invops.NetworkLoop``) with physics operators inside the network.

The loop is checked, for PyLops (numpy), torch-callable and dense-matrix operators and several link
functions, for invertibility, against plain autograd of its own math, with dot tests of its
Jacobian and Taylor tests of its gradients, and against a differentiable reference in which the
physics is applied by a different mechanism (a torch matrix instead of the operator under test).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pylops
import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_parameters

import invops
from invops import NetworkLoop
from invops.networks.irim import link_function
from invops.operators import Operator, as_operator
from invops.testing import (
    TensorMemoryTracker,
    check_against_autograd,
    dottest,
    gradient_test,
)

F64 = torch.float64
N = 8  # model side (the conditioners downsample by 4)
B = 2


def _cupy_available() -> bool:
    try:
        import cupy  # noqa: F401
    except Exception:
        return False
    return True


needs_cuda_and_cupy = pytest.mark.skipif(
    not (torch.cuda.is_available() and _cupy_available()), reason="needs a CUDA device and cupy"
)


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------ operators
def _kernel() -> np.ndarray:
    return np.random.default_rng(11).standard_normal((3, 3)) / 3


def _blur_pair(k: np.ndarray):
    """A 2D blur as batched torch callables: conv2d and its adjoint conv_transpose2d."""
    kt = torch.from_numpy(k)

    def forward(x):
        w = kt.to(x)[None, None]
        return F.conv2d(x[:, None], w, padding=1)[:, 0]

    def adjoint(y):
        w = kt.to(y)[None, None]
        return F.conv_transpose2d(y[:, None], w, padding=1)[:, 0]

    return forward, adjoint


def _dense_of_pair(forward, model_shape) -> np.ndarray:
    n = math.prod(model_shape)
    basis = torch.eye(n, dtype=F64).reshape(n, *model_shape)
    return forward(basis).reshape(n, -1).T.numpy().copy()


def _matmul_pair(M: torch.Tensor, model_shape, data_shape):
    """``M`` and ``M^H`` as batched torch callables (real part of the adjoint for real models)."""

    def forward(x):
        return (x.reshape(x.shape[0], -1).to(M.dtype) @ M.T).reshape(x.shape[0], *data_shape)

    def adjoint(y):
        out = y.reshape(y.shape[0], -1) @ M.conj()
        return (out.real if out.is_complex() else out).reshape(y.shape[0], *model_shape)

    return forward, adjoint


def make_physics(kind: str, model_shape=(N, N)):
    """``(J under test, reference operator, data shape)``.

    The reference applies the same linear map by a different mechanism than the operator under
    test, so agreement of the gradients is a meaningful check of the operator path.
    """
    if kind == "pylops":  # numpy-backed PyLops operator; reference: a torch matrix
        J = pylops.signalprocessing.Convolve2D(model_shape, h=_kernel(), offset=(1, 1))
        ref = as_operator(torch.from_numpy(J.todense()), model_shape, model_shape)
        return J, ref, model_shape
    if kind == "callables":  # torch conv / conv_transpose; reference: a torch matrix
        J = _blur_pair(_kernel())
        M = torch.from_numpy(_dense_of_pair(J[0], model_shape))
        ref = as_operator(M, model_shape, model_shape)
        return J, ref, model_shape
    if kind == "matrix":  # dense numpy matrix; reference: torch matmul callables
        n = math.prod(model_shape)
        A = np.random.default_rng(12).standard_normal((3 * n // 4, n)) / math.sqrt(n)
        J = as_operator(A, model_shape=model_shape)
        ref = as_operator(_matmul_pair(torch.from_numpy(A), model_shape, (A.shape[0],)))
        return J, ref, (A.shape[0],)
    if kind == "mri2d":  # complex PyLops operator; reference: a complex torch matrix
        J = pylops.medical.MRI2D(model_shape, mask="vertical-reg", nlines=4, perc_center=0.0)
        ds = tuple(int(n) for n in J.dimsd)
        ref = as_operator(torch.from_numpy(J.todense()), model_shape, ds)
        return J, ref, ds
    if kind == "complex-matrix":  # complex dense numpy matrix; reference: complex matmul
        n = math.prod(model_shape)
        rng = np.random.default_rng(13)
        A = (rng.standard_normal((n // 2, n)) + 1j * rng.standard_normal((n // 2, n))) / n
        J = as_operator(A, model_shape=model_shape)
        ref = as_operator(_matmul_pair(torch.from_numpy(A), model_shape, (n // 2,)))
        return J, ref, (n // 2,)
    raise KeyError(kind)


# ------------------------------------------------------------------------------------ links
def _psi_user(x):
    return x + 0.5 * torch.tanh(x)


def _dpsi_user(x):
    return 1.0 + 0.5 * (1.0 - torch.tanh(x) ** 2)


LINKS = {
    "identity": (None, None),  # (link given to the loop under test, plain torch callable)
    "softplus": ("softplus", F.softplus),
    "exp": ("exp", lambda x: torch.exp(x)),
    "user": ((_psi_user, _dpsi_user), _psi_user),
}


# ------------------------------------------------------------------------------------ helpers
def make_inputs(data_shape, model_shape=(N, N), batch=B, complex_data=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    eta = 0.5 * torch.randn(batch, 1, *model_shape, generator=gen, dtype=F64)
    s = torch.randn(batch, 2, *model_shape, generator=gen, dtype=F64)
    d = torch.randn(batch, *data_shape, generator=gen, dtype=F64)
    if complex_data:
        d = torch.complex(d, torch.randn(batch, *data_shape, generator=gen, dtype=F64))
    return eta, s, d


def make_loop(J, eta, s, d, link=None, type="additive", maxiter=2, ndim=2, n_hidden=4):
    torch.manual_seed(0)
    loop = NetworkLoop(3, n_hidden, maxiter=maxiter, link=link, type=type, ndim=ndim).double()
    with torch.no_grad():
        loop(eta, s, d, J)  # data-dependent (ActNorm) initialisation
    randomize_parameters(loop, 0.1)
    return loop


def twin(loop: NetworkLoop, link) -> NetworkLoop:
    """The same network (same parameters and buffers) with another link."""
    other = NetworkLoop(
        loop.n_in, 4, maxiter=loop.maxiter, link=link, type=loop.type, ndim=loop.ndim
    ).double()
    other.load_state_dict(loop.state_dict())
    return other


def loss_of(eta_out, s_out, w):
    """A loss with first- and second-order parts and a small value (a low Taylor-test floor)."""
    return (w * eta_out).sum() + 0.05 * (s_out**2).sum()


def cotangents_of(eta_out, s_out, w):
    """``d loss_of / d eta_out`` and ``d loss_of / d s_out``."""
    return w, 0.1 * s_out


def rel(a, b) -> float:
    a, b = torch.as_tensor(a).detach(), torch.as_tensor(b).detach()
    return float((a - b).abs().max() / max(float(b.abs().max()), 1e-300))


def memory_free_grads(loop, J, eta, s, d, w):
    """``loop.backward`` gradients of ``loss_of`` (eta, s, d, *params), and the recomputed input."""
    with torch.no_grad():
        eta_out, s_out = loop(eta, s, d, J)
    loop.zero_grad(set_to_none=True)
    deta, ds, eta_in, s_in, dd = loop.backward(
        *cotangents_of(eta_out, s_out, w), eta_out, s_out, d, J
    )
    grads = [deta, ds, dd] + [
        torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in loop.parameters()
    ]
    loop.zero_grad(set_to_none=True)
    return grads, (eta_in, s_in)


def bridge_grads(loop, J, eta, s, d, w):
    """Gradients of ``loss_of`` by ``loss.backward()`` through the memory-free bridge."""
    leaves = [t.clone().requires_grad_() for t in (eta, s, d)]
    loop.zero_grad(set_to_none=True)
    loss_of(*loop(*leaves, J), w).backward()
    grads = [t.grad for t in leaves] + [
        torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in loop.parameters()
    ]
    loop.zero_grad(set_to_none=True)
    return grads


def reference_grads(loop, ref_op, eta, s, d, w):
    """Plain torch autograd through the loop's math, with the physics done by ``ref_op``."""
    leaves = [t.clone().requires_grad_() for t in (eta, s, d)]
    params = list(loop.parameters())
    with invops.plain_autograd():
        eta_out, s_out = loop(*leaves, ref_op)
        assert eta_out.grad_fn is not None
        grads = torch.autograd.grad(loss_of(eta_out, s_out, w), leaves + params)
    return list(grads)


def assert_grads_close(got, ref, rtol, names=None):
    assert len(got) == len(ref)
    # a gradient that vanishes mathematically is compared on the scale of the others
    floor = 1e-6 * max(float(r.abs().max()) for r in ref)
    errs = {}
    for i, (a, b) in enumerate(zip(got, ref)):
        a = torch.as_tensor(a)
        assert a.shape == b.shape and a.dtype == b.dtype, (i, a.shape, b.shape, a.dtype, b.dtype)
        errs[names[i] if names and i < len(names) else i] = float((a - b).abs().max()) / max(
            float(b.abs().max()), floor
        )
    bad = {k: v for k, v in errs.items() if not v <= rtol}
    assert not bad, bad


NAMES = ["eta", "s", "d"]
# the conditioners use ReLU: steps of 10% of the point's norm cross its kinks, where the Taylor
# remainder is first order, so the Taylor tests start at 0.1% and halve from there
H0 = 1e-3

# (operator kind, link, coupling type): every combination (each takes a fraction of a second)
COMBOS = [
    (kind, link, type_)
    for kind in ("pylops", "callables", "matrix")
    for link in LINKS
    for type_ in ("additive", "hint")
]


@pytest.fixture(params=COMBOS, ids=["-".join(c) for c in COMBOS])
def setup(request):
    kind, link, type_ = request.param
    J, ref, ds = make_physics(kind)
    eta, s, d = make_inputs(ds)
    loop = make_loop(J, eta, s, d, link=LINKS[link][0], type=type_, maxiter=2)
    return dict(kind=kind, link=link, J=J, ref=ref, eta=eta, s=s, d=d, loop=loop)


# ------------------------------------------------------------------------------------ core checks
def test_inverse_recovers_state(setup):
    loop, J, eta, s, d = (setup[k] for k in ("loop", "J", "eta", "s", "d"))
    eta_out, s_out = loop(eta, s, d, J)
    assert eta_out.shape == eta.shape and s_out.shape == s.shape
    assert rel(eta_out, eta) > 1e-2  # the loop does something
    eta_rec, s_rec = loop.inverse(eta_out, s_out, d, J)
    assert rel(eta_rec, eta) < 1e-9
    assert rel(s_rec, s) < 1e-9


def test_against_plain_autograd(setup):
    loop, J, eta, s, d = (setup[k] for k in ("loop", "J", "eta", "s", "d"))
    errors = check_against_autograd(
        loop.bind(J), torch.cat((eta, s), 1), d, rtol=1e-8, jvp_oracle="forward_ad"
    )
    assert errors["backward:cond0"] <= 1e-8  # the data gradient is checked too


def test_jacobian_dottest(setup):
    loop, J, eta, s, d = (setup[k] for k in ("loop", "J", "eta", "s", "d"))
    n_params = sum(p.numel() for p in loop.parameters())
    for wrt, n_in in (("input", eta.numel() + s.numel()), ("params", n_params)):
        jac = loop.jacobian(eta, s, d, J, wrt=wrt)
        assert jac.shape == (eta.numel() + s.numel(), n_in)
        assert dottest(jac, rtol=1e-10)
    jac = loop.jacobian(eta, s, d, J, wrt="both")
    assert jac.shape == (eta.numel() + s.numel(), eta.numel() + s.numel() + n_params)
    assert dottest(jac, rtol=1e-10)


def test_taylor_input_gradients(setup):
    loop, J, eta, s, d = (setup[k] for k in ("loop", "J", "eta", "s", "d"))
    w = torch.randn_like(eta)
    (deta, ds, dd, *_), (eta_in, s_in) = memory_free_grads(loop, J, eta, s, d, w)
    assert rel(eta_in, eta) < 1e-9 and rel(s_in, s) < 1e-9

    def f(eta_, s_, d_):
        return loss_of(*loop(eta_, s_, d_, J), w)

    gradient_test(f, [eta, s, d], [deta, ds, dd], h0=H0)
    only_eta = [torch.randn_like(eta), torch.zeros_like(s), torch.zeros_like(d)]
    gradient_test(f, [eta, s, d], [deta, ds, dd], direction=only_eta, h0=H0)
    with pytest.raises(AssertionError, match="convergence rates"):  # the test has teeth
        gradient_test(f, [eta, s, d], [1.1 * deta, ds, dd], direction=only_eta, h0=H0)


def test_taylor_parameter_gradients(setup):
    loop, J, eta, s, d = (setup[k] for k in ("loop", "J", "eta", "s", "d"))
    w = torch.randn_like(eta)
    params = list(loop.parameters())
    with torch.no_grad():
        eta_out, s_out = loop(eta, s, d, J)
    *_, dtheta, eta_in, s_in, dd = loop.vjp(*cotangents_of(eta_out, s_out, w), eta_out, s_out, d, J)
    assert all(p.grad is None for p in params)  # vjp leaves p.grad alone
    assert len(dtheta) == len(params)
    parameter_taylor_test(loop, J, eta, s, d, w, dtheta)


def parameter_taylor_test(loop, J, eta, s, d, w, dtheta) -> None:
    """Taylor test of ``loss_of`` in the loop's parameters against the cotangents ``dtheta``."""
    params = list(loop.parameters())
    point = [p.detach().clone() for p in params]

    def f(*values):
        with torch.no_grad():
            for p, v in zip(params, values):
                p.copy_(v)
            out = loss_of(*loop(eta, s, d, J), w)
            for p, v in zip(params, point):
                p.copy_(v)
        return out

    gradient_test(f, point, list(dtheta), h0=H0)


def test_gradients_match_differentiable_reference(setup):
    loop, J, ref, eta, s, d = (setup[k] for k in ("loop", "J", "ref", "eta", "s", "d"))
    w = torch.randn_like(eta)
    # the reference network: same parameters, the link as a plain differentiable torch function
    # (autograd computes psi'), the physics applied through a torch matrix
    ref_loop = twin(loop, LINKS[setup["link"]][1])
    expected = reference_grads(ref_loop, ref, eta, s, d, w)
    got, _ = memory_free_grads(loop, J, eta, s, d, w)
    assert_grads_close(got, expected, 1e-7, NAMES)
    assert_grads_close(bridge_grads(loop, J, eta, s, d, w), expected, 1e-7, NAMES)
    # the reference operator really is the same map
    with torch.no_grad():
        out, out_ref = loop(eta, s, d, J), ref_loop(eta, s, d, ref)
    assert rel(out[0], out_ref[0]) < 1e-12 and rel(out[1], out_ref[1]) < 1e-12


# ------------------------------------------------------------------------------------ link
def test_link_derivative_is_included():
    J, ref, ds = make_physics("pylops")
    eta, s, d = make_inputs(ds)
    loop_exp = make_loop(J, eta, s, d, link="exp")
    w = torch.randn_like(eta)
    g_exp, _ = memory_free_grads(loop_exp, J, eta, s, d, w)
    g_id, _ = memory_free_grads(twin(loop_exp, None), J, eta, s, d, w)
    # psi' = exp(eta) changes the gradient ...
    assert rel(g_exp[0], g_id[0]) > 1e-2
    assert max(rel(a, b) for a, b in zip(g_exp[3:], g_id[3:])) > 1e-2
    # ... and the memory-free one matches autograd through torch.exp
    expected = reference_grads(twin(loop_exp, lambda x: torch.exp(x)), ref, eta, s, d, w)
    assert_grads_close(g_exp, expected, 1e-7, NAMES)

    # independent of autograd: finite differences of the loop's output agree with the gradient
    def f(eta_):
        return loss_of(*loop_exp(eta_, s, d, J), w)

    gradient_test(f, eta, g_exp[0], h0=H0)
    # a link whose derivative is dropped (psi' := 1, as the reference Julia code does) is wrong
    dropped = twin(loop_exp, (torch.exp, torch.ones_like))
    g_dropped, _ = memory_free_grads(dropped, J, eta, s, d, w)
    assert rel(g_dropped[0], expected[0]) > 1e-2
    # a user pair with the right derivative gives the named link's gradients
    g_pair, _ = memory_free_grads(twin(loop_exp, (torch.exp, torch.exp)), J, eta, s, d, w)
    assert_grads_close(g_pair, g_exp, 1e-12, NAMES)


def test_link_function():
    x = torch.linspace(-2, 2, 9, dtype=F64)
    assert torch.equal(link_function(None)(x), x)
    assert torch.equal(link_function("identity")(x), x)
    assert torch.allclose(link_function("exp")(x), x.exp())
    assert torch.allclose(link_function("softplus")(x), F.softplus(x))
    assert torch.allclose(link_function("sigmoid")(x), torch.sigmoid(x))
    psi = link_function((_psi_user, _dpsi_user))
    xr = x.clone().requires_grad_()
    psi(xr).sum().backward()
    assert torch.allclose(psi(x), _psi_user(x))
    assert torch.allclose(xr.grad, _dpsi_user(x))
    with pytest.raises(ValueError, match="link"):
        link_function("relu")
    with pytest.raises(ValueError, match="link"):
        link_function("")
    with pytest.raises(TypeError, match="link"):
        link_function(3)


def test_user_link_forward_mode():
    import torch.autograd.forward_ad as fwAD

    psi = link_function((_psi_user, _dpsi_user))
    x, dx = torch.randn(5, dtype=F64), torch.randn(5, dtype=F64)
    with fwAD.dual_level():
        out = fwAD.unpack_dual(psi(fwAD.make_dual(x, dx)))
    assert torch.allclose(out.primal, _psi_user(x))
    assert torch.allclose(out.tangent, _dpsi_user(x) * dx)


# ------------------------------------------------------------------------------------ memory
def _param_bytes(module):
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _memory_peaks(maxiter):
    """Peak live tensor bytes of a reverse pass, for a loop of ``maxiter`` iterations."""
    n, batch = 16, 4
    J = pylops.signalprocessing.Convolve2D((n, n), h=_kernel(), offset=(1, 1))
    eta, s, d = make_inputs((n, n), model_shape=(n, n), batch=batch)
    loop = make_loop(J, eta, s, d, maxiter=maxiter)
    w = torch.randn_like(eta)
    with torch.no_grad():
        eta_out, s_out = loop(eta, s, d, J)
    peaks = {"params": _param_bytes(loop), "state": (eta.numel() + s.numel()) * 8}

    cot = cotangents_of(eta_out, s_out, w)
    with TensorMemoryTracker() as mem:
        loop.backward(*cot, eta_out, s_out, d, J)
    peaks["backward"] = mem.peak
    loop.zero_grad(set_to_none=True)

    def train_step():
        leaves = [t.clone().requires_grad_() for t in (eta, s)]
        loss_of(*loop(*leaves, d, J), w).backward()

    with TensorMemoryTracker() as mem:
        train_step()
    peaks["bridge"] = mem.peak
    loop.zero_grad(set_to_none=True)
    with TensorMemoryTracker() as mem, invops.plain_autograd():
        train_step()
    peaks["plain"] = mem.peak
    loop.zero_grad(set_to_none=True)
    return peaks


@pytest.fixture(scope="module")
def memory_peaks():
    return {maxiter: _memory_peaks(maxiter) for maxiter in (1, 4, 16)}


@pytest.mark.parametrize("mode", ["backward", "bridge"])
def test_reverse_pass_memory_does_not_grow_with_maxiter(memory_peaks, mode):
    p = memory_peaks
    peaks = {m: v[mode] for m, v in p.items()}

    def growth_beyond_params(a, b):
        return (peaks[b] - peaks[a]) - (p[b]["params"] - p[a]["params"])

    # 4 -> 16 iterations: no growth beyond the parameter gradients themselves, plus 10%
    assert growth_beyond_params(4, 16) <= 0.1 * peaks[4], peaks
    # 1 -> 16: the same, plus a FIXED cost that appears once there are two iterations or more
    # (the outer Chain walk holds one (state, cotangent) pair while the nested i-RIM layer
    # walks its own): at most two state-sized buffers, the same for 4 and 16 iterations
    # (measured: 1.33 states; with maxiter=1 as the only baseline the 10% rule alone fails)
    state_bytes = p[1]["state"]
    assert growth_beyond_params(1, 16) <= 0.1 * peaks[1] + 2 * state_bytes, peaks
    # far below what plain autograd stores for ONE extra iteration, so nothing is kept per
    # iteration
    plain_per_iteration = (p[16]["plain"] - p[4]["plain"]) / 12
    assert growth_beyond_params(1, 16) < plain_per_iteration, (peaks, plain_per_iteration)
    assert peaks[16] < p[16]["plain"] / 3, p


def test_plain_autograd_memory_grows_with_maxiter(memory_peaks):
    p = memory_peaks
    assert p[4]["plain"] > 2 * p[1]["plain"], p
    assert p[16]["plain"] > 2.5 * p[4]["plain"], p
    # plain autograd stores more than a whole state per iteration
    assert (p[16]["plain"] - p[4]["plain"]) / 12 > p[1]["state"], p


# ------------------------------------------------------------------------------------ errors
@pytest.fixture
def small():
    J, ref, ds = make_physics("pylops")
    eta, s, d = make_inputs(ds)
    loop = make_loop(J, eta, s, d, maxiter=1)
    return loop, J, eta, s, d


def test_operator_model_shape_mismatch(small):
    loop, J, eta, s, d = small
    eta12, s12 = torch.zeros(B, 1, 12, 12, dtype=F64), torch.zeros(B, 2, 12, 12, dtype=F64)
    for call in (loop, loop.inverse):
        with pytest.raises(ValueError, match=r"\(8, 8\).*12, 12"):
            call(eta12, s12, d, J)
    with pytest.raises(ValueError, match=r"\(8, 8\).*12, 12"):
        loop.backward(eta12, s12, eta12, s12, d, J)
    with pytest.raises(ValueError, match=r"\(8, 8\).*12, 12"):
        loop.jacobian(eta12, s12, d, J)
    # a flat matrix that is not reshaped to the model's image
    with pytest.raises(ValueError, match=r"\(64,\).*8, 8"):
        loop(eta, s, d.reshape(B, -1), np.eye(64))


def test_data_errors(small):
    loop, J, eta, s, d = small
    with pytest.raises(ValueError, match=r"d: .*\(8, 8\).*\(2, 7, 7\)"):
        loop(eta, s, torch.zeros(B, 7, 7, dtype=F64), J)
    with pytest.raises(ValueError, match=r"d: .*\(8, 8\)"):
        loop(eta, s, d.reshape(B, 64), J)
    with pytest.raises(ValueError, match="batch size 2.* got 3"):
        loop(eta, s, torch.zeros(3, N, N, dtype=F64), J)
    with pytest.raises(ValueError, match="batch size"):
        loop.inverse(eta, s, d[:1], J)
    with pytest.raises(ValueError, match="batch size"):
        loop.backward(eta, s, eta, s, d[:1], J)
    with pytest.raises(TypeError, match="dtype"):
        loop(eta, s, d.float(), J)


def test_state_errors(small):
    loop, J, eta, s, d = small
    with pytest.raises(ValueError, match=r"s must have shape \(B, 2, 8, 8\)"):
        loop(eta, torch.zeros(B, 3, N, N, dtype=F64), d, J)
    with pytest.raises(ValueError, match=r"s must have shape"):
        loop(eta, torch.zeros(B, 2, N, N + 4, dtype=F64), d, J)
    with pytest.raises(ValueError, match="eta must have 1 channel"):
        loop(torch.zeros(B, 2, N, N, dtype=F64), s, d, J)
    with pytest.raises(ValueError, match="eta must have 1 channel"):
        loop(eta[:, 0], s, d, J)  # no channel axis
    with pytest.raises(ValueError, match="same batch size"):
        loop(eta, s[:1], d, J)
    with pytest.raises(ValueError, match="ds must have shape"):
        loop.backward(eta, s[:, :1], eta, s, d, J)
    with pytest.raises(TypeError, match="eta"):
        loop(eta.float(), s, d, J)
    with pytest.raises(TypeError, match="J"):
        loop(eta, s, d, "blur")


@pytest.mark.parametrize("kind", ["complex-matrix", "mri2d"])
def test_complex_operator_data_errors(kind):
    J, ref, ds = make_physics(kind)
    eta, s, d = make_inputs(ds, complex_data=True)
    loop = make_loop(J, eta, s, d, maxiter=1)
    real = d.real.contiguous()
    # real data for a complex operator
    for call in (loop, loop.inverse, loop.jacobian):
        with pytest.raises(TypeError, match="d: .*complex"):
            call(eta, s, real, J)
    with pytest.raises(TypeError, match="d: .*complex"):
        loop.backward(eta, s, eta, s, real, J)
    # complex data of the wrong shape
    flat = d.reshape(B, -1)
    for bad in (flat[:, :-1], flat.reshape(B, 1, -1), flat[:, None]):
        with pytest.raises(ValueError, match=r"d: .*" + re.escape(str(ds))):
            loop(eta, s, bad, J)
    # real data of the wrong shape: the shape is reported
    with pytest.raises(ValueError, match=r"d: .*" + re.escape(str(ds))):
        loop(eta, s, real.reshape(B, -1)[:, :-1], J)
    # complex data with the wrong batch
    with pytest.raises(ValueError, match="batch size"):
        loop(eta, s, d[:1], J)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_in=1), "n_in"),
        (dict(maxiter=0), "maxiter"),
        (dict(type="affine"), "type"),
        (dict(link="relu"), "link"),
        (dict(ndim=4), "ndim"),
    ],
)
def test_constructor_errors(kwargs, match):
    args = dict(n_in=3, n_hidden=4, maxiter=2) | kwargs
    with pytest.raises(ValueError, match=match):
        NetworkLoop(**args)


def test_constructor_link_type_error():
    with pytest.raises(TypeError, match="link"):
        NetworkLoop(3, 4, maxiter=1, link=3.0)


# ------------------------------------------------------------------------------------ behaviour
def test_numpy_in_numpy_out():
    J, ref, ds = make_physics("pylops")
    eta, s, d = make_inputs(ds)
    loop = make_loop(J, eta, s, d)
    w = torch.randn_like(eta)
    e, s_, dn, wn = eta.numpy(), s.numpy(), d.numpy(), w.numpy()
    eta_out, s_out = loop(e, s_, dn, J)
    assert isinstance(eta_out, np.ndarray) and isinstance(s_out, np.ndarray)
    ref_out = loop(eta, s, d, J)
    assert rel(torch.from_numpy(eta_out), ref_out[0]) < 1e-14
    eta_in, s_in = loop.inverse(eta_out, s_out, dn, J)
    assert isinstance(eta_in, np.ndarray) and isinstance(s_in, np.ndarray)
    assert rel(torch.from_numpy(eta_in), eta) < 1e-9
    res = loop.backward(*cotangents_of(eta_out, s_out, wn), eta_out, s_out, dn, J)
    assert all(isinstance(r, np.ndarray) for r in res)
    res_t = loop.backward(*cotangents_of(*ref_out, w), *ref_out, d, J)
    for a, b in zip(res, res_t):
        assert rel(torch.from_numpy(a), b) < 1e-12
    deta, ds_, dtheta, eta_v, s_v, dd = loop.vjp(
        *cotangents_of(eta_out, s_out, wn), eta_out, s_out, dn, J
    )
    assert all(isinstance(t, np.ndarray) for t in (deta, ds_, eta_v, s_v, dd, *dtheta))
    # inputs are not mutated
    assert np.array_equal(e, eta.numpy()) and np.array_equal(dn, d.numpy())


def test_deferred_backward_uses_its_own_operator():
    J1, _, ds = make_physics("pylops")
    J2 = pylops.signalprocessing.Convolve2D((N, N), h=np.ones((3, 3)) / 9, offset=(1, 1))
    eta, s, d = make_inputs(ds)
    loop = make_loop(J1, eta, s, d)
    w = torch.randn_like(eta)
    params = list(loop.parameters())

    def leaves():
        return [t.clone().requires_grad_() for t in (eta, s, d)]

    def grads_of(xs):
        return [t.grad for t in xs] + [p.grad.clone() for p in params]

    # J1 alone
    loop.zero_grad(set_to_none=True)
    x1 = leaves()
    loss_of(*loop(*x1, J1), w).backward()
    alone = grads_of(x1)
    # J2 alone (to see that the operators matter)
    loop.zero_grad(set_to_none=True)
    x2 = leaves()
    loss_of(*loop(*x2, J2), w).backward()
    other = grads_of(x2)
    assert rel(other[0], alone[0]) > 1e-3
    # forward with J1, forward with J2, then backward of the FIRST loss only
    loop.zero_grad(set_to_none=True)
    xa, xb = leaves(), leaves()
    loss_a = loss_of(*loop(*xa, J1), w)
    loss_b = loss_of(*loop(*xb, J2), w)
    loss_a.backward()
    assert_grads_close(grads_of(xa), alone, 1e-12, NAMES)
    loop.zero_grad(set_to_none=True)
    loss_b.backward()
    assert_grads_close(grads_of(xb), other, 1e-12, NAMES)


def test_operator_may_be_given_as_operator_or_raw():
    J, _, ds = make_physics("pylops")
    eta, s, d = make_inputs(ds)
    loop = make_loop(J, eta, s, d)
    op = as_operator(J)
    assert isinstance(loop.bind(op).op, Operator) and loop.bind(op).op is op
    a, b = loop(eta, s, d, J), loop(eta, s, d, op)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_public_jvp():
    J, _, ds = make_physics("pylops")
    eta, s, d = make_inputs(ds)
    loop = make_loop(J, eta, s, d, link="exp", type="hint")
    deta, ds_, dd = torch.randn_like(eta), torch.randn_like(s), torch.randn_like(d)
    eta_out, s_out, deta_out, ds_out = loop.jvp(eta, s, d, J, deta=deta, ds=ds_, dd=dd)
    ref = loop(eta, s, d, J)
    assert rel(eta_out, ref[0]) < 1e-14 and rel(s_out, ref[1]) < 1e-14
    # central finite differences
    h = 1e-6
    with torch.no_grad():
        plus = loop(eta + h * deta, s + h * ds_, d + h * dd, J)
        minus = loop(eta - h * deta, s - h * ds_, d - h * dd, J)
    assert rel((plus[0] - minus[0]) / (2 * h), deta_out) < 1e-7
    assert rel((plus[1] - minus[1]) / (2 * h), ds_out) < 1e-7
    # the Jacobian operator applies the same forward mode (input perturbation only)
    jac = loop.jacobian(eta, s, d, J)
    _, _, deta_in, ds_in = loop.jvp(eta, s, d, J, deta=deta, ds=ds_)
    Jv = torch.from_numpy(jac @ torch.cat((deta, ds_), 1).numpy().ravel()).reshape(B, 3, N, N)
    assert rel(Jv[:, :1], deta_in) < 1e-12 and rel(Jv[:, 1:], ds_in) < 1e-12
    # numpy in, numpy out; a missing tangent is zero
    res = loop.jvp(eta.numpy(), s.numpy(), d.numpy(), J, deta=deta.numpy())
    assert all(isinstance(r, np.ndarray) for r in res)
    _, _, deta_only, _ = loop.jvp(eta, s, d, J, deta=deta, ds=torch.zeros_like(s))
    assert rel(torch.from_numpy(res[2]), deta_only) < 1e-13


def test_inverse_through_the_bridge_matches_plain_autograd():
    J, _, ds = make_physics("pylops")
    eta, s, d = make_inputs(ds)
    loop = make_loop(J, eta, s, d, link="softplus")
    with torch.no_grad():
        eta_out, s_out = loop(eta, s, d, J)
    w = torch.randn_like(eta)
    grads = []
    for plain in (False, True):
        leaves = [t.clone().requires_grad_() for t in (eta_out, s_out, d)]
        loop.zero_grad(set_to_none=True)
        with invops.plain_autograd(plain):
            eta_in, s_in = loop.inverse(*leaves, J)
            assert rel(eta_in, eta) < 1e-9
            loss_of(eta_in, s_in, w).backward()
        grads.append([t.grad for t in leaves] + [p.grad.clone() for p in loop.parameters()])
    assert_grads_close(grads[0], grads[1], 1e-9, NAMES)


def test_float32_loop():
    J, _, ds = make_physics("pylops")
    eta, s, d = make_inputs(ds)
    loop = make_loop(J, eta, s, d, link="exp", type="hint")
    loop32 = twin(loop, "exp").float()
    eta32, s32, d32 = eta.float(), s.float(), d.float()
    eta_out, s_out = loop32(eta32, s32, d32, J)  # a float64 numpy operator on float32 states
    assert eta_out.dtype == torch.float32 and s_out.dtype == torch.float32
    ref = loop(eta, s, d, J)
    assert rel(eta_out.double(), ref[0]) < 1e-5 and rel(s_out.double(), ref[1]) < 1e-5
    eta_rec, s_rec = loop32.inverse(eta_out, s_out, d32, J)
    assert rel(eta_rec.double(), eta) < 1e-4 and rel(s_rec.double(), s) < 1e-4
    w = torch.randn_like(eta)
    got, _ = memory_free_grads(loop32, J, eta32, s32, d32, w.float())
    assert all(g.dtype == torch.float32 for g in got)
    expected, _ = memory_free_grads(loop, J, eta, s, d, w)
    assert_grads_close([g.double() for g in got], expected, 1e-4, NAMES)
    assert dottest(loop32.jacobian(eta32, s32, d32, J, wrt="both"), rtol=1e-4)


def test_1d_models():
    J = pylops.FirstDerivative(16, kind="forward")
    eta, s, d = make_inputs((16,), model_shape=(16,))
    loop = make_loop(J, eta, s, d, link="softplus", ndim=1)
    eta_rec, s_rec = loop.inverse(*loop(eta, s, d, J), d, J)
    assert rel(eta_rec, eta) < 1e-9 and rel(s_rec, s) < 1e-9
    w = torch.randn_like(eta)
    got, _ = memory_free_grads(loop, J, eta, s, d, w)
    ref = as_operator(torch.from_numpy(J.todense()), (16,), (16,))
    expected = reference_grads(twin(loop, F.softplus), ref, eta, s, d, w)
    assert_grads_close(got, expected, 1e-7, NAMES)


# ------------------------------------------------------------------------------------ 3D
@pytest.mark.parametrize("type_", ["additive", "hint"])
def test_3d_models(type_):
    shape3 = (4, 4, 4)
    n = math.prod(shape3)
    A = np.random.default_rng(14).standard_normal((40, n)) / math.sqrt(n)
    J = as_operator(pylops.MatrixMult(A), model_shape=shape3)
    ref = as_operator(torch.from_numpy(A), model_shape=shape3)
    eta, s, d = make_inputs((40,), model_shape=shape3)
    loop = make_loop(J, eta, s, d, link="softplus", type=type_, ndim=3)
    eta_out, s_out = loop(eta, s, d, J)
    assert eta_out.shape == (B, 1, *shape3)
    eta_rec, s_rec = loop.inverse(eta_out, s_out, d, J)
    assert rel(eta_rec, eta) < 1e-9 and rel(s_rec, s) < 1e-9
    w = torch.randn_like(eta)
    got, _ = memory_free_grads(loop, J, eta, s, d, w)
    expected = reference_grads(twin(loop, F.softplus), ref, eta, s, d, w)
    assert_grads_close(got, expected, 1e-7, NAMES)
    assert dottest(loop.jacobian(eta, s, d, J, wrt="both"), rtol=1e-10)


def test_3d_models_with_a_pylops_diagonal():
    shape3 = (4, 4, 8)
    diag = np.random.default_rng(15).uniform(0.5, 1.5, shape3)
    J = pylops.Diagonal(diag)
    eta, s, d = make_inputs(shape3, model_shape=shape3)
    loop = make_loop(J, eta, s, d, ndim=3)
    eta_rec, s_rec = loop.inverse(*loop(eta, s, d, J), d, J)
    assert rel(eta_rec, eta) < 1e-9 and rel(s_rec, s) < 1e-9
    w = torch.randn_like(eta)
    got, _ = memory_free_grads(loop, J, eta, s, d, w)
    diag_t = torch.from_numpy(diag)
    ref = as_operator((lambda x: x * diag_t, lambda y: y * diag_t), shape3, shape3)
    assert_grads_close(got, reference_grads(loop, ref, eta, s, d, w), 1e-7, NAMES)


# ------------------------------------------------------------------------------------ complex
@pytest.mark.parametrize("kind", ["mri2d", "complex-matrix"])
def test_complex_operator(kind):
    J, ref, ds = make_physics(kind)
    eta, s, d = make_inputs(ds, complex_data=True)
    loop = make_loop(J, eta, s, d, link="exp", type="additive")
    eta_out, s_out = loop(eta, s, d, J)
    assert eta_out.dtype == F64 and s_out.dtype == F64
    eta_rec, s_rec = loop.inverse(eta_out, s_out, d, J)
    assert rel(eta_rec, eta) < 1e-9 and rel(s_rec, s) < 1e-9
    assert dottest(loop.jacobian(eta, s, d, J, wrt="both"), rtol=1e-10)
    w = torch.randn_like(eta)
    got, _ = memory_free_grads(loop, J, eta, s, d, w)
    assert got[2].dtype == torch.complex128  # the data cotangent is complex
    expected = reference_grads(twin(loop, lambda x: torch.exp(x)), ref, eta, s, d, w)
    assert_grads_close(got, expected, 1e-7, NAMES)
    assert_grads_close(bridge_grads(loop, J, eta, s, d, w), expected, 1e-7, NAMES)


# ------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@needs_cuda_and_cupy
@pytest.mark.parametrize("type_", ["additive", "hint"])
def test_gpu_loop_with_cupy_pylops_operator(type_):
    import cupy

    h = _kernel()
    J_cpu = pylops.signalprocessing.Convolve2D((N, N), h=h, offset=(1, 1), dtype="float64")
    J_gpu = pylops.signalprocessing.Convolve2D(
        (N, N), h=cupy.asarray(h), offset=(1, 1), dtype="float64"
    )
    eta, s, d = make_inputs((N, N))
    loop = make_loop(J_cpu, eta, s, d, link="exp", type=type_)
    w = torch.randn_like(eta)
    expected, _ = memory_free_grads(loop, J_cpu, eta, s, d, w)
    with torch.no_grad():
        out_cpu = loop(eta, s, d, J_cpu)

    loop_gpu = twin(loop, "exp").cuda()
    eg, sg, dg, wg = (t.cuda() for t in (eta, s, d, w))
    eta_out, s_out = loop_gpu(eg, sg, dg, J_gpu)
    assert eta_out.device.type == "cuda"
    assert rel(eta_out.cpu(), out_cpu[0]) < 1e-10 and rel(s_out.cpu(), out_cpu[1]) < 1e-10
    eta_rec, s_rec = loop_gpu.inverse(eta_out, s_out, dg, J_gpu)
    assert rel(eta_rec.cpu(), eta) < 1e-9 and rel(s_rec.cpu(), s) < 1e-9
    got, _ = memory_free_grads(loop_gpu, J_gpu, eg, sg, dg, wg)
    assert all(g.device.type == "cuda" for g in got)
    assert_grads_close([g.cpu() for g in got], expected, 1e-7, NAMES)
    got_bridge = bridge_grads(loop_gpu, J_gpu, eg, sg, dg, wg)
    assert_grads_close([g.cpu() for g in got_bridge], expected, 1e-7, NAMES)
    # cupy in, cupy out
    res = loop_gpu(
        cupy.asarray(eta.numpy()), cupy.asarray(s.numpy()), cupy.asarray(d.numpy()), J_gpu
    )
    assert all(isinstance(r, cupy.ndarray) for r in res)


@pytest.mark.gpu
@needs_cuda_and_cupy
def test_gpu_loop_hands_cupy_arrays_to_the_operator():
    import cupy

    seen = []
    A_np = np.random.default_rng(16).standard_normal((N * N, N * N)) / N
    A = cupy.asarray(A_np)

    class Spy(pylops.LinearOperator):
        def __init__(self):
            super().__init__(dtype=np.float64, dims=(N, N), dimsd=(N, N))

        def _matvec(self, x):
            return A @ x

        def _rmatvec(self, y):
            return A.T @ y

        def _matmat(self, X):
            seen.append(type(X))
            return A @ X

        def _rmatmat(self, Y):
            seen.append(type(Y))
            return A.T @ Y

    J_cpu = as_operator(pylops.MatrixMult(A_np), model_shape=(N, N), data_shape=(N, N))
    eta, s, d = make_inputs((N, N))
    loop = make_loop(J_cpu, eta, s, d, type="hint")
    w = torch.randn_like(eta)
    expected, _ = memory_free_grads(loop, J_cpu, eta, s, d, w)
    loop_gpu = twin(loop, None).cuda()
    got, _ = memory_free_grads(loop_gpu, Spy(), *(t.cuda() for t in (eta, s, d, w)))
    # every application of J and J^T on the GPU received cupy arrays (no trip through the host)
    assert seen and all(t is cupy.ndarray for t in seen)
    assert_grads_close([g.cpu() for g in got], expected, 1e-7, NAMES)
