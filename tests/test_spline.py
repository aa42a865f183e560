"""The rational-quadratic spline coupling law: inverse, log-slope, derivatives and identity init."""

import math

import pytest
import torch

from invops.layers.spline import Spline

pytestmark = pytest.mark.usefixtures("one_thread")

# layouts (B, n, *spatial): dense, 1D, 2D, 3D
SHAPES = [(3, 4), (2, 3, 5), (2, 2, 3, 4), (1, 2, 2, 3, 2)]


def conditioner_output(law, x, scale, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (x.shape[0], law.n_params * x.shape[1], *x.shape[2:])
    return scale * torch.randn(shape, generator=gen, dtype=x.dtype)


def inputs(shape, law, seed=0, dtype=torch.float64):
    """Points inside and outside the bound, with some exactly at -bound, +bound and 0."""
    gen = torch.Generator().manual_seed(seed)
    x = (2 * torch.rand(shape, generator=gen, dtype=torch.float64) - 1) * 1.4 * law.bound
    flat = x.view(-1)
    flat[:3] = torch.tensor([-law.bound, law.bound, 0.0])
    return x.to(dtype)


def slope(law, x, h):
    """dy/dx element-wise, by autograd (the law is element-wise, so this is the diagonal)."""
    x = x.detach().clone().requires_grad_()
    y, _ = law.forward(x, h)
    (g,) = torch.autograd.grad(y.sum(), x)
    return g


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"bins": 5, "bound": 2.5}, {"min_bin_width": 1e-2, "min_bin_height": 1e-4}],
)
def test_identity_at_zero_parameters(shape, dtype, kwargs):
    """A conditioner whose last layer is zero makes the law the identity, bit for bit."""
    law = Spline(**kwargs)
    x = 3 * torch.randn(shape, dtype=dtype)
    x.view(-1)[:2] = torch.tensor([-law.bound, law.bound])
    h = torch.zeros(shape[0], law.n_params * shape[1], *shape[2:], dtype=dtype)
    y, logdet = law.forward(x, h)
    assert torch.equal(y, x)
    assert torch.equal(logdet, torch.zeros(shape[0], dtype=dtype))
    x_back, logdet_inv = law.inverse(x, h)
    assert torch.equal(x_back, x)
    assert torch.equal(logdet_inv, torch.zeros(shape[0], dtype=dtype))
    y_t, dy, logdet_t, _ = law.tangent(x, h, torch.ones_like(x), None)
    assert torch.equal(y_t, x) and torch.equal(dy, torch.ones_like(x))
    assert torch.equal(logdet_t, logdet)


@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_moderate_parameters(shape):
    law = Spline()
    x = inputs(shape, law)
    h = conditioner_output(law, x, 1.0)
    y, logdet = law.forward(x, h)
    x_back, logdet_inv = law.inverse(y, h)
    assert float((x_back - x).abs().max()) <= 1e-10
    assert float((logdet_inv + logdet).abs().max()) <= 1e-10 * max(1.0, float(logdet.abs().max()))
    y_again, _ = law.forward(x_back, h)
    assert float((y_again - y).abs().max()) <= 1e-10


@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_large_parameters(shape):
    """h ~ 3 randn: slopes from ~1e-7 to ~1e3, so the error is judged against the conditioning.

    A rounding error of ``eps * bound`` in ``y`` moves ``x`` by ``eps * bound / slope``; the
    round-trip error must stay within a few such units (at most 4.2 in float64 and 6.7 in
    float32 on a 65k-element sample; normflows' spline reaches 175 and 252 on the same data).
    """
    law = Spline()
    x = inputs(shape, law, seed=1)
    h = conditioner_output(law, x, 3.0, seed=1)
    y, logdet = law.forward(x, h)
    x_back, logdet_inv = law.inverse(y, h)
    unit = torch.finfo(x.dtype).eps * law.bound * (1 + 1 / slope(law, x, h))
    assert float(((x_back - x).abs() / unit).max()) <= 20
    assert float((logdet_inv + logdet).abs().max()) <= 1e-10 * max(1.0, float(logdet.abs().max()))


