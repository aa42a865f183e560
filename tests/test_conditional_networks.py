"""Operator contract checks for the conditional networks: NetworkConditionalGlow,
NetworkConditionalHINT and SummarizedNet.

Every network is built in float64 with tiny hidden sizes, run once (data-dependent ActNorm
initialisation), and then has its parameters moved off their initial values: the conditioners
start at zero, i.e. as identity couplings, which would make every check below vacuous.
"""

import pytest
import torch
from conftest import SPATIAL, randomize_parameters

import invops
from invops.testing import (
    TensorMemoryTracker,
    check_against_autograd,
    check_invertible,
    check_logdet,
    dottest,
)

HIDDEN = 3  # hidden channels / features of every conditioner
F64 = torch.float64
WRTS = ["input", "params", "both"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _randn(*shape):
    return torch.randn(*shape, dtype=F64)


def _n_params(net):
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def _param_bytes(net):
    return sum(p.numel() * p.element_size() for p in net.parameters())


def _grads(net):
    return [None if p.grad is None else p.grad.clone() for p in net.parameters()]


def _zero_grads(net):
    for p in net.parameters():
        p.grad = None


def _assert_same_grads(a, b, rtol=1e-12):
    """Equal gradients; ``None`` (a parameter the loss does not depend on) only on both sides."""
    assert len(a) == len(b)
    for i, (ga, gb) in enumerate(zip(a, b)):
        assert (ga is None) == (gb is None), f"parameter {i}: gradient on one side only"
        if ga is not None:
            scale = max(float(gb.abs().max()), 1.0)
            torch.testing.assert_close(ga, gb, rtol=rtol, atol=rtol * scale)


def _assert_all_trained(net, grads):
    """Every parameter got a non-zero gradient (no parameter is left unused)."""
    for (name, _), g in zip(net.named_parameters(), grads):
        assert g is not None and float(g.abs().max()) > 0, name


# ---------------------------------------------------------------------------------- Glow
# spatial sizes must be multiples of 2**L: tiny shapes per (rank, L)
GLOW_SPATIAL = {
    (0, 1): (),
    (0, 2): (),
    (1, 1): (6,),
    (1, 2): (8,),
    (2, 1): (2, 4),
    (2, 2): (4, 4),
    (3, 1): (2, 2, 2),
    (3, 2): (4, 4, 4),
}


def _glow_case(ndim, cond, split, L, squeeze, logdet, n_in=2, n_cond=2, K=1, batch=2):
    name = f"{ndim}d-{cond}-{'split' if split else 'nosplit'}-L{L}-{squeeze}"
    name += f"-K{K}-c{n_in}" + ("" if logdet else "-nologdet")
    return pytest.param(
        dict(
            ndim=ndim,
            cond=cond,
            split=split,
            L=L,
            squeeze=squeeze,
            logdet=logdet,
            n_in=n_in,
            n_cond=n_cond,
            K=K,
            batch=batch,
        ),
        id=name,
    )


# every rank, image and vector conditions, split_scales on and off, L 1-2, checkerboard / haar
# (and one patch) squeezes, logdet on and off; not a full cartesian product
GLOW_CASES = [
    _glow_case(0, "dense", False, 1, "checkerboard", True, n_in=3, n_cond=3, K=2),
    _glow_case(0, "dense", True, 2, "checkerboard", True, n_in=3),
    _glow_case(0, "dense", False, 2, "checkerboard", False, n_in=2, n_cond=3),
    _glow_case(1, "image", True, 2, "checkerboard", True, n_in=3),
    _glow_case(1, "dense", False, 1, "haar", True, n_cond=3, K=2),
    _glow_case(1, "image", False, 2, "haar", False),
    _glow_case(1, "dense", True, 2, "checkerboard", False, n_in=3),
    _glow_case(2, "image", False, 2, "checkerboard", True, n_cond=1),
    _glow_case(2, "image", True, 2, "haar", True, n_in=3),
    _glow_case(2, "dense", True, 2, "checkerboard", True, n_cond=3),
    _glow_case(2, "dense", False, 1, "haar", False),
    _glow_case(2, "image", True, 1, "patch", True, K=2),
    _glow_case(3, "image", True, 2, "haar", True, n_cond=1),
    _glow_case(3, "dense", False, 1, "checkerboard", True, n_cond=3),
    _glow_case(3, "image", False, 1, "haar", False),
]


def build_glow(cfg, randomize=True):
    """A float64 NetworkConditionalGlow, an input and a condition (randomized after a first
    forward unless ``randomize`` is False, in which case the network is fresh)."""
    net = invops.NetworkConditionalGlow(
        cfg["n_in"],
        cfg["n_cond"],
        HIDDEN,
        L=cfg["L"],
        K=cfg["K"],
        split_scales=cfg["split"],
        logdet=cfg["logdet"],
        ndim=cfg["ndim"],
        squeeze=cfg["squeeze"],
        dense_condition=cfg["cond"] == "dense",
    ).double()
    spatial = GLOW_SPATIAL[cfg["ndim"], cfg["L"]]
    b = cfg["batch"]
    x = _randn(b, cfg["n_in"], *spatial)
    c = _randn(b, cfg["n_cond"]) if cfg["cond"] == "dense" else _randn(b, cfg["n_cond"], *spatial)
    if randomize:
        randomize_parameters(net)
        net(x, c)  # a first forward initialises the ActNorms, then move the parameters again
        randomize_parameters(net, seed=2)
    return net, x, c


def _out(net, x, *cond):
    with torch.no_grad():
        res = net(x, *cond)
    return res if net.logdet else (res, None)


@pytest.mark.parametrize("cfg", GLOW_CASES)
def test_glow_invertible_and_derivatives(cfg):
    net, x, c = build_glow(cfg)
    assert net.dense_condition == (cfg["cond"] == "dense")
    z, logdet = _out(net, x, c)
    assert z.shape == x.shape  # the latent keeps the input's shape
    if cfg["logdet"]:
        assert logdet.shape == (cfg["batch"],)
    assert float((z - x).abs().max()) > 1e-2  # the randomized network is not the identity
    # the condition matters
    z2, _ = _out(net, x, c + 0.5 * torch.randn_like(c))
    assert float((z2 - z).abs().max()) > 1e-3

    assert check_invertible(net, x, c, rtol=1e-9) <= 1e-9
    # backward, vjp, backward_inverse (input, parameter and condition cotangents, non-zero
    # dlogdet), the autograd bridge against plain autograd, and jvp against torch.func.jvp
    errors = check_against_autograd(net, x, c, rtol=1e-7)
    assert "backward:cond0" in errors and "backward_inverse:cond0" in errors
    if cfg["logdet"]:
        assert "jvp:dlogdet" in errors


@pytest.mark.parametrize("cfg", [c for c in GLOW_CASES if c.values[0]["logdet"]])
def test_glow_logdet_matches_slogdet(cfg):
    net, x, c = build_glow(cfg)
    assert x[0].numel() <= 128
    check_logdet(net, x, c, rtol=1e-9)


@pytest.mark.parametrize("wrt", WRTS)
@pytest.mark.parametrize("cfg", GLOW_CASES)
def test_glow_jacobian_dottest(cfg, wrt):
    net, x, c = build_glow(cfg)
    J = net.jacobian(x, c, wrt=wrt)
    n_cols = {"input": x.numel(), "params": _n_params(net), "both": x.numel() + _n_params(net)}
    assert J.shape == (x.numel(), n_cols[wrt])
    assert dottest(J, rtol=1e-10, n_trials=2)


@pytest.mark.parametrize("cfg", [GLOW_CASES[1], GLOW_CASES[3], GLOW_CASES[9], GLOW_CASES[12]])
def test_glow_inverse_with_raw_condition_on_fresh_network(cfg):
    """``inverse(z, c)`` first, on a network that has never seen data: it takes the raw
    condition, initialises itself, and ``forward`` then maps back to ``z``."""
    net, x, c = build_glow(cfg, randomize=False)
    assert net._needs_init()
    z = _randn(*x.shape)
    with torch.no_grad():
        x_rec, ld_inv = net.inverse(z, c)
    assert not net._needs_init()
    assert bool(net.cond_norm.initialized)
    z_back, ld = _out(net, x_rec, c)
    torch.testing.assert_close(z_back, z, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ld_inv, -ld, rtol=1e-9, atol=1e-9)
    # the condition's ActNorm normalises the condition (initialised in its forward sense,
    # whichever direction the network was first used in)
    with torch.no_grad():
        cn, _ = net.cond_norm._forward(c)
    dims = [d for d in range(cn.ndim) if d != 1]
    zeros = cn.new_zeros(cfg["n_cond"])
    torch.testing.assert_close(cn.mean(dim=dims), zeros, rtol=0, atol=1e-10)
    torch.testing.assert_close(cn.var(dim=dims, unbiased=False), zeros + 1, rtol=1e-9, atol=0)


@pytest.mark.parametrize(
    "cfg",
    [
        GLOW_CASES[0],  # dense data, vector condition
        GLOW_CASES[3],  # 1D, image condition
        GLOW_CASES[8],  # 2D, image condition, haar, split
        pytest.param(GLOW_CASES[9].values[0], id="2d-dense-cond"),
    ],
)
def test_glow_sample_shape(cfg):
    net, x, c = build_glow(cfg)
    n = 3
    vector_on_spatial = net.dense_condition and net.ndim > 0
    if vector_on_spatial:
        with pytest.raises(ValueError, match=r"give shape=\(n_in, \*spatial\)"):
            net.sample(c, n)
    s = net.sample(c, n, shape=x.shape[1:] if vector_on_spatial else None)
    assert isinstance(s, torch.Tensor)
    assert s.shape == (n, *x.shape)
    assert s.dtype == F64 and bool(torch.isfinite(s).all())
    assert float((s[0] - s[1]).abs().max()) > 1e-3  # independent draws
    # each draw is x = inverse(z, c) for some z: forward maps it back to a latent of x's shape
    z, _ = _out(net, s[0], c)
    assert z.shape == x.shape


@pytest.mark.parametrize("cfg", [GLOW_CASES[0], GLOW_CASES[8], GLOW_CASES[9]])
def test_glow_bridge_and_backward_api_train_identically(cfg):
    """One NLL training step through ``loss.backward()`` and through ``net.backward``: identical
    parameter and condition gradients, equal to plain autograd."""
    net, x, c = build_glow(cfg)

    def bridge_step(plain):
        _zero_grads(net)
        cc = c.clone().requires_grad_()
        with invops.plain_autograd(plain):
            z, logdet = net(x, cc)
            assert (z.grad_fn is not None) and (plain or "MemoryFree" in type(z.grad_fn).__name__)
            (0.5 * (z**2).sum() - logdet.sum()).backward()
        return _grads(net), cc.grad

    g_bridge, dc_bridge = bridge_step(plain=False)
    g_plain, dc_plain = bridge_step(plain=True)

    _zero_grads(net)
    z, _ = _out(net, x, c)
    dx, x_rec, dc = net.backward(z, z, c, dlogdet=-1.0)
    torch.testing.assert_close(x_rec, x, rtol=1e-9, atol=1e-9)
    g_api = _grads(net)

    _assert_same_grads(g_bridge, g_api)
    torch.testing.assert_close(dc_bridge, dc, rtol=1e-12, atol=1e-12)
    _assert_same_grads(g_plain, g_api, rtol=1e-8)
    torch.testing.assert_close(dc_plain, dc, rtol=1e-8, atol=1e-8)
    assert float(dc.abs().max()) > 0
    _assert_all_trained(net, g_api)


# ---------------------------------------------------------------------------------- HINT
def _hint_case(ndim, permute, depth, n_in, n_cond, logdet=True, batch=2):
    name = f"{ndim}d-{'permute' if permute else 'plain'}-depth{depth}-x{n_in}-y{n_cond}"
    name += "" if logdet else "-nologdet"
    cfg = dict(
        ndim=ndim,
        permute=permute,
        depth=depth,
        n_in=n_in,
        n_cond=n_cond,
        logdet=logdet,
        batch=batch,
    )
    return pytest.param(cfg, id=name)


# ranks 0-2, permute on and off, depth 1-3, odd channel counts (3, 5), logdet on and off
HINT_CASES = [
    _hint_case(0, True, 1, 3, 5),
    _hint_case(0, False, 3, 5, 3),
    _hint_case(0, True, 2, 3, 3, logdet=False),
    _hint_case(1, False, 1, 5, 3),
    _hint_case(1, True, 3, 3, 5),
    _hint_case(1, False, 2, 2, 2, logdet=False),
    _hint_case(2, True, 2, 5, 3),
    _hint_case(2, False, 3, 3, 5),
    _hint_case(2, True, 1, 3, 3, logdet=False),
]


def build_hint(cfg, randomize=True):
    net = invops.NetworkConditionalHINT(
        cfg["n_in"],
        cfg["n_cond"],
        HIDDEN,
        depth=cfg["depth"],
        permute=cfg["permute"],
        ndim=cfg["ndim"],
        logdet=cfg["logdet"],
    ).double()
    spatial = SPATIAL[cfg["ndim"]]
    x = _randn(cfg["batch"], cfg["n_in"], *spatial)
    y = _randn(cfg["batch"], cfg["n_cond"], *spatial)
    if randomize:
        randomize_parameters(net)
        net(x, y)  # initialises the input lane's ActNorms (and the condition lane's)
        net.forward_y(y)
        randomize_parameters(net, seed=2)
    return net, x, y


def _lane_y(net, y):
    with torch.no_grad():
        res = net.forward_y(y)
    return res if net.logdet else (res, None)


@pytest.mark.parametrize("cfg", HINT_CASES)
def test_hint_invertible_and_derivatives(cfg):
    net, x, y = build_hint(cfg)
    zx, logdet = _out(net, x, y)
    assert zx.shape == x.shape
    assert float((zx - x).abs().max()) > 1e-2
    zx2, _ = _out(net, x, y + 0.5 * torch.randn_like(y))
    assert float((zx2 - zx).abs().max()) > 1e-3  # the condition matters

    assert check_invertible(net, x, y, rtol=1e-9) <= 1e-9
    errors = check_against_autograd(net, x, y, rtol=1e-7)
    assert "backward:cond0" in errors and "backward_inverse:cond0" in errors

    # the condition lane on its own: a round trip with opposite logdets
    zy, ldy = _lane_y(net, y)
    assert zy.shape == y.shape
    assert float((zy - y).abs().max()) > 1e-2
    with torch.no_grad():
        res = net.inverse_y(zy)
    y_rec, ldy_inv = res if net.logdet else (res, None)
    torch.testing.assert_close(y_rec, y, rtol=1e-9, atol=1e-9)
    if net.logdet:
        assert ldy.shape == (cfg["batch"],)
        torch.testing.assert_close(ldy_inv, -ldy, rtol=1e-9, atol=1e-9)
    assert check_invertible(net.y_lane, y, rtol=1e-9) <= 1e-9


@pytest.mark.parametrize("cfg", [c for c in HINT_CASES if c.values[0]["logdet"]])
def test_hint_logdets_match_slogdet(cfg):
    """The conditional logdet (x -> zx given y) and the JOINT logdet of the triangular map
    cat(x, y) -> cat(zx, zy), which is forward(x, y)[1] + forward_y(y)[1]."""
    net, x, y = build_hint(cfg)
    check_logdet(net, x, y, rtol=1e-9)

    _, ldx = _out(net, x, y)
    _, ldy = _lane_y(net, y)
    joint = ldx + ldy
    nx = x[0].numel()
    assert nx + y[0].numel() <= 100
    for b in range(cfg["batch"]):

        def f(v, b=b):
            xb = v[:nx].reshape(x[b : b + 1].shape)
            yb = v[nx:].reshape(y[b : b + 1].shape)
            zx, _ = net._forward(xb, yb)
            zy, _ = net.y_lane._forward(yb)
            return torch.cat([zx.reshape(-1), zy.reshape(-1)])

        v = torch.cat([x[b].reshape(-1), y[b].reshape(-1)])
        jac = torch.autograd.functional.jacobian(f, v)
        sign, ref = torch.linalg.slogdet(jac)
        assert float(sign) != 0
        assert abs(float(joint[b]) - float(ref)) <= 1e-9 * max(abs(float(ref)), 1.0)
        # the off-diagonal block dzx/dy is non-zero: the check is not of a block-diagonal map
        assert float(jac[:nx, nx:].abs().max()) > 1e-3


@pytest.mark.parametrize("wrt", WRTS)
@pytest.mark.parametrize("cfg", HINT_CASES)
def test_hint_jacobian_dottest(cfg, wrt):
    net, x, y = build_hint(cfg)
    J = net.jacobian(x, y, wrt=wrt)
    n_cols = {"input": x.numel(), "params": _n_params(net), "both": x.numel() + _n_params(net)}
    assert J.shape == (x.numel(), n_cols[wrt])
    assert dottest(J, rtol=1e-10, n_trials=2)


def test_hint_inverse_with_raw_condition_on_fresh_network():
    net, x, y = build_hint(HINT_CASES[6].values[0], randomize=False)
    z = _randn(*x.shape)
    with torch.no_grad():
        x_rec, ld_inv = net.inverse(z, y)
    assert not net._needs_init()
    z_back, ld = _out(net, x_rec, y)
    torch.testing.assert_close(z_back, z, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ld_inv, -ld, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("cfg", [HINT_CASES[1], HINT_CASES[6]])
def test_hint_bridge_and_backward_api_train_identically(cfg):
    """The joint NLL of (x, y): through ``loss.backward()`` (forward and forward_y under the
    bridge) and through the explicit API (``net.backward`` then ``net.y_lane.backward``) the
    parameter gradients are identical, and equal plain autograd."""
    net, x, y = build_hint(cfg)

    def bridge_step(plain):
        _zero_grads(net)
        yy = y.clone().requires_grad_()
        with invops.plain_autograd(plain):
            zx, ldx = net(x, yy)
            zy, ldy = net.forward_y(yy)
            loss = 0.5 * (zx**2).sum() - ldx.sum() + 0.5 * (zy**2).sum() - ldy.sum()
            loss.backward()
        return _grads(net), yy.grad

    g_bridge, dy_bridge = bridge_step(plain=False)
    g_plain, dy_plain = bridge_step(plain=True)

    _zero_grads(net)
    zx, _ = _out(net, x, y)
    zy, _ = _lane_y(net, y)
    _, x_rec, dy_x = net.backward(zx, zx, y, dlogdet=-1.0)  # y as the condition of x
    dy_y, y_rec = net.y_lane.backward(zy, zy, dlogdet=-1.0)  # y as the input of its lane
    torch.testing.assert_close(x_rec, x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(y_rec, y, rtol=1e-9, atol=1e-9)
    g_api = _grads(net)

    _assert_same_grads(g_bridge, g_api)
    _assert_same_grads(g_plain, g_api, rtol=1e-8)
    scale = float(dy_plain.abs().max())
    torch.testing.assert_close(dy_bridge, dy_x + dy_y, rtol=1e-10, atol=1e-10 * scale)
    torch.testing.assert_close(dy_plain, dy_x + dy_y, rtol=1e-8, atol=1e-8 * scale)
    _assert_all_trained(net, g_api)


def test_hint_backward_peak_memory_flat_in_depth():
    """Peak live tensor storage of ``net.backward`` grows from depth 2 to depth 8 by at most
    the parameter gradients plus 10%; plain autograd grows with depth."""
    x = _randn(4, 3, 16, 16)
    y = _randn(4, 3, 16, 16)

    def net_of(depth):
        net = invops.NetworkConditionalHINT(3, 3, 4, depth=depth, ndim=2).double()
        randomize_parameters(net, scale=0.1)
        net(x, y)
        net.forward_y(y)
        randomize_parameters(net, scale=0.1, seed=2)
        return net

    peaks, bridge, plain, params = {}, {}, {}, {}
    for depth in (2, 8):
        net = net_of(depth)
        params[depth] = _param_bytes(net)
        zx, _ = _out(net, x, y)
        with TensorMemoryTracker() as mem:
            net.backward(zx, zx, y, dlogdet=-1.0)
        peaks[depth] = mem.peak
        _zero_grads(net)
        with TensorMemoryTracker() as mem:
            xx = x.clone().requires_grad_()
            z, logdet = net(xx, y)
            (0.5 * (z**2).sum() - logdet.sum()).backward()
        bridge[depth] = mem.peak
        _zero_grads(net)
        with TensorMemoryTracker() as mem:
            xx = x.clone().requires_grad_()
            with invops.plain_autograd():
                z, logdet = net(xx, y)
                (0.5 * (z**2).sum() - logdet.sum()).backward()
        plain[depth] = mem.peak
    assert peaks[8] <= 1.1 * peaks[2] + (params[8] - params[2]), (peaks, params)
    assert bridge[8] <= 1.1 * bridge[2] + (params[8] - params[2]), (bridge, params)
    assert plain[8] > 2 * plain[2], plain
    assert peaks[8] < plain[8] / 4, (peaks, plain)


@pytest.mark.parametrize(
    "family,cfg",
    [
        pytest.param("glow", GLOW_CASES[0].values[0], id="glow-dense"),
        pytest.param("glow", GLOW_CASES[8].values[0], id="glow-image"),
        pytest.param("hint", HINT_CASES[6].values[0], id="hint"),
    ],
)
def test_reverse_is_the_sampling_direction(family, cfg):
    """``reverse()`` (z -> x given the condition) shares the parameters and passes the same
    contract checks, at a point of the latent space."""
    net, x, c = (build_glow if family == "glow" else build_hint)(cfg)
    rev = net.reverse()
    assert rev.reverse() is net and rev.n_conditions == 1
    assert all(a is b for a, b in zip(rev.parameters(), net.parameters()))
    z, _ = _out(net, x, c)
    x_rev, _ = _out(rev, z, c)
    torch.testing.assert_close(x_rev, x, rtol=1e-9, atol=1e-9)
    assert check_invertible(rev, z, c, rtol=1e-9) <= 1e-9
    check_against_autograd(rev, z, c, rtol=1e-7)
    check_logdet(rev, z, c, rtol=1e-9)
    for wrt in WRTS:
        assert dottest(rev.jacobian(z, c, wrt=wrt), rtol=1e-10)


# ---------------------------------------------------------------------------------- SummarizedNet
SUMMARY_CASES = ["dense", "dense-on-image", "image"]


def build_summarized(kind, randomize=True, batch=2):
    """A SummarizedNet around a NetworkConditionalGlow, an input and a raw observation."""
    if kind == "dense":  # dense data, a vector observation of 5 summarised to 3 features
        flow = invops.NetworkConditionalGlow(2, 3, HIDDEN, L=1, K=2, ndim=0)
        summary = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
        x, obs = _randn(batch, 2), _randn(batch, 5)
    elif kind == "dense-on-image":  # 2D data, a vector observation summarised to a vector
        flow = invops.NetworkConditionalGlow(2, 3, HIDDEN, L=1, K=1, ndim=2, dense_condition=True)
        summary = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh())
        x, obs = _randn(batch, 2, 2, 4), _randn(batch, 4)
    else:  # 2D data, a one-channel image observation summarised to two channels
        flow = invops.NetworkConditionalGlow(
            2, 2, HIDDEN, L=2, K=1, ndim=2, split_scales=True, squeeze="haar"
        )
        summary = torch.nn.Sequential(
            torch.nn.Conv2d(1, 3, 3, padding=1),
            torch.nn.Tanh(),
            torch.nn.Conv2d(3, 2, 3, padding=1),
        )
        x, obs = _randn(batch, 2, 4, 4), _randn(batch, 1, 4, 4)
    net = invops.SummarizedNet(flow, summary).double()
    if randomize:
        randomize_parameters(net)
        net(x, obs)
        randomize_parameters(net, seed=2)
    return net, x, obs


def _summary_param_indices(net):
    ids = {id(p) for p in net.summary.parameters()}
    return [i for i, p in enumerate(net.parameters()) if id(p) in ids]


@pytest.mark.parametrize("kind", SUMMARY_CASES)
def test_summarized_invertible_and_derivatives(kind):
    net, x, obs = build_summarized(kind)
    idx = _summary_param_indices(net)
    assert len(idx) == len(list(net.summary.parameters())) > 0  # parameters of the SummarizedNet
    assert check_invertible(net, x, obs, rtol=1e-9) <= 1e-9
    # the condition is the raw observation; the summary's parameters are among the parameters
    # whose backward / vjp / bridge gradients are compared with plain autograd
    errors = check_against_autograd(net, x, obs, rtol=1e-7)
    assert all(f"backward:param{i}" in errors for i in idx)
    assert all(f"backward_inverse:param{i}" in errors for i in idx)
    assert "backward:cond0" in errors
    check_logdet(net, x, obs, rtol=1e-9)

    # the summary parameters get non-zero gradients from the explicit backward API
    _zero_grads(net)
    z, _ = _out(net, x, obs)
    _, _, dobs = net.backward(z, z, obs, dlogdet=-1.0)
    assert dobs.shape == obs.shape and float(dobs.abs().max()) > 0
    for p in net.summary.parameters():
        assert p.grad is not None and float(p.grad.abs().max()) > 0


@pytest.mark.parametrize("wrt", WRTS)
@pytest.mark.parametrize("kind", SUMMARY_CASES)
def test_summarized_jacobian_dottest(kind, wrt):
    net, x, obs = build_summarized(kind)
    J = net.jacobian(x, obs, wrt=wrt)
    n_cols = {"input": x.numel(), "params": _n_params(net), "both": x.numel() + _n_params(net)}
    assert J.shape == (x.numel(), n_cols[wrt])
    assert dottest(J, rtol=1e-10, n_trials=2)


@pytest.mark.parametrize("kind", SUMMARY_CASES)
def test_summarized_bridge_gradients_reach_summary(kind):
    """``loss.backward()`` through the bridge fills the summary network's gradients (and the
    observation's), equal to plain autograd and to the explicit backward API."""
    net, x, obs = build_summarized(kind)

    def bridge_step(plain):
        _zero_grads(net)
        oo = obs.clone().requires_grad_()
        with invops.plain_autograd(plain):
            z, logdet = net(x, oo)
            (0.5 * (z**2).sum() - logdet.sum()).backward()
        return _grads(net), oo.grad

    g_bridge, dobs_bridge = bridge_step(False)
    g_plain, dobs_plain = bridge_step(True)
    _zero_grads(net)
    z, _ = _out(net, x, obs)
    _, _, dobs = net.backward(z, z, obs, dlogdet=-1.0)
    g_api = _grads(net)

    idx = _summary_param_indices(net)
    assert all(g_bridge[i] is not None and float(g_bridge[i].abs().max()) > 0 for i in idx)
    _assert_same_grads(g_bridge, g_plain, rtol=1e-8)
    _assert_same_grads(g_bridge, g_api)
    _assert_all_trained(net, g_api)
    torch.testing.assert_close(dobs_bridge, dobs_plain, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(dobs_bridge, dobs, rtol=1e-12, atol=1e-12)


def test_summarized_rejects_bad_members():
    summary = torch.nn.Linear(4, 2)
    with pytest.raises(TypeError, match="one condition"):
        invops.SummarizedNet(invops.ActNorm(2), summary)  # n_cond == 0
    with pytest.raises(TypeError, match="one condition"):
        invops.SummarizedNet(invops.Chain(invops.ActNorm(2)), summary)
    with pytest.raises(TypeError, match="InvertibleModule"):
        invops.SummarizedNet(summary, summary)  # not an invertible module at all
    flow = invops.NetworkConditionalGlow(2, 2, HIDDEN, L=1, K=1, ndim=0)
    with pytest.raises(TypeError, match="summary must be a torch.nn.Module"):
        invops.SummarizedNet(flow, lambda t: t)
    with pytest.raises(TypeError, match="summary must be a torch.nn.Module"):
        invops.SummarizedNet(flow, torch.randn(2, 2))


def test_summarized_bad_observation():
    net, x, obs = build_summarized("image")
    # the summary accepts it, but its output does not match x's spatial size
    with pytest.raises(ValueError, match=r"cond\[0\] must have shape"):
        net(x, _randn(2, 1, 4, 8))
    with pytest.raises(ValueError, match=r"cond\[0\] must have shape"):
        net(x, _randn(3, 1, 4, 4))  # batch
    with pytest.raises(TypeError, match="condition"):
        net(x)


# ---------------------------------------------------------------------------------- state_dict
def _save_load_cases():
    return [
        pytest.param("glow", GLOW_CASES[8].values[0], id="glow-image"),
        pytest.param("glow", GLOW_CASES[9].values[0], id="glow-dense"),
        pytest.param("hint", HINT_CASES[6].values[0], id="hint"),
        pytest.param("summarized", "image", id="summarized"),
    ]


@pytest.mark.parametrize("family,cfg", _save_load_cases())
def test_state_dict_into_fresh_network(family, cfg):
    """load_state_dict into a freshly built network: identical outputs, ActNorm state included
    (the fresh network must not re-initialise its ActNorms from the data it sees first)."""
    builder = {"glow": build_glow, "hint": build_hint, "summarized": build_summarized}[family]
    net, x, c = builder(cfg)
    fresh, _, _ = builder(cfg, randomize=False)
    assert fresh._needs_init()
    fresh.load_state_dict(net.state_dict())
    assert not fresh._needs_init()
    # data from another distribution than the one the original network was initialised on
    x2, c2 = 3.0 + 2.0 * torch.randn_like(x), -1.0 + 0.5 * torch.randn_like(c)
    for a, b in ((x, c), (x2, c2)):
        za, lda = _out(net, a, b)
        zb, ldb = _out(fresh, a, b)
        torch.testing.assert_close(zb, za, rtol=0, atol=0)
        torch.testing.assert_close(ldb, lda, rtol=0, atol=0)
        with torch.no_grad():
            xa, _ = net.inverse(za, b)
            xb, _ = fresh.inverse(za, b)
        torch.testing.assert_close(xb, xa, rtol=0, atol=0)
    if family == "hint":
        for b in (c, c2):
            torch.testing.assert_close(_lane_y(fresh, b)[0], _lane_y(net, b)[0], rtol=0, atol=0)


# ---------------------------------------------------------------------------------- bad input
def _glow_2d(dense=False, L=2):
    net = invops.NetworkConditionalGlow(
        2, 2, HIDDEN, L=L, K=1, ndim=2, dense_condition=dense
    ).double()
    return net


GLOW_BAD = [
    # (id, dense, x shape, c shape, exception, message pattern)
    ("cond-channels", False, (2, 2, 4, 4), (2, 3, 4, 4), ValueError, r"cond\[0\] must have shape"),
    ("cond-spatial", False, (2, 2, 4, 4), (2, 2, 4, 8), ValueError, r"\(2, 2, 4, 4\)"),
    ("cond-batch", False, (2, 2, 4, 4), (3, 2, 4, 4), ValueError, r"cond\[0\] must have shape"),
    ("cond-rank", False, (2, 2, 4, 4), (2, 2), ValueError, r"cond\[0\] must have shape"),
    ("dense-cond-image", True, (2, 2, 4, 4), (2, 2, 4, 4), ValueError, r"shape \(2, 2\)"),
    ("dense-cond-features", True, (2, 2, 4, 4), (2, 3), ValueError, r"cond\[0\] must have"),
    ("dense-cond-batch", True, (2, 2, 4, 4), (1, 2), ValueError, r"cond\[0\] must have"),
    ("x-spatial", False, (2, 2, 4, 6), (2, 2, 4, 6), ValueError, r"multiple of 2\*\*L"),
    ("x-spatial-odd", False, (2, 2, 3, 4), (2, 2, 3, 4), ValueError, r"multiple of 2\*\*L = 4"),
    ("x-rank", False, (2, 2, 4), (2, 2, 4), ValueError, r"layout \(B, C, \*, \*\)"),
    ("x-rank-5d", False, (2, 2, 4, 4, 4), (2, 2, 4, 4, 4), ValueError, r"ndim=2"),
    ("x-channels", False, (2, 3, 4, 4), (2, 2, 4, 4), ValueError, r"2 channels"),
]


@pytest.mark.parametrize(
    "dense,x_shape,c_shape,exc,pattern", [pytest.param(*g[1:], id=g[0]) for g in GLOW_BAD]
)
def test_glow_bad_input(dense, x_shape, c_shape, exc, pattern):
    net = _glow_2d(dense)
    x, c = _randn(*x_shape), _randn(*c_shape)
    for call in (
        lambda: net(x, c),
        lambda: net.inverse(x, c),
        lambda: net.backward(x, x, c),
        lambda: net.backward_inverse(x, x, c),
        lambda: net.jvp(x, c),
        lambda: net.jacobian(x, c),
    ):
        with pytest.raises(exc, match=pattern):
            call()
    assert net._needs_init()  # nothing ran on the bad input


def test_glow_bad_input_other_ranks_and_missing_condition():
    net = _glow_2d()
    x, c = _randn(2, 2, 4, 4), _randn(2, 2, 4, 4)
    with pytest.raises(TypeError, match="expects 1 condition argument"):
        net(x)
    with pytest.raises(TypeError, match="expects 1 condition argument"):
        net.inverse(x)
    with pytest.raises(TypeError, match="expects 1 condition argument"):
        net(x, c, c)
    with pytest.raises(TypeError, match="float64"):
        net(x, c.float())
    # L=1 in 1D and 3D: the multiple is 2; dense data has no spatial constraint
    net1 = invops.NetworkConditionalGlow(2, 2, HIDDEN, L=1, K=1, ndim=1).double()
    with pytest.raises(ValueError, match=r"multiple of 2\*\*L = 2"):
        net1(_randn(2, 2, 5), _randn(2, 2, 5))
    net3 = invops.NetworkConditionalGlow(2, 2, HIDDEN, L=2, K=1, ndim=3).double()
    with pytest.raises(ValueError, match=r"multiple of 2\*\*L = 4.*\(4, 4, 2\)"):
        net3(_randn(1, 2, 4, 4, 2), _randn(1, 2, 4, 4, 2))
    net0 = invops.NetworkConditionalGlow(2, 3, HIDDEN, L=1, K=1, ndim=0).double()
    with pytest.raises(ValueError, match=r"layout \(B, C\)"):
        net0(_randn(2, 2, 3), _randn(2, 3))
    with pytest.raises(ValueError, match=r"cond\[0\] must have shape \(2, 3\)"):
        net0(_randn(2, 2), _randn(2, 3, 1))
    with pytest.raises(ValueError, match="n_cond must be >= 1"):
        invops.NetworkConditionalGlow(2, 0, HIDDEN, L=1, K=1)
    with pytest.raises(ValueError, match="couplings need 2"):
        invops.NetworkConditionalGlow(2, 2, HIDDEN, L=2, K=1, ndim=0, split_scales=True)


HINT_BAD = [
    ("y-channels", (2, 3, 3, 4), (2, 4, 3, 4), ValueError, r"must have shape \(2, 5, 3, 4\)"),
    ("y-spatial", (2, 3, 3, 4), (2, 5, 3, 5), ValueError, r"observation y"),
    ("y-batch", (2, 3, 3, 4), (1, 5, 3, 4), ValueError, r"observation y"),
    ("y-rank", (2, 3, 3, 4), (2, 5, 12), ValueError, r"observation y"),
    ("x-rank", (2, 3, 12), (2, 5, 12), ValueError, r"2 spatial dimensions"),
    ("x-channels", (2, 4, 3, 4), (2, 5, 3, 4), ValueError, r"shape \(B, 3, \*, \*\)"),
]


@pytest.mark.parametrize(
    "x_shape,y_shape,exc,pattern", [pytest.param(*g[1:], id=g[0]) for g in HINT_BAD]
)
def test_hint_bad_input(x_shape, y_shape, exc, pattern):
    net = invops.NetworkConditionalHINT(3, 5, HIDDEN, depth=2, ndim=2).double()
    x, y = _randn(*x_shape), _randn(*y_shape)
    for call in (
        lambda: net(x, y),
        lambda: net.inverse(x, y),
        lambda: net.backward(x, x, y),
        lambda: net.backward_inverse(x, x, y),
        lambda: net.jvp(x, y),
        lambda: net.jacobian(x, y),
    ):
        with pytest.raises(exc, match=pattern):
            call()
    assert net._needs_init()


def test_hint_bad_input_lanes_and_missing_condition():
    net = invops.NetworkConditionalHINT(3, 5, HIDDEN, depth=2, ndim=2).double()
    x = _randn(2, 3, 3, 4)
    with pytest.raises(TypeError, match="expects 1 condition argument"):
        net(x)
    with pytest.raises(TypeError, match="expects 1 condition argument"):
        net.backward(x, x)
    with pytest.raises(ValueError, match="5 channels"):
        net.forward_y(_randn(2, 4, 3, 4))
    with pytest.raises(ValueError, match="2 spatial dimensions"):
        net.inverse_y(_randn(2, 5, 12))
    with pytest.raises(ValueError, match="n_in and n_cond must be >= 2"):
        invops.NetworkConditionalHINT(1, 5, HIDDEN, depth=1)
    with pytest.raises(ValueError, match="depth must be >= 1"):
        invops.NetworkConditionalHINT(3, 5, HIDDEN, depth=0)
