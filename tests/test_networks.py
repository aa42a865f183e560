"""Operator contract checks for the networks: Glow, multiscale HINT, hyperbolic, RevNet, U-Net.

Every network is built in float64 with hidden size 4, run once (ActNorm initialisation), and then
has its parameters moved off their initial values: the default conditioners start at zero, i.e.
as identity couplings, which would make every check below vacuous. The parameters are moved by
0.1 (not conftest's default 0.3): these are deep stacks of couplings, and 0.3 per parameter
makes their outputs reach 1e4 to 1e6, where float64 round-off alone exceeds the 1e-9 to 1e-10
tolerances.

Each network is described by a spec ``(class name, args, kwargs)`` of plain literals, so that the
same network can be rebuilt in another process (the save/load test).
"""

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize_parameters

import invops
from invops.testing import (
    TensorMemoryTracker,
    check_against_autograd,
    check_invertible,
    check_logdet,
    dottest,
)

HIDDEN = 4  # hidden channels / features of every conditioner
SCALE = 0.1  # parameter randomization (see the module docstring)
ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------- specs
def build(spec) -> invops.InvertibleModule:
    """A fresh float64 network from its spec (never called)."""
    name, args, kwargs = spec
    return getattr(invops, name)(*args, **kwargs).double()


def expected_output_shape(spec, shape) -> tuple[int, ...]:
    """Shape of the network's output for an input of ``shape``."""
    name, args, kwargs = spec
    batch, spatial = shape[0], shape[2:]
    ndim = len(spatial)
    if name == "NetworkHyperbolic":
        n_in, arch = args
        shift = sum({"squeeze": -1, "none": 0, "unsqueeze": 1}[a] for a, _ in arch)
        channels = 2 * n_in * 2 ** (-ndim * shift)
        return (batch, int(channels), *(int(n * 2.0**shift) for n in spatial))
    if name == "NetworkRevNet":
        n_in, _, blocks = args
        stages = len(blocks) - 1 if ndim else 0
        return (batch, n_in * 2 ** (ndim * stages), *(n // 2**stages for n in spatial))
    return tuple(shape)  # Glow, HINT and U-Net keep the input's shape


def _multiscale_spatial(rank: int, L: int) -> tuple[int, ...]:
    """Small spatial shapes allowed by ``L`` scales: multiples of ``2**L``, and at least 4 along
    the last axis so that L=1 is not a single pixel after the squeeze."""
    factor = 2**L
    return {0: (), 1: (max(factor, 4),), 2: (factor, max(factor, 4)), 3: (factor,) * 3}[rank]


def _multiscale_case(cls, rank, L, split, logdet, squeeze, batch, channels, K=1):
    kwargs = dict(L=L, K=K, split_scales=split, logdet=logdet, ndim=rank)
    if rank:
        kwargs["squeeze"] = squeeze
    spec = (cls, (channels, HIDDEN), kwargs)
    short = {"NetworkGlow": "glow", "NetworkMultiScaleHINT": "hint"}[cls]
    tag = (
        f"{short}-{rank}d-L{L}-K{K}-{'split' if split else 'nosplit'}"
        f"{'' if logdet else '-nologdet'}{f'-{squeeze}' if rank else ''}-b{batch}-c{channels}"
    )
    shape = (batch, channels, *_multiscale_spatial(rank, L))
    return pytest.param(spec, shape, id=tag)


def _hyperbolic_case(rank, n_in, arch, spatial, batch, logdet=True):
    spec = ("NetworkHyperbolic", (n_in, arch), dict(ndim=rank, alpha=0.7, logdet=logdet))
    tag = f"hyperbolic-{rank}d-{'-'.join(a for a, _ in arch)}-b{batch}-c{n_in}"
    return pytest.param(spec, (batch, 2 * n_in, *spatial), id=tag)


def _revnet_case(rank, n_in, blocks, spatial, batch, squeeze="checkerboard"):
    kwargs = dict(ndim=rank)
    if rank and len(blocks) > 1:
        kwargs["squeeze"] = squeeze
    spec = ("NetworkRevNet", (n_in, HIDDEN, blocks), kwargs)
    tag = f"revnet-{rank}d-{'x'.join(map(str, blocks))}-b{batch}-c{n_in}"
    return pytest.param(spec, (batch, n_in, *spatial), id=tag)


def _unet_case(rank, n_in, blocks, spatial, batch, logdet=True):
    spec = ("NetworkUNet", (n_in, HIDDEN, blocks), dict(ndim=rank, logdet=logdet))
    tag = f"unet-{rank}d-{'x'.join(map(str, blocks))}{'' if logdet else '-nologdet'}"
    return pytest.param(spec, (batch, n_in, *spatial), id=f"{tag}-b{batch}-c{n_in}")


G, H = "NetworkGlow", "NetworkMultiScaleHINT"
GLOW_CASES = [
    # (rank, L, split_scales, logdet, squeeze, batch, channels): every rank, L in {1, 2} (and 3
    # for 1D and dense), both split options, with and without logdet, the three squeezes, odd
    # channel counts, batch 1 and 3; not a full cartesian product
    _multiscale_case(G, *c)
    for c in [
        (0, 1, False, True, None, 1, 3),
        (0, 2, True, True, None, 3, 5),
        (0, 3, True, False, None, 3, 5),  # 5 -> 3 -> 2 features
        (0, 2, False, False, None, 1, 2),
        (1, 1, False, True, "checkerboard", 3, 3),
        (1, 2, True, True, "haar", 1, 3),
        (1, 3, True, True, "patch", 3, 1),
        (1, 3, False, False, "checkerboard", 1, 2),
        (1, 2, False, True, "patch", 3, 5),
        (2, 1, True, True, "patch", 1, 3),
        (2, 2, True, True, "checkerboard", 3, 3),
        (2, 2, False, False, "haar", 3, 1),
        (2, 1, False, True, "haar", 3, 2),
        (3, 1, True, True, "haar", 3, 3),
        (3, 1, False, False, "checkerboard", 1, 2),
        (3, 2, True, True, "patch", 1, 1),
        (3, 2, False, True, "checkerboard", 3, 1),
    ]
] + [_multiscale_case(G, 2, 2, True, True, "haar", 3, 3, K=2)]
HINT_CASES = [
    _multiscale_case(H, *c)
    for c in [
        (0, 1, False, True, None, 3, 3),
        (0, 2, True, True, None, 1, 5),
        (0, 2, False, False, None, 3, 4),
        (1, 1, False, True, "haar", 1, 3),
        (1, 2, True, True, "haar", 3, 3),
        (1, 3, True, False, "checkerboard", 3, 1),
        (1, 2, False, True, "patch", 1, 2),
        (2, 1, True, True, "checkerboard", 3, 3),
        (2, 2, True, True, "haar", 1, 1),
        (2, 2, False, False, "patch", 3, 1),
        (3, 1, False, True, "haar", 1, 3),
        (3, 1, True, False, "patch", 3, 2),
    ]
] + [_multiscale_case(H, 1, 2, True, True, "haar", 3, 3, K=2)]
HYPERBOLIC_CASES = [
    _hyperbolic_case(1, 3, [("none", 4), ("none", 4)], (5,), 1),
    _hyperbolic_case(1, 3, [("squeeze", 4), ("none", 4), ("unsqueeze", 4)], (4,), 3),
    _hyperbolic_case(1, 2, [("unsqueeze", 4), ("squeeze", 4)], (3,), 1, logdet=False),
    _hyperbolic_case(2, 1, [("squeeze", 4), ("unsqueeze", 4)], (2, 4), 3),
    _hyperbolic_case(2, 4, [("none", 4), ("unsqueeze", 4), ("squeeze", 4)], (3, 2), 1),
    _hyperbolic_case(2, 3, [("squeeze", 4), ("none", 4)], (2, 2), 1),
    _hyperbolic_case(3, 1, [("squeeze", 4), ("none", 4)], (2, 2, 2), 3),
    _hyperbolic_case(3, 8, [("unsqueeze", 4), ("none", 4)], (1, 2, 1), 1),
    _hyperbolic_case(3, 3, [("none", 4)], (2, 3, 2), 3, logdet=False),
]
REVNET_CASES = [
    _revnet_case(0, 5, [2], (), 3),
    _revnet_case(0, 2, [1, 1], (), 1),
    _revnet_case(1, 3, [1, 2], (4,), 3),
    _revnet_case(1, 2, [2], (5,), 1),
    _revnet_case(2, 3, [1, 1], (2, 4), 3, squeeze="haar"),
    _revnet_case(2, 4, [2], (3, 3), 1),
    _revnet_case(3, 3, [1, 1], (2, 2, 2), 1, squeeze="patch"),
    _revnet_case(3, 5, [1], (2, 3, 2), 3),
]
UNET_CASES = [
    _unet_case(1, 3, [1, 1, 1], (4,), 3),
    _unet_case(1, 2, [2, 1], (6,), 1),
    _unet_case(2, 3, [1, 1], (2, 4), 1, logdet=False),
    _unet_case(2, 5, [1, 1, 1], (4, 4), 3),
    _unet_case(3, 3, [1, 1], (2, 2, 2), 3),
    _unet_case(3, 2, [1, 1, 1], (4, 4, 4), 1),
]
CASES = GLOW_CASES + HINT_CASES + HYPERBOLIC_CASES + REVNET_CASES + UNET_CASES

# one representative per network (and per rank for the cheaper per-network checks)
FAMILIES = [
    _multiscale_case(G, 2, 2, True, True, "checkerboard", 3, 3, K=2),
    _multiscale_case(G, 0, 2, True, True, None, 3, 5),
    _multiscale_case(H, 1, 2, True, True, "haar", 3, 3),
    _multiscale_case(H, 3, 1, False, True, "patch", 3, 2),
    _hyperbolic_case(2, 2, [("squeeze", 4), ("none", 4), ("unsqueeze", 4)], (4, 4), 3),
    _revnet_case(2, 3, [1, 2], (4, 4), 3),
    _revnet_case(0, 5, [2], (), 3),
    _unet_case(2, 3, [1, 1, 1], (4, 4), 3),
    _unet_case(1, 3, [1, 1], (6,), 3),
]


def prepared(spec, shape):
    """A randomized float64 network (ActNorms initialised) and an input."""
    net = build(spec)
    x = torch.randn(*shape, dtype=torch.float64)
    randomize_parameters(net, scale=SCALE)
    with torch.no_grad():
        net(x)  # a first forward (data-dependent initialisation), then move the parameters again
    randomize_parameters(net, scale=SCALE, seed=2)
    return net, x


def _forward(net, x):
    """``(y, logdet)`` without a graph; ``logdet`` is None for a network built without it."""
    with torch.no_grad():
        out = net(x)
    return out if net.logdet else (out, None)


def _actnorms(net):
    return [m for m in net.modules() if isinstance(m, invops.ActNorm)]


# ---------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("spec,shape", CASES)
def test_invertible_and_derivatives(spec, shape):
    net, x = prepared(spec, shape)
    y, logdet = _forward(net, x)
    assert tuple(y.shape) == expected_output_shape(spec, shape)
    if net.logdet:
        assert logdet.shape == (shape[0],)
    else:
        assert isinstance(y, torch.Tensor)
    assert check_invertible(net, x, rtol=1e-9) <= 1e-9
    # backward, backward_inverse, vjp and the autograd bridge against plain autograd (with a
    # non-zero logdet cotangent), jvp against torch.func.jvp
    check_against_autograd(net, x, rtol=1e-8)

    # the checks above are not vacuous: every parameter moves the output or the logdet
    with torch.no_grad():
        dy = torch.randn_like(y)
    dlogdet = torch.randn(shape[0], dtype=torch.float64) if net.logdet else None
    _, dtheta, _ = net.vjp(dy, y, dlogdet=dlogdet)
    assert len(dtheta) == len(list(net.parameters())) > 0
    dead = [n for (n, _), g in zip(net.named_parameters(), dtheta) if not float(g.abs().max()) > 0]
    assert not dead, dead


def _tiny(shape):
    return torch.randn(2, *shape[1:], dtype=torch.float64)


@pytest.mark.parametrize("spec,shape", CASES)
def test_logdet_matches_slogdet(spec, shape):
    net, _ = prepared(spec, shape)
    x = _tiny(shape)
    assert x[0].numel() <= 128
    # the log-determinant is computed even where the network does not report it
    check_logdet(net, x, rtol=1e-9)
    if spec[0] in ("NetworkHyperbolic", "NetworkRevNet"):  # volume preserving: logdet is 0
        y, logdet = _forward(net, x)
        if logdet is not None:
            assert torch.equal(logdet, torch.zeros_like(logdet))


@pytest.mark.parametrize("wrt", ["input", "params", "both"])
@pytest.mark.parametrize("spec,shape", CASES)
def test_jacobian_dottest(spec, shape, wrt):
    net, _ = prepared(spec, shape)
    x = _tiny(shape)
    J = net.jacobian(x, wrt=wrt)
    n_out = math.prod(expected_output_shape(spec, x.shape))
    n_params = sum(p.numel() for p in net.parameters() if p.requires_grad)
    n_cols = {"input": x.numel(), "params": n_params, "both": x.numel() + n_params}[wrt]
    assert J.shape == (n_out, n_cols)
    assert dottest(J, rtol=1e-10, n_trials=1)


# ---------------------------------------------------------------------------------- latent
@pytest.mark.parametrize(
    "spec,shape",
    [
        *FAMILIES,
        _multiscale_case(G, 0, 1, False, True, None, 1, 3),  # batch 1 dense: zero variance
        _multiscale_case(H, 0, 2, True, False, None, 1, 5),
        _multiscale_case(G, 3, 2, True, True, "haar", 1, 1),
        _multiscale_case(H, 2, 2, False, True, "patch", 1, 3),
        _multiscale_case(G, 1, 3, False, False, "patch", 3, 3),
    ],
)
def test_inverse_of_a_fresh_network(spec, shape):
    """inverse(z) on a network that has never run forward initialises its ActNorms from z."""
    net = build(spec)
    x = torch.randn(*shape, dtype=torch.float64)
    z = torch.randn(*expected_output_shape(spec, shape), dtype=torch.float64)
    assert all(not bool(m.initialized) for m in _actnorms(net))
    with torch.no_grad():
        out = net.inverse(z)
    x_gen, logdet_inv = out if net.logdet else (out, None)
    assert x_gen.shape == x.shape
    assert bool(torch.isfinite(x_gen).all())
    if logdet_inv is not None:
        assert logdet_inv.shape == (shape[0],) and bool(torch.isfinite(logdet_inv).all())
    assert all(bool(m.initialized) for m in _actnorms(net))
    # after that first inverse, the network is an ordinary invertible map
    y, logdet = _forward(net, x_gen)
    torch.testing.assert_close(y, z, rtol=1e-9, atol=1e-9)
    if logdet is not None:
        torch.testing.assert_close(logdet, -logdet_inv, rtol=1e-9, atol=1e-9)
    # the latent has the input's shape for the shape-preserving networks
    if spec[0] in (G, H, "NetworkUNet"):
        with torch.no_grad():
            z2 = net(x)[0] if net.logdet else net(x)
        assert z2.shape == x.shape


@pytest.mark.parametrize(
    "rank,spatial,batch,channels,split",
    [
        (0, (), 1, 3, False),
        (1, (8,), 4, 3, True),
        (2, (4, 4), 2, 1, True),
        (3, (4, 4, 4), 1, 2, False),
    ],
)
def test_glow_sample(rank, spatial, batch, channels, split):
    kw = dict(L=2, K=2, ndim=rank, split_scales=split)
    net = invops.NetworkGlow(channels, HIDDEN, **kw).double()
    s = net.sample(batch, (channels, *spatial))
    assert s.shape == (batch, channels, *spatial) and s.dtype == torch.float64
    assert bool(torch.isfinite(s).all())
    assert s.grad_fn is None
    assert all(bool(m.initialized) for m in _actnorms(net))
    # a second draw comes from the (now initialised) same network: different and finite
    s2 = net.sample(batch, (channels, *spatial))
    assert bool(torch.isfinite(s2).all()) and not torch.equal(s, s2)

    # the default shape, and no shape at all
    net = invops.NetworkGlow(channels, HIDDEN, sample_shape=(channels, *spatial), **kw)
    s = net.sample(3)
    assert s.shape == (3, channels, *spatial) and s.dtype == torch.float32
    assert bool(torch.isfinite(s).all())
    with pytest.raises(ValueError, match=r"give shape=\(C, \*spatial\) or sample_shape"):
        invops.NetworkGlow(channels, HIDDEN, **kw).sample(2)


# ---------------------------------------------------------------------------------- training
@pytest.mark.parametrize("spec,shape", CASES)
def test_bridge_and_backward_api_give_the_same_gradients(spec, shape):
    net, x = prepared(spec, shape)
    params = list(net.parameters())
    y0, _ = _forward(net, x)
    w = torch.randn_like(y0)

    # loss.backward() through the memory-free autograd bridge
    xr = x.clone().requires_grad_()
    out = net(xr)
    y, logdet = out if net.logdet else (out, None)
    loss = (w * y).sum() + 0.5 * (y**2).sum() - (logdet.sum() if logdet is not None else 0.0)
    for p in params:
        p.grad = None
    loss.backward()
    bridge = [xr.grad] + [p.grad.clone() for p in params]

    # the explicit backward API from the output
    for p in params:
        p.grad = None
    dlogdet = -1.0 if net.logdet else None
    dx, x_rec = net.backward(w + y0, y0, dlogdet=dlogdet)
    explicit = [dx] + [p.grad for p in params]
    torch.testing.assert_close(x_rec, x, rtol=1e-9, atol=1e-9)
    for a, b in zip(bridge, explicit):
        scale = max(float(b.abs().max()), 1e-300)
        assert float((a - b).abs().max()) <= 1e-10 * scale


# ---------------------------------------------------------------------------------- reverse
@pytest.mark.parametrize("spec,shape", FAMILIES)
def test_reverse_is_the_inverse_and_shares_parameters(spec, shape):
    net, x = prepared(spec, shape)
    rev = net.reverse()
    assert rev.reverse() is net
    ours, theirs = list(net.parameters()), list(rev.parameters())
    assert len(ours) == len(theirs) > 0
    assert all(a is b for a, b in zip(ours, theirs))

    y, logdet = _forward(net, x)
    with torch.no_grad():
        x_rev, logdet_rev = rev(y)
        y_rev, _ = rev.inverse(x)
    torch.testing.assert_close(x_rev, x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(logdet_rev, -logdet, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(y_rev, y, rtol=1e-9, atol=1e-9)
    assert check_invertible(rev, y, rtol=1e-9) <= 1e-9
    check_against_autograd(rev, y, rtol=1e-8)

    # a change of the network's parameters is a change of the reversed network's
    randomize_parameters(net, scale=0.02, seed=7)
    y2, _ = _forward(net, x)
    assert not torch.allclose(y2, y)
    with torch.no_grad():
        x_rev2, _ = rev(y2)
    torch.testing.assert_close(x_rev2, x, rtol=1e-9, atol=1e-9)

    # the gradient of the reversed network lands in the same parameter objects
    for p in ours:
        p.grad = None
    rev.backward(torch.randn_like(x), x, dlogdet=1.0)
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in ours)


@pytest.mark.parametrize("spec,shape", FAMILIES)
def test_numpy_in_numpy_out(spec, shape):
    net, x = prepared(spec, shape)
    y, logdet = net(x.numpy())
    assert type(y).__name__ == "ndarray" and type(logdet).__name__ == "ndarray"
    y_t, _ = _forward(net, x)
    torch.testing.assert_close(torch.from_numpy(y), y_t, rtol=0, atol=0)
    x_rec, _ = net.inverse(y)
    torch.testing.assert_close(torch.from_numpy(x_rec), x, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------- save / load
def _trained(spec, shape, steps=2):
    """A network after its first forward and a couple of Adam steps, and an input."""
    net, x = prepared(spec, shape)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        out = net(x)
        y, logdet = out if net.logdet else (out, torch.zeros(x.shape[0], dtype=x.dtype))
        (0.5 * (y**2).sum() / x.shape[0] - logdet.mean()).backward()
        opt.step()
    return net, x


SAVE_LOAD = [
    _multiscale_case(G, 2, 2, True, True, "checkerboard", 3, 3, K=2),
    _multiscale_case(G, 0, 2, False, True, None, 3, 5),
    _multiscale_case(H, 1, 2, True, True, "haar", 3, 3),
    _hyperbolic_case(2, 2, [("squeeze", 4), ("none", 4), ("unsqueeze", 4)], (4, 4), 3),
    _revnet_case(2, 3, [1, 2], (4, 4), 3),
    _unet_case(2, 3, [1, 1, 1], (4, 4), 3),
]

_LOADER = """
import sys
import torch
import invops

torch.set_num_threads(1)
blobs = torch.load(sys.argv[1])
bad = []
for blob in blobs:
    name, args, kwargs = blob["spec"]
    net = getattr(invops, name)(*args, **kwargs).double()
    net.load_state_dict(blob["state"])
    with torch.no_grad():
        y, logdet = net(blob["x"])
    if not (torch.equal(y, blob["y"]) and torch.equal(logdet, blob["logdet"])):
        bad.append(name)
    states = net.state_dict()
    if any(not torch.equal(states[k], v) for k, v in blob["state"].items()):
        bad.append(name + " (state changed by the forward)")
print("mismatch:", bad)
sys.exit(1 if bad else 0)
"""


def test_state_dict_round_trip_in_a_new_process(tmp_path):
    """torch.save(state_dict()) into a freshly built network in a new process: identical output,
    ActNorm initialisation state included (one process for every network, to save start-up)."""
    blobs = []
    for case in SAVE_LOAD:
        spec, shape = case.values
        net, x = _trained(spec, shape)
        y, logdet = _forward(net, x)
        assert any(k.endswith("initialized") for k in net.state_dict()) == bool(_actnorms(net))
        blobs.append(
            dict(spec=spec, state=net.state_dict(), x=x, y=y.clone(), logdet=logdet.clone())
        )
    path = tmp_path / "networks.pt"
    torch.save(blobs, path)
    _load_in_a_new_process(_LOADER, path)


def _load_in_a_new_process(loader: str, path: Path) -> None:
    """Run ``loader`` (a script comparing saved outputs) on ``path`` in a fresh interpreter."""
    res = subprocess.run(
        [sys.executable, "-c", loader, str(path)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=path.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("spec,shape", SAVE_LOAD[:3])
def test_load_state_dict_keeps_actnorm_initialisation(spec, shape):
    net, x = _trained(spec, shape)
    y, logdet = _forward(net, x)
    fresh = build(spec)
    assert fresh._needs_init()
    fresh.load_state_dict(net.state_dict())
    assert all(bool(m.initialized) for m in _actnorms(fresh)) and _actnorms(fresh)
    assert not fresh._needs_init()
    before = copy.deepcopy(fresh.state_dict())
    # a batch unlike the training data would give different ActNorm statistics if it
    # re-initialised them
    x_other = 5.0 + 3.0 * torch.randn_like(x)
    with torch.no_grad():
        fresh(x_other)
        y2, logdet2 = fresh(x)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in before.items())
    assert torch.equal(y2, y) and torch.equal(logdet2, logdet)
    # the same holds for a first call in the inverse direction
    fresh = build(spec)
    fresh.load_state_dict(net.state_dict())
    with torch.no_grad():
        x_rec, _ = fresh.inverse(y)
    torch.testing.assert_close(x_rec, x, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------- bad input
def _t(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)


def _net(name, *args, **kwargs):
    return lambda: getattr(invops, name)(*args, **kwargs).double()


def _bad(id_, make, call, match, exc=ValueError):
    return pytest.param(make, call, exc, match, id=id_)


_FWD = lambda m, x: m(x)  # noqa: E731
_INV = lambda m, x: m.inverse(x)  # noqa: E731


BAD_INPUTS = [
    # spatial size not a multiple of 2**L, forward and inverse
    *[
        _bad(
            f"{short}-{d}-spatial",
            _net(cls, 3, HIDDEN, L=2, K=1, ndim=rank),
            lambda m, d=d, bad=bad: (_INV if d == "inverse" else _FWD)(m, _t(2, 3, *bad)),
            rf"{cls}: with L=2 scales every spatial size must be a multiple of 2\*\*L = 4, "
            rf"got spatial shape \({', '.join(map(str, bad))},?\)",
        )
        for cls, short in [(G, "glow"), (H, "hint")]
        for rank, bad in [(1, (6,)), (2, (4, 6)), (3, (4, 4, 2))]
        for d in ("forward", "inverse")
    ],
    _bad(
        "glow-L1-odd",
        _net(G, 3, HIDDEN, L=1, K=1, ndim=2),
        lambda m: m(_t(2, 3, 3, 4)),
        r"multiple of 2\*\*L = 2, got spatial shape \(3, 4\)",
    ),
    _bad(
        "unet-spatial",
        _net("NetworkUNet", 3, HIDDEN, [1, 1, 1], ndim=2),
        lambda m: m(_t(2, 3, 4, 6)),
        r"NetworkUNet: .*multiple of .* 4, got spatial shape \(4, 6\)",
    ),
    _bad(
        "unet-spatial-inverse-3d",
        _net("NetworkUNet", 3, HIDDEN, [1, 1], ndim=3),
        lambda m: m.inverse(_t(2, 3, 2, 3, 2)),
        r"NetworkUNet: .*multiple of .* 2, got spatial shape \(2, 3, 2\)",
    ),
    _bad(
        "revnet-spatial",
        _net("NetworkRevNet", 3, HIDDEN, [1, 2], ndim=2),
        lambda m: m(_t(2, 3, 5, 5)),
        r"(?i)spatial size",
    ),
    _bad(
        "hyperbolic-later-squeeze-odd",
        _net("NetworkHyperbolic", 2, [("none", 4), ("squeeze", 4)]),
        lambda m: m(_t(2, 4, 5, 5)),
        r"even spatial size",
    ),
    _bad(
        "hyperbolic-first-squeeze-odd",
        _net("NetworkHyperbolic", 2, [("squeeze", 4), ("none", 4)]),
        lambda m: m(_t(2, 4, 5, 4)),
        r"even spatial size",
    ),
    # wrong channel count
    *[
        _bad(
            f"{short}-{d}-channels",
            make,
            lambda m, d=d, shape=shape: (_INV if d == "inverse" else _FWD)(m, _t(*shape)),
            match.format(xy="y" if d == "inverse" else "x"),
        )
        for short, make, shape, match in [
            ("glow", _net(G, 3, HIDDEN, L=2, K=1), (2, 4, 4, 4), r"NetworkGlow: . must have 3 ch"),
            ("glow-dense", _net(G, 3, HIDDEN, L=2, K=1, ndim=0), (2, 4), r"must have 3 channels"),
            ("hint", _net(H, 3, HIDDEN, L=1, K=1, ndim=1), (2, 2, 4), r"must have 3 channels"),
            ("unet", _net("NetworkUNet", 3, HIDDEN, [1, 1]), (2, 4, 4, 4), r"must have 3 ch"),
            (
                "hyperbolic",
                _net("NetworkHyperbolic", 2, [("none", 4)]),
                (2, 3, 4, 4),
                r"{xy} must have shape \(B, 4, \*, \*\) \(two states of 2 channels\)",
            ),
            (
                "revnet",
                _net("NetworkRevNet", 3, HIDDEN, [1], ndim=2),
                (2, 4, 4, 4),
                r"{xy} must have 3 channels",
            ),
            (
                "revnet-dense",
                _net("NetworkRevNet", 3, HIDDEN, [2], ndim=0),
                (2, 4),
                r"{xy} must have 3 channels",
            ),
        ]
        for d in ("forward", "inverse")
    ],
    _bad(
        "hyperbolic-inverse-output-channels",
        _net("NetworkHyperbolic", 2, [("squeeze", 4)]),
        lambda m: m.inverse(_t(2, 4, 2, 2)),
        r"y must have shape \(B, 16, \*, \*\) \(two states of 8 channels\)",
    ),
    _bad(
        "revnet-inverse-output-channels",
        _net("NetworkRevNet", 3, HIDDEN, [1, 1], ndim=2),
        lambda m: m.inverse(_t(2, 3, 2, 2)),
        r"y must have 12 channels",
    ),
    # wrong rank
    _bad(
        "glow-rank",
        _net(G, 3, HIDDEN, L=1, K=1, ndim=2),
        lambda m: m(_t(2, 3, 4)),
        r"NetworkGlow: x must have layout \(B, C, \*, \*\) \(ndim=2\), got shape \(2, 3, 4\)",
    ),
    _bad(
        "glow-dense-rank-inverse",
        _net(G, 3, HIDDEN, L=2, K=1, ndim=0),
        lambda m: m.inverse(_t(2, 3, 4)),
        r"z must have layout \(B, C\) \(ndim=0\)",
    ),
    _bad(
        "hint-rank",
        _net(H, 3, HIDDEN, L=1, K=1, ndim=3),
        lambda m: m(_t(2, 3, 4, 4)),
        r"NetworkMultiScaleHINT: x must have layout \(B, C, \*, \*, \*\) \(ndim=3\)",
    ),
    _bad(
        "unet-rank",
        _net("NetworkUNet", 3, HIDDEN, [1, 1], ndim=1),
        lambda m: m(_t(2, 3, 4, 4)),
        r"NetworkUNet: x must have layout \(B, C, \*\) \(ndim=1\)",
    ),
    _bad(
        "hyperbolic-rank",
        _net("NetworkHyperbolic", 2, [("none", 4)], ndim=2),
        lambda m: m(_t(2, 4, 4)),
        r"x must have shape \(B, 4, \*, \*\)",
    ),
    _bad(
        "revnet-rank",
        _net("NetworkRevNet", 3, HIDDEN, [1, 1], ndim=2),
        lambda m: m(_t(2, 3, 4)),
        r"x must have layout \(B, C, \*, \*\)",
    ),
    _bad(
        "revnet-dense-rank",
        _net("NetworkRevNet", 3, HIDDEN, [1], ndim=0),
        lambda m: m(_t(2, 3, 4)),
        r"x must have layout \(B, C\)",
    ),
    # dtype, and the reverse-mode entry point validating its point
    _bad(
        "glow-float32",
        _net(G, 3, HIDDEN, L=1, K=1, ndim=1),
        lambda m: m(_t(2, 3, 4, dtype=torch.float32)),
        r"x: expected dtype torch.float64",
        exc=TypeError,
    ),
    _bad(
        "glow-backward-spatial",
        _net(G, 3, HIDDEN, L=2, K=1, ndim=1),
        lambda m: m.backward(_t(2, 3, 6), _t(2, 3, 6)),
        r"multiple of 2\*\*L = 4",
    ),
]


@pytest.mark.parametrize("make,call,exc,match", BAD_INPUTS)
def test_bad_input_raises_clear_error(make, call, exc, match):
    net = make()
    with pytest.raises(exc, match=match):
        call(net)


@pytest.mark.parametrize(
    "make,match",
    [
        # split_scales leaving fewer than 2 channels for a scale's couplings
        (
            lambda: invops.NetworkGlow(1, 4, L=1, K=1, ndim=0, split_scales=True),
            r"NetworkGlow: scale 0 would have 1 channel\(s\); couplings need 2",
        ),
        (
            lambda: invops.NetworkGlow(3, 4, L=3, K=1, ndim=0, split_scales=True),
            r"NetworkGlow: scale 2 would have 1 channel\(s\)",
        ),
        (
            lambda: invops.NetworkGlow(4, 4, L=3, K=1, ndim=0, split_scales=True),
            r"scale 2 would have 1 channel\(s\).*split_scales=False",
        ),
        (
            lambda: invops.NetworkMultiScaleHINT(4, 4, L=3, K=1, ndim=0, split_scales=True),
            r"NetworkMultiScaleHINT: scale 2 would have 1 channel\(s\); HINT needs 2",
        ),
        (lambda: invops.NetworkGlow(1, 4, L=2, K=1, ndim=0), r"scale 0 would have 1 channel"),
        (lambda: invops.NetworkGlow(3, 4, L=0, K=1), r"L and K must be >= 1, got L=0, K=1"),
        (lambda: invops.NetworkGlow(3, 4, L=1, K=0), r"L and K must be >= 1, got L=1, K=0"),
        (lambda: invops.NetworkGlow(3, 4, L=1, K=1, ndim=4), r"ndim must be 0, 1, 2 or 3, got 4"),
        (lambda: invops.NetworkGlow(3, 4, L=1, K=1, squeeze="zz"), r"squeeze: expected one of"),
        (
            lambda: invops.NetworkMultiScaleHINT(3, 4, L=0, K=1),
            r"NetworkMultiScaleHINT: L and K must be >= 1",
        ),
        (lambda: invops.NetworkMultiScaleHINT(3, 4, L=1, K=1, ndim=5), r"ndim must be 0, 1, 2"),
        # hyperbolic architectures
        (lambda: invops.NetworkHyperbolic(2, []), r"architecture must list at least one layer"),
        (
            lambda: invops.NetworkHyperbolic(2, [("shrink", 4)]),
            r"action must be one of \('squeeze', 'none', 'unsqueeze'\), got 'shrink'",
        ),
        (
            lambda: invops.NetworkHyperbolic(2, [("none", 4), ("none",)]),
            r"architecture\[1\] must be \(action, n_hidden\)",
        ),
        (
            lambda: invops.NetworkHyperbolic(
                2, [("squeeze", 4), ("unsqueeze", 4), ("unsqueeze", 4)]
            ),
            r"unsqueeze needs n_in divisible by 4, got 2",
        ),
        (lambda: invops.NetworkHyperbolic(2, [("none", 4)], ndim=0), r"ndim must be 1, 2 or 3"),
        # RevNet blocks
        (lambda: invops.NetworkRevNet(3, 4, []), r"blocks must be positive counts, got \[\]"),
        (lambda: invops.NetworkRevNet(3, 4, [1, 0]), r"blocks must be positive counts"),
        (lambda: invops.NetworkRevNet(3, 4, [-2]), r"blocks must be positive counts"),
        (lambda: invops.NetworkRevNet(1, 4, [1]), r"NetworkRevNet: n_in must be >= 2, got 1"),
        (lambda: invops.NetworkRevNet(3, 4, [1, 1], squeeze="x"), r"squeeze: expected one of"),
        # U-Net
        (lambda: invops.NetworkUNet(3, 4, []), r"NetworkUNet: blocks must be positive counts"),
        (lambda: invops.NetworkUNet(3, 4, [1, 0]), r"blocks must be positive counts"),
        (lambda: invops.NetworkUNet(1, 4, [1]), r"NetworkUNet: n_in must be >= 2, got 1"),
        (lambda: invops.NetworkUNet(3, 4, [1], ndim=0), r"ndim must be 1, 2 or 3, got 0"),
    ],
    ids=[
        "glow-split-c1",
        "glow-split-c3-L3",
        "glow-split-c4-L3",
        "hint-split-c4-L3",
        "glow-dense-c1",
        "glow-L0",
        "glow-K0",
        "glow-ndim",
        "glow-squeeze",
        "hint-L0",
        "hint-ndim",
        "hyp-empty",
        "hyp-action",
        "hyp-entry",
        "hyp-unsqueeze",
        "hyp-ndim",
        "revnet-empty",
        "revnet-zero",
        "revnet-negative",
        "revnet-n_in",
        "revnet-squeeze",
        "unet-empty",
        "unet-zero",
        "unet-n_in",
        "unet-ndim",
    ],
)
def test_bad_construction_raises(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ---------------------------------------------------------------------------------- memory
def _param_bytes(net):
    return sum(p.numel() * p.element_size() for p in net.parameters())


def _peak_of_training_step(net, x, plain):
    with TensorMemoryTracker() as tracker:
        xr = x.clone().requires_grad_()
        with invops.plain_autograd(plain):
            y, logdet = net(xr)
            (0.5 * (y**2).sum() - logdet.sum()).backward()
    return tracker.peak


def test_glow_training_memory_is_flat_in_depth():
    """K=2 vs K=8 steps per scale: the bridge's peak grows by the parameter gradients only."""
    x = torch.randn(8, 2, 16, 16, dtype=torch.float64)
    peaks, plain, params = {}, {}, {}
    for K in (2, 8):
        net = invops.NetworkGlow(2, HIDDEN, L=2, K=K, split_scales=True).double()
        with torch.no_grad():
            net(x)  # ActNorm initialisation outside the measurement
        randomize_parameters(net, scale=SCALE)
        params[K] = _param_bytes(net)
        peaks[K] = _peak_of_training_step(net, x, plain=False)
        plain[K] = _peak_of_training_step(net, x, plain=True)
    assert peaks[8] <= 1.1 * peaks[2] + (params[8] - params[2]), (peaks, params)
    assert plain[8] > 2 * plain[2], plain
    assert peaks[8] < plain[8] / 3, (peaks, plain)


_COND_LOADER = """
import sys
import numpy as np
import pylops
import torch
import invops

torch.set_num_threads(1)
bad = []
for blob in torch.load(sys.argv[1]):
    name, args, kwargs = blob["spec"]
    net = getattr(invops, name)(*args, **kwargs).double()
    net.load_state_dict(blob["state"])
    with torch.no_grad():
        if name == "NetworkLoop":
            op = pylops.MatrixMult(blob["A"].numpy())
            out = net(*blob["inputs"], invops.operators.as_operator(op, model_shape=(4, 4)))
        else:
            out = net(*blob["inputs"])
    if not all(torch.equal(a, b) for a, b in zip(out, blob["out"])):
        bad.append(name)
print("mismatch:", bad)
sys.exit(1 if bad else 0)
"""


def test_conditional_networks_round_trip_in_a_new_process(tmp_path):
    """The same for conditional networks and the i-RIM loop (condition and operator rebuilt)."""
    import numpy as np
    import pylops

    gen = torch.Generator().manual_seed(5)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    specs = [
        (
            ("NetworkConditionalGlow", (1, 2, 3, 2, 1), dict(split_scales=True)),
            (4, 1, 4, 4),
            (4, 2, 4, 4),
        ),
        (("NetworkConditionalHINT", (3, 2, 3, 2), dict(ndim=0)), (4, 3), (4, 2)),
        (
            ("NetworkMultiScaleConditionalHINT", (1, 1, 3, 2, 1), dict(split_scales=True)),
            (4, 1, 4, 4),
            (4, 1, 4, 4),
        ),
    ]
    blobs = []
    for (name, args, kwargs), xs, cs in specs:
        net = getattr(invops, name)(*args, **kwargs).double()
        x, c = rnd(*xs), rnd(*cs)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        for _ in range(2):
            opt.zero_grad()
            z, logdet = net(x, c)
            (0.5 * (z**2).sum() - logdet.sum()).backward()
            opt.step()
        with torch.no_grad():
            out = net(x, c)
        blobs.append(
            dict(spec=(name, args, kwargs), state=net.state_dict(), inputs=(x, c), out=out)
        )
    A = rnd(10, 16)
    loop = invops.NetworkLoop(3, 3, maxiter=2).double()
    op = invops.operators.as_operator(pylops.MatrixMult(A.numpy()), model_shape=(4, 4))
    eta, s, d = rnd(2, 1, 4, 4), rnd(2, 2, 4, 4), rnd(2, 10)
    loop(eta, s, d, op)
    with torch.no_grad():
        out = loop(eta, s, d, op)
    assert np.isfinite(out[0].numpy()).all()
    blobs.append(
        dict(
            spec=("NetworkLoop", (3, 3, 2), {}),
            state=loop.state_dict(),
            inputs=(eta, s, d),
            out=out,
            A=A,
        )
    )
    path = tmp_path / "conditional.pt"
    torch.save(blobs, path)
    _load_in_a_new_process(_COND_LOADER, path)
