"""Per-sample physics operators in the i-RIM: one operator (say, one sampling mask) per scan.

A loop given a list of ``B`` operators (or a batched operator) must give exactly what running
each sample alone with its own operator gives, in every mode; per-sample MRI operators must be
applied in ONE batched call, not ``B``; and bad lists are refused before any compute.
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
from invops.operators import BatchedOperator, as_operator, per_sample
from invops.physics import MultiCoilMRI2D, TorchMRI, cartesian_mask, coil_sensitivities
from invops.testing import check_against_autograd, dottest

F64 = torch.float64
N = 8
B = 3

pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a, b) -> float:
    a, b = torch.as_tensor(a).detach(), torch.as_tensor(b).detach()
    return float((a - b).abs().max() / max(float(b.abs().max()), 1e-300))


def _conv_pair(seed):
    w = torch.from_numpy(np.random.default_rng(seed).standard_normal((1, 1, 3, 3)) / 3)
    return (
        lambda x: F.conv2d(x[:, None], w.to(x), padding=1)[:, 0],
        lambda y: F.conv_transpose2d(y[:, None], w.to(y), padding=1)[:, 0],
    )


def per_sample_physics(kind: str, batch: int = B):
    """``(list of operators, complex model?, data shape, expected one_call)``."""
    rng = np.random.default_rng(5)
    masks = [cartesian_mask((N, N), 2, rng=rng) for _ in range(batch)]
    if kind == "convolve":
        ops = [
            pylops.signalprocessing.Convolve2D((N, N), h=rng.standard_normal((3, 3)), offset=(1, 1))
            for _ in range(batch)
        ]
        return ops, False, (N, N), False
    if kind == "matrices":
        mats = [rng.standard_normal((40, N * N)) / N for _ in range(batch)]
        return [as_operator(A, model_shape=(N, N)) for A in mats], False, (40,), False
    if kind == "raw-matrices":
        mats = [rng.standard_normal((N * N, N * N)) / N for _ in range(batch)]
        return [a.reshape(N * N, N * N) for a in mats], False, (N * N,), True
    if kind == "callables":
        return [_conv_pair(i) for i in range(batch)], False, (N, N), False
    if kind == "mri2d":
        return [pylops.medical.MRI2D((N, N), mask=m) for m in masks], True, (N, N), True
    if kind == "mri2d-real-model":
        return [pylops.medical.MRI2D((N, N), mask=m) for m in masks], False, (N, N), True
    if kind == "mri2d-vertical":
        ops = [
            pylops.medical.MRI2D((N, N), mask="vertical-uni", nlines=3, perc_center=0.25)
            for _ in range(batch)
        ]
        return ops, True, (N, 5), True
    if kind == "multicoil":
        coils = [coil_sensitivities((N, N), 3, rng=i) for i in range(batch)]
        return [MultiCoilMRI2D(c, m) for c, m in zip(coils, masks)], True, (3, N, N), True
    if kind == "torchmri":
        coils = [coil_sensitivities((N, N), 2, rng=i) for i in range(batch)]
        return [TorchMRI(m, c) for c, m in zip(coils, masks)], True, (2, N, N), True
    raise KeyError(kind)


KINDS = [
    "convolve",
    "matrices",
    "callables",
    "mri2d",
    "mri2d-real-model",
    "mri2d-vertical",
    "multicoil",
    "torchmri",
]


def make_case(kind, batch=B, maxiter=2):
    ops, cplx, ds, one_call = per_sample_physics(kind, batch)
    n_model = 2 if cplx else 1
    n_in = 2 * n_model + 1
    gen = torch.Generator().manual_seed(1)
    eta = 0.5 * torch.randn(batch, n_model, N, N, generator=gen, dtype=F64)
    s = torch.randn(batch, n_in - n_model, N, N, generator=gen, dtype=F64)
    d = torch.randn(batch, *ds, generator=gen, dtype=F64)
    if kind.startswith(("mri", "multicoil", "torchmri")):
        d = torch.complex(d, torch.randn(batch, *ds, generator=gen, dtype=F64))
    torch.manual_seed(0)
    loop = NetworkLoop(n_in, 4, maxiter, type="hint", n_model=n_model, complex_model=cplx)
    loop = loop.double()
    with torch.no_grad():
        loop(eta, s, d, ops)
    randomize_parameters(loop, 0.1)
    return loop, ops, eta, s, d, one_call


def backward_of(loop, J, eta, s, d, w):
    with torch.no_grad():
        eta_out, s_out = loop(eta, s, d, J)
    loop.zero_grad(set_to_none=True)
    deta, ds, eta_in, s_in, dd = loop.backward(w, 0.1 * s_out, eta_out, s_out, d, J)
    params = [p.grad.clone() for p in loop.parameters()]
    loop.zero_grad(set_to_none=True)
    return (eta_out, s_out), (deta, ds, dd), params


@pytest.mark.parametrize("kind", KINDS)
def test_per_sample_equals_each_sample_alone(kind):
    loop, ops, eta, s, d, one_call = make_case(kind)
    op = loop.bind(ops).op
    assert isinstance(op, BatchedOperator) and op.batch_size == B
    assert op.one_call == one_call, op
    w = torch.randn_like(eta)
    (eta_out, s_out), grads, params = backward_of(loop, ops, eta, s, d, w)
    param_sum = [torch.zeros_like(p) for p in params]
    for i, J in enumerate(ops):
        rows = slice(i, i + 1)
        alone = backward_of(loop, J, eta[rows], s[rows], d[rows], w[rows])
        assert rel(eta_out[rows], alone[0][0]) < 1e-12 and rel(s_out[rows], alone[0][1]) < 1e-12
        for g, g_alone in zip(grads, alone[1]):
            assert rel(g[rows], g_alone) < 1e-12
        param_sum = [a + b for a, b in zip(param_sum, alone[2])]
        eta_rec, s_rec = loop.inverse(eta_out[rows], s_out[rows], d[rows], J)
        assert rel(eta_rec, eta[rows]) < 1e-9
    for p, p_sum in zip(params, param_sum):
        assert rel(p, p_sum) < 1e-12
    assert rel(loop.inverse(eta_out, s_out, d, ops)[0], eta) < 1e-9


@pytest.mark.parametrize("kind", ["mri2d", "convolve"])
def test_per_sample_loop_against_plain_autograd(kind):
    loop, ops, eta, s, d, _ = make_case(kind)
    check_against_autograd(
        loop.bind(ops), torch.cat((eta, s), 1), d, rtol=1e-8, jvp_oracle="forward_ad"
    )
    assert dottest(loop.jacobian(eta, s, d, ops, wrt="both"), rtol=1e-10)


@pytest.mark.parametrize("kind", ["mri2d", "callables"])
def test_reconstruction_check_runs_on_the_whole_batch(kind):
    """The opt-in reconstruction check inverts the loop on the whole batch: a per-sample
    operator accepts no single sample, and a batched callable pair may not either."""
    loop, ops, eta, s, d, _ = make_case(kind)
    if kind == "callables":  # one callable pair that scales each row by its own factor
        scales = torch.arange(1.0, B + 1, dtype=F64).view(B, 1, 1)
        ops = (lambda x: x * scales, lambda y: y * scales)
    previous = invops.set_reconstruction_check(1e-9, action="raise")
    try:
        with torch.no_grad():
            eta_out, s_out = loop(eta, s, d, ops)
        deta, _, eta_in, _, _ = loop.backward(
            torch.ones_like(eta), 0 * s_out, eta_out, s_out, d, ops
        )
        eta_leaf = eta.clone().requires_grad_()
        loop(eta_leaf, s, d, ops)[0].sum().backward()  # through the autograd bridge
    finally:
        invops.set_reconstruction_check(None)
        if previous is not None:
            invops.set_reconstruction_check(*previous)
    assert rel(eta_in, eta) < 1e-9 and rel(eta_leaf.grad, deta) < 1e-12


def test_batched_torch_operator_equals_the_list():
    loop, ops, eta, s, d, _ = make_case("multicoil")
    stacked = TorchMRI(np.stack([J.mask for J in ops]), np.stack([J.coils for J in ops]))
    assert stacked.batch_size == B
    a, b = loop(eta, s, d, ops), loop(eta, s, d, stacked)
    assert rel(a[0], b[0]) < 1e-14 and rel(a[1], b[1]) < 1e-14


# ------------------------------------------------------------------------------------ one call
class CallCounter:
    def __init__(self, monkeypatch, module, name):
        self.count, self.original = 0, getattr(module, name)

        def counted(*args, **kwargs):
            self.count += 1
            return self.original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)


def _spy_pylops(monkeypatch, ops):
    calls = []
    for J in ops:
        for name in ("_matvec", "_rmatvec", "_matmat", "_rmatmat"):
            original = getattr(J, name)

            def spy(x, original=original):
                calls.append(1)
                return original(x)

            monkeypatch.setattr(J, name, spy)
    return calls


@pytest.mark.parametrize("kind", ["mri2d", "multicoil", "mri2d-vertical"])
def test_per_sample_mri_makes_one_batched_call(monkeypatch, kind):
    counts = {}
    for batch in (1, 4):
        loop, ops, eta, s, d, _ = make_case(kind, batch=batch, maxiter=2)
        pylops_calls = _spy_pylops(monkeypatch, ops)
        fft = CallCounter(monkeypatch, torch.fft, "fft2")
        ifft = CallCounter(monkeypatch, torch.fft, "ifft2")
        w = torch.randn_like(eta)
        with torch.no_grad():
            eta_out, s_out = loop(eta, s, d, ops)
        forward_calls = (fft.count, ifft.count)
        loop.backward(w, s_out, eta_out, s_out, d, ops)
        counts[batch] = forward_calls, (fft.count, ifft.count)
        assert not pylops_calls  # the per-sample pylops operators are never applied one by one
        monkeypatch.undo()
    # one J and one J^H per iteration in the forward pass, whatever the batch size
    assert counts[4][0] == (2, 2), counts
    assert counts[4] == counts[1], counts


def test_row_by_row_fallback_makes_one_call_per_sample():
    ops, _, _, _ = per_sample_physics("callables")
    calls = []

    def counted(pair):
        return (lambda x: calls.append(x.shape[0]) or pair[0](x), pair[1])

    op = per_sample([counted(p) for p in ops])
    assert not op.one_call
    op.apply(torch.randn(B, N, N, dtype=F64))
    assert calls == [1] * B


def test_per_sample_operator_shapes_and_dottest():
    ops, _, ds, _ = per_sample_physics("multicoil")
    op = as_operator(ops, real_model=False)
    assert op.model_shape == (N, N) and op.data_shape == ds and op.is_complex
    x = torch.randn(B, N, N, dtype=torch.complex128)
    y = torch.randn(B, *ds, dtype=torch.complex128)
    lhs = torch.vdot(op.apply(x).flatten(), y.flatten())
    rhs = torch.vdot(x.flatten(), op.adjoint(y).flatten())
    assert abs(lhs - rhs) / abs(lhs) < 1e-12
    for i, J in enumerate(ops):
        row = (J @ x[i].numpy().ravel()).reshape(ds)
        assert rel(op.apply(x)[i], torch.from_numpy(row)) < 1e-12


def test_raw_matrices_are_stacked():
    mats, _, _, _ = per_sample_physics("raw-matrices")
    op = per_sample(mats)
    assert op.one_call and op.batch_size == B
    x = torch.randn(B, N * N, dtype=F64)
    for i, A in enumerate(mats):
        assert rel(op.apply(x)[i], torch.from_numpy(A) @ x[i]) < 1e-14
    cplx = per_sample([A + 1j * A.T for A in mats], real_model=False)
    y = torch.randn(B, N * N, dtype=torch.complex128)
    for i, A in enumerate(mats):
        expected = torch.from_numpy((A + 1j * A.T).conj().T) @ y[i]
        assert rel(cplx.adjoint(y)[i], expected) < 1e-14


# ------------------------------------------------------------------------------------ errors
class Spy:
    def __init__(self):
        self.calls = 0

    def pair(self):
        def forward(x):
            self.calls += 1
            return x

        def adjoint(y):
            self.calls += 1
            return y

        return forward, adjoint


def test_wrong_number_of_operators_is_refused_before_any_compute():
    spy = Spy()
    eta, s = torch.zeros(B, 1, N, N, dtype=F64), torch.zeros(B, 2, N, N, dtype=F64)
    d = torch.zeros(B, N, N, dtype=F64)
    loop = NetworkLoop(3, 4, 1).double()
    for n_ops in (B - 1, B + 1):
        ops = [spy.pair() for _ in range(n_ops)]
        for call in (loop, loop.inverse, loop.jacobian):
            with pytest.raises(ValueError, match=f"J holds {n_ops} per-sample operators.*{B}"):
                call(eta, s, d, ops)
        with pytest.raises(ValueError, match=f"{n_ops} per-sample"):
            loop.backward(eta, s, eta, s, d, ops)
    masks = np.stack([cartesian_mask((N, N), 2, rng=i) for i in range(B + 1)])
    cloop = NetworkLoop(4, 4, 1, n_model=2, complex_model=True).double()
    with pytest.raises(ValueError, match="per-sample"):
        cloop(
            torch.zeros(B, 2, N, N, dtype=F64),
            torch.zeros(B, 2, N, N, dtype=F64),
            torch.zeros(B, N, N, dtype=torch.complex128),
            TorchMRI(masks),
        )
    assert spy.calls == 0


def test_mismatched_operators_are_refused():
    conv = pylops.signalprocessing.Convolve2D((N, N), h=np.ones((3, 3)), offset=(1, 1))
    other = pylops.signalprocessing.Convolve2D((N, N + 4), h=np.ones((3, 3)), offset=(1, 1))
    with pytest.raises(ValueError, match=r"share their shapes.*J\[1\].*\(8, 12\)"):
        as_operator([conv, other])
    mri = pylops.medical.MRI2D((N, N), mask=np.ones((N, N)))
    with pytest.raises(ValueError, match="all real or all complex"):
        as_operator([conv, mri])
    with pytest.raises(TypeError, match=r"J\[1\]"):
        as_operator([conv, "blur"])
    with pytest.raises(TypeError, match="nested"):
        as_operator([conv, [conv]])
    masks = np.stack([np.ones((N, N))] * 2)
    with pytest.raises(TypeError, match="itself per-sample"):
        as_operator([conv, TorchMRI(masks)])
    with pytest.raises(ValueError, match="empty"):
        per_sample([])
    with pytest.raises(TypeError, match="callable pair"):
        per_sample(_conv_pair(0))
    with pytest.raises(ValueError, match="coil set"):
        TorchMRI(masks, np.ones((3, 2, N, N)))
    # in the loop: refused when bound, before any compute
    loop = NetworkLoop(3, 4, 1).double()
    with pytest.raises(ValueError, match="share their shapes"):
        loop(
            torch.zeros(2, 1, N, N, dtype=F64),
            torch.zeros(2, 2, N, N, dtype=F64),
            torch.zeros(2, N, N, dtype=F64),
            [conv, other],
        )


def test_a_tuple_of_operators_is_per_sample_and_a_callable_pair_is_not():
    conv = pylops.signalprocessing.Convolve2D((N, N), h=np.ones((3, 3)), offset=(1, 1))
    assert as_operator((conv, conv)).batch_size == 2
    pair = _conv_pair(0)
    assert getattr(as_operator(pair), "batch_size", None) is None
    assert as_operator((pair, pair)).batch_size == 2
    assert math.isclose(
        float(as_operator([pair, pair]).apply(torch.ones(2, N, N, dtype=F64)).sum()),
        2 * float(pair[0](torch.ones(1, N, N, dtype=F64)).sum()),
    )
