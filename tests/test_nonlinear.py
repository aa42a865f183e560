"""NonlinearOperator and the operator algebra: compositions of networks and physics operators.

Every composite is checked against the same composition written by hand in plain torch (the
network's raw math and the operators as dense torch matrices): ``apply`` to 1e-12, the Jacobian
in every ``wrt`` against ``torch.func.jvp`` / ``torch.func.vjp`` and by the PyLops dot test
(1e-10 in float64, 1e-4 in float32), the public ``jvp`` / ``vjp``, and ``loss.backward()``
through ``apply`` against plain autograd for the input and every part's parameters.
"""

from __future__ import annotations

import numpy as np
import pylops
import pytest
import scipy.sparse
import scipy.sparse.linalg
import torch
from conftest import randomize_parameters

import invops
from invops.nonlinear import BlockDiag, Composition, Scaled, Sum, VStack
from invops.operators import Operator, as_operator, blockdiag, vstack
from invops.testing import TensorMemoryTracker

F64 = torch.float64
B = 2
SHAPE = (2, 4, 4)  # one sample of the network's input
N = 32
pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(a, b) -> float:
    a = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a.detach()).double()
    b = torch.as_tensor(np.asarray(b) if not isinstance(b, torch.Tensor) else b.detach()).double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _dottest(J, rtol=1e-10):
    return pylops.utils.dottest(J, rtol=rtol, atol=0.0, raiseerror=True)


# ----------------------------------------------------------------------------------- fixtures
class Parts:
    """A small Glow, two PyLops matrices and their dense torch versions, all float64."""

    def __init__(self, dtype=F64) -> None:
        torch.manual_seed(3)
        rng = np.random.default_rng(3)
        self.G = invops.NetworkGlow(2, 4, L=1, K=2).to(dtype)
        self.G(torch.randn(8, *SHAPE, dtype=dtype))  # data-dependent ActNorm initialisation
        randomize_parameters(self.G, scale=0.2)
        np_dtype = np.float64 if dtype == F64 else np.float32
        self.A_np = (rng.standard_normal((20, N)) / 4).astype(np_dtype)
        self.B_np = (rng.standard_normal((N, 12)) / 3).astype(np_dtype)
        self.A = as_operator(pylops.MatrixMult(self.A_np), model_shape=SHAPE)
        self.Bop = as_operator(pylops.MatrixMult(self.B_np), data_shape=SHAPE)
        self.A_t = torch.from_numpy(self.A_np)
        self.B_t = torch.from_numpy(self.B_np)
        self.dtype = dtype

    # hand-written pieces: raw network math and dense matrices
    def g(self, x):
        return self.G._forward(x)[0]

    def ginv(self, z):
        return self.G._inverse(z)[0]

    def a(self, x):
        return x.reshape(x.shape[0], -1) @ self.A_t.T

    def b(self, u):
        return (u @ self.B_t.T).reshape(u.shape[0], *SHAPE)


def cases(p: Parts) -> dict:
    """name -> (composite, hand-written function, input shape)."""
    A, G, Bop = p.A, p.G, p.Bop
    image, vector = (B, *SHAPE), (B, 12)
    return {
        "A@G": (A @ G, lambda x: p.a(p.g(x)), image),
        "G@B": (G @ Bop, lambda u: p.g(p.b(u)), vector),
        "A@G@B": (A @ G @ Bop, lambda u: p.a(p.g(p.b(u))), vector),
        "A@G.reverse()": (A @ G.reverse(), lambda z: p.a(p.ginv(z)), image),
        "sum": (A @ G + A @ G.reverse(), lambda x: p.a(p.g(x)) + p.a(p.ginv(x)), image),
        "difference": (A @ G - 0.5 * A, lambda x: p.a(p.g(x)) - 0.5 * p.a(x), image),
        "sum-of-chains": (
            A @ G @ Bop + 2.0 * (A @ G.reverse() @ Bop),
            lambda u: p.a(p.g(p.b(u))) + 2.0 * p.a(p.ginv(p.b(u))),
            vector,
        ),
        "vstack": (
            vstack([A @ G, A @ G.reverse(), A]),
            lambda x: torch.cat([p.a(p.g(x)), p.a(p.ginv(x)), p.a(x)], dim=1),
            image,
        ),
        "vstack-of-chains": (
            vstack([A @ G @ Bop, G @ Bop]),
            lambda u: torch.cat([p.a(p.g(p.b(u))), p.g(p.b(u)).reshape(B, -1)], dim=1),
            vector,
        ),
        "blockdiag": (
            blockdiag([A @ G, Bop], model_shapes=[SHAPE, (12,)]),
            lambda v: torch.cat(
                [p.a(p.g(v[:, :N].reshape(B, *SHAPE))), p.b(v[:, N:]).reshape(B, -1)], dim=1
            ),
            (B, N + 12),
        ),
    }


