"""Physics-operator adapters: ``as_operator``, ``apply_operator`` and ``apply_adjoint``.

Every supported kind of operator (PyLops, scipy LinearOperator, scipy sparse, dense numpy and torch
matrices, torch callables, an existing ``Operator``) is checked against the plain operator applied
sample by sample, against its own adjoint (dot test), and under torch autograd (reverse and forward
mode) against the same operator as a torch matrix.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pylops
import pytest
import scipy.sparse
import scipy.sparse.linalg
import torch
import torch.autograd.forward_ad as fwAD

from invops.operators import Operator, apply_adjoint, apply_operator, as_operator

F64 = torch.float64
N = 6  # image side of the 2D operators
B = 3  # batch size


def _cupy_available() -> bool:
    try:
        import cupy  # noqa: F401
    except Exception:
        return False
    return True


needs_cuda_and_cupy = pytest.mark.skipif(
    not (torch.cuda.is_available() and _cupy_available()), reason="needs a CUDA device and cupy"
)


# ------------------------------------------------------------------------------------ test cases
@dataclass
class Case:
    """An operator in one of the supported forms, with its plain per-sample application."""

    J: Any
    kwargs: dict
    dense: np.ndarray  # (n_data, n_model) matrix of the operator
    model_shape: tuple[int, ...]
    data_shape: tuple[int, ...]
    plain_fwd: Callable[[np.ndarray], np.ndarray]  # one flat model -> one flat datum
    plain_adj: Callable[[np.ndarray], np.ndarray]
    spy: Callable[[], tuple[int, int]] | None = None  # (forward, adjoint) matmat call counts
    has_shape: bool = True  # whether the operator itself knows its shape


def _matrix_pair(A: np.ndarray, model_shape, data_shape):
    """A (forward, adjoint) pair of batched torch callables computing ``A`` and ``A^T``."""
    At = torch.from_numpy(A)

    def forward(x):
        M = At.to(x.dtype)
        return (x.reshape(x.shape[0], -1) @ M.T).reshape(x.shape[0], *data_shape)

    def adjoint(y):
        M = At.to(y.dtype)
        return (y.reshape(y.shape[0], -1) @ M).reshape(y.shape[0], *model_shape)

    return forward, adjoint


class _CountingScipy(scipy.sparse.linalg.LinearOperator):
    """A scipy operator with explicit matmat/rmatmat that counts its calls."""

    def __init__(self, A):
        super().__init__(dtype=A.dtype, shape=A.shape)
        self.A = A
        self.calls = [0, 0]

    def _matvec(self, x):
        return self.A @ x

    def _rmatvec(self, y):
        return self.A.T @ y

    def _matmat(self, X):
        self.calls[0] += 1
        return self.A @ X

    def _rmatmat(self, Y):
        self.calls[1] += 1
        return self.A.T @ Y


def _pylops_spy(op):
    return lambda: (op.matmat_count, op.rmatmat_count)


def make_case(name: str) -> Case:
    rng = np.random.default_rng(1)
    A = rng.standard_normal((5, 12))
    if name == "pylops-matrixmult":
        op = pylops.MatrixMult(A)
        return Case(op, {}, A, (12,), (5,), op.matvec, op.rmatvec, _pylops_spy(op))
    if name == "pylops-matrixmult-reshaped":
        op = pylops.MatrixMult(A)
        kw = {"model_shape": (3, 4)}
        return Case(op, kw, A, (3, 4), (5,), op.matvec, op.rmatvec, _pylops_spy(op))
    if name == "pylops-convolve2d":
        op = pylops.signalprocessing.Convolve2D(
            (N, N), h=rng.standard_normal((3, 3)), offset=(1, 1)
        )
        return Case(op, {}, op.todense(), (N, N), (N, N), op.matvec, op.rmatvec, _pylops_spy(op))
    if name == "pylops-firstderivative":
        op = pylops.FirstDerivative((N, N), axis=0)
        return Case(op, {}, op.todense(), (N, N), (N, N), op.matvec, op.rmatvec, _pylops_spy(op))
    if name == "scipy-linearoperator":
        op = _CountingScipy(A)
        kw = {"model_shape": (3, 4), "data_shape": (5,)}
        spy = lambda: tuple(op.calls)  # noqa: E731
        return Case(op, kw, A, (3, 4), (5,), lambda v: A @ v, lambda w: A.T @ w, spy)
    if name == "scipy-sparse":
        S = scipy.sparse.random(7, 12, density=0.4, random_state=2, format="csr")
        return Case(S, {}, S.toarray(), (12,), (7,), lambda v: S @ v, lambda w: S.T @ w)
    if name == "numpy-matrix":
        kw = {"model_shape": (3, 4), "data_shape": (5,)}
        return Case(A, kw, A, (3, 4), (5,), lambda v: A @ v, lambda w: A.T @ w)
    if name == "torch-matrix":
        At = torch.from_numpy(A.copy())
        return Case(
            At,
            {},
            A,
            (12,),
            (5,),
            lambda v: (At @ torch.from_numpy(v)).numpy(),
            lambda w: (At.T @ torch.from_numpy(w)).numpy(),
        )
    if name == "torch-callables":
        fwd, adj = _matrix_pair(A, (3, 4), (5,))
        kw = {"model_shape": (3, 4), "data_shape": (5,)}
        return Case(
            (fwd, adj),
            kw,
            A,
            (3, 4),
            (5,),
            lambda v: fwd(torch.from_numpy(v).reshape(1, 3, 4)).reshape(-1).numpy(),
            lambda w: adj(torch.from_numpy(w).reshape(1, 5)).reshape(-1).numpy(),
            has_shape=False,
        )
    if name == "operator":
        inner = as_operator(A, model_shape=(3, 4), data_shape=(5,))
        return Case(inner, {}, A, (3, 4), (5,), lambda v: A @ v, lambda w: A.T @ w)
    raise KeyError(name)


CASES = [
    "pylops-matrixmult",
    "pylops-matrixmult-reshaped",
    "pylops-convolve2d",
    "pylops-firstderivative",
    "scipy-linearoperator",
    "scipy-sparse",
    "numpy-matrix",
    "torch-matrix",
    "torch-callables",
    "operator",
]
SHAPED_CASES = [c for c in CASES if c not in ("torch-callables", "operator")]


def _models(case: Case, dtype=F64, batch=B) -> torch.Tensor:
    return torch.randn(batch, *case.model_shape, dtype=dtype)


def _data(case: Case, dtype=F64, batch=B) -> torch.Tensor:
    return torch.randn(batch, *case.data_shape, dtype=dtype)


def _rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


# ------------------------------------------------------------------------------------ as_operator
@pytest.mark.parametrize("name", CASES)
def test_shapes(name):
    case = make_case(name)
    op = as_operator(case.J, **case.kwargs)
    assert isinstance(op, Operator)
    assert op.model_shape == case.model_shape
    assert op.data_shape == case.data_shape
    assert not op.is_complex


def test_operator_is_passed_through_unchanged():
    op = as_operator(np.eye(4))
    assert as_operator(op) is op
    # shapes given with an Operator do not rebuild it
    assert as_operator(op, model_shape=(2, 2)) is op


def test_shapes_from_dims_and_overrides():
    conv = pylops.signalprocessing.Convolve2D((4, 6), h=np.ones((3, 3)), offset=(1, 1))
    op = as_operator(conv)
    assert (op.model_shape, op.data_shape) == ((4, 6), (4, 6))
    assert all(type(n) is int for n in op.model_shape + op.data_shape)
    op = as_operator(conv, model_shape=(24,), data_shape=(2, 12))
    assert (op.model_shape, op.data_shape) == ((24,), (2, 12))
    y = op.apply(torch.randn(2, 24, dtype=F64))
    assert y.shape == (2, 2, 12)
    op = as_operator(scipy.sparse.eye(6, format="csr"), model_shape=(2, 3))
    assert (op.model_shape, op.data_shape) == ((2, 3), (6,))
    op = as_operator((lambda x: x, lambda y: y))
    assert op.model_shape is None and op.data_shape is None


@pytest.mark.parametrize("name", CASES)
def test_apply_and_adjoint_match_plain_operator_per_sample(name):
    case = make_case(name)
    op = as_operator(case.J, **case.kwargs)
    x, y = _models(case), _data(case)
    calls0 = case.spy() if case.spy else None
    Jx = op.apply(x)
    JTy = op.adjoint(y)
    if case.spy:
        # the batch goes through ONE matmat / rmatmat call, not a loop over samples
        fwd_calls, adj_calls = (a - b for a, b in zip(case.spy(), calls0))
        assert (fwd_calls, adj_calls) == (1, 1)
    assert Jx.shape == (B, *case.data_shape) and Jx.dtype == F64
    assert JTy.shape == (B, *case.model_shape) and JTy.dtype == F64
    for b in range(B):
        ref_fwd = case.plain_fwd(x[b].reshape(-1).numpy().copy())
        ref_adj = case.plain_adj(y[b].reshape(-1).numpy().copy())
        assert _rel(Jx[b].reshape(-1).numpy(), ref_fwd) < 1e-13
        assert _rel(JTy[b].reshape(-1).numpy(), ref_adj) < 1e-13
    # and the whole batch against the dense matrix
    assert _rel(Jx.reshape(B, -1).numpy(), x.reshape(B, -1).numpy() @ case.dense.T) < 1e-12
    assert _rel(JTy.reshape(B, -1).numpy(), y.reshape(B, -1).numpy() @ case.dense) < 1e-12


@pytest.mark.parametrize("name", CASES)
def test_dot_test_per_sample(name):
    case = make_case(name)
    op = as_operator(case.J, **case.kwargs)
    x, y = _models(case), _data(case)
    lhs = (op.apply(x) * y).reshape(B, -1).sum(1)
    rhs = (x * op.adjoint(y)).reshape(B, -1).sum(1)
    scale = (op.apply(x).reshape(B, -1).norm(dim=1) * y.reshape(B, -1).norm(dim=1)).max()
    assert float((lhs - rhs).abs().max() / scale) < 1e-12


@pytest.mark.parametrize("name", CASES)
def test_float32_is_not_promoted(name):
    case = make_case(name)
    op = as_operator(case.J, **case.kwargs)
    x, y = _models(case, torch.float32), _data(case, torch.float32)
    Jx, JTy = op.apply(x), op.adjoint(y)
    assert Jx.dtype == torch.float32 and JTy.dtype == torch.float32
    assert _rel(Jx.reshape(B, -1).numpy(), x.reshape(B, -1).double().numpy() @ case.dense.T) < 1e-5
    assert _rel(JTy.reshape(B, -1).numpy(), y.reshape(B, -1).double().numpy() @ case.dense) < 1e-5
    # and the differentiable versions too
    assert apply_operator(op, x).dtype == torch.float32
    assert apply_adjoint(op, y).dtype == torch.float32


def test_float64_operator_on_float32_models_keeps_the_operator():
    # the operator stays as given (no mutation, no down-cast of the caller's matrix)
    A = torch.randn(5, 12, dtype=F64)
    A0 = A.clone()
    op = as_operator(A)
    op.apply(torch.randn(2, 12))
    assert A.dtype == F64 and torch.equal(A, A0)


@pytest.mark.parametrize("name", SHAPED_CASES)
def test_mismatched_shapes_raise(name):
    case = make_case(name)
    n_model = int(np.prod(case.model_shape))
    n_data = int(np.prod(case.data_shape))
    with pytest.raises(ValueError, match="model shape"):
        as_operator(case.J, model_shape=(n_model + 1,))
    with pytest.raises(ValueError, match="data shape"):
        as_operator(case.J, data_shape=(n_data, 2))
    with pytest.raises(ValueError, match=re.escape(str(tuple(case.dense.shape)))):
        as_operator(case.J, model_shape=(n_model - 1,), data_shape=case.data_shape)


@pytest.mark.parametrize(
    "J",
    [
        "blur",
        3.0,
        [[1.0, 0.0], [0.0, 1.0]],
        {"forward": abs},
        (abs,),
        (abs, abs, abs),
        [abs, abs],
        None,
    ],
    ids=[
        "str",
        "float",
        "list",
        "dict",
        "1-tuple",
        "3-tuple",
        "list-pair",
        "none",
    ],
)
def test_unsupported_operator_type_raises(J):
    # a list or tuple (not a callable pair) is read as one operator per sample: the error names
    # the entry that is no operator
    with pytest.raises(TypeError, match=r"J(\[0\])?: expected"):
        as_operator(J)


def test_a_pair_of_matrices_is_one_operator_per_sample():
    op = as_operator((np.eye(2), 2 * np.eye(2)))
    assert op.batch_size == 2
    x = torch.ones(2, 2, dtype=torch.float64)
    assert torch.equal(op.apply(x), torch.tensor([[1.0, 1.0], [2.0, 2.0]], dtype=torch.float64))


def test_matrix_of_wrong_rank_raises():
    with pytest.raises(ValueError, match="2-dimensional"):
        as_operator(np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="2-dimensional"):
        as_operator(torch.ones(5))


@pytest.mark.parametrize("name", CASES)
def test_apply_with_wrong_model_shape_names_expected_shape(name):
    case = make_case(name)
    kwargs = dict(case.kwargs)
    if not case.has_shape:
        kwargs["model_shape"] = case.model_shape
    op = as_operator(case.J, **kwargs)
    bad_shapes = [(B, int(np.prod(case.model_shape)) + 1), (B, *case.model_shape, 1)]
    if len(case.model_shape) > 1:
        bad_shapes.append((B, int(np.prod(case.model_shape))))  # flat instead of an image
    for shape in bad_shapes:
        x = torch.randn(*shape, dtype=F64)
        with pytest.raises(ValueError, match=re.escape(str(case.model_shape))):
            op.apply(x)
        with pytest.raises(ValueError, match=re.escape(str(case.model_shape))):
            apply_operator(op, x)


@pytest.mark.parametrize("name", SHAPED_CASES)
def test_apply_adjoint_with_wrong_data_shape_raises(name):
    case = make_case(name)
    op = as_operator(case.J, **case.kwargs)
    y = torch.randn(B, int(np.prod(case.data_shape)) + 1, dtype=F64)
    with pytest.raises(ValueError, match=re.escape(str(case.data_shape))):
        apply_adjoint(op, y)
    with pytest.raises(ValueError, match=re.escape(str(case.data_shape))):
        op.check_data(y)


@pytest.mark.parametrize("name", ["pylops-matrixmult", "numpy-matrix"])
def test_operator_adjoint_with_wrong_data_shape_raises_value_error(name):
    case = make_case(name)
    op = as_operator(case.J, **case.kwargs)
    for shape in [(B, 4), (B, 5, 1)]:
        with pytest.raises(ValueError, match=re.escape(str(case.data_shape))):
            op.adjoint(torch.randn(*shape, dtype=F64))


# ------------------------------------------------------------------------------------ autograd
@pytest.mark.parametrize("name", CASES)
def test_reverse_mode_is_the_adjoint(name):
    case = make_case(name)
    op = as_operator(case.J, **case.kwargs)
    A = torch.from_numpy(np.ascontiguousarray(case.dense))
    x0, d = _models(case), _data(case)

    x = x0.clone().requires_grad_()
    r = apply_operator(op, x) - d
    (0.5 * (r**2).sum()).backward()
    # reference: plain torch autograd through the same matrix
    x_ref = x0.clone().requires_grad_()
    r_ref = (x_ref.reshape(B, -1) @ A.T).reshape(d.shape) - d
    (0.5 * (r_ref**2).sum()).backward()
    assert _rel(x.grad.numpy(), x_ref.grad.numpy()) < 1e-12
    assert _rel(x.grad.numpy(), op.adjoint(r.detach()).numpy()) < 1e-13

    # the adjoint, differentiated with respect to its data
    w = _models(case)
    y = _data(case).requires_grad_()
    (apply_adjoint(op, y) * w).sum().backward()
    y_ref = y.detach().clone().requires_grad_()
    ((y_ref.reshape(B, -1) @ A).reshape(w.shape) * w).sum().backward()
    assert _rel(y.grad.numpy(), y_ref.grad.numpy()) < 1e-12
    assert _rel(y.grad.numpy(), op.apply(w).numpy()) < 1e-13


@pytest.mark.parametrize("name", CASES)
def test_forward_mode_gives_J_dx(name):
    case = make_case(name)
    op = as_operator(case.J, **case.kwargs)
    x, dx = _models(case), _models(case)
    y, dy = _data(case), _data(case)
    with fwAD.dual_level():
        out, tangent = fwAD.unpack_dual(apply_operator(op, fwAD.make_dual(x, dx)))
        out_adj, tangent_adj = fwAD.unpack_dual(apply_adjoint(op, fwAD.make_dual(y, dy)))
    assert _rel(out.numpy(), op.apply(x).numpy()) < 1e-14
    assert _rel(tangent.numpy(), op.apply(dx).numpy()) < 1e-14
    assert _rel(out_adj.numpy(), op.adjoint(y).numpy()) < 1e-14
    assert _rel(tangent_adj.numpy(), op.adjoint(dy).numpy()) < 1e-14


@pytest.mark.parametrize("name", ["pylops-convolve2d", "scipy-sparse", "torch-callables"])
def test_gradcheck(name):
    case = make_case(name)
    op = as_operator(case.J, **case.kwargs)
    x = _models(case, batch=2).requires_grad_()
    y = _data(case, batch=2).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: apply_operator(op, t), (x,), check_forward_ad=True)
    assert torch.autograd.gradcheck(lambda t: apply_adjoint(op, t), (y,), check_forward_ad=True)


def test_inputs_are_not_mutated():
    case = make_case("pylops-convolve2d")
    op = as_operator(case.J)
    x, y = _models(case), _data(case)
    x0, y0 = x.clone(), y.clone()
    op.apply(x), op.adjoint(y), apply_operator(op, x), apply_adjoint(op, y)
    assert torch.equal(x, x0) and torch.equal(y, y0)


def test_non_contiguous_batch():
    case = make_case("pylops-convolve2d")
    op = as_operator(case.J)
    x = torch.randn(N, N, B, dtype=F64).permute(2, 0, 1)  # a batch that is a strided view
    assert not x.is_contiguous()
    ref = x.contiguous().reshape(B, -1).numpy() @ case.dense.T
    assert _rel(op.apply(x).reshape(B, -1).numpy(), ref) < 1e-13


def test_zero_copy_into_numpy():
    """CPU tensors reach a numpy-backed operator as views of their own memory."""
    seen = {}
    n = 12
    A = np.random.default_rng(7).standard_normal((n, n))

    class Spy(pylops.LinearOperator):
        def __init__(self):
            super().__init__(dtype=np.float64, dims=(n,), dimsd=(n,))

        def _matvec(self, x):
            return A @ x

        def _rmatvec(self, y):
            return A.T @ y

        def _matmat(self, X):
            seen["fwd"] = (type(X), X.__array_interface__["data"][0], X.shape)
            return A @ X

        def _rmatmat(self, Y):
            seen["adj"] = (type(Y), Y.__array_interface__["data"][0], Y.shape)
            return A.T @ Y

    op = as_operator(Spy())
    x, y = torch.randn(B, n, dtype=F64), torch.randn(B, n, dtype=F64)
    Jx, JTy = op.apply(x), op.adjoint(y)
    assert seen["fwd"] == (np.ndarray, x.data_ptr(), (n, B))
    assert seen["adj"] == (np.ndarray, y.data_ptr(), (n, B))
    assert _rel(Jx.numpy(), x.numpy() @ A.T) < 1e-13
    assert _rel(JTy.numpy(), y.numpy() @ A) < 1e-13
    # the result does not alias the input
    assert Jx.data_ptr() != x.data_ptr()


# ------------------------------------------------------------------------------------ complex
NX = 6


def make_complex(name: str):
    """``(J, dense complex matrix, model_shape, data_shape)``."""
    rng = np.random.default_rng(3)
    Ac = rng.standard_normal((20, NX * NX)) + 1j * rng.standard_normal((20, NX * NX))
    if name == "numpy-matrix":
        return Ac, Ac, (NX * NX,), (20,)
    if name == "torch-matrix":
        return torch.from_numpy(Ac), Ac, (NX * NX,), (20,)
    if name == "pylops-matrixmult":
        return pylops.MatrixMult(Ac, dtype="complex128"), Ac, (NX * NX,), (20,)
    if name == "mri2d":
        M = pylops.medical.MRI2D((NX, NX), mask="vertical-reg", nlines=3, perc_center=0.0)
        return M, M.todense(), (NX, NX), tuple(int(n) for n in M.dimsd)
    if name == "fft2d":
        F = pylops.signalprocessing.FFT2D((NX, NX), dtype="complex128")
        return F, F.todense(), (NX, NX), tuple(int(n) for n in F.dimsd)
    raise KeyError(name)


COMPLEX_CASES = ["numpy-matrix", "torch-matrix", "pylops-matrixmult", "mri2d", "fft2d"]


@pytest.mark.parametrize("name", COMPLEX_CASES)
def test_complex_operator_on_real_models(name):
    J, M, ms, ds = make_complex(name)
    op = as_operator(J)
    assert op.is_complex and op.model_shape == ms and op.data_shape == ds
    x = torch.randn(B, *ms, dtype=F64)
    y = torch.randn(B, *ds, dtype=torch.complex128)
    Jx, JHy = op.apply(x), op.adjoint(y)
    assert Jx.dtype == torch.complex128 and Jx.shape == (B, *ds)
    assert JHy.dtype == F64 and JHy.shape == (B, *ms)  # the real part of J^H y
    assert _rel(Jx.reshape(B, -1).numpy(), x.reshape(B, -1).numpy() @ M.T) < 1e-12
    ref = (y.reshape(B, -1).numpy() @ M.conj()).real
    assert _rel(JHy.reshape(B, -1).numpy(), ref) < 1e-12
    # dot test for real models: Re <J x, y> = <x, Re J^H y>
    lhs = (Jx.conj() * y).real.reshape(B, -1).sum(1)
    rhs = (x * JHy).reshape(B, -1).sum(1)
    assert float((lhs - rhs).abs().max() / (Jx.abs().max() * y.abs().max() * 20)) < 1e-12


@pytest.mark.parametrize("name", COMPLEX_CASES)
def test_complex_operator_gradient_of_data_misfit(name):
    J, M, ms, ds = make_complex(name)
    op = as_operator(J)
    Mt = torch.from_numpy(np.ascontiguousarray(M))
    x0 = torch.randn(B, *ms, dtype=F64)
    d = torch.randn(B, *ds, dtype=torch.complex128)

    x = x0.clone().requires_grad_()
    r = apply_operator(op, x) - d
    (0.5 * (r.abs() ** 2).sum()).backward()
    assert x.grad.dtype == F64
    # Re(J^H (J x - d))
    expected = op.adjoint(r.detach())
    assert _rel(x.grad.numpy(), expected.numpy()) < 1e-13
    # plain torch autograd through the complex matrix
    x_ref = x0.clone().requires_grad_()
    r_ref = (x_ref.reshape(B, -1).to(Mt.dtype) @ Mt.T).reshape(d.shape) - d
    (0.5 * (r_ref.abs() ** 2).sum()).backward()
    assert _rel(x.grad.numpy(), x_ref.grad.numpy()) < 1e-12

    # reverse mode with respect to complex data, through the adjoint
    w = torch.randn(B, *ms, dtype=F64)
    y = torch.randn(B, *ds, dtype=torch.complex128).requires_grad_()
    (apply_adjoint(op, y) * w).sum().backward()
    y_ref = y.detach().clone().requires_grad_()
    ((y_ref.reshape(B, -1) @ Mt.conj()).real.reshape(w.shape) * w).sum().backward()
    assert _rel(y.grad.numpy(), y_ref.grad.numpy()) < 1e-12

    # forward mode: J dx (complex tangent of a real model)
    dx = torch.randn_like(x0)
    with fwAD.dual_level():
        _, tangent = fwAD.unpack_dual(apply_operator(op, fwAD.make_dual(x0, dx)))
    assert _rel(tangent.numpy(), op.apply(dx).numpy()) < 1e-14


@pytest.mark.parametrize("name", COMPLEX_CASES)
def test_complex_operator_check_data(name):
    J, M, ms, ds = make_complex(name)
    op = as_operator(J)
    op.check_data(torch.randn(B, *ds, dtype=torch.complex128))  # fine
    with pytest.raises(TypeError, match="complex"):
        op.check_data(torch.randn(B, *ds, dtype=F64), name="d")
    with pytest.raises(TypeError, match="d: "):
        op.check_data(torch.randn(B, *ds, dtype=F64), name="d")
    with pytest.raises(ValueError, match=re.escape(str(ds))):
        op.check_data(torch.randn(B, int(np.prod(ds)) + 1, dtype=torch.complex128))
    # a wrong shape is reported as such even for real data
    with pytest.raises(ValueError, match=re.escape(str(ds))):
        op.check_data(torch.randn(B, int(np.prod(ds)) + 1, dtype=F64))
    with pytest.raises(TypeError, match="complex"):
        apply_adjoint(op, torch.randn(B, *ds, dtype=F64))


@pytest.mark.parametrize(
    "name",
    [
        "numpy-matrix",
        "torch-matrix",
        "pylops-matrixmult",
        "mri2d",
        "fft2d",
    ],
)
def test_complex_operator_float32_is_not_promoted(name):
    J, M, ms, ds = make_complex(name)
    op = as_operator(J)
    x = torch.randn(B, *ms)
    Jx = op.apply(x)
    assert Jx.dtype == torch.complex64
    assert op.adjoint(Jx).dtype == torch.float32
    assert apply_operator(op, x).dtype == torch.complex64
    assert apply_adjoint(op, Jx).dtype == torch.float32


# ------------------------------------------------------------------------------------ GPU
def _gpu_conv_pair(n):
    """The same 2D convolution as a numpy-backed and a cupy-backed pylops operator."""
    import cupy

    h = np.random.default_rng(5).standard_normal((3, 3))
    cpu = pylops.signalprocessing.Convolve2D((n, n), h=h, offset=(1, 1), dtype="float64")
    gpu = pylops.signalprocessing.Convolve2D(
        (n, n), h=cupy.asarray(h), offset=(1, 1), dtype="float64"
    )
    return cpu, gpu


@pytest.mark.gpu
@needs_cuda_and_cupy
def test_gpu_cupy_pylops_operator_matches_numpy():
    conv_cpu, conv_gpu = _gpu_conv_pair(N)
    op_gpu, op_cpu = as_operator(conv_gpu), as_operator(conv_cpu)
    x = torch.randn(B, N, N, dtype=F64)
    y = torch.randn(B, N, N, dtype=F64)
    Jx = op_gpu.apply(x.cuda())
    JTy = op_gpu.adjoint(y.cuda())
    assert Jx.device.type == "cuda" and JTy.device.type == "cuda"
    assert _rel(Jx.cpu().numpy(), op_cpu.apply(x).numpy()) < 1e-12
    assert _rel(JTy.cpu().numpy(), op_cpu.adjoint(y).numpy()) < 1e-12
    # reverse and forward mode on the GPU
    xg = x.cuda().requires_grad_()
    (apply_operator(op_gpu, xg) * y.cuda()).sum().backward()
    assert xg.grad.device.type == "cuda"
    assert _rel(xg.grad.cpu().numpy(), op_cpu.adjoint(y).numpy()) < 1e-12
    with fwAD.dual_level():
        _, tangent = fwAD.unpack_dual(apply_operator(op_gpu, fwAD.make_dual(x.cuda(), y.cuda())))
    assert _rel(tangent.cpu().numpy(), op_cpu.apply(y).numpy()) < 1e-12
    # float32 CUDA tensors stay float32
    assert op_gpu.apply(x.float().cuda()).dtype == torch.float32


@pytest.mark.gpu
@needs_cuda_and_cupy
def test_gpu_zero_copy_into_cupy():
    import cupy

    seen = {}
    n = 16
    A = cupy.asarray(np.random.default_rng(6).standard_normal((n, n)))

    class Spy(pylops.LinearOperator):
        def __init__(self):
            super().__init__(dtype=np.float64, dims=(n,), dimsd=(n,))

        def _matvec(self, x):
            return A @ x

        def _rmatvec(self, y):
            return A.T @ y

        def _matmat(self, X):
            seen["fwd"] = (type(X), X.data.ptr)
            return A @ X

        def _rmatmat(self, Y):
            seen["adj"] = (type(Y), Y.data.ptr)
            return A.T @ Y

    op = as_operator(Spy())
    x = torch.randn(B, n, dtype=F64, device="cuda")
    y = torch.randn(B, n, dtype=F64, device="cuda")
    Jx, JTy = op.apply(x), op.adjoint(y)
    # the (n, B) matrices handed to matmat / rmatmat are views of the tensors' own memory
    assert seen["fwd"] == (cupy.ndarray, x.data_ptr())
    assert seen["adj"] == (cupy.ndarray, y.data_ptr())
    A_np = cupy.asnumpy(A)
    assert _rel(Jx.cpu().numpy(), x.cpu().numpy() @ A_np.T) < 1e-12
    assert _rel(JTy.cpu().numpy(), y.cpu().numpy() @ A_np) < 1e-12