def test_outside_and_at_the_bound_is_the_identity():
    law = Spline(bins=6, bound=2.0)
    x = torch.tensor([[-1e30, -5.0, -2.0, 2.0, 2.5, 1e30, float("inf"), -float("inf")]])
    x = x.double()
    h = conditioner_output(law, x, 3.0)
    y, logdet = law.forward(x, h)
    assert torch.equal(y, x) and torch.equal(logdet, torch.zeros(1, dtype=torch.float64))
    x_back, logdet_inv = law.inverse(x, h)
    assert torch.equal(x_back, x) and torch.equal(logdet_inv, torch.zeros(1, dtype=torch.float64))
    # the slope is 1 on both sides of the bound, so the tails join continuously
    inside = torch.tensor([[-2.0 + 1e-13, 2.0 - 1e-13]], dtype=torch.float64)
    h2 = conditioner_output(law, inside, 3.0)
    y_in, _ = law.forward(inside, h2)
    torch.testing.assert_close(y_in, inside, rtol=0, atol=1e-12)
    torch.testing.assert_close(slope(law, inside, h2), torch.ones_like(inside), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_logdet_is_sum_of_log_slopes(shape, scale):
    law = Spline()
    x = inputs(shape, law, seed=2)
    h = conditioner_output(law, x, scale, seed=2)
    _, logdet = law.forward(x, h)
    ref = slope(law, x, h).log().flatten(1).sum(1)
    assert float((logdet - ref).abs().max()) <= 1e-10 * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("shape", [(2, 3), (1, 1, 2, 2)])
@pytest.mark.parametrize("scale", [0.0, 1.0])
def test_gradcheck(shape, scale):
    """Forward and inverse against finite differences, at random and at zero parameters.

    Points exactly at the bound are left out: the log-slope is continuous there but its
    derivative jumps, so finite differences straddling it are meaningless.
    """
    law = Spline(bins=4)
    gen = torch.Generator().manual_seed(3)
    x = (2 * torch.rand(shape, generator=gen, dtype=torch.float64) - 1) * 1.3 * law.bound
    x.view(-1)[0] = 1.3 * law.bound  # one point in the tail
    h = conditioner_output(law, x, scale, seed=3).requires_grad_()
    assert torch.autograd.gradcheck(law.forward, (x.requires_grad_(), h))
    y, _ = law.forward(x.detach(), h.detach())
    assert torch.autograd.gradcheck(law.inverse, (y.requires_grad_(), h))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [0.0, 1.0, 3.0])
@pytest.mark.parametrize("which", ["both", "x", "h"])
def test_tangent_matches_forward_mode(shape, scale, which):
    law = Spline()
    x = inputs(shape, law, seed=4)
    h = conditioner_output(law, x, scale, seed=4)
    dx = torch.randn_like(x) if which in ("both", "x") else None
    dh = torch.randn_like(h) if which in ("both", "h") else None
    (y, logdet), (dy_ref, dlogdet_ref) = torch.func.jvp(
        law.forward,
        (x, h),
        (torch.zeros_like(x) if dx is None else dx, torch.zeros_like(h) if dh is None else dh),
    )
    y_t, dy, logdet_t, dlogdet = law.tangent(x, h, dx, dh)
    assert torch.equal(y_t, y) and torch.equal(logdet_t, logdet)
    assert rel(dy, dy_ref) <= 1e-10
    assert rel(dlogdet, dlogdet_ref) <= 1e-10


@pytest.mark.parametrize("shape", [(3, 4), (2, 2, 3, 4)])
@pytest.mark.parametrize("scale", [0.0, 1.0])
def test_forward_mode_through_the_inverse_undoes_the_tangent(shape, scale):
    """The reversed coupling's forward mode differentiates ``inverse`` with dual tensors."""
    law = Spline()
    x = inputs(shape, law, seed=8)
    h = conditioner_output(law, x, scale, seed=8)
    dx, dh = torch.randn_like(x), torch.randn_like(h)
    y, dy, logdet, dlogdet = law.tangent(x, h, dx, dh)
    (x_back, logdet_inv), (dx_back, dlogdet_inv) = torch.func.jvp(law.inverse, (y, h), (dy, dh))
    assert rel(x_back, x) <= 1e-12
    assert rel(dx_back, dx) <= 1e-9
    assert rel(-dlogdet_inv, dlogdet) <= 1e-9


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_monotone_and_onto(scale):
    law = Spline(bins=8, bound=3.0)
    x = torch.linspace(-3.5, 3.5, 4001, dtype=torch.float64).repeat(3, 1)
    # one spline per row, evaluated at every point of the row
    per_row = conditioner_output(law, x[:, :1], scale, seed=5)  # (3, n_params)
    h = per_row.unsqueeze(2).expand(-1, -1, x.shape[1]).reshape(3, -1)
    y, _ = law.forward(x, h)
    assert bool((y.diff(dim=1) > 0).all())
    inside = x.abs() < law.bound
    assert bool((y[inside].abs() < law.bound).all())
    assert not torch.allclose(y, x)  # a genuine spline, not the identity


def test_hand_computed_values():
    """Two bins on [-1, 1], no minimums: widths 1/2 and 3/2, heights 1 and 1, delta_1 = 2.

    In bin 0 (x_0 = -1, w = 1/2, y_0 = -1, h = 1, s = 2, delta = 1 and 2) at theta = 1/2:
    y = -1 + (2/4 + 1/4) / (2 - 1/4) = -4/7 and dy/dx = 4 (2/4 + 1 + 1/4) / (7/4)^2 = 16/7.
    """
    law = Spline(bins=2, bound=1.0, min_bin_width=0, min_bin_height=0, min_derivative=0)
    # softmax(0, log 3) = (1/4, 3/4); derivative logit u: softplus(u + log(e - 1)) = 2
    u = math.log(math.e + 1)
    h = torch.tensor([[0.0, math.log(3.0), 0.0, 0.0, u]], dtype=torch.float64)
    x = torch.tensor([[-0.75]], dtype=torch.float64)
    y, logdet = law.forward(x, h)
    torch.testing.assert_close(y, torch.tensor([[-4 / 7]], dtype=torch.float64), rtol=1e-14, atol=0)
    torch.testing.assert_close(logdet, torch.tensor([math.log(16 / 7)], dtype=torch.float64))
    # second bin at its interior knot, and the knot itself: x = -1/2 maps to y = 0 with slope 2
    x = torch.tensor([[-0.5]], dtype=torch.float64)
    y, logdet = law.forward(x, h)
    assert float(y.abs()) <= 1e-15
    torch.testing.assert_close(logdet, torch.tensor([math.log(2.0)], dtype=torch.float64))
    x_back, _ = law.inverse(torch.tensor([[-4 / 7]], dtype=torch.float64), h)
    torch.testing.assert_close(x_back, torch.tensor([[-0.75]], dtype=torch.float64))