CASE_NAMES = [
    "A@G",
    "G@B",
    "A@G@B",
    "A@G.reverse()",
    "sum",
    "difference",
    "sum-of-chains",
    "vstack",
    "vstack-of-chains",
    "blockdiag",
]


@pytest.fixture(scope="module")
def parts():
    return Parts()


class _Reference(torch.nn.Module):
    """The hand-written composition as a module holding the network (for functional_call)."""

    def __init__(self, G, fn):
        super().__init__()
        self.G, self.fn = G, fn

    def forward(self, x):
        return self.fn(x)


def _reference_call(p: Parts, fn, F):
    """``ref(x, *params)`` with params ordered as ``F``'s trainable parameters."""
    ref = _Reference(p.G, fn)
    names = {id(q): n for n, q in ref.named_parameters()}
    order = [names[id(q)] for q in F.parameters() if q.requires_grad]

    def call(x, *params):
        return torch.func.functional_call(ref, dict(zip(order, params)), (x,))

    return call, [q.detach() for q in F.parameters() if q.requires_grad]


# ----------------------------------------------------------------------------------- type
def test_every_public_module_is_a_nonlinear_operator():
    # coupling laws are parts of a coupling (maps of a parameter tensor too), not operators
    names = [
        n
        for n in invops.__all__
        if isinstance(getattr(invops, n), type)
        and issubclass(getattr(invops, n), torch.nn.Module)
        and not issubclass(getattr(invops, n), invops.CouplingLaw)
    ]
    assert len(names) > 30
    for name in names:
        assert issubclass(getattr(invops, name), invops.NonlinearOperator), name
    assert issubclass(invops.InvertibleModule, invops.NonlinearOperator)
    assert issubclass(Operator, invops.NonlinearOperator)


def test_as_operator_results_and_composites_are_nonlinear_operators(parts):
    for name in CASE_NAMES:
        F, _, _ = cases(parts)[name]
        assert isinstance(F, invops.NonlinearOperator), name
    assert isinstance(as_operator(np.eye(3)), invops.NonlinearOperator)
    assert isinstance(parts.A @ parts.G, Composition)
    assert isinstance(parts.A @ parts.G + parts.A @ parts.G, Sum)
    assert isinstance(-parts.G, Scaled)
    assert isinstance(vstack([parts.G]), VStack)
    assert isinstance(blockdiag([parts.A]), BlockDiag)


def test_composites_hold_the_parts_parameters(parts):
    F = parts.A @ parts.G + parts.A @ parts.G.reverse()
    assert [id(q) for q in F.parameters()] == [id(q) for q in parts.G.parameters()]
    assert set(F.state_dict()) >= {"ops.0.ops.1." + k for k in parts.G.state_dict()}
    assert F.double() is F


# ----------------------------------------------------------------------------------- apply
@pytest.mark.parametrize("name", CASE_NAMES)
def test_apply_equals_hand_written_composition(parts, name):
    F, ref, shape = cases(parts)[name]
    x = torch.randn(shape, dtype=F64)
    with torch.no_grad():
        expected = ref(x)
    y = F.apply(x)
    assert y.shape == expected.shape
    assert _rel(y, expected) < 1e-12
    assert _rel(F(x), expected) < 1e-12
    y_np = F.apply(x.numpy())
    assert isinstance(y_np, np.ndarray) and _rel(y_np, expected) < 1e-12


