"""Operator contract checks for every coupling layer, on every rank, odd channels and conditions.

Each layer is built in float64 with tiny hidden sizes, run once, and then has its parameters moved
off their initial values (the default conditioners start at zero, i.e. as identity couplings,
which would make every check below vacuous).
"""

import copy

import pytest
import torch
from conftest import SPATIAL, randomize_parameters

import invops
from invops.testing import (
    check_against_autograd,
    check_invertible,
    check_logdet,
    dottest,
    gradient_test,
)

HIDDEN = 4  # hidden channels / features of every conditioner
N_COND = 2  # condition channels of ConditionalLayerGlow
N_COND_HINT = 3  # condition channels of ConditionalLayerHINT (its condition lane is a HINT)

# spatial shapes per rank for the layers with extra constraints
# multiples of 4 for the default strided conditioner; in 3D (4, 4, 4) leaves a single hidden voxel,
# whose four ReLUs can all be off (an identity coupling), so one side is 8
IRIM_SPATIAL = {1: (8,), 2: (4, 4), 3: (4, 4, 8)}
EVEN_SPATIAL = {1: (4,), 2: (2, 4), 3: (2, 2, 2)}  # HyperbolicLayer squeeze
SMALL_SPATIAL = {1: (3,), 2: (2, 1), 3: (1, 2, 1)}  # HyperbolicLayer unsqueeze (doubles sizes)

_CONV = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------- builders
def _spatial(family: str, variant: str | None, rank: int) -> tuple[int, ...]:
    if family == "irim" and variant == "strided":
        return IRIM_SPATIAL[rank]
    if family == "hyperbolic" and variant == "squeeze":
        return EVEN_SPATIAL[rank]
    if family == "hyperbolic" and variant == "unsqueeze":
        return SMALL_SPATIAL[rank]
    return SPATIAL[rank]


def _residual_fn(variant: str, rank: int, n_in: int, n_out: int):
    """F or G of an AdditiveCoupling: a user torch module or an invops block."""
    if variant == "torch":
        if rank == 0:
            return torch.nn.Sequential(
                torch.nn.Linear(n_in, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, n_out)
            )
        conv = _CONV[rank]
        return torch.nn.Sequential(
            conv(n_in, HIDDEN, 3, padding=1), torch.nn.Tanh(), conv(HIDDEN, n_out, 3, padding=1)
        )
    if variant == "linear":
        assert rank == 0
        return torch.nn.Linear(n_in, n_out)
    if variant == "blocks":
        if rank == 0:
            return invops.MLPBlock(n_in, HIDDEN, n_out, activation=torch.tanh)
        return invops.ResidualBlock(
            n_in, HIDDEN, n_out=n_out, fan=True, final_activation=False, ndim=rank
        )
    raise KeyError(variant)


def build(family: str, variant: str | None, rank: int, channels: int, logdet: bool = True):
    """The layer (float64, not yet randomized) and the channel count of its input."""
    kw = dict(ndim=rank, logdet=logdet)
    if family == "basic":
        return invops.CouplingLayerBasic(channels, HIDDEN, **kw), channels
    if family == "glow":
        return invops.CouplingLayerGlow(channels, HIDDEN, **kw), channels
    if family == "hint":
        return invops.CouplingLayerHINT(channels, HIDDEN, permute=variant, **kw), channels
    if family == "irim":
        conv = {} if variant == "strided" else dict(k1=3, p1=1, s1=1)
        return invops.CouplingLayerIRIM(channels, HIDDEN, **conv, **kw), channels
    if family == "hyperbolic":
        # the input holds two states of `channels` channels each
        layer = invops.HyperbolicLayer(channels, HIDDEN, action=variant, alpha=0.7, **kw)
        return layer, 2 * channels
    if family == "additive":
        n1 = (channels + 1) // 2
        n2 = channels - n1
        F = _residual_fn(variant, rank, n2, n1)
        G = _residual_fn(variant, rank, n1, n2)
        return invops.AdditiveCoupling(channels, F, G, **kw), channels
    if family == "cglow":
        return invops.ConditionalLayerGlow(channels, N_COND, HIDDEN, **kw), channels
    if family == "chint":
        layer = invops.ConditionalLayerHINT(
            channels, N_COND_HINT, HIDDEN, permute=variant == "permute", **kw
        )
        return layer, channels
    raise KeyError(family)


def make_cond(family, variant, rank, batch, spatial, dtype=torch.float64):
    if family == "cglow":
        shape = (batch, N_COND) if variant == "vector" else (batch, N_COND, *spatial)
        return (torch.randn(shape, dtype=dtype),)
    if family == "chint":
        return (torch.randn(batch, N_COND_HINT, *spatial, dtype=dtype),)
    return ()


