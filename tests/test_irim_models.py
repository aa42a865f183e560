"""i-RIM with multi-channel and complex models (``NetworkLoop(..., n_model, complex_model)``).

For real models of 1, 2 and 3 channels and complex models of 1 and 2 channels, each with a PyLops
operator, a dense matrix and a pair of torch callables, the loop is checked for invertibility,
against plain autograd and forward-mode AD (every reverse mode, the jvp), with dot tests of its
Jacobian in every ``wrt``, with Taylor tests for eta, s, d and the parameters, and against a
differentiable reference whose physics is a torch matrix. A complex loop is checked to BE the
real loop with twice the channels and the real-stacked operator, weights and all.
"""

from __future__ import annotations

import math

import numpy as np
import pylops
import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_parameters

import invops
from invops import NetworkLoop
from invops.operators import as_operator
from invops.physics import TorchMRI, cartesian_mask
from invops.testing import TensorMemoryTracker, check_against_autograd, dottest, gradient_test

F64, C128 = torch.float64, torch.complex128
N = 8  # model side (the conditioners downsample by 4)
B = 2
H0 = 1e-3  # Taylor steps start at 0.1% of the point (see test_irim.py)

pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a, b) -> float:
    a, b = torch.as_tensor(a).detach(), torch.as_tensor(b).detach()
    return float((a - b).abs().max() / max(float(b.abs().max()), 1e-300))


def model_shape(k: int) -> tuple[int, ...]:
    """The operator's model: ``(N, N)`` for one channel, ``(k, N, N)`` for more."""
    return (N, N) if k == 1 else (k, N, N)


def dense_of(forward, shape, dtype) -> np.ndarray:
    """The matrix of a batched torch callable, column by column."""
    n = math.prod(shape)
    basis = torch.eye(n, dtype=dtype).reshape(n, *shape)
    return forward(basis).reshape(n, -1).T.numpy().copy()