# ----------------------------------------------------------------------------------- Jacobians
@pytest.mark.parametrize("wrt", ["input", "params", "both"])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_jacobian_dottest_and_against_torch_func(parts, name, wrt):
    F, fn, shape = cases(parts)[name]
    x = torch.randn(shape, dtype=F64)
    J = F.jacobian(x, wrt=wrt)
    assert isinstance(J, pylops.LinearOperator)
    _dottest(J)
    call, params = _reference_call(parts, fn, F)
    n_x = x.numel()
    n_p = sum(q.numel() for q in params)
    n_cols = {"input": n_x, "params": n_p, "both": n_x + n_p}[wrt]
    y = call(x, *params)
    assert J.shape == (y.numel(), n_cols)
    if wrt == "input":
        assert tuple(J.dims) == tuple(x.shape) and tuple(J.dimsd) == tuple(y.shape)

    v = np.random.default_rng(0).standard_normal(n_cols)
    vt = torch.from_numpy(v)
    dx = vt[:n_x].reshape(x.shape) if wrt != "params" else torch.zeros_like(x)
    rest = vt[n_x:] if wrt == "both" else vt
    dps, offset = [], 0
    for q in params:
        if wrt == "input":
            dps.append(torch.zeros_like(q))
        else:
            dps.append(rest[offset : offset + q.numel()].reshape(q.shape))
            offset += q.numel()
    with invops.plain_autograd():
        _, jvp_ref = torch.func.jvp(call, (x, *params), (dx, *dps))
    assert _rel(J.matvec(v), jvp_ref.reshape(-1)) < 1e-10

    w = torch.from_numpy(np.random.default_rng(1).standard_normal(y.numel())).reshape(y.shape)
    with invops.plain_autograd():
        _, pull = torch.func.vjp(call, x, *params)
        grads = pull(w)
    parts_ref = []
    if wrt != "params":
        parts_ref.append(grads[0].reshape(-1))
    if wrt != "input":
        parts_ref += [g.reshape(-1) for g in grads[1:]]
    expected = torch.cat(parts_ref)
    assert _rel(J.rmatvec(w.reshape(-1).numpy()), expected) < 1e-10


@pytest.mark.parametrize("name", ["A@G", "A@G.reverse()", "vstack", "sum-of-chains"])
def test_jacobian_against_finite_differences(parts, name):
    F, _, shape = cases(parts)[name]
    x = torch.randn(shape, dtype=F64)
    v = torch.randn(shape, dtype=F64)
    h = 1e-5
    fd = (F.apply(x + h * v) - F.apply(x - h * v)) / (2 * h)
    Jv = F.jacobian(x).matvec(v.reshape(-1).numpy())
    assert _rel(Jv, fd.reshape(-1)) < 1e-7


@pytest.mark.parametrize("name", ["A@G", "G@B", "A@G.reverse()", "vstack", "blockdiag"])
def test_float32_jacobian_dottest(name):
    p = Parts(torch.float32)
    F, _, shape = cases(p)[name]
    x = torch.randn(shape)
    for wrt in ("input", "params", "both"):
        J = F.jacobian(x, wrt=wrt)
        assert J.dtype == np.float32
        _dottest(J, rtol=1e-4)


@pytest.mark.parametrize("name", ["A@G", "A@G@B", "A@G.reverse()", "sum", "vstack", "blockdiag"])
def test_public_jvp_and_vjp_against_torch_func(parts, name):
    F, fn, shape = cases(parts)[name]
    x = torch.randn(shape, dtype=F64)
    call, params = _reference_call(parts, fn, F)
    dx = torch.randn_like(x)
    dtheta = [torch.randn_like(q) for q in F.parameters()]
    y, dy = F.jvp(x, dx=dx, dtheta=dtheta)
    with invops.plain_autograd():
        y_ref, dy_ref = torch.func.jvp(call, (x, *params), (dx, *dtheta))
    assert _rel(y, y_ref) < 1e-12 and _rel(dy, dy_ref) < 1e-10
    w = torch.randn_like(y_ref)
    dx_out, dtheta_out = F.vjp(w, x)
    assert F.vjp(w, x, at="input")[0].shape == x.shape
    with invops.plain_autograd():
        grads = torch.func.vjp(call, x, *params)[1](w)
    assert _rel(dx_out, grads[0]) < 1e-10
    assert len(dtheta_out) == len(list(F.parameters()))
    for got, ref in zip(dtheta_out, grads[1:]):
        assert _rel(got, ref) < 1e-10
    # numpy in, numpy out
    dx_np, dtheta_np = F.vjp(w.numpy(), x.numpy())
    assert isinstance(dx_np, np.ndarray) and _rel(dx_np, grads[0]) < 1e-10


