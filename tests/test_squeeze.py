"""Tests for invops.squeeze: Squeeze, HaarSqueeze, split and cat."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import invops
from invops import testing

DT = torch.float64
FACTORIES = {
    "checkerboard": lambda: invops.Squeeze("checkerboard"),
    "patch": lambda: invops.Squeeze("patch"),
    "haar": lambda: invops.HaarSqueeze(),
}
# spatial sizes divisible by 4, so the squeezed output is itself squeezable: this lets the
# testing helpers (which also apply the inverse to their input) run on ``module.reverse()``
SPATIAL = {1: (8,), 2: (4, 8), 3: (4, 4, 4)}


def randn(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=DT)


# ---------------------------------------------------------------------- independent references
def _offsets(d):
    """Offsets (or bands) in row-major order: k = sum_i o_i 2^(d-1-i)."""
    return list(itertools.product((0, 1), repeat=d))


def reference_squeeze(x, pattern):
    """Squeeze written pixel by pixel from the formula in the docstring."""
    b, c, *sizes = x.shape
    d = len(sizes)
    half = [s // 2 for s in sizes]
    y = torch.empty(b, 2**d * c, *half, dtype=x.dtype)
    for k, o in enumerate(_offsets(d)):
        for m in itertools.product(*(range(h) for h in half)):
            if pattern == "checkerboard":
                n = [2 * mi + oi for mi, oi in zip(m, o)]
            else:
                n = [oi * hi + mi for mi, oi, hi in zip(m, o, half)]
            y[(slice(None), slice(k * c, (k + 1) * c), *m)] = x[(slice(None), slice(None), *n)]
    return y


def reference_haar(x):
    """Haar bands from strided slices: band beta = sum_o prod_i (-1)^(beta_i o_i)/sqrt(2) x_o."""
    d = x.ndim - 2
    blocks = {
        o: x[(slice(None), slice(None), *(slice(oi, None, 2) for oi in o))] for o in _offsets(d)
    }
    bands = []
    for beta in _offsets(d):
        band = 0
        for o, z in blocks.items():
            sign = (-1) ** sum(bi * oi for bi, oi in zip(beta, o))
            band = band + sign * z / math.sqrt(2) ** d
        bands.append(band)
    return torch.cat(bands, dim=1)


REFERENCES = {
    "checkerboard": lambda x: reference_squeeze(x, "checkerboard"),
    "patch": lambda x: reference_squeeze(x, "patch"),
    "haar": reference_haar,
}

grid = pytest.mark.parametrize(
    "kind, d, batch, channels",
    list(itertools.product(FACTORIES, (1, 2, 3), (1, 3), (1, 3, 5, 6))),
)


# ---------------------------------------------------------------------- operator checks
@grid
def test_matches_reference_and_inverts(kind, d, batch, channels):
    m = FACTORIES[kind]()
    x = randn(batch, channels, *SPATIAL[d])
    x_copy = x.clone()
    y, logdet = m(x)
    assert y.shape == (batch, 2**d * channels, *(s // 2 for s in SPATIAL[d]))
    torch.testing.assert_close(y, REFERENCES[kind](x), rtol=1e-14, atol=1e-14)
    assert logdet.shape == (batch,) and logdet.dtype == DT and not logdet.any()
    # orthonormal: every sample keeps its norm
    torch.testing.assert_close(
        y.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1), rtol=1e-13, atol=0
    )
    x_rec, logdet_inv = m.inverse(y)
    assert torch.equal(x, x_copy), "the input was mutated"
    assert (x_rec - x).abs().max() <= 1e-14
    assert logdet_inv.shape == (batch,) and not logdet_inv.any()
    # check_invertible also applies the inverse to its argument, so it runs on the unsqueeze
    # (whose input y is valid in both directions for every channel count)
    assert testing.check_invertible(m.reverse(), y, rtol=1e-10) <= 1e-10


@grid
def test_against_autograd(kind, d, batch, channels):
    m = FACTORIES[kind]()
    y, _ = m(randn(batch, channels, *SPATIAL[d]))
    # the reversed module covers both directions of ``m`` (backward, backward_inverse, vjp,
    # the autograd bridge and jvp), each with a non-zero dlogdet
    errors = testing.check_against_autograd(m.reverse(), y)
    assert {"backward:input", "backward_inverse:input", "vjp:input", "jvp:tangent"} <= set(errors)


@pytest.mark.parametrize("kind", FACTORIES)
@pytest.mark.parametrize("d", (1, 2, 3))
def test_helpers_directly_when_shapes_allow(kind, d):
    # 3 * 2^d channels and sizes divisible by 4: x is valid for forward and inverse
    m = FACTORIES[kind]()
    x = randn(2, 3 * 2**d, *SPATIAL[d], seed=1)
    assert testing.check_invertible(m, x, rtol=1e-10) <= 1e-10
    testing.check_against_autograd(m, x)


@pytest.mark.parametrize("kind", FACTORIES)
@pytest.mark.parametrize("d", (1, 2, 3))
@pytest.mark.parametrize("channels", (1, 3))
def test_logdet_against_dense_jacobian(kind, d, channels):
    m = FACTORIES[kind]()
    x = randn(2, channels, *([2] * d), seed=2)
    assert testing.check_logdet(m, x) <= 1e-10
    y, _ = m(x)
    assert testing.check_logdet(m.reverse(), y) <= 1e-10
    # the dense Jacobian is orthogonal (a permutation for Squeeze)
    jac = torch.autograd.functional.jacobian(lambda v: m._forward(v)[0], x[:1]).reshape(
        y[:1].numel(), x[:1].numel()
    )
    torch.testing.assert_close(jac @ jac.T, torch.eye(jac.shape[0], dtype=DT), rtol=0, atol=1e-14)
    if kind != "haar":
        assert set(jac.unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("kind", FACTORIES)
@pytest.mark.parametrize("d", (1, 2, 3))
def test_jacobian_operator_input_and_both(kind, d):
    m = FACTORIES[kind]()
    x = randn(3, 5, *SPATIAL[d], seed=3)
    y, _ = m(x)
    for wrt in ("input", "both"):
        jac = m.jacobian(x, wrt=wrt)
        assert jac.shape == (y.numel(), x.numel())
        assert testing.dottest(jac, n_trials=2)
    # the map is linear and orthogonal: J v = f(v) and J^T w = f^{-1}(w)
    jac = m.jacobian(x)
    v, w = randn(*x.shape, seed=4), randn(*y.shape, seed=5)
    np.testing.assert_allclose(jac @ v.numpy().ravel(), m(v)[0].numpy().ravel(), rtol=0, atol=1e-14)
    np.testing.assert_allclose(
        jac.H @ w.numpy().ravel(), m.inverse(w)[0].numpy().ravel(), rtol=0, atol=1e-14
    )
    assert testing.dottest(m.reverse().jacobian(y))


@pytest.mark.parametrize("kind", FACTORIES)
def test_jacobian_operator_params_forward_part(kind):
    m = FACTORIES[kind]()
    x = randn(2, 3, 4, 4)
    jac = m.jacobian(x, wrt="params")
    assert jac.shape == (x.numel(), 0) and jac.dims == (0,)
    np.testing.assert_array_equal(jac.matvec(np.zeros(0)), np.zeros(x.numel()))


def test_jacobian_operator_params_adjoint_without_parameters():
    m = invops.Squeeze()
    x = randn(2, 3, 4, 4)
    jac = m.jacobian(x, wrt="params")
    out = jac.H @ np.ones(jac.shape[0])
    assert out.shape == (0,)
    assert testing.dottest(jac)


@pytest.mark.parametrize("kind", FACTORIES)
@pytest.mark.parametrize("d", (1, 2, 3))
def test_gradient_second_order(kind, d):
    m = FACTORIES[kind]()
    x = randn(2, 3, *SPATIAL[d], seed=6)
    y, _ = m(x)
    w = randn(*y.shape, seed=7)

    def phi(v):
        out, logdet = m(v)
        return (torch.sin(out) * w).sum() + 0.5 * logdet.sum()

    dx, x_rec = m.backward(torch.cos(y) * w, y, dlogdet=0.5)
    assert (x_rec - x).abs().max() <= 1e-14
    rate0, rate1 = testing.gradient_test(phi, x, dx)
    assert abs(rate1 - 2) < 0.25
    # a wrong gradient (the forward map instead of its transpose) is caught
    wrong = m.reverse()(torch.cos(y) * w)[0].flip(-1)
    with pytest.raises(AssertionError):
        testing.gradient_test(phi, x, wrong)


@pytest.mark.parametrize("kind", FACTORIES)
def test_numpy_in_numpy_out(kind):
    m = FACTORIES[kind]()
    x_t = randn(3, 5, 4, 8)
    x = x_t.numpy().copy()
    x_saved = x.copy()
    y, logdet = m(x)
    assert isinstance(y, np.ndarray) and isinstance(logdet, np.ndarray)
    assert y.dtype == np.float64 and logdet.shape == (3,)
    np.testing.assert_array_equal(y, m(x_t)[0].numpy())
    x_rec, logdet_inv = m.inverse(y)
    assert isinstance(x_rec, np.ndarray) and isinstance(logdet_inv, np.ndarray)
    np.testing.assert_allclose(x_rec, x, rtol=0, atol=1e-14)
    dy = np.random.default_rng(0).standard_normal(y.shape)
    dx, x_back = m.backward(dy, y, dlogdet=np.ones(3))
    assert isinstance(dx, np.ndarray) and isinstance(x_back, np.ndarray)
    np.testing.assert_allclose(dx, m.inverse(dy)[0], rtol=0, atol=1e-14)
    dx2, dtheta, _ = m.vjp(dy, y)
    assert dtheta == () and isinstance(dx2, np.ndarray)
    np.testing.assert_array_equal(dx2, dx)
    y2, dy2, ld, dld = m.jvp(x, dx=x)
    assert all(isinstance(a, np.ndarray) for a in (y2, dy2, ld, dld))
    np.testing.assert_allclose(dy2, y, rtol=0, atol=1e-14)
    assert not dld.any()
    np.testing.assert_array_equal(x, x_saved)
    # negative-stride numpy views are accepted
    np.testing.assert_array_equal(m(x[..., ::-1])[0], m(x_t.flip(-1))[0].numpy())


def test_autograd_bridge_and_float32():
    m = invops.HaarSqueeze()
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    y, logdet = m(x)
    assert y.dtype == torch.float32 and y.grad_fn is not None
    ((y**2).sum() + logdet.sum()).backward()
    torch.testing.assert_close(x.grad, 2 * x.detach())
    q = invops.Squeeze("patch", logdet=False)
    out = q(x.detach())
    assert isinstance(out, torch.Tensor) and out.shape == (2, 12, 2, 2)
    assert isinstance(q.inverse(out), torch.Tensor)


# ---------------------------------------------------------------------- exact channel order
def test_channel_order_1d():
    x = torch.arange(6.0, dtype=DT).reshape(1, 1, 6)
    assert invops.Squeeze("checkerboard")(x)[0].tolist() == [[[0, 2, 4], [1, 3, 5]]]
    assert invops.Squeeze("patch")(x)[0].tolist() == [[[0, 1, 2], [3, 4, 5]]]
    # offset-major: channel k * C + c
    x2 = torch.tensor([[[0.0, 1, 2, 3], [10, 11, 12, 13]]], dtype=DT)
    assert invops.Squeeze("checkerboard")(x2)[0].tolist() == [[[0, 2], [10, 12], [1, 3], [11, 13]]]
    assert invops.Squeeze("patch")(x2)[0].tolist() == [[[0, 1], [10, 11], [2, 3], [12, 13]]]


def test_channel_order_2d():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=DT)
    for pattern in ("checkerboard", "patch"):
        assert invops.Squeeze(pattern)(x)[0].flatten().tolist() == [1, 2, 3, 4]
    x = torch.arange(16.0, dtype=DT).reshape(1, 1, 4, 4)
    assert invops.Squeeze("checkerboard")(x)[0].tolist() == [
        [
            [[0, 2], [8, 10]],
            [[1, 3], [9, 11]],
            [[4, 6], [12, 14]],
            [[5, 7], [13, 15]],
        ]
    ]
    assert invops.Squeeze("patch")(x)[0].tolist() == [
        [
            [[0, 1], [4, 5]],
            [[2, 3], [6, 7]],
            [[8, 9], [12, 13]],
            [[10, 11], [14, 15]],
        ]
    ]
    # two channels: output channel k * C + c
    x2 = torch.cat([x, x + 100], dim=1)
    y2 = invops.Squeeze("checkerboard")(x2)[0]
    assert y2[0, :, 0, 0].tolist() == [0, 100, 1, 101, 4, 104, 5, 105]


def test_channel_order_3d():
    x = torch.arange(8.0, dtype=DT).reshape(1, 1, 2, 2, 2)  # x[o1, o2, o3] = 4 o1 + 2 o2 + o3
    for pattern in ("checkerboard", "patch"):
        assert invops.Squeeze(pattern)(x)[0].flatten().tolist() == list(range(8))
    x = torch.arange(64.0, dtype=DT).reshape(1, 1, 4, 4, 4)
    y = invops.Squeeze("checkerboard")(x)[0]
    assert torch.equal(y[0, 5], x[0, 0, 1::2, 0::2, 1::2])  # k = 5 = (1, 0, 1)
    y = invops.Squeeze("patch")(x)[0]
    assert torch.equal(y[0, 3], x[0, 0, :2, 2:, 2:])  # k = 3 = (0, 1, 1)


def test_haar_hand_computed():
    r2 = math.sqrt(2)
    y = invops.HaarSqueeze()(torch.tensor([[[1.0, 2.0]]], dtype=DT))[0]
    torch.testing.assert_close(y.flatten(), torch.tensor([3 / r2, -1 / r2], dtype=DT))
    y = invops.HaarSqueeze()(torch.tensor([[[1.0, 2.0], [5.0, 9.0]]], dtype=DT))[0]
    torch.testing.assert_close(
        y.flatten(), torch.tensor([3 / r2, 14 / r2, -1 / r2, -4 / r2], dtype=DT)
    )
    # [[a, b], [c, d]] -> LL (a+b+c+d)/2, LH (a-b+c-d)/2, HL (a+b-c-d)/2, HH (a-b-c+d)/2
    y = invops.HaarSqueeze()(torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=DT))[0]
    torch.testing.assert_close(y.flatten(), torch.tensor([5.0, -1.0, -2.0, 0.0], dtype=DT))
    # 3D: the Kronecker product H (x) H (x) H on the row-major 2x2x2 block
    h = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=DT) / r2
    x = randn(1, 1, 2, 2, 2)
    y = invops.HaarSqueeze()(x)[0]
    torch.testing.assert_close(y.flatten(), torch.kron(torch.kron(h, h), h) @ x.flatten())


def test_haar_band_meaning():
    hx = invops.HaarSqueeze()
    const = torch.full((1, 2, 4, 4), 3.0, dtype=DT)
    y = hx(const)[0]
    torch.testing.assert_close(y[:, :2], torch.full((1, 2, 2, 2), 6.0, dtype=DT))  # 2^(d/2) * 3
    assert y[:, 2:].abs().max() < 1e-14
    # alternating along W, constant along H: only band 1 (LH: lowpass H, highpass W)
    alt_w = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=DT).expand(1, 1, 4, 4)
    y = hx(alt_w)[0]
    nonzero = [k for k in range(4) if y[0, k].abs().max() > 1e-14]
    assert nonzero == [1]
    y = hx(alt_w.transpose(-1, -2))[0]
    assert [k for k in range(4) if y[0, k].abs().max() > 1e-14] == [2]


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(sorted(FACTORIES)),
    batch=st.integers(1, 2),
    channels=st.integers(1, 4),
    halves=st.lists(st.integers(1, 3), min_size=1, max_size=3),
)
def test_property_matches_reference(kind, batch, channels, halves):
    x = randn(batch, channels, *(2 * h for h in halves))
    m = FACTORIES[kind]()
    y, _ = m(x)
    torch.testing.assert_close(y, REFERENCES[kind](x), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(m.inverse(y)[0], x, rtol=0, atol=1e-14)


# ---------------------------------------------------------------------- reverse = unsqueeze
@pytest.mark.parametrize("kind", FACTORIES)
def test_reverse_is_unsqueeze(kind):
    m = FACTORIES[kind]()
    u = m.reverse()
    assert isinstance(u, invops.Reversed) and u.reverse() is m
    assert list(u.parameters()) == [] and u.state_dict() == {} and m.state_dict() == {}
    x = randn(2, 3, 4, 6)
    y, _ = m(x)
    assert torch.equal(u(y)[0], m.inverse(y)[0])
    assert torch.equal(u.inverse(x)[0], y)
    assert (u(y)[0] - x).abs().max() <= 1e-14
    # the reversed module validates in its own direction
    with pytest.raises(ValueError, match="divisible by 4"):
        u(x)
    with pytest.raises(ValueError, match="size 3 in spatial dimension W"):
        u.inverse(randn(2, 3, 4, 3))
    # a flow that squeezes, mixes channels and unsqueezes keeps the shape and is consistent
    flow = invops.Chain(m, invops.Conv1x1(12).double(), FACTORIES[kind]().reverse())
    out, logdet = flow(x)
    assert out.shape == x.shape and logdet.abs().max() < 1e-12
    testing.check_invertible(flow, x)
    testing.check_against_autograd(flow, x)


# ---------------------------------------------------------------------- input errors
@pytest.mark.parametrize("kind", FACTORIES)
def test_errors(kind):
    m = FACTORIES[kind]()
    name = "HaarSqueeze" if kind == "haar" else "Squeeze"
    with pytest.raises(ValueError, match=re.escape("size 5 in spatial dimension H")) as err:
        m(randn(2, 3, 5, 4))
    assert name in str(err.value) and "(2, 3, 5, 4)" in str(err.value)
    with pytest.raises(ValueError, match="size 7 in spatial dimension L"):
        m(randn(2, 3, 7))
    with pytest.raises(ValueError, match="size 3 in spatial dimension W"):
        m(randn(1, 1, 4, 4, 3))
    with pytest.raises(ValueError, match=re.escape("dense (B, C) input")) as err:
        m(randn(4, 3))
    assert "(4, 3)" in str(err.value)
    with pytest.raises(ValueError, match="layout"):
        m(randn(1, 1, 2, 2, 2, 2))
    with pytest.raises(ValueError, match="layout"):
        m(randn(4))
    with pytest.raises(ValueError, match=re.escape("divisible by 4")) as err:
        m.inverse(randn(2, 6, 2, 2))
    assert "got 6 channels" in str(err.value)
    with pytest.raises(ValueError, match=re.escape("divisible by 8")):
        m.inverse(randn(2, 4, 2, 2, 2))
    with pytest.raises(ValueError, match="divisible by 2"):
        m.backward(randn(1, 3, 2), randn(1, 3, 2))
    with pytest.raises(TypeError, match="floating-point"):
        m(torch.ones(1, 1, 2, 2, dtype=torch.int64))


def test_bad_pattern():
    with pytest.raises(ValueError, match="pattern must be one of"):
        invops.Squeeze("column")


# ---------------------------------------------------------------------- split / cat
@pytest.mark.parametrize("channels, first", [(2, 1), (3, 2), (5, 3), (7, 4)])
@pytest.mark.parametrize("spatial", [(), (5,), (3, 4), (2, 3, 2)])
def test_split_cat_round_trip(channels, first, spatial):
    x = randn(3, channels, *spatial)
    x1, x2 = invops.split(x)
    assert x1.shape == (3, first, *spatial) and x2.shape == (3, channels - first, *spatial)
    assert torch.equal(x1, x[:, :first]) and torch.equal(x2, x[:, first:])
    assert x1.data_ptr() == x.data_ptr()  # a view, no copy
    assert torch.equal(invops.cat(x1, x2), x)
    for k in range(1, channels):
        a, b = invops.split(x, n_first=k)
        assert a.shape[1] == k and torch.equal(invops.cat(a, b), x)


def test_split_cat_numpy_and_autograd():
    x = np.random.default_rng(0).standard_normal((2, 5, 4))
    x1, x2 = invops.split(x)
    assert isinstance(x1, np.ndarray) and x1.shape == (2, 3, 4) and x2.shape == (2, 2, 4)
    joined = invops.cat(x1, x2)
    assert isinstance(joined, np.ndarray)
    np.testing.assert_array_equal(joined, x)
    # the reference's banker's rounding (5 -> 2) is reachable through n_first
    assert invops.split(x, n_first=2)[0].shape == (2, 2, 4)
    t = torch.randn(2, 5, 4, dtype=DT, requires_grad=True)
    a, b = invops.split(t)
    (invops.cat(b, a) * torch.arange(5.0, dtype=DT).reshape(1, 5, 1)).sum().backward()
    assert t.grad[0, :, 0].tolist() == [2.0, 3.0, 4.0, 0.0, 1.0]


def test_split_cat_errors():
    with pytest.raises(ValueError, match="at least 2 channels"):
        invops.split(randn(3, 1, 4))
    with pytest.raises(ValueError, match="layout"):
        invops.split(randn(4))
    for bad in (0, 5, -1, 6):
        with pytest.raises(ValueError, match=re.escape("between 1 and 4 (x has 5 channels)")):
            invops.split(randn(2, 5), n_first=bad)
    with pytest.raises(TypeError, match="integer"):
        invops.split(randn(2, 5), n_first=2.5)
    with pytest.raises(TypeError, match="integer"):
        invops.split(randn(2, 5), n_first=True)
    assert invops.split(randn(2, 5), n_first=np.int64(1))[0].shape == (2, 1)
    with pytest.raises(ValueError, match="same batch size and spatial shape"):
        invops.cat(randn(2, 3, 4), randn(3, 3, 4))
    with pytest.raises(ValueError, match="same batch size and spatial shape"):
        invops.cat(randn(2, 3, 4), randn(2, 3, 5))
    with pytest.raises(ValueError, match="same batch size and spatial shape"):
        invops.cat(randn(2, 3, 4), randn(2, 3))
    with pytest.raises(ValueError, match="layout"):
        invops.cat(randn(2), randn(2, 3))
    with pytest.raises(TypeError, match="same dtype"):
        invops.cat(randn(2, 3), torch.zeros(2, 3))
    with pytest.raises(TypeError, match="same kind"):
        invops.cat(randn(2, 3), np.zeros((2, 3)))


@pytest.mark.parametrize("kind", FACTORIES)
def test_checkers_take_shape_changing_layers_directly(kind):
    # the inverse direction is probed at y = forward(x), so any channel count works
    m = FACTORIES[kind]()
    x = randn(2, 3, 4, 2)
    assert testing.check_invertible(m, x) <= 1e-12
    testing.check_against_autograd(m, x)


@pytest.mark.parametrize("kind", FACTORIES)
@pytest.mark.parametrize("d", (1, 2, 3))
@pytest.mark.parametrize("wrt", ["input", "params", "both"])
def test_float32_jacobian_dottest(kind, d, wrt):
    m = FACTORIES[kind]()
    x = randn(2, 3, *SPATIAL[d]).float()
    assert testing.dottest(m.jacobian(x, wrt=wrt), rtol=1e-4, n_trials=3)