def prepared(family, variant, rank, batch, channels, logdet=True):
    """A randomized float64 layer, an input and its conditions."""
    layer, n_in = build(family, variant, rank, channels, logdet=logdet)
    layer = layer.double()
    spatial = _spatial(family, variant, rank)
    x = torch.randn(batch, n_in, *spatial, dtype=torch.float64)
    cond = make_cond(family, variant, rank, batch, spatial)
    randomize_parameters(layer)
    layer(x, *cond)  # a first forward, then move the parameters again
    randomize_parameters(layer, seed=2)
    return layer, x, cond


def _case(family, variant, rank, batch, channels):
    name = family if variant is None else f"{family}-{variant}"
    return pytest.param(
        family, variant, rank, batch, channels, id=f"{name}-{rank}d-b{batch}-c{channels}"
    )


# (family, variant, rank, batch, channels): every rank for every layer, dense where supported,
# batch 1 and 3, odd and non-power-of-two channel counts; not a full cartesian product
CASES = [
    *[
        _case("basic", None, r, b, c)
        for r, b, c in [
            (0, 1, 3),
            (0, 3, 6),
            (1, 3, 5),
            (1, 1, 7),
            (2, 1, 3),
            (2, 3, 6),
            (3, 3, 5),
            (3, 1, 7),
        ]
    ],
    *[
        _case("glow", None, r, b, c)
        for r, b, c in [
            (0, 3, 5),
            (0, 1, 7),
            (1, 1, 3),
            (1, 3, 6),
            (2, 3, 5),
            (2, 1, 7),
            (3, 1, 3),
            (3, 3, 6),
        ]
    ],
    *[
        _case("hint", p, r, 1 + 2 * ((i + r) % 2), (3, 5, 6, 7, 12)[(i + 2 * r) % 5])
        for i, p in enumerate(["none", "lower", "both", "full"])
        for r in (0, 1, 2, 3)
    ],
    *[
        _case("irim", v, r, b, c)
        for v, r, b, c in [
            ("strided", 1, 1, 3),
            ("strided", 1, 3, 6),
            ("strided", 2, 3, 5),
            ("strided", 2, 1, 7),
            ("strided", 3, 1, 3),
            ("strided", 3, 3, 5),
            ("cheap", 1, 3, 7),
            ("cheap", 2, 1, 6),
            ("cheap", 3, 3, 3),
        ]
    ],
    *[
        _case("hyperbolic", a, r, b, c)
        for a, r, b, c in [
            ("none", 1, 1, 3),
            ("none", 2, 3, 5),
            ("none", 3, 1, 2),
            ("squeeze", 1, 3, 3),
            ("squeeze", 2, 1, 2),
            ("squeeze", 3, 3, 1),
            ("unsqueeze", 1, 1, 6),
            ("unsqueeze", 2, 3, 4),
            ("unsqueeze", 3, 1, 8),
        ]
    ],
    *[
        _case("additive", v, r, b, c)
        for v, r, b, c in [
            ("torch", 0, 1, 3),
            ("torch", 1, 3, 5),
            ("torch", 2, 1, 6),
            ("torch", 3, 3, 7),
            ("blocks", 0, 3, 5),
            ("blocks", 1, 1, 6),
            ("blocks", 2, 3, 7),
            ("blocks", 3, 1, 3),
            ("linear", 0, 3, 6),
            ("linear", 0, 1, 7),
        ]
    ],
    *[
        _case("cglow", v, r, b, c)
        for v, r, b, c in [
            ("vector", 0, 1, 3),
            ("vector", 0, 3, 6),
            ("vector", 1, 3, 5),
            ("vector", 2, 1, 7),
            ("vector", 3, 3, 3),
            ("image", 1, 1, 6),
            ("image", 2, 3, 3),
            ("image", 3, 1, 5),
        ]
    ],
    *[
        _case("chint", v, r, b, c)
        for v, r, b, c in [
            ("permute", 0, 1, 3),
            ("plain", 0, 3, 6),
            ("permute", 1, 3, 5),
            ("plain", 1, 1, 7),
            ("permute", 2, 1, 6),
            ("plain", 2, 3, 3),
            ("permute", 3, 3, 5),
            ("plain", 3, 1, 12),
        ]
    ],
]