# ----------------------------------------------------------------------------------- autograd
@pytest.mark.parametrize("name", CASE_NAMES)
def test_backward_through_apply_fills_every_parts_grad(parts, name):
    F, fn, shape = cases(parts)[name]
    x0 = torch.randn(shape, dtype=F64)
    with torch.no_grad():
        w = torch.randn_like(fn(x0))
    for q in F.parameters():
        q.grad = None
    x = x0.clone().requires_grad_()
    (F.apply(x) * w).sum().backward()
    got = [q.grad.clone() for q in F.parameters()]
    dx = x.grad.clone()
    for q in F.parameters():
        q.grad = None
    x = x0.clone().requires_grad_()
    with invops.plain_autograd():
        (fn(x) * w).sum().backward()
    assert _rel(dx, x.grad) < 1e-10
    for g, q in zip(got, F.parameters()):
        assert g is not None and _rel(g, q.grad) < 1e-10
    for q in F.parameters():
        q.grad = None


def test_autograd_through_a_composite_is_memory_free_in_the_network():
    torch.manual_seed(0)
    x0 = torch.randn(4, 4, 8, 8, dtype=F64)
    A = as_operator(np.random.default_rng(0).standard_normal((10, 256)), model_shape=(4, 8, 8))
    peaks = {}
    for depth in (2, 16):
        layers = []
        for _ in range(depth):
            layers += [invops.ActNorm(4), invops.Conv1x1(4), invops.AffineLayer((4, 8, 8))]
        net = invops.Chain(*layers).double()
        net(x0)
        F = A @ net

        def run(F=F):
            x = x0.clone().requires_grad_()
            F.apply(x).pow(2).sum().backward()

        with TensorMemoryTracker() as tracker:
            run()
        params = sum(q.numel() * q.element_size() for q in net.parameters())
        peaks[depth] = (tracker.peak, params)
        # the explicit reverse mode and the Jacobian's adjoint do not store activations either
        with TensorMemoryTracker() as t_vjp:
            F.vjp(torch.ones(4, 10, dtype=F64), x0)
        with TensorMemoryTracker() as t_jac:
            F.jacobian(x0).rmatvec(np.ones(40))
        peaks[depth] += (t_vjp.peak, t_jac.peak)
    (p2, w2, v2, j2), (p16, w16, v16, j16) = peaks[2], peaks[16]
    assert p16 <= 1.1 * p2 + (w16 - w2), peaks
    assert v16 <= 1.1 * v2 + 2 * (w16 - w2), peaks
    assert j16 <= 1.1 * j2 + 2 * (w16 - w2), peaks


# ----------------------------------------------------------------------------------- conditions
def test_composition_with_a_conditional_layer():
    torch.manual_seed(0)
    layer = invops.ConditionalLayerGlow(3, 2, 4).double()
    x, c = torch.randn(2, 3, 4, 4, dtype=F64), torch.randn(2, 2, 4, 4, dtype=F64)
    layer(x, c)
    randomize_parameters(layer, scale=0.2)
    M = torch.from_numpy(np.random.default_rng(0).standard_normal((7, 48)))
    F = as_operator(M, model_shape=(3, 4, 4)) @ layer
    assert F.n_conditions == 1

    def ref(x, c):
        return layer._forward(x, c)[0].reshape(2, -1) @ M.T

    assert _rel(F.apply(x, c), ref(x, c)) < 1e-12
    for wrt in ("input", "params", "both"):
        _dottest(F.jacobian(x, c, wrt=wrt))
    w = torch.randn(2, 7, dtype=F64)
    dx, dtheta, dc = F.vjp(w, x, c)
    xr, cr = x.clone().requires_grad_(), c.clone().requires_grad_()
    with invops.plain_autograd():
        grads = torch.autograd.grad((ref(xr, cr) * w).sum(), [xr, cr, *layer.parameters()])
    assert _rel(dx, grads[0]) < 1e-10 and _rel(dc, grads[1]) < 1e-10
    for got, want in zip(dtheta, grads[2:]):
        assert _rel(got, want) < 1e-10
    with pytest.raises(TypeError, match="condition"):
        F.apply(x)


