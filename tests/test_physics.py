"""Physics operators of ``invops.physics``: multi-coil MRI and sparse-view CT.

Each fast torch operator is proven equal to its PyLops reference (built from PyLops parts) to
rounding, every operator passes a dot test, and the coil-map and mask helpers deliver what they
promise (normalisation, smoothness, acceleration, centre sampling).
"""

from __future__ import annotations

import math

import numpy as np
import pylops
import pytest
import torch

from invops.physics import (
    MultiCoilMRI2D,
    TorchCT,
    TorchMRI,
    cartesian_mask,
    coil_sensitivities,
    ct_angles,
    ct_matrix,
    ct_operator,
    image,
    kspace,
    radial_mask,
)

F64, C128 = torch.float64, torch.complex128

pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


def crandn(rng, *shape):
    return rng.standard_normal(shape) + 1j * rng.standard_normal(shape)


def torch_dottest(
    op, model_shape, data_shape, batch=3, complex_model=True, complex_data=True, seed=0
):
    """``|<Ax, y> - <x, A^H y>| / |<Ax, y>|`` on a random batch."""
    rng = np.random.default_rng(seed)
    x = (
        crandn(rng, batch, *model_shape)
        if complex_model
        else rng.standard_normal((batch, *model_shape))
    )
    y = (
        crandn(rng, batch, *data_shape)
        if complex_data
        else rng.standard_normal((batch, *data_shape))
    )
    ax = op.apply(torch.from_numpy(x)).numpy()
    ahy = op.adjoint(torch.from_numpy(y)).numpy()
    lhs, rhs = np.vdot(y.ravel(), ax.ravel()), np.vdot(ahy.ravel(), x.ravel())
    if not complex_model:  # real models: the real inner product, <x, Re A^H y> = Re <Ax, y>
        lhs = lhs.real
    return abs(lhs - rhs) / abs(lhs)