# ------------------------------------------------------------------------------------ operators
def real_physics(kind: str, k: int):
    """``(J, reference matrix operator, data shape)`` for a real model of ``k`` channels."""
    ms = model_shape(k)
    rng = np.random.default_rng(20 + k)
    if kind == "pylops":  # a sum of per-channel blurs: data of one channel
        blurs = [
            pylops.signalprocessing.Convolve2D(
                (N, N), h=rng.standard_normal((3, 3)) / 3, offset=(1, 1)
            )
            for _ in range(k)
        ]
        J = blurs[0] if k == 1 else pylops.HStack(blurs)
        J.dims, J.dimsd = ms, (N, N)
        dense, ds = J.todense(), (N, N)
    elif kind == "matrix":
        n = math.prod(ms)
        dense = rng.standard_normal((3 * n // 4, n)) / math.sqrt(n)
        J, ds = as_operator(dense, model_shape=ms), (dense.shape[0],)
    elif kind == "callables":  # a 3x3 convolution from k channels to 2
        w = torch.from_numpy(rng.standard_normal((2, k, 3, 3)) / 3)

        def forward(x):
            x = x[:, None] if k == 1 else x
            return F.conv2d(x, w.to(x), padding=1)

        def adjoint(y):
            out = F.conv_transpose2d(y, w.to(y), padding=1)
            return out[:, 0] if k == 1 else out

        J, ds = (forward, adjoint), (2, N, N)
        dense = dense_of(forward, ms, F64)
    else:
        raise KeyError(kind)
    ref = as_operator(torch.from_numpy(np.ascontiguousarray(dense)), ms, ds)
    return J, ref, ds


def complex_physics(kind: str, k: int):
    """``(J, reference matrix operator, data shape)`` for a complex model of ``k`` channels."""
    ms = model_shape(k)
    rng = np.random.default_rng(30 + k)
    masks = [cartesian_mask((N, N), 2, rng=rng) for _ in range(k)]
    if kind == "pylops":  # MRI2D (k = 1), or a sum of MRI2D of the channels (k = 2)
        parts = [pylops.medical.MRI2D((N, N), mask=m) for m in masks]
        J = parts[0] if k == 1 else pylops.HStack(parts)
        J.dims, J.dimsd = ms, (N, N)
        dense, ds = J.todense(), (N, N)
    elif kind == "matrix":
        n = math.prod(ms)
        dense = (rng.standard_normal((n // 2, n)) + 1j * rng.standard_normal((n // 2, n))) / n
        J, ds = as_operator(dense, model_shape=ms, real_model=False), (n // 2,)
    elif kind == "callables":  # torch FFT MRI of complex-weighted channel sums
        weights = torch.from_numpy(
            rng.standard_normal((k, N, N)) + 1j * rng.standard_normal((k, N, N))
        )
        mri = TorchMRI(masks[0])

        def forward(x):
            x = x[:, None] if k == 1 else x
            return mri.apply((x * weights.to(x.device)).sum(1))

        def adjoint(y):
            out = mri.adjoint(y)[:, None] * weights.conj().to(y.device)
            return out[:, 0] if k == 1 else out

        J, ds = (forward, adjoint), (N, N)
        dense = dense_of(forward, ms, C128)
    else:
        raise KeyError(kind)
    ref = as_operator(torch.from_numpy(np.ascontiguousarray(dense)), ms, ds, real_model=False)
    return J, ref, ds


# ------------------------------------------------------------------------------------ helpers
def make_inputs(n_model, n_in, data_shape, complex_data, batch=B, seed=0):
    gen = torch.Generator().manual_seed(seed)
    eta = 0.5 * torch.randn(batch, n_model, N, N, generator=gen, dtype=F64)
    s = torch.randn(batch, n_in - n_model, N, N, generator=gen, dtype=F64)
    d = torch.randn(batch, *data_shape, generator=gen, dtype=F64)
    if complex_data:
        d = torch.complex(d, torch.randn(batch, *data_shape, generator=gen, dtype=F64))
    return eta, s, d


def make_loop(J, eta, s, d, n_model, complex_model=False, link=None, maxiter=2, **kwargs):
    torch.manual_seed(0)
    n_in = eta.shape[1] + s.shape[1]
    loop = NetworkLoop(
        n_in, 4, maxiter, link=link, n_model=n_model, complex_model=complex_model, **kwargs
    ).double()
    with torch.no_grad():
        loop(eta, s, d, J)  # data-dependent (ActNorm) initialisation
    randomize_parameters(loop, 0.1)
    return loop


def loss_of(eta_out, s_out, w):
    return (w * eta_out).sum() + 0.05 * (s_out**2).sum()


def memory_free_grads(loop, J, eta, s, d, w):
    """``loop.backward`` gradients of ``loss_of`` (eta, s, d, *params) and the recomputed input."""
    with torch.no_grad():
        eta_out, s_out = loop(eta, s, d, J)
    loop.zero_grad(set_to_none=True)
    deta, ds, eta_in, s_in, dd = loop.backward(w, 0.1 * s_out, eta_out, s_out, d, J)
    grads = [deta, ds, dd] + [
        torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in loop.parameters()
    ]
    loop.zero_grad(set_to_none=True)
    return grads, (eta_in, s_in)


def reference_grads(loop, ref_op, eta, s, d, w):
    """Plain autograd through the loop's math with the physics applied by ``ref_op``."""
    leaves = [t.clone().requires_grad_() for t in (eta, s, d)]
    params = list(loop.parameters())
    with invops.plain_autograd():
        out = loop(*leaves, ref_op)
        return list(torch.autograd.grad(loss_of(*out, w), leaves + params))


def assert_grads_close(got, ref, rtol):
    floor = 1e-6 * max(float(r.abs().max()) for r in ref)
    errs = {}
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a.shape == b.shape and a.dtype == b.dtype, (i, a.shape, b.shape, a.dtype, b.dtype)
        errs[i] = float((a - b).abs().max()) / max(float(b.abs().max()), floor)
    bad = {i: e for i, e in errs.items() if not e <= rtol}
    assert not bad, bad


# (complex?, channels of the operator's model, operator kind, link)
CASES = [
    (False, k, kind, "identity") for k in (1, 2, 3) for kind in ("pylops", "matrix", "callables")
]
CASES += [(True, k, kind, "identity") for k in (1, 2) for kind in ("pylops", "matrix", "callables")]
# nonlinear links: real (n_model = 2) and complex parts below, the magnitude link further down
CASES += [(False, 2, "callables", "softplus"), (True, 1, "pylops", "softplus")]


def case_id(case):
    cplx, k, kind, link = case
    return f"{'complex' if cplx else 'real'}{k}-{kind}-{link}"


def build(case):
    cplx, k, kind, link = case
    J, ref, ds = (complex_physics if cplx else real_physics)(kind, k)
    n_model = 2 * k if cplx else k
    n_in = 2 * n_model + 1  # an odd channel count, memory wider than the gradient
    eta, s, d = make_inputs(n_model, n_in, ds, complex_data=cplx)
    loop = make_loop(J, eta, s, d, n_model, complex_model=cplx, link=link)
    return dict(J=J, ref=ref, eta=eta, s=s, d=d, loop=loop, link=link)


@pytest.fixture(params=CASES, ids=[case_id(c) for c in CASES])
def setup(request):
    return build(request.param)


# the reference check applies the physics as a dense torch matrix: pointless for matrices
REF_CASES = [c for c in CASES if c[2] != "matrix"]


@pytest.fixture(params=REF_CASES, ids=[case_id(c) for c in REF_CASES])
def ref_setup(request):
    return build(request.param)


# ------------------------------------------------------------------------------------ the matrix
def test_inverse_and_jacobian_dottests(setup):
    loop, J, eta, s, d = (setup[k] for k in ("loop", "J", "eta", "s", "d"))
    eta_out, s_out = loop(eta, s, d, J)
    assert eta_out.shape == eta.shape and s_out.shape == s.shape
    assert rel(eta_out, eta) > 1e-2
    eta_rec, s_rec = loop.inverse(eta_out, s_out, d, J)
    assert rel(eta_rec, eta) < 1e-9 and rel(s_rec, s) < 1e-9
    n_params = sum(p.numel() for p in loop.parameters())
    for wrt, n_in in (("input", 0), ("params", n_params), ("both", n_params)):
        jac = loop.jacobian(eta, s, d, J, wrt=wrt)
        n_in += 0 if wrt == "params" else eta.numel() + s.numel()
        assert jac.shape == (eta.numel() + s.numel(), n_in)
        assert dottest(jac, rtol=1e-10)


def test_against_plain_autograd_and_forward_ad(setup):
    loop, J, eta, s, d = (setup[k] for k in ("loop", "J", "eta", "s", "d"))
    errors = check_against_autograd(
        loop.bind(J), torch.cat((eta, s), 1), d, rtol=1e-8, jvp_oracle="forward_ad"
    )
    assert {"backward:cond0", "backward_inverse:input", "vjp:input", "jvp:tangent"} <= set(errors)


def test_against_differentiable_reference(ref_setup):
    """Gradients against plain autograd with the physics applied by a dense torch matrix."""
    setup = ref_setup
    loop, J, ref, eta, s, d = (setup[k] for k in ("loop", "J", "ref", "eta", "s", "d"))
    w = torch.randn_like(eta)
    got, _ = memory_free_grads(loop, J, eta, s, d, w)
    assert_grads_close(got, reference_grads(loop, ref, eta, s, d, w), 1e-8)
    with torch.no_grad():
        out, out_ref = loop(eta, s, d, J), loop(eta, s, d, ref)
    assert rel(out[0], out_ref[0]) < 1e-12 and rel(out[1], out_ref[1]) < 1e-12


def test_taylor_eta_s_d_and_parameters(setup):
    loop, J, eta, s, d = (setup[k] for k in ("loop", "J", "eta", "s", "d"))
    w = torch.randn_like(eta)
    (deta, ds, dd, *_), (eta_in, s_in) = memory_free_grads(loop, J, eta, s, d, w)
    assert rel(eta_in, eta) < 1e-9 and rel(s_in, s) < 1e-9
    assert dd.dtype == d.dtype  # a complex datum has a complex cotangent
    # complex data are perturbed through their real and imaginary parts: the cotangent of a
    # complex d is dL/dRe d + i dL/dIm d
    if d.is_complex():
        point, grads = [eta, s, d.real, d.imag], [deta, ds, dd.real, dd.imag]
    else:
        point, grads = [eta, s, d], [deta, ds, dd]

    def f(eta_, s_, *d_parts):
        d_ = torch.complex(*d_parts) if len(d_parts) == 2 else d_parts[0]
        return loss_of(*loop(eta_, s_, d_, J), w)

    zero = [torch.zeros_like(t) for t in point]
    for group in ([0], [1], list(range(2, len(point)))):  # eta, s and d, each on its own
        direction = list(zero)
        for i in group:
            direction[i] = torch.randn_like(zero[i])
        gradient_test(f, point, grads, direction=direction, h0=H0, n_steps=8)

    # the parameters, through vjp (which leaves p.grad alone)
    params = list(loop.parameters())
    with torch.no_grad():
        eta_out, s_out = loop(eta, s, d, J)
    *_, dtheta, _, _, _ = loop.vjp(w, 0.1 * s_out, eta_out, s_out, d, J)
    assert all(p.grad is None for p in params)
    values = [p.detach().clone() for p in params]

    def g(*new):
        with torch.no_grad():
            for p, v in zip(params, new):
                p.copy_(v)
            out = loss_of(*loop(eta, s, d, J), w)
            for p, v in zip(params, values):
                p.copy_(v)
        return out

    gradient_test(g, values, list(dtheta), h0=H0, n_steps=8)


# ------------------------------------------------------------------------ complex = real
def real_stacked(dense: np.ndarray) -> np.ndarray:
    """``z -> [Re Jz; Im Jz]`` on ``[Re z; Im z]``: the real form of a complex matrix."""
    return np.block([[dense.real, -dense.imag], [dense.imag, dense.real]])


@pytest.mark.parametrize("kind", ["pylops", "matrix", "callables"])
@pytest.mark.parametrize("k", [1, 2])
def test_complex_loop_is_the_real_loop_with_the_real_stacked_operator(kind, k):
    link = "softplus"  # a nonlinear link, applied to the real and imaginary parts alike
    J, ref, ds = complex_physics(kind, k)
    dense = ref._forward(
        torch.eye(math.prod(model_shape(k)), dtype=C128).reshape(-1, *model_shape(k))
    )
    dense = dense.reshape(dense.shape[0], -1).T.numpy()
    n_model = 2 * k
    eta, s, d = make_inputs(n_model, 2 * n_model + 1, ds, complex_data=True)
    cloop = make_loop(J, eta, s, d, n_model, complex_model=True, link=link, type="hint")
    rloop = NetworkLoop(cloop.n_in, 4, 2, link=link, n_model=n_model, type="hint").double()
    rloop.load_state_dict(cloop.state_dict())  # the same modules: the weights load strictly
    R = as_operator(real_stacked(dense), (n_model, N, N), (2, math.prod(ds)))
    d_real = torch.stack((d.real, d.imag), 1).reshape(B, 2, -1)

    out_c, out_r = cloop(eta, s, d, J), rloop(eta, s, d_real, R)
    assert rel(out_c[0], out_r[0]) < 1e-10 and rel(out_c[1], out_r[1]) < 1e-10
    back_c, back_r = cloop.inverse(*out_c, d, J), rloop.inverse(*out_r, d_real, R)
    assert rel(back_c[0], back_r[0]) < 1e-10 and rel(back_c[1], back_r[1]) < 1e-10
    w = torch.randn_like(eta)
    g_c, _ = memory_free_grads(cloop, J, eta, s, d, w)
    g_r, _ = memory_free_grads(rloop, R, eta, s, d_real, w)
    # the complex data cotangent is d/dRe d + i d/dIm d
    g_r[2] = g_r[2].reshape(B, 2, *ds)
    g_r[2] = torch.complex(g_r[2][:, 0], g_r[2][:, 1])
    for a, b in zip(g_c, g_r):
        assert rel(a, b) < 1e-10
    # forward mode too
    deta = torch.randn_like(eta)
    jvp_c = cloop.jvp(eta, s, d, J, deta=deta)
    jvp_r = rloop.jvp(eta, s, d_real, R, deta=deta)
    assert rel(jvp_c[2], jvp_r[2]) < 1e-10 and rel(jvp_c[3], jvp_r[3]) < 1e-10


# ------------------------------------------------------------------------------------ links
def test_complex_link_on_parts_and_magnitude():
    J, ref, ds = complex_physics("pylops", 1)
    eta, s, d = make_inputs(2, 4, ds, complex_data=True)
    parts = make_loop(J, eta, s, d, 2, complex_model=True, link="softplus")
    magnitude = NetworkLoop(
        4, 4, 2, link="softplus", n_model=2, complex_model=True, complex_link="magnitude"
    ).double()
    magnitude.load_state_dict(parts.state_dict())
    z = torch.complex(eta[:, 0], eta[:, 1])
    assert (
        rel(parts.physical_model(eta), torch.complex(F.softplus(z.real), F.softplus(z.imag)))
        < 1e-15
    )
    r = z.abs()
    assert rel(magnitude.physical_model(eta), F.softplus(r) * z / r) < 1e-14
    # the magnitude link is exact in every mode, too
    check_against_autograd(
        magnitude.bind(J), torch.cat((eta, s), 1), d, rtol=1e-8, jvp_oracle="forward_ad"
    )
    assert dottest(magnitude.jacobian(eta, s, d, J, wrt="both"), rtol=1e-10)
    # with the identity link both conventions are the identity
    ident = NetworkLoop(4, 4, 2, n_model=2, complex_model=True, complex_link="magnitude").double()
    assert rel(ident.physical_model(eta), z) < 1e-15
    zero = torch.zeros(1, 2, N, N, dtype=F64)
    assert torch.isfinite(torch.view_as_real(magnitude.physical_model(zero))).all()


def test_one_link_per_channel():
    J, ref, ds = real_physics("pylops", 2)
    eta, s, d = make_inputs(2, 5, ds, complex_data=False)
    loop = make_loop(J, eta, s, d, 2, link=["exp", None])
    model = loop.physical_model(eta)
    assert rel(model[:, 0], eta[:, 0].exp()) < 1e-15 and rel(model[:, 1], eta[:, 1]) < 1e-15
    check_against_autograd(
        loop.bind(J), torch.cat((eta, s), 1), d, rtol=1e-8, jvp_oracle="forward_ad"
    )
    with pytest.raises(ValueError, match="one per model channel"):
        NetworkLoop(5, 4, 1, link=["exp"], n_model=2)


def test_numpy_in_numpy_out():
    J, ref, ds = complex_physics("pylops", 1)
    eta, s, d = make_inputs(2, 4, ds, complex_data=True)
    loop = make_loop(J, eta, s, d, 2, complex_model=True)
    out = loop(eta.numpy(), s.numpy(), d.numpy(), J)
    assert all(isinstance(o, np.ndarray) for o in out)
    assert rel(torch.from_numpy(out[0]), loop(eta, s, d, J)[0]) < 1e-15
    assert isinstance(loop.physical_model(eta.numpy()), np.ndarray)


# ------------------------------------------------------------------------------------ errors
def test_constructor_errors():
    with pytest.raises(ValueError, match=r"n_in must be >= 2 \* n_model = 6.*n_in=5"):
        NetworkLoop(5, 4, 1, n_model=3)
    with pytest.raises(ValueError, match="n_in must be >= 2"):
        NetworkLoop(3, 4, 1, n_model=2, complex_model=True)
    with pytest.raises(ValueError, match="even n_model"):
        NetworkLoop(6, 4, 1, n_model=3, complex_model=True)
    with pytest.raises(ValueError, match="n_model"):
        NetworkLoop(6, 4, 1, n_model=0)
    with pytest.raises(ValueError, match="complex_link"):
        NetworkLoop(4, 4, 1, n_model=2, complex_model=True, complex_link="phase")


class Spy:
    """A pair of torch callables that counts its applications."""

    def __init__(self, scale=1.0):
        self.calls, self.scale = 0, scale

    def forward(self, x):
        self.calls += 1
        return self.scale * x

    def adjoint(self, y):
        self.calls += 1
        return self.scale * y.real if y.is_complex() else self.scale * y


def test_state_errors_before_any_compute():
    spy = Spy()
    J = (spy.forward, spy.adjoint)
    eta, s, d = make_inputs(2, 5, (2, N, N), complex_data=False)
    loop = NetworkLoop(5, 4, 1, n_model=2).double()
    with pytest.raises(ValueError, match=r"eta must have 2 channels"):
        loop(eta[:, :1], torch.cat((s, s[:, :1]), 1), d, J)
    with pytest.raises(ValueError, match=r"s must have shape \(B, 3, 8, 8\)"):
        loop(eta, s[:, :2], d, J)
    with pytest.raises(
        ValueError, match=r"eta .*expects models of shape \(1, 8, 8\).*\(2, 2, 8, 8\)"
    ):
        loop(eta, s, d, as_operator(J, model_shape=(1, N, N), data_shape=(2, N, N)))
    assert spy.calls == 0


def test_complex_model_needs_complex_data_before_any_compute():
    spy = Spy()
    eta, s, d = make_inputs(2, 4, (N, N), complex_data=True)
    loop = NetworkLoop(4, 4, 1, n_model=2, complex_model=True).double()
    for J in ((spy.forward, spy.adjoint), pylops.medical.MRI2D((N, N), mask=np.ones((N, N)))):
        for call in (loop, loop.inverse, loop.jacobian):
            with pytest.raises(TypeError, match="complex"):
                call(eta, s, d.real.contiguous(), J)
        with pytest.raises(TypeError, match="complex"):
            loop.backward(eta, s, eta, s, d.real.contiguous(), J)
    assert spy.calls == 0


def test_complex_model_with_an_adjoint_that_drops_the_imaginary_part():
    mri = pylops.medical.MRI2D((N, N), mask=np.ones((N, N)))
    eta, s, d = make_inputs(2, 4, (N, N), complex_data=True)
    loop = NetworkLoop(4, 4, 1, n_model=2, complex_model=True).double()
    with pytest.raises(TypeError, match="real_model=False"):
        loop(eta, s, d, as_operator(mri, real_model=True))
    loop(eta, s, d, as_operator(mri, real_model=False))  # the right adapter works


# ------------------------------------------------------------------------------------ memory
def _peaks(maxiter, n_model, complex_model):
    n = 16
    k = n_model // 2 if complex_model else n_model
    if complex_model:
        J = pylops.medical.MRI2D((n, n), mask=cartesian_mask((n, n), 2, rng=0))
        ds = (n, n)
    else:
        blurs = [
            pylops.signalprocessing.Convolve2D(
                (n, n), h=np.full((3, 3), 0.1 * (c + 1)), offset=(1, 1)
            )
            for c in range(k)
        ]
        J = pylops.HStack(blurs)
        J.dims, J.dimsd = (k, n, n), (n, n)
        ds = (n, n)
    gen = torch.Generator().manual_seed(0)
    batch, n_in = 4, 2 * n_model + 1
    eta = 0.5 * torch.randn(batch, n_model, n, n, generator=gen, dtype=F64)
    s = torch.randn(batch, n_in - n_model, n, n, generator=gen, dtype=F64)
    d = torch.randn(batch, *ds, generator=gen, dtype=F64)
    if complex_model:
        d = torch.complex(d, torch.randn(batch, *ds, generator=gen, dtype=F64))
    loop = make_loop(J, eta, s, d, n_model, complex_model=complex_model, maxiter=maxiter)
    with torch.no_grad():
        eta_out, s_out = loop(eta, s, d, J)
    w = torch.randn_like(eta)
    params = sum(p.numel() * p.element_size() for p in loop.parameters())
    with TensorMemoryTracker() as mem:
        loop.backward(w, 0.1 * s_out, eta_out, s_out, d, J)
    backward = mem.peak
    loop.zero_grad(set_to_none=True)
    with TensorMemoryTracker() as mem, invops.plain_autograd():
        leaves = [t.clone().requires_grad_() for t in (eta, s)]
        loss_of(*loop(*leaves, d, J), w).backward()
    plain = mem.peak
    return dict(backward=backward, plain=plain, params=params, state=(eta.numel() + s.numel()) * 8)


@pytest.mark.parametrize(
    "n_model, complex_model", [(2, True), (3, False)], ids=["complex1", "real3"]
)
def test_backward_memory_does_not_grow_with_maxiter(n_model, complex_model):
    p = {m: _peaks(m, n_model, complex_model) for m in (2, 8)}
    growth = (p[8]["backward"] - p[2]["backward"]) - (p[8]["params"] - p[2]["params"])
    # no growth beyond the parameter gradients themselves (10% slack) ...
    assert growth <= 0.1 * p[2]["backward"], p
    # ... far below what plain autograd stores per iteration, which grows
    plain_per_iteration = (p[8]["plain"] - p[2]["plain"]) / 6
    assert plain_per_iteration > p[2]["state"], p
    assert growth < plain_per_iteration, p
    assert p[8]["backward"] < p[8]["plain"] / 2, p