# ----------------------------------------------------------------------------------- subclasses
class Cube(invops.NonlinearOperator):
    """A user-written nonlinear operator with a parameter: y = a * x**3."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(1.5, dtype=F64))

    def _forward(self, x):
        return self.a * x**3


def test_user_subclass_gets_jvp_vjp_and_jacobian():
    op = Cube()
    x = torch.randn(3, 4, dtype=F64)
    M = torch.randn(5, 4, dtype=F64)
    F = as_operator(M) @ op
    for wrt in ("input", "params", "both"):
        _dottest(op.jacobian(x, wrt=wrt))
        _dottest(F.jacobian(x, wrt=wrt))
    dx = torch.randn_like(x)
    y, dy = op.jvp(x, dx=dx, dtheta=[torch.tensor(0.5, dtype=F64)])
    assert _rel(dy, 4.5 * x**2 * dx + 0.5 * x**3) < 1e-12
    w = torch.randn(3, 5, dtype=F64)
    gx, (ga,) = F.vjp(w, x)
    assert _rel(gx, (w @ M) * 4.5 * x**2) < 1e-12
    assert _rel(ga, ((w @ M) * x**3).sum()) < 1e-12
    with pytest.raises(TypeError, match="not invertible"):
        op.vjp(w, x, at="output")


def test_blocks_are_nonlinear_operators():
    block = invops.ResidualBlock(3, 5, 4, ndim=1).double()
    randomize_parameters(block)
    x = torch.randn(2, 3, 6, dtype=F64)
    assert _rel(block.apply(x.numpy()), block(x).detach()) < 1e-12
    for wrt in ("input", "params", "both"):
        _dottest(block.jacobian(x, wrt=wrt))
    w = torch.randn_like(block(x))
    dx_block, _ = block.vjp(w, x)
    dx_generic, _ = invops.NonlinearOperator.vjp(block, w, x, at="input")
    assert _rel(dx_block, dx_generic) < 1e-12


def test_invertible_module_apply_and_vjp_at_input(parts):
    G = parts.G
    x = torch.randn(B, *SHAPE, dtype=F64)
    y, _ = G(x)
    assert _rel(G.apply(x), y) < 1e-12
    w = torch.randn_like(y)
    dx_out, dtheta_out, x_rec = G.vjp(w, y)  # documented: from the output
    dx_in, dtheta_in = G.vjp(w, x, at="input")
    assert _rel(x_rec, x) < 1e-10 and _rel(dx_in, dx_out) < 1e-10
    for a, b in zip(dtheta_in, dtheta_out):
        assert _rel(a, b) < 1e-10
    with pytest.raises(ValueError, match="dlogdet"):
        G.vjp(w, x, dlogdet=1.0, at="input")
    # torch.nn.Module.apply(fn) still works
    seen = []
    parts.G.apply(lambda m: seen.append(type(m).__name__))
    assert "NetworkGlow" in seen


# ----------------------------------------------------------------------------------- operators
def _operator_cases():
    rng = np.random.default_rng(5)
    M = rng.standard_normal((6, 12))
    conv = pylops.signalprocessing.Convolve2D((3, 4), h=rng.standard_normal((3, 3)), offset=(1, 1))
    Mt = torch.from_numpy(M)
    return {
        "pylops": (pylops.MatrixMult(M), {}, M),
        "pylops-dims": (conv, {}, conv.todense()),
        "scipy": (scipy.sparse.linalg.aslinearoperator(M), {"model_shape": (3, 4)}, M),
        "sparse": (scipy.sparse.csr_matrix(M), {}, M),
        "numpy": (M, {"model_shape": (2, 6)}, M),
        "torch": (Mt, {}, M),
        "callables": (
            (lambda x: x.reshape(x.shape[0], -1) @ Mt.T, lambda y: (y @ Mt).reshape(-1, 12)),
            {"model_shape": (12,), "data_shape": (6,)},
            M,
        ),
    }


@pytest.mark.parametrize("name", list(_operator_cases()))
def test_linear_operator_is_its_own_jacobian(name):
    J_in, kwargs, dense = _operator_cases()[name]
    op = as_operator(J_in, **kwargs)
    assert isinstance(op, invops.NonlinearOperator)
    x = torch.randn(3, *op.model_shape, dtype=F64)
    expected = (x.reshape(3, -1) @ torch.from_numpy(dense).T).reshape(3, *op.data_shape)
    assert _rel(op.apply(x), expected) < 1e-12
    assert _rel(op.apply(x.numpy()), expected) < 1e-12
    x_other = torch.randn_like(x)
    J = op.jacobian(x_other)  # the same operator at any point
    assert _rel(J.matvec(x.reshape(-1).numpy()), expected.reshape(-1)) < 1e-12
    assert tuple(J.dims) == tuple(x.shape)
    _dottest(J)
    assert op.jacobian(x, wrt="params").shape == (expected.numel(), 0)
    _dottest(op.jacobian(x, wrt="both"))
    # autograd through apply is the adjoint
    xr = x.clone().requires_grad_()
    w = torch.randn_like(expected)
    (op.apply(xr) * w).sum().backward()
    assert _rel(xr.grad, (w.reshape(3, -1) @ torch.from_numpy(dense)).reshape(x.shape)) < 1e-12


def test_complex_operator_jacobian_real_part_adjoint():
    rng = np.random.default_rng(0)
    M = rng.standard_normal((5, 4)) + 1j * rng.standard_normal((5, 4))
    op = as_operator(pylops.MatrixMult(M, dtype="complex128"))
    assert op.is_complex
    x = torch.randn(2, 4, dtype=F64)
    J = op.jacobian(x)
    y = J.matvec(x.reshape(-1).numpy())
    assert np.iscomplexobj(y)
    w = rng.standard_normal(10) + 1j * rng.standard_normal(10)
    v = rng.standard_normal(8)
    # real-linear adjoint: Re <J v, w> = <v, J^H w>
    assert abs(np.real(np.vdot(w, J.matvec(v))) - v @ J.rmatvec(w)) < 1e-12 * np.abs(w).sum()


# ----------------------------------------------------------------------------------- algebra
def test_scalars_and_signs(parts):
    x = torch.randn(B, *SHAPE, dtype=F64)
    y = parts.G.apply(x)
    assert _rel((2 * parts.G).apply(x), 2 * y) < 1e-14
    assert _rel((parts.G * np.float64(2.0)).apply(x), 2 * y) < 1e-14
    assert _rel((parts.G / 4).apply(x), y / 4) < 1e-14
    assert _rel((-parts.G).apply(x), -y) < 1e-14
    assert _rel((torch.tensor(3.0) * parts.G).apply(x), 3 * y) < 1e-14
    nested = 2 * (3 * parts.G)
    assert isinstance(nested, Scaled) and nested.scale == 6.0 and nested.op is parts.G


def test_linear_operators_join_on_either_side(parts):
    M = np.random.default_rng(0).standard_normal((N, N))
    P = pylops.MatrixMult(M)
    x = torch.randn(B, N, dtype=F64)
    net = invops.ActNorm(N).double()
    net(x)
    randomize_parameters(net)
    expected = net.apply(x) @ torch.from_numpy(M).T
    assert _rel((as_operator(P) @ net).apply(x), expected) < 1e-12
    # a raw pylops operator on the right is wrapped; on the left, + goes through __radd__
    assert _rel((net @ P).apply(x), net.apply(x @ torch.from_numpy(M).T)) < 1e-12
    assert _rel((P + net).apply(x), x @ torch.from_numpy(M).T + net.apply(x)) < 1e-12
    assert _rel((net - P).apply(x), net.apply(x) - x @ torch.from_numpy(M).T) < 1e-12


def test_nested_compositions_flatten(parts):
    F = parts.A @ (parts.G @ parts.Bop)
    assert isinstance(F, Composition) and len(F.ops) == 3
    assert F.model_shape == (12,) and F.data_shape == (20,)


# ----------------------------------------------------------------------------------- bad input
def test_composing_incompatible_shapes_raises_naming_both(parts):
    C = as_operator(np.ones((5, 7)))
    with pytest.raises(ValueError, match=r"produces data of shape \(12,\).*models of shape"):
        parts.A @ as_operator(np.ones((12, 7)))
    with pytest.raises(ValueError) as err:
        C @ parts.A
    msg = str(err.value)
    assert "(20,)" in msg and "(7,)" in msg and "MatrixMult" in msg and "matrix" in msg
    with pytest.raises(ValueError, match="model_shape"):
        parts.A + C
    with pytest.raises(ValueError, match=r"data_shape \(20,\).*data_shape \(5,\)"):
        parts.A + as_operator(np.ones((5, N)), model_shape=SHAPE)
    with pytest.raises(ValueError, match="model_shape"):
        vstack([parts.A, C])


def test_call_time_shape_errors_name_both_sides(parts):
    F = parts.A @ parts.G
    with pytest.raises(ValueError) as err:
        F.apply(torch.randn(B, 2, 8, 8, dtype=F64))  # the network takes it, A does not
    msg = str(err.value)
    assert "NetworkGlow" in msg and "MatrixMult" in msg and "(2, 2, 8, 8)" in msg
    with pytest.raises(ValueError, match="Sum"):
        (parts.G + as_operator((lambda x: x[:, :1], lambda y: y))).apply(
            torch.randn(B, *SHAPE, dtype=F64)
        )


@pytest.mark.parametrize(
    "other",
    ["blur", 3, None, np.eye(3), torch.eye(3), scipy.sparse.eye(3), [np.eye(3)]],
    ids=["str", "int", "none", "ndarray", "tensor", "sparse", "list"],
)
def test_composing_with_a_non_operator_raises(parts, other):
    with pytest.raises(TypeError, match="operator @|expected"):
        parts.G @ other
    if isinstance(other, (np.ndarray, torch.Tensor)):  # scipy and pylops on the left: see README
        with pytest.raises(TypeError, match="ambiguous"):
            other @ parts.G
    if not isinstance(other, int):
        with pytest.raises(TypeError):
            parts.G + other


def test_multiplying_operators_or_by_non_real_raises(parts):
    with pytest.raises(TypeError, match="composed with @"):
        parts.G * parts.G
    with pytest.raises(TypeError, match="real scalar"):
        (1 + 2j) * parts.G
    with pytest.raises(ValueError, match="finite"):
        parts.G * float("inf")
    with pytest.raises(TypeError, match="list of operators"):
        vstack(parts.G)
    with pytest.raises(ValueError, match="model shape of NetworkGlow is unknown"):
        blockdiag([parts.G, parts.A])
    with pytest.raises(ValueError, match="at least two"):
        Composition(parts.G)


def test_wrong_dtype_raises_before_computing(parts):
    F = parts.A @ parts.G
    with pytest.raises(TypeError, match="dtype"):
        F.apply(torch.randn(B, *SHAPE))
    with pytest.raises(ValueError, match="wrt"):
        F.jacobian(torch.randn(B, *SHAPE, dtype=F64), wrt="theta")


def test_inputs_are_not_mutated(parts):
    F = vstack([parts.A @ parts.G, parts.A])
    x = torch.randn(B, *SHAPE, dtype=F64)
    x_np = x.numpy().copy()
    w = torch.randn(B, 40, dtype=F64)
    w0 = w.clone()
    F.apply(x)
    F.vjp(w, x)
    F.jvp(x, dx=x)
    F.jacobian(x.numpy(), wrt="both").rmatvec(w.reshape(-1).numpy())
    assert np.array_equal(x.numpy(), x_np) and torch.equal(w, w0)


# ----------------------------------------------------------------------------------- devices
# the device suite's --devices option (see tests/test_devices.py): ``device`` runs over it
from test_devices import (  # noqa: E402, F401
    _single_thread_ieee_float32,
    pytest_generate_tests,
)


def _cupy():
    try:
        import cupy
    except ImportError:
        return None
    return cupy


@pytest.mark.gpu
def test_composite_on_device(device):
    p = Parts()
    G = p.G.to(device)
    cupy = _cupy() if torch.device(device).type == "cuda" else None
    if cupy is not None:  # a PyLops operator on cupy arrays: torch <-> cupy by DLPack
        A = as_operator(pylops.MatrixMult(cupy.asarray(p.A_np)), model_shape=SHAPE)
    else:
        A = as_operator(p.A_t, model_shape=SHAPE)  # a matrix follows the tensors' device
    F = A @ G.reverse()
    z = torch.randn(B, *SHAPE, dtype=F64, device=device)
    y = F.apply(z)
    assert y.device == z.device
    G.cpu()
    with torch.no_grad():
        expected = p.a(p.ginv(z.cpu()))
    G.to(device)
    assert _rel(y.cpu(), expected) < 1e-10
    for wrt in ("input", "params", "both"):
        J = F.jacobian(z, wrt=wrt)
        _dottest(J)  # numpy vectors, moved to the device inside
        if cupy is not None:
            pylops.utils.dottest(J, rtol=1e-10, atol=0.0, backend="cupy")
    zr = z.clone().requires_grad_()
    F.apply(zr).sum().backward()
    assert zr.grad.device == z.device
    assert all(q.grad.device == z.device for q in G.parameters())
    for q in G.parameters():
        q.grad = None


def test_irim_loop_composes_as_an_operator_of_the_packed_state():
    torch.manual_seed(0)
    loop = invops.NetworkLoop(3, 4, maxiter=2, k1=3, p1=1, s1=1).double()
    J = as_operator(pylops.MatrixMult(np.random.default_rng(0).standard_normal((10, 16))), (4, 4))
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    d = torch.randn(2, 10, dtype=F64)
    eta, s = loop(x[:, :1], x[:, 1:], d, J)
    assert _rel(loop.apply(x, d, J), torch.cat((eta, s), 1)) < 1e-12
    M = np.random.default_rng(1).standard_normal((5, 48))
    F = as_operator(M, model_shape=(3, 4, 4)) @ loop
    y = F.apply(x, d, J)
    assert _rel(y, torch.cat((eta, s), 1).reshape(2, -1) @ torch.from_numpy(M).T) < 1e-12
    for wrt in ("input", "params", "both"):
        _dottest(F.jacobian(x, d, J, wrt=wrt))
    w = torch.randn(2, 5, dtype=F64)
    dx, dtheta, dd, dJ = F.vjp(w, x, d, J)
    assert dJ is None and dd.shape == d.shape and len(dtheta) == len(list(loop.parameters()))
    xr = x.clone().requires_grad_()
    (F.apply(xr, d, J) * w).sum().backward()
    assert _rel(xr.grad, dx) < 1e-10


def test_readme_operator_algebra_snippet_runs(capsys):
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Operator algebra", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "README.md", "exec"), {})
    residuals = [float(v) for v in capsys.readouterr().out.strip(" []\n").split()]
    assert len(residuals) == 5 and residuals[-1] < 1e-2 * residuals[0], residuals


def test_batch_of_one_and_odd_channels():
    torch.manual_seed(1)
    G = invops.NetworkGlow(3, 4, L=1, K=1).double()
    G(torch.randn(4, 3, 4, 4, dtype=F64))
    randomize_parameters(G, scale=0.2)
    M = torch.from_numpy(np.random.default_rng(2).standard_normal((7, 48)))
    C = torch.from_numpy(np.random.default_rng(3).standard_normal((5, 3)))
    A = as_operator(M, model_shape=(3, 4, 4))
    x = torch.randn(1, 3, 4, 4, dtype=F64)
    u = torch.randn(1, 51, dtype=F64)
    composites = {
        "vstack": (
            vstack([A @ G, A]),
            x,
            lambda x: torch.cat([G._forward(x)[0].reshape(1, -1) @ M.T, x.reshape(1, -1) @ M.T], 1),
        ),
        "blockdiag": (
            blockdiag([A @ G, as_operator(C)], model_shapes=[(3, 4, 4), (3,)]),
            u,
            lambda u: torch.cat(
                [
                    G._forward(u[:, :48].reshape(1, 3, 4, 4))[0].reshape(1, -1) @ M.T,
                    u[:, 48:] @ C.T,
                ],
                1,
            ),
        ),
    }
    for name, (F, inp, ref) in composites.items():
        with torch.no_grad():
            assert _rel(F.apply(inp), ref(inp)) < 1e-12, name
        for wrt in ("input", "params", "both"):
            _dottest(F.jacobian(inp, wrt=wrt))
        v = torch.randn_like(inp)
        with invops.plain_autograd():
            _, expected = torch.func.jvp(ref, (inp,), (v,))
        assert _rel(F.jacobian(inp).matvec(v.reshape(-1).numpy()), expected.reshape(-1)) < 1e-10


def test_the_same_operator_twice(parts):
    x = torch.randn(B, *SHAPE, dtype=F64)
    G = parts.G
    M = torch.from_numpy(np.random.default_rng(4).standard_normal((N, N)) / 6)
    C = as_operator(M, model_shape=SHAPE, data_shape=SHAPE)
    twice = {
        "G@G": (G @ G, lambda x: parts.g(parts.g(x))),
        "C@C": (C @ C, lambda x: (x.reshape(B, -1) @ M.T @ M.T).reshape(x.shape)),
        "C@G@C@G": (
            C @ G @ C @ G,
            lambda x: (
                parts.g((parts.g(x).reshape(B, -1) @ M.T).reshape(x.shape)).reshape(B, -1) @ M.T
            ).reshape(x.shape),
        ),
        "G+G": (G + G, lambda x: 2 * parts.g(x)),
    }
    for name, (F, ref) in twice.items():
        call, params = _reference_call(parts, ref, F)
        assert _rel(F.apply(x), call(x, *params)) < 1e-12, name
        w = torch.randn_like(x)
        dx, dtheta = F.vjp(w, x)
        with invops.plain_autograd():
            grads = torch.func.vjp(call, x, *params)[1](w)
        assert _rel(dx, grads[0]) < 1e-10, name
        for got, want in zip(dtheta, grads[1:]):
            assert _rel(got, want) < 1e-10, name
        _dottest(F.jacobian(x, wrt="both"))