# one tiny input (batch 2) per family, variant and rank: dense Jacobians stay below ~100 columns
_SMALL_CHANNELS = {"hint": 5, "hyperbolic": 1}
SMALL_CASES = [
    _case(family, variant, rank, 2, channels)
    for family, variants, ranks in [
        ("basic", [None], (0, 1, 2, 3)),
        ("glow", [None], (0, 1, 2, 3)),
        ("hint", ["none", "lower", "both", "full"], (0, 1, 2, 3)),
        ("irim", ["strided"], (1, 2)),
        ("irim", ["cheap"], (1, 2, 3)),
        ("hyperbolic", ["none", "squeeze"], (1, 2, 3)),
        ("additive", ["torch", "blocks"], (0, 1, 2, 3)),
        ("additive", ["linear"], (0,)),
        ("cglow", ["vector"], (0, 1, 2, 3)),
        ("cglow", ["image"], (1, 2, 3)),
        ("chint", ["permute"], (0, 1, 2, 3)),
        ("chint", ["plain"], (0, 2)),
    ]
    for variant in variants
    for rank in ranks
    for channels in [_SMALL_CHANNELS.get(family, 3)]
] + [_case("hyperbolic", "unsqueeze", rank, 2, 2**rank) for rank in (1, 2, 3)]

# one representative per layer family (and variant where the variants differ in kind)
FAMILIES = [
    _case("basic", None, 2, 3, 5),
    _case("glow", None, 1, 3, 5),
    _case("hint", "both", 2, 3, 6),
    _case("irim", "strided", 2, 3, 3),
    _case("hyperbolic", "squeeze", 2, 3, 2),
    _case("additive", "torch", 2, 3, 5),
    _case("additive", "blocks", 0, 3, 5),
    _case("cglow", "image", 2, 3, 3),
    _case("cglow", "vector", 0, 3, 5),
    _case("chint", "permute", 1, 3, 3),
]

CASE_ARGS = "family,variant,rank,batch,channels"


def _output(layer, x, cond):
    with torch.no_grad():
        y, logdet = layer(x, *cond)
    return y, logdet


# ---------------------------------------------------------------------------------- contract
@pytest.mark.parametrize(CASE_ARGS, CASES)
def test_invertible_and_derivatives(family, variant, rank, batch, channels):
    layer, x, cond = prepared(family, variant, rank, batch, channels)
    y, logdet = _output(layer, x, cond)
    assert y.shape[0] == batch and logdet.shape == (batch,)
    if y.shape == x.shape:  # the randomized layer is not the identity
        assert float((y - x).abs().max()) > 1e-3
    assert check_invertible(layer, x, *cond, rtol=1e-10) <= 1e-10
    check_against_autograd(layer, x, *cond, rtol=1e-8)
    rev = layer.reverse()
    assert check_invertible(rev, y, *cond, rtol=1e-10) <= 1e-10
    check_against_autograd(rev, y, *cond, rtol=1e-8)


@pytest.mark.parametrize(CASE_ARGS, SMALL_CASES)
def test_logdet_matches_slogdet(family, variant, rank, batch, channels):
    layer, x, cond = prepared(family, variant, rank, batch, channels)
    assert x[0].numel() <= 100
    check_logdet(layer, x, *cond, rtol=1e-9)
    y, _ = _output(layer, x, cond)
    check_logdet(layer.reverse(), y, *cond, rtol=1e-9)


@pytest.mark.parametrize("wrt", ["input", "params", "both"])
@pytest.mark.parametrize(CASE_ARGS, SMALL_CASES)
def test_jacobian_dottest(family, variant, rank, batch, channels, wrt):
    layer, x, cond = prepared(family, variant, rank, batch, channels)
    J = layer.jacobian(x, *cond, wrt=wrt)
    y, _ = _output(layer, x, cond)
    n_params = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    n_cols = {"input": x.numel(), "params": n_params, "both": x.numel() + n_params}[wrt]
    assert J.shape == (y.numel(), n_cols)
    assert dottest(J, rtol=1e-10, n_trials=2)


@pytest.mark.parametrize(CASE_ARGS, FAMILIES)
def test_jacobian_dottest_float32(family, variant, rank, batch, channels):
    layer, x, cond = prepared(family, variant, rank, batch, channels)
    layer32 = copy.deepcopy(layer).float()
    cond32 = tuple(c.float() for c in cond)
    for wrt in ("input", "params", "both"):
        J = layer32.jacobian(x.float(), *cond32, wrt=wrt)
        assert J.dtype == "float32"
        assert dottest(J, rtol=1e-4, n_trials=2)


# the default conditioners use ReLU: steps of 10% of the point's norm cross its kinks, where the
# Taylor remainder is first order, so the test starts at 0.1% and halves from there
H0 = 1e-3