# ------------------------------------------------------------------------------------ transforms
@pytest.mark.parametrize("shape", [(8, 8), (7, 10)])
def test_kspace_follows_pylops_mri2d_conventions(shape):
    rng = np.random.default_rng(0)
    x = crandn(rng, 2, *shape)
    M = pylops.medical.MRI2D(shape, mask=np.ones(shape))
    k = kspace(torch.from_numpy(x)).numpy()
    for i in range(2):
        assert rel(k[i], (M @ x[i].ravel()).reshape(shape)) < 1e-13
    # zero frequency at n // 2, orthonormal, and image() inverts it
    assert np.isclose(k[0][shape[0] // 2, shape[1] // 2], x[0].sum() / math.sqrt(x[0].size))
    assert rel(image(torch.from_numpy(k)).numpy(), x) < 1e-13


# ------------------------------------------------------------------------------------ MRI
@pytest.mark.parametrize("shape, n_coils", [((8, 8), 4), ((9, 6), 3), ((8, 8), 1)])
def test_multicoil_pylops_operator_is_built_from_parts_and_passes_dottest(shape, n_coils):
    coils = coil_sensitivities(shape, n_coils, rng=1)
    mask = cartesian_mask(shape, 2, rng=2)
    A = MultiCoilMRI2D(coils, mask)
    assert A.dims == shape and A.dimsd == (n_coils, *shape)
    assert pylops.utils.dottest(A, complexflag=3, rtol=1e-10, atol=0.0, raiseerror=True)
    # the same operator by hand: coil c's k-space is MRI2D(S_c x)
    rng = np.random.default_rng(3)
    x = crandn(rng, *shape)
    mri = pylops.medical.MRI2D(shape, mask=mask)
    expected = np.stack([(mri @ (coils[c] * x).ravel()).reshape(shape) for c in range(n_coils)])
    assert rel((A @ x.ravel()).reshape(A.dimsd), expected) < 1e-13


@pytest.mark.parametrize("shape, n_coils", [((8, 8), 4), ((9, 6), 3)])
def test_torch_mri_equals_the_pylops_operator(shape, n_coils):
    coils = coil_sensitivities(shape, n_coils, rng=4)
    mask = radial_mask(shape, 2, rng=5)
    A = MultiCoilMRI2D(coils, mask)
    T = A.torch_operator()
    rng = np.random.default_rng(6)
    x, y = crandn(rng, 3, *shape), crandn(rng, 3, n_coils, *shape)
    Tx = T.apply(torch.from_numpy(x)).numpy()
    Ty = T.adjoint(torch.from_numpy(y)).numpy()
    for i in range(3):
        assert rel(Tx[i], (A @ x[i].ravel()).reshape(A.dimsd)) < 1e-12
        assert rel(Ty[i], (A.H @ y[i].ravel()).reshape(A.dims)) < 1e-12
    assert torch_dottest(T, shape, (n_coils, *shape)) < 1e-12
    # real models: the real part of the adjoint, and a real input goes in as it is
    T_real = A.torch_operator(real_model=True)
    xr = rng.standard_normal((2, *shape))
    assert (
        rel(T_real.apply(torch.from_numpy(xr)).numpy()[0], (A @ xr[0].ravel()).reshape(A.dimsd))
        < 1e-12
    )
    assert rel(T_real.adjoint(torch.from_numpy(y)).numpy(), Ty.real) < 1e-15
    assert torch_dottest(T_real, shape, (n_coils, *shape), complex_model=False) < 1e-12


def test_torch_mri_single_coil_equals_mri2d():
    shape = (8, 10)
    mask = cartesian_mask(shape, 3, rng=0)
    M = pylops.medical.MRI2D(shape, mask=mask)
    T = TorchMRI(mask)
    rng = np.random.default_rng(1)
    x, y = crandn(rng, 2, *shape), crandn(rng, 2, *shape)
    assert rel(T.apply(torch.from_numpy(x)).numpy()[1], (M @ x[1].ravel()).reshape(shape)) < 1e-12
    assert (
        rel(T.adjoint(torch.from_numpy(y)).numpy()[1], (M.H @ y[1].ravel()).reshape(shape)) < 1e-12
    )
    assert torch_dottest(T, shape, shape) < 1e-12


def test_torch_mri_per_sample_masks_and_coils():
    shape, batch = (8, 8), 3
    masks = np.stack([cartesian_mask(shape, 2, rng=i) for i in range(batch)])
    coils = np.stack([coil_sensitivities(shape, 2, rng=i) for i in range(batch)])
    rng = np.random.default_rng(2)
    x = crandn(rng, batch, *shape)
    for T, mask_of, coils_of in (
        (TorchMRI(masks, coils), lambda i: masks[i], lambda i: coils[i]),
        (TorchMRI(masks, coils[0]), lambda i: masks[i], lambda i: coils[0]),
        (TorchMRI(masks[0], coils), lambda i: masks[0], lambda i: coils[i]),
    ):
        assert T.batch_size == batch
        out = T.apply(torch.from_numpy(x)).numpy()
        for i in range(batch):
            A = MultiCoilMRI2D(coils_of(i), mask_of(i))
            assert rel(out[i], (A @ x[i].ravel()).reshape(A.dimsd)) < 1e-12
        assert torch_dottest(T, shape, (2, *shape), batch=batch) < 1e-12
        with pytest.raises(ValueError, match="batch of 3"):
            T.apply(torch.from_numpy(x[:2]))


def test_torch_mri_precision_follows_the_input():
    mask = cartesian_mask((8, 8), 2, rng=0)
    T = TorchMRI(mask, coil_sensitivities((8, 8), 2))
    x = torch.randn(2, 8, 8)
    assert T.apply(x).dtype == torch.complex64
    assert T.adjoint(T.apply(x)).dtype == torch.complex64
    assert rel(T.apply(x).numpy(), T.apply(x.double()).numpy()) < 1e-5


def test_torch_mri_bad_input():
    with pytest.raises(ValueError, match="mask must be"):
        TorchMRI(np.ones(8))
    with pytest.raises(ValueError, match="coils must be"):
        TorchMRI(np.ones((8, 8)), np.ones((2, 8, 6)))
    with pytest.raises(ValueError, match="coils must be"):
        MultiCoilMRI2D(np.ones((8, 8)), np.ones((8, 8)))
    with pytest.raises(ValueError, match="mask must have the image shape"):
        MultiCoilMRI2D(np.ones((2, 8, 8)), np.ones((8, 6)))
    T = TorchMRI(np.ones((8, 8)))
    with pytest.raises(ValueError, match=r"\(8, 8\)"):
        T.apply(torch.zeros(1, 8, 6))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_operators_on_gpu():
    mask = cartesian_mask((16, 16), 4, rng=0)
    coils = coil_sensitivities((16, 16), 4, rng=0)
    T = TorchMRI(mask, coils)
    x = torch.randn(2, 16, 16, dtype=C128)
    out = T.apply(x.cuda())
    assert out.device.type == "cuda"
    assert rel(out.cpu().numpy(), T.apply(x).numpy()) < 1e-12
    assert rel(T.adjoint(out).cpu().numpy(), T.adjoint(T.apply(x)).numpy()) < 1e-12
    ct = TorchCT(16, 6)
    xr = torch.randn(2, 16, 16, dtype=F64)
    assert rel(ct.apply(xr.cuda()).cpu().numpy(), ct.apply(xr).numpy()) < 1e-12
    y = ct.apply(xr)
    assert rel(ct.adjoint(y.cuda()).cpu().numpy(), ct.adjoint(y).numpy()) < 1e-12


# ------------------------------------------------------------------------------------ helpers
def test_coil_sensitivities():
    S = coil_sensitivities((32, 24), 8, rng=0)
    assert S.shape == (8, 32, 24) and S.dtype == np.complex128
    assert np.allclose((np.abs(S) ** 2).sum(0), 1.0, atol=1e-14)
    # smooth: neighbouring pixels differ by a small fraction of the map's range
    assert np.abs(np.diff(S, axis=1)).max() < 0.15 and np.abs(np.diff(S, axis=2)).max() < 0.15
    # each coil is brightest near its own side, so the maps differ
    peaks = {np.unravel_index(np.abs(s).argmax(), s.shape) for s in S}
    assert len(peaks) == 8
    assert np.array_equal(
        coil_sensitivities((8, 8), 3, rng=1), coil_sensitivities((8, 8), 3, rng=1)
    )
    assert not np.allclose(
        coil_sensitivities((8, 8), 3, rng=1), coil_sensitivities((8, 8), 3, rng=2)
    )
    with pytest.raises(ValueError, match="n_coils"):
        coil_sensitivities((8, 8), 0)


@pytest.mark.parametrize("acceleration", [4, 8])
@pytest.mark.parametrize("pattern", ["random", "equispaced"])
def test_cartesian_mask(acceleration, pattern):
    m = cartesian_mask((64, 64), acceleration, pattern=pattern, rng=0)
    assert m.shape == (64, 64) and set(np.unique(m)) == {0.0, 1.0}
    assert (m == m[:1]).all()  # whole columns
    assert m[0].sum() == 64 // acceleration
    n_center = round(64 * 0.32 / acceleration)
    start = 32 - n_center // 2
    assert m[0, start : start + n_center].all()
    assert not np.array_equal(m, cartesian_mask((64, 64), acceleration, pattern=pattern, rng=1))
    with pytest.raises(ValueError, match="acceleration"):
        cartesian_mask((8, 8), 0.5)
    with pytest.raises(ValueError, match="pattern"):
        cartesian_mask((8, 8), 2, pattern="poisson")


@pytest.mark.parametrize("acceleration", [4, 8])
def test_radial_mask(acceleration):
    m = radial_mask((64, 64), acceleration, rng=0)
    assert 1 / acceleration <= m.mean() < 1.2 / acceleration
    assert m[32, 32] == 1.0  # every spoke crosses the zero frequency
    # denser at the centre than at the edge
    yy, xx = np.mgrid[:64, :64]
    r = np.hypot(yy - 32, xx - 32)
    assert m[r < 8].mean() > 3 * m[(r > 24) & (r < 32)].mean()
    with pytest.raises(ValueError, match="acceleration"):
        radial_mask((8, 8), 0)


# ------------------------------------------------------------------------------------ CT
@pytest.mark.parametrize("n, n_views", [(8, 4), (12, 7), (15, 30), (16, 1)])
def test_ct_matrix_and_torch_equal_the_radon2d_operator(n, n_views):
    P = ct_operator(n, n_views)
    assert P.dims == (n, n) and P.dimsd == (n_views, n)
    assert pylops.utils.dottest(P, rtol=1e-10, atol=0.0, raiseerror=True)
    A = ct_matrix(n, n_views)
    T = TorchCT(n, n_views)
    rng = np.random.default_rng(n)
    X = rng.standard_normal((3, n, n))
    Y = rng.standard_normal((3, n_views, n))
    ref_fwd = np.stack([(P @ x.ravel()).reshape(n_views, n) for x in X])
    ref_adj = np.stack([(P.H @ y.ravel()).reshape(n, n) for y in Y])
    assert rel((A @ X.reshape(3, -1).T).T.reshape(ref_fwd.shape), ref_fwd) < 1e-12
    assert rel(T.apply(torch.from_numpy(X)).numpy(), ref_fwd) < 1e-12
    assert rel(T.adjoint(torch.from_numpy(Y)).numpy(), ref_adj) < 1e-12
    assert torch_dottest(T, (n, n), (n_views, n), complex_model=False, complex_data=False) < 1e-12


def test_ct_geometry():
    theta = ct_angles(30)
    assert np.allclose(np.diff(theta), np.pi / 30) and theta[0] == -np.pi / 4
    # a pixel at the centre is seen by every view, in a middle bin
    n = 16
    x = np.zeros((n, n))
    x[n // 2, n // 2] = 1.0
    sino = (ct_matrix(n, 8) @ x.ravel()).reshape(8, n)
    assert np.allclose(sino.sum(1), 1.0)
    # a horizontal view (p = 0) of a column-constant image sums the rows
    img = np.tile(np.arange(n, dtype=float), (n, 1))
    view0 = (ct_matrix(n, 2) @ img.ravel()).reshape(2, n)[0]  # angle -45 deg ...
    assert view0.shape == (n,)
    flat = (ct_matrix(n, 4) @ img.ravel()).reshape(4, n)[1]  # angle 0: p = 0
    assert np.allclose(flat[:-1], n * np.arange(n - 1))  # the last bin has no interpolation partner
    with pytest.raises(ValueError, match="n_views"):
        ct_angles(0)
    T = TorchCT(8, 3)
    assert T.apply(torch.ones(2, 8, 8, dtype=torch.complex128)).dtype == torch.complex128