def test_matches_normflows_spline():
    """normflows' spline (from nflows, the authors' code) with the derivative offset added."""
    splines = pytest.importorskip("normflows.utils.splines")
    law = Spline(bins=7, bound=2.5)
    x = inputs((3, 4, 25), law, seed=6)
    x = x[x.abs() != law.bound].reshape(1, -1)  # normflows' bin search is unreliable there
    n = x.shape[1]
    h = conditioner_output(law, x, 2.0, seed=6)
    y, logdet = law.forward(x, h)
    hv = h.view(1, law.n_params, n).permute(0, 2, 1)
    k = law.bins
    args = (hv[..., :k], hv[..., k : 2 * k], hv[..., 2 * k :] + law.offset)
    y_ref, ld_ref = splines.unconstrained_rational_quadratic_spline(
        x, *args, tails="linear", tail_bound=law.bound
    )
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logdet, ld_ref.sum(1), rtol=1e-12, atol=1e-12)
    x_ref, _ = splines.unconstrained_rational_quadratic_spline(
        y, *args, inverse=True, tails="linear", tail_bound=law.bound
    )
    x_back, _ = law.inverse(y, h)
    torch.testing.assert_close(x_back, x_ref, rtol=1e-10, atol=1e-10)


def test_float32_inversion_accuracy():
    """Round trip in float32 against the same float64 conditioning unit as above.

    Measured (65k elements, h ~ randn): max |x - inverse(forward(x))| = 6.3e-4, at most 1.4
    units; with h ~ 3 randn the plain maximum reaches 0.42 (slopes down to 3e-7), still at most
    6.7 units (normflows: 6.1e-4 and 0.43, 8.5 and 252 units).
    """
    law = Spline()
    x64 = inputs((4, 4, 16, 16), law, seed=7)
    for scale in (1.0, 3.0):
        h64 = conditioner_output(law, x64, scale, seed=7)
        x, h = x64.float(), h64.float()
        y, logdet = law.forward(x, h)
        x_back, logdet_inv = law.inverse(y, h)
        unit = torch.finfo(torch.float32).eps * law.bound * (1 + 1 / slope(law, x64, h64))
        assert float(((x_back.double() - x64).abs() / unit).max()) <= 20
        _, logdet64 = law.forward(x64, h64)
        assert rel(logdet.double(), logdet64) <= 1e-4


def test_bad_inputs():
    law = Spline(bins=4)
    x = torch.randn(2, 3, 5)
    with pytest.raises(
        ValueError, match=r"n_params \* n = 11 \* 3 = 33 channels.*got \(2, 32, 5\)"
    ):
        law.forward(x, torch.randn(2, 32, 5))
    with pytest.raises(ValueError, match=r"h must have shape \(2, 33, 5\).*got \(2, 33, 4\)"):
        law.inverse(x, torch.randn(2, 33, 4))
    with pytest.raises(ValueError, match="layout"):
        law.forward(torch.randn(3), torch.randn(33))
    with pytest.raises(TypeError, match="dtype"):
        law.forward(x, torch.randn(2, 33, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="dh must have the shape of h"):
        law.tangent(x, torch.randn(2, 33, 5), None, torch.randn(2, 33, 4))
    for kwargs, match in [
        ({"bins": 1}, "bins must be an integer >= 2"),
        ({"bins": 2.5}, "bins must be an integer >= 2"),
        ({"bound": 0.0}, "bound must be finite and > 0"),
        ({"bound": float("inf")}, "bound must be finite and > 0"),
        ({"min_bin_width": 0.2, "bins": 5}, "min_bin_width must satisfy"),
        ({"min_bin_height": -1e-3}, "min_bin_height must satisfy"),
        ({"min_derivative": 1.0}, "min_derivative must satisfy"),
    ]:
        with pytest.raises(ValueError, match=match):
            Spline(**kwargs)


def test_inputs_are_not_mutated():
    law = Spline()
    x = inputs((2, 3, 4), law)
    h = conditioner_output(law, x, 2.0)
    x0, h0 = x.clone(), h.clone()
    y, _ = law.forward(x, h)
    law.inverse(y, h)
    law.tangent(x, h, torch.ones_like(x), torch.ones_like(h))
    assert torch.equal(x, x0) and torch.equal(h, h0)