@pytest.mark.parametrize(CASE_ARGS, FAMILIES)
def test_gradient_test_second_order(family, variant, rank, batch, channels):
    layer, x, cond = prepared(family, variant, rank, batch, channels)
    y, logdet = _output(layer, x, cond)
    w = torch.randn_like(y)

    def objective(y, logdet):
        return (w * y).sum() + 0.7 * logdet.sum() + 0.1 * (y**2).sum()

    dy = w + 0.2 * y
    dx, x_rec, *dcond = layer.backward(dy, y, *cond, dlogdet=0.7)
    torch.testing.assert_close(x_rec, x, rtol=1e-10, atol=1e-10)
    _, r1 = gradient_test(lambda v: objective(*layer(v, *cond)), x, dx, h0=H0)
    assert abs(r1 - 2) < 0.25

    if cond:  # the condition's gradient
        _, r1 = gradient_test(lambda c: objective(*layer(x, c)), cond[0], dcond[0], h0=H0)
        assert abs(r1 - 2) < 0.25

    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone() for p in layer.parameters()]

    def loss_p(*ps):
        out = torch.func.functional_call(layer, dict(zip(names, ps)), (x, *cond))
        return objective(*out)

    _, dtheta, *_ = layer.vjp(dy, y, *cond, dlogdet=0.7)
    assert len(dtheta) == len(params)
    _, r1 = gradient_test(loss_p, params, list(dtheta), h0=H0)
    assert abs(r1 - 2) < 0.25


@pytest.mark.parametrize(CASE_ARGS, FAMILIES)
def test_reverse_shares_parameters_and_inverts(family, variant, rank, batch, channels):
    layer, x, cond = prepared(family, variant, rank, batch, channels)
    rev = layer.reverse()
    assert rev.reverse() is layer
    assert rev.n_conditions == layer.n_conditions
    ours, theirs = list(layer.parameters()), list(rev.parameters())
    assert len(ours) == len(theirs) > 0
    assert all(a is b for a, b in zip(ours, theirs))

    y, logdet = _output(layer, x, cond)
    with torch.no_grad():
        x_rev, logdet_rev = rev(y, *cond)  # conditional layers: the same condition
        y_rev, _ = rev.inverse(x, *cond)
    torch.testing.assert_close(x_rev, x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logdet_rev, -logdet, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y_rev, y, rtol=1e-10, atol=1e-10)

    # a change of the layer's parameters is a change of the reversed layer's
    randomize_parameters(layer, scale=0.1, seed=7)
    y2, _ = _output(layer, x, cond)
    assert not torch.allclose(y2, y)
    with torch.no_grad():
        x_rev2, _ = rev(y2, *cond)
    torch.testing.assert_close(x_rev2, x, rtol=1e-10, atol=1e-10)

    # the gradient of the reversed layer lands in the same parameter objects
    for p in ours:
        p.grad = None
    rev.backward(torch.randn_like(x), x, *cond)
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in ours)


@pytest.mark.parametrize(CASE_ARGS, FAMILIES)
def test_numpy_in_numpy_out(family, variant, rank, batch, channels):
    layer, x, cond = prepared(family, variant, rank, batch, channels)
    y, logdet = layer(x.numpy(), *(c.numpy() for c in cond))
    assert type(y).__name__ == "ndarray" and type(logdet).__name__ == "ndarray"
    x_rec, _ = layer.inverse(y, *(c.numpy() for c in cond))
    torch.testing.assert_close(torch.from_numpy(x_rec), x, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(CASE_ARGS, FAMILIES)
def test_without_logdet(family, variant, rank, batch, channels):
    layer, x, cond = prepared(family, variant, rank, batch, channels, logdet=False)
    with torch.no_grad():
        y = layer(x, *cond)
        x_rec = layer.inverse(y, *cond)
    assert isinstance(y, torch.Tensor) and isinstance(x_rec, torch.Tensor)
    assert check_invertible(layer, x, *cond, rtol=1e-10) <= 1e-10
    check_against_autograd(layer, x, *cond, rtol=1e-8)
    check_against_autograd(layer.reverse(), y, *cond, rtol=1e-8)
    assert len(layer.jvp(x, *cond, dx=torch.randn_like(x))) == 2
    with pytest.raises(ValueError, match="logdet=False"):
        layer.backward(torch.randn_like(y), y, *cond, dlogdet=1.0)


# ---------------------------------------------------------------------------------- specifics
def test_hint_tree_owns_weights_per_branch():
    hint = invops.CouplingLayerHINT(12, HIDDEN, ndim=1).double()
    couplings = hint.couplings()
    assert len(couplings) == 7  # 12 -> 6 + 6 -> (3 + 3) + (3 + 3)
    ids = {id(p) for c in couplings for p in c.subnet.parameters()}
    assert len(ids) == sum(len(list(c.subnet.parameters())) for c in couplings)


@pytest.mark.parametrize("permute", ["none", "lower", "both", "full"])
def test_hint_permutation_structure(permute):
    layer, _, _ = prepared("hint", permute, 1, 2, 6)
    n_conv = sum(isinstance(m, invops.Conv1x1) for m in layer.modules())
    assert n_conv == {"none": 0, "lower": 1, "both": 1, "full": 1}[permute]
    if permute == "both":  # mixes before and un-mixes after with the same convolution
        assert isinstance(layer.layers[-1], invops.Reversed)
        assert layer.layers[-1].module is layer.layers[0]


@pytest.mark.parametrize("action", ["none", "squeeze", "unsqueeze"])
def test_hyperbolic_shapes_and_leapfrog(action):
    rank = 2
    n_in = 4
    layer, x, _ = prepared("hyperbolic", action, rank, 2, n_in)
    y, logdet = _output(layer, x, ())
    factor = {"none": 1, "squeeze": 4, "unsqueeze": 1 / 4}[action]
    assert y.shape[1] == int(2 * n_in * factor)
    assert y[0].numel() == x[0].numel()
    torch.testing.assert_close(logdet, torch.zeros_like(logdet))
    # (x_prev, x_curr) -> (x_curr, x_next): the new previous state is the old current state
    if action == "none":
        torch.testing.assert_close(y[:, :n_in], x[:, n_in:])


def test_irim_is_volume_preserving_with_zero_logdet():
    layer, x, _ = prepared("irim", "strided", 2, 3, 5)
    y, logdet = _output(layer, x, ())
    assert torch.equal(logdet, torch.zeros_like(logdet))
    assert not torch.allclose(y, x)


def test_additive_coupling_formula_with_torch_modules():
    layer, x, _ = prepared("additive", "torch", 1, 2, 5)
    F = layer.layers[0].subnet.module
    G = layer.layers[1].subnet.module
    with torch.no_grad():
        y, logdet = layer(x)
        x1, x2 = x[:, :3], x[:, 3:]
        y1 = x1 + F(x2)
        y2 = x2 + G(y1)
    torch.testing.assert_close(y, torch.cat((y1, y2), 1), rtol=1e-12, atol=1e-12)
    assert torch.equal(logdet, torch.zeros_like(logdet))
    # the user's module parameters are the layer's parameters
    assert {id(p) for p in F.parameters()} <= {id(p) for p in layer.parameters()}


def test_conditional_glow_vector_and_image_conditions_differ():
    layer, x, (c,) = prepared("cglow", "vector", 2, 3, 3)
    img = torch.randn(3, N_COND, *SPATIAL[2], dtype=torch.float64)
    y_vec, _ = _output(layer, x, (c,))
    y_img, _ = _output(layer, x, (img,))
    assert not torch.allclose(y_vec, y_img)
    # the condition matters: another condition, another output
    y_other, _ = _output(layer, x, (c + 1.0,))
    assert not torch.allclose(y_vec, y_other)


# ------------------------------------------------------------------------ ConditionalLayerHINT
@pytest.mark.parametrize("rank", [0, 1, 2, 3])
def test_conditional_hint_forward_y_round_trip(rank):
    layer, x, (c,) = prepared("chint", "permute", rank, 3, 5)
    with torch.no_grad():
        zy, ld_y = layer.forward_y(c)
        c_rec, ld_inv = layer.inverse_y(zy)
    assert zy.shape == c.shape and ld_y.shape == (3,)
    assert not torch.allclose(zy, c)
    torch.testing.assert_close(c_rec, c, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ld_inv, -ld_y, rtol=1e-10, atol=1e-10)
    check_invertible(layer.y_lane, c, rtol=1e-10)
    check_logdet(layer.y_lane, c[(slice(0, 2), slice(None)) + (slice(0, 2),) * rank], rtol=1e-9)
    # the y lane's parameters are the layer's
    assert {id(p) for p in layer.y_lane.parameters()} <= {id(p) for p in layer.parameters()}


@pytest.mark.parametrize("rank,permute", [(0, "permute"), (1, "plain"), (2, "permute")])
def test_conditional_hint_joint_logdet_matches_slogdet(rank, permute):
    spatial = {0: (), 1: (3,), 2: (2, 2)}[rank]
    layer, _, _ = prepared("chint", permute, rank, 2, 3)
    x = torch.randn(2, 3, *spatial, dtype=torch.float64)
    c = torch.randn(2, N_COND_HINT, *spatial, dtype=torch.float64)
    with torch.no_grad():
        _, ld_x = layer(x, c)
        _, ld_y = layer.forward_y(c)
    joint = ld_x + ld_y
    nx = x[0].numel()
    for b in range(2):

        def joint_map(v, b=b):
            xb = v[:nx].reshape(x[b : b + 1].shape)
            cb = v[nx:].reshape(c[b : b + 1].shape)
            zx, _ = layer._forward(xb, cb)
            zy, _ = layer.y_lane._forward(cb)
            return torch.cat((zx.reshape(-1), zy.reshape(-1)))

        v = torch.cat((x[b].reshape(-1), c[b].reshape(-1)))
        jac = torch.autograd.functional.jacobian(joint_map, v)
        assert jac.shape[0] <= 100
        sign, ref = torch.linalg.slogdet(jac)
        assert float(sign) != 0.0
        assert abs(float(joint[b]) - float(ref)) <= 1e-9 * max(1.0, abs(float(ref)))
        # the x-block alone is not the joint logdet (the y lane contributes)
        assert abs(float(ld_y[b])) > 1e-6


@pytest.mark.parametrize("rank", [0, 2])
def test_conditional_hint_condition_gradient_bridge_vs_autograd(rank):
    layer, x, (c,) = prepared("chint", "permute", rank, 3, 5)
    params = list(layer.parameters())
    w = torch.randn_like(x)

    def run():
        xr = x.clone().requires_grad_()
        cr = c.clone().requires_grad_()
        zx, ld_x = layer(xr, cr)
        zy, ld_y = layer.forward_y(cr)
        loss = (w * zx).sum() + 0.1 * (zx**2).sum() + 0.3 * (zy**2).sum() + (ld_x + ld_y).sum()
        return torch.autograd.grad(loss, [xr, cr, *params])

    got = run()  # memory-free bridge
    with invops.plain_autograd():
        ref = run()
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert float(got[1].abs().max()) > 0

    # the same condition cotangent from backward(): dc of forward plus the y lane's vjp
    zx, _ = _output(layer, x, (c,))
    dzx = w + 0.2 * zx
    _, _, dc = layer.backward(dzx, zx, c, dlogdet=1.0)
    xr, cr = x.clone().requires_grad_(), c.clone().requires_grad_()
    with invops.plain_autograd():
        zx_p, ld_p = layer(xr, cr)
        (ref_dc,) = torch.autograd.grad((dzx * zx_p).sum() + ld_p.sum(), [cr])
    torch.testing.assert_close(dc, ref_dc, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------- bad input
def _small(family, variant, rank, channels=3):
    layer, _ = build(family, variant, rank, channels)
    return layer.double()


def _t(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)


def _bad(id_, make, call, exc, match):
    return pytest.param(make, call, exc, match, id=id_)


BAD_INPUTS = [
    # wrong channel count, forward and inverse
    *[
        _bad(
            f"{fam}-{d}-channels",
            lambda fam=fam, v=v: _small(fam, v, 2),
            lambda m, d=d: (m.inverse if d == "inverse" else m)(_t(2, 4, 4, 4)),
            ValueError,
            r"[xy] must have 3 channels",
        )
        for fam, v in [
            ("basic", None),
            ("glow", None),
            ("hint", "lower"),
            ("irim", "strided"),
            ("additive", "torch"),
        ]
        for d in ("forward", "inverse")
    ],
    _bad(
        "cglow-channels",
        lambda: _small("cglow", "image", 2),
        lambda m: m(_t(2, 4, 4, 4), _t(2, N_COND, 4, 4)),
        ValueError,
        r"x must have 3 channels",
    ),
    _bad(
        "chint-channels",
        lambda: _small("chint", "permute", 2),
        lambda m: m(_t(2, 4, 4, 4), _t(2, N_COND_HINT, 4, 4)),
        ValueError,
        r"x must have 3 channels",
    ),
    _bad(
        "hyperbolic-channels",
        lambda: _small("hyperbolic", "none", 2),
        lambda m: m(_t(2, 3, 4, 4)),
        ValueError,
        r"x must have shape \(B, 6, \*, \*\) \(two states of 3 channels\)",
    ),
    _bad(
        "hyperbolic-unsqueeze-inverse-channels",
        lambda: _small("hyperbolic", "unsqueeze", 2, channels=4),
        lambda m: m.inverse(_t(2, 8, 2, 2)),
        ValueError,
        r"y must have shape \(B, 2, \*, \*\)",
    ),
    _bad(
        "dense-channels",
        lambda: _small("basic", None, 0),
        lambda m: m(_t(5, 4)),
        ValueError,
        r"x must have 3 channels",
    ),
    # wrong rank: a 3D tensor into an ndim=2 layer, and a 2D tensor into a dense layer's inverse
    *[
        _bad(
            f"{fam}-rank",
            lambda fam=fam, v=v: _small(fam, v, 2),
            lambda m, fam=fam, cond=cond: m(_t(2, 6 if fam == "hyperbolic" else 3, 4), *cond),
            ValueError,
            match,
        )
        for fam, v, cond, match in [
            ("basic", None, (), r"x must have layout \(B, C, \*, \*\) \(2 spatial dimensions\)"),
            ("glow", None, (), r"x must have layout \(B, C, \*, \*\)"),
            ("hint", "full", (), r"x must have layout \(B, C, \*, \*\)"),
            ("irim", "strided", (), r"x must have layout \(B, C, \*, \*\)"),
            ("hyperbolic", "squeeze", (), r"x must have shape \(B, 6, \*, \*\)"),
            ("additive", "blocks", (), r"x must have layout \(B, C, \*, \*\)"),
            ("cglow", "image", (_t(2, N_COND, 4),), r"x must have layout \(B, C, \*, \*\)"),
            ("chint", "plain", (_t(2, N_COND_HINT, 4),), r"x must have layout \(B, C, \*, \*\)"),
        ]
    ],
    _bad(
        "dense-rank-inverse",
        lambda: _small("glow", None, 0),
        lambda m: m.inverse(_t(2, 3, 4)),
        ValueError,
        r"y must have layout \(B, C\) \(0 spatial dimensions\)",
    ),
    # conditions with the wrong shape
    _bad(
        "cglow-cond-channels",
        lambda: _small("cglow", "image", 2),
        lambda m: m(_t(2, 3, 4, 4), _t(2, N_COND + 1, 4, 4)),
        ValueError,
        r"condition must have shape \(2, 2\) or \(2, 2, 4, 4\), got \(2, 3, 4, 4\)",
    ),
    _bad(
        "cglow-cond-spatial",
        lambda: _small("cglow", "image", 2),
        lambda m: m.inverse(_t(2, 3, 4, 4), _t(2, N_COND, 4, 5)),
        ValueError,
        r"condition must have shape .* got \(2, 2, 4, 5\)",
    ),
    _bad(
        "cglow-cond-batch",
        lambda: _small("cglow", "vector", 1),
        lambda m: m(_t(2, 3, 5), _t(3, N_COND)),
        ValueError,
        r"cond\[0\] must have batch size 2",
    ),
    _bad(
        "cglow-dense-cond-channels",
        lambda: _small("cglow", "vector", 0),
        lambda m: m(_t(2, 3), _t(2, N_COND + 2)),
        ValueError,
        r"(?i)cond",
    ),
    _bad(
        "cglow-dense-cond-rank",
        lambda: _small("cglow", "vector", 0),
        lambda m: m(_t(2, 3), _t(2, N_COND, 4)),
        ValueError,
        r"(?i)cond",
    ),
    _bad(
        "chint-cond-batch",
        lambda: _small("chint", "permute", 2),
        lambda m: m(_t(2, 3, 4, 4), _t(3, N_COND_HINT, 4, 4)),
        ValueError,
        r"cond\[0\] must have batch size 2",
    ),
    _bad(
        "chint-cond-channels",
        lambda: _small("chint", "permute", 2),
        lambda m: m(_t(2, 3, 4, 4), _t(2, N_COND_HINT + 1, 4, 4)),
        ValueError,
        r"(?i)cond.*3 channels",
    ),
    _bad(
        "chint-cond-rank-plain",
        lambda: _small("chint", "plain", 2),
        lambda m: m(_t(2, 3, 4, 4), _t(2, N_COND_HINT, 4)),
        ValueError,
        r"(?i)cond",
    ),
    _bad(
        "chint-cond-rank-permute",
        lambda: _small("chint", "permute", 2),
        lambda m: m(_t(2, 3, 4, 4), _t(2, N_COND_HINT, 4)),
        ValueError,
        r"(?i)cond",
    ),
    _bad(
        "chint-cond-spatial",
        lambda: _small("chint", "permute", 2),
        lambda m: m(_t(2, 3, 4, 4), _t(2, N_COND_HINT, 4, 5)),
        ValueError,
        r"(?i)cond",
    ),
    _bad(
        "chint-cond-spatial-inverse",
        lambda: _small("chint", "plain", 1),
        lambda m: m.inverse(_t(2, 3, 5), _t(2, N_COND_HINT, 6)),
        ValueError,
        r"(?i)cond",
    ),
    # missing / extra conditions
    _bad(
        "cglow-missing-cond",
        lambda: _small("cglow", "image", 2),
        lambda m: m(_t(2, 3, 4, 4)),
        TypeError,
        r"ConditionalLayerGlow expects 1 condition argument\(s\) after x, got 0",
    ),
    _bad(
        "chint-missing-cond",
        lambda: _small("chint", "permute", 1),
        lambda m: m.inverse(_t(2, 3, 5)),
        TypeError,
        r"ConditionalLayerHINT expects 1 condition argument\(s\) after ., got 0",
    ),
    _bad(
        "chint-missing-cond-backward",
        lambda: _small("chint", "permute", 1),
        lambda m: m.backward(_t(2, 3, 5), _t(2, 3, 5)),
        TypeError,
        r"expects 1 condition argument",
    ),
    _bad(
        "cglow-reverse-missing-cond",
        lambda: _small("cglow", "vector", 1).reverse(),
        lambda m: m(_t(2, 3, 5)),
        TypeError,
        r"expects 1 condition argument",
    ),
    _bad(
        "basic-extra-cond",
        lambda: _small("basic", None, 1),
        lambda m: m(_t(2, 3, 5), _t(2, 3, 5)),
        TypeError,
        r"CouplingLayerBasic expects 0 condition argument\(s\) after x, got 1",
    ),
    # squeeze / stride constraints on spatial sizes
    _bad(
        "hyperbolic-squeeze-odd",
        lambda: _small("hyperbolic", "squeeze", 2, channels=2),
        lambda m: m(_t(2, 4, 3, 4)),
        ValueError,
        r"even spatial size",
    ),
    _bad(
        "hyperbolic-squeeze-odd-1d",
        lambda: _small("hyperbolic", "squeeze", 1, channels=2),
        lambda m: m(_t(2, 4, 5)),
        ValueError,
        r"even spatial size",
    ),
    _bad(
        "hyperbolic-unsqueeze-inverse-odd",
        lambda: _small("hyperbolic", "unsqueeze", 2, channels=4),
        lambda m: m.inverse(_t(2, 2, 3, 3)),
        ValueError,
        r"even spatial size",
    ),
    _bad(
        "irim-spatial-below-kernel",
        lambda: _small("irim", "strided", 2),
        lambda m: m(_t(2, 3, 2, 8)),
        ValueError,
        r"spatial size \(2, 8\) is smaller than the kernel size 4",
    ),
    _bad(
        "hyperbolic-spatial-below-kernel",
        lambda: invops.HyperbolicLayer(1, HIDDEN, k=5, p=0, ndim=1).double(),
        lambda m: m(_t(2, 2, 3)),
        ValueError,
        r"spatial size \(3,\) is smaller than the kernel size 5",
    ),
    # dtype mismatch and custom sub-networks of the wrong size
    _bad(
        "float32-into-float64",
        lambda: _small("hint", "none", 1),
        lambda m: m(_t(2, 3, 5, dtype=torch.float32)),
        TypeError,
        r"x: expected dtype torch.float64",
    ),
    _bad(
        "cglow-cond-dtype",
        lambda: _small("cglow", "image", 1),
        lambda m: m(_t(2, 3, 5), _t(2, N_COND, 5, dtype=torch.float32)),
        TypeError,
        r"cond\[0\]: expected dtype torch.float64",
    ),
    _bad(
        "additive-F-wrong-output",
        lambda: invops.AdditiveCoupling(
            4, torch.nn.Conv1d(2, 3, 3, padding=1), torch.nn.Conv1d(2, 2, 3, padding=1), ndim=1
        ).double(),
        lambda m: m(_t(2, 4, 5)),
        ValueError,
        r"sub-network must return 2 channels, got 3",
    ),
]


@pytest.mark.parametrize("make,call,exc,match", BAD_INPUTS)
def test_bad_input_raises_clear_error(make, call, exc, match):
    layer = make()
    with pytest.raises(exc, match=match):
        call(layer)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: invops.CouplingLayerBasic(1, 4), r"n_in must be >= 2, got 1"),
        (lambda: invops.CouplingLayerGlow(1, 4), r"n_in must be >= 2, got 1"),
        (lambda: invops.CouplingLayerIRIM(1, 4), r"n_in must be >= 2, got 1"),
        (lambda: invops.CouplingLayerHINT(5, 4, permute="half"), r"permute must be one of"),
        (lambda: invops.ConditionalLayerHINT(3, 1, 4), r"n_in and n_cond must be >= 2"),
        (lambda: invops.HyperbolicLayer(3, 4, action="unsqueeze"), r"divisible by 4, got 3"),
        (lambda: invops.HyperbolicLayer(2, 4, action="shrink"), r"action must be one of"),
        (lambda: invops.HyperbolicLayer(2, 4, ndim=0), r"ndim must be 1, 2 or 3, got 0"),
    ],
    ids=["basic", "glow", "irim", "hint-permute", "chint-cond", "hyp-unsq", "hyp-act", "hyp-nd"],
)
def test_bad_construction_raises(make, match):
    with pytest.raises(ValueError, match=match):
        make()
