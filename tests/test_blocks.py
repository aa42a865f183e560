"""Tests of the non-invertible coupling sub-networks (``invops.layers.blocks``).

ResidualBlock shapes and math (pinned against an explicit ``torch.nn.functional`` formula and a
hand-computed case), ConditionalResidualBlock conditions, TorchBlock and MLPBlock, and the Block
contract (``backward`` / ``vjp`` / ``jvp``) of every block against plain torch autograd and
``torch.func.jvp``.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_parameters

from invops import ConditionalResidualBlock, MLPBlock, ResidualBlock, TorchBlock

DT = torch.float64
TOL = 1e-10
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


pytestmark = pytest.mark.usefixtures("one_thread")


def randn(*shape):
    return torch.randn(*shape, dtype=DT)


def assert_rel(actual, expected, tol=TOL):
    """Equal up to ``tol`` relative to the largest entry of ``expected``."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * max(scale, 1e-300))


# --------------------------------------------------------------------------- explicit formulas
def rb_formula(x, W1, W2, W3, b1, b2, *, p1, s1, p2, s2, out_pad, mode, extra=None):
    """The ResidualBlock of the reference (section 1.2), written with torch.nn.functional."""
    ndim = x.ndim - 2
    bshape = (1, -1) + (1,) * ndim
    y1 = _CONV[ndim](x, W1, stride=s1, padding=p1) + b1.reshape(bshape)
    if extra is not None:
        y1 = y1 + extra
    x2 = F.relu(y1)
    y2 = x2 + _CONV[ndim](x2, W2, stride=s2, padding=p2) + b2.reshape(bshape)
    x3 = F.relu(y2)
    y3 = _CONV_T[ndim](x3, W3, stride=s1, padding=p1, output_padding=out_pad)
    if mode == "linear":
        return y3
    if mode == "relu":
        return F.relu(y3)
    half = y3.shape[1] // 2
    return y3[:, :half] * torch.sigmoid(y3[:, half:])


MODES = {  # mode -> ResidualBlock keyword arguments
    "linear": dict(fan=True, final_activation=False),
    "relu": dict(fan=True, final_activation=True),
    "galu": dict(fan=False),
}


class CondNet(torch.nn.Module):
    """A custom module taking ``(x, c)``, with the condition entering nonlinearly."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(3, 4)
        self.b = torch.nn.Linear(2, 4)
        self.out = torch.nn.Linear(4, 3)
        self.scale = torch.nn.Parameter(torch.randn(3))

    def forward(self, x, c):
        h = torch.tanh(self.a(x) + self.b(c) * x.sum(1, keepdim=True))
        return self.out(h) * self.scale + c.mean(1, keepdim=True)


def _seq():
    return torch.nn.Sequential(
        torch.nn.Conv1d(2, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv1d(4, 3, 3, padding=1)
    )


# name -> (block factory, input shape, condition shapes)
CASES = {
    "rb1d_galu": (lambda: ResidualBlock(2, 3, ndim=1), (2, 2, 5), ()),
    "rb2d_linear": (
        lambda: ResidualBlock(2, 3, n_out=3, fan=True, final_activation=False, ndim=2),
        (2, 2, 3, 4),
        (),
    ),
    "rb3d_relu": (lambda: ResidualBlock(1, 2, fan=True, ndim=3), (2, 1, 2, 3, 2), ()),
    "rb2d_stride2_odd": (
        lambda: ResidualBlock(2, 3, n_out=4, k1=3, p1=1, s1=2, fan=True, final_activation=False),
        (2, 2, 5, 6),
        (),
    ),
    "rb1d_stride4": (lambda: ResidualBlock(2, 3, k1=4, p1=0, s1=4, ndim=1), (2, 2, 8), ()),
    "crb2d_image": (
        lambda: ConditionalResidualBlock(2, 3, 4, n_out=4, fan=True, final_activation=False),
        (2, 2, 3, 4),
        ((2, 3, 3, 4),),
    ),
    "crb1d_dense": (lambda: ConditionalResidualBlock(2, 3, 4, ndim=1), (2, 2, 5), ((2, 3),)),
    "crb3d_image_stride2": (
        lambda: ConditionalResidualBlock(1, 2, 3, k1=3, p1=1, s1=2, fan=True, ndim=3),
        (2, 1, 3, 2, 3),
        ((2, 2, 3, 2, 3),),
    ),
    "torch_sequential": (lambda: TorchBlock(_seq()), (2, 2, 5), ()),
    "torch_cond_module": (lambda: TorchBlock(CondNet()), (4, 3), ((4, 2),)),
    "mlp": (lambda: MLPBlock(3, 5, 2), (4, 3), ()),
    "mlp_cond": (lambda: MLPBlock(5, 5, 2, n_layers=3, activation=torch.tanh), (4, 3), ((4, 2),)),
}


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request):
    factory, xshape, cshapes = CASES[request.param]
    block = factory().to(DT)
    randomize_parameters(block)
    x = randn(*xshape)
    cond = tuple(randn(*s) for s in cshapes)
    dy = randn(*block(x, *cond).shape)
    return block, x, cond, dy


def autograd_grads(block, dy, x, cond):
    """dx, dcond and {param: grad} of <dy, block(x, *cond)> by torch autograd (zeros if unused)."""
    xs = x.detach().clone().requires_grad_()
    cs = [c.detach().clone().requires_grad_() for c in cond]
    params = [p for p in block.parameters() if p.requires_grad]
    y = block(xs, *cs)
    grads = torch.autograd.grad(y, [xs, *cs, *params], dy, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, [xs, *cs, *params])]
    return grads[0], grads[1 : 1 + len(cs)], dict(zip(params, grads[1 + len(cs) :]))


def func_jvp(block, x, cond, dx, dcond, dtheta):
    """torch.func.jvp through functional_call; frozen parameters are constants."""
    trainable = [(n, p) for n, p in block.named_parameters() if p.requires_grad]
    names = [n for n, _ in trainable]
    tangent = dict(zip(block.parameters(), dtheta))

    def f(x_, cond_, params_):
        return torch.func.functional_call(block, dict(zip(names, params_)), (x_, *cond_))

    return torch.func.jvp(
        f,
        (x, tuple(cond), tuple(p.detach() for _, p in trainable)),
        (dx, tuple(dcond), tuple(tangent[p] for _, p in trainable)),
    )


# =========================================================================== Block contract
def test_backward_matches_autograd(case):
    block, x, cond, dy = case
    reference = copy.deepcopy(block)
    xs = x.clone().requires_grad_()
    cs = [c.clone().requires_grad_() for c in cond]
    reference(xs, *cs).backward(dy)

    block.zero_grad(set_to_none=True)
    out = block.backward(dy, x, *cond)
    if cond:
        assert isinstance(out, tuple) and len(out) == 1 + len(cond)
        dx, dcond = out[0], out[1:]
        for d, c in zip(dcond, cs):
            assert_rel(d, c.grad)
    else:
        assert isinstance(out, torch.Tensor)
        dx = out
    assert_rel(dx, xs.grad)
    pairs = list(zip(block.parameters(), reference.parameters()))
    for p, q in pairs:
        if q.grad is None:
            assert p.grad is None
        else:
            assert_rel(p.grad, q.grad)

    # a second call accumulates
    block.backward(dy, x, *cond)
    for p, q in pairs:
        if q.grad is not None:
            assert_rel(p.grad, 2 * q.grad)


def test_vjp_matches_autograd(case):
    block, x, cond, dy = case
    dx_ref, dcond_ref, grads_ref = autograd_grads(block, dy, x, cond)
    block.zero_grad(set_to_none=True)
    out = block.vjp(dy, x, *cond)
    assert len(out) == 2 + len(cond)
    dx, dtheta, dcond = out[0], out[1], out[2:]
    assert_rel(dx, dx_ref)
    for d, r in zip(dcond, dcond_ref):
        assert_rel(d, r)
    params = list(block.parameters())
    assert isinstance(dtheta, tuple) and len(dtheta) == len(params)
    for g, p in zip(dtheta, params):
        assert_rel(g, grads_ref[p])
    assert all(p.grad is None for p in params), "vjp must not touch p.grad"


def test_jvp_matches_torch_func(case):
    block, x, cond, _ = case
    dx = randn(*x.shape)
    dcond = tuple(randn(*c.shape) for c in cond)
    dtheta = tuple(randn(*p.shape) for p in block.parameters())
    y, dy = block.jvp(x, *cond, dx=dx, dtheta=dtheta, dcond=dcond)
    y_ref, dy_ref = func_jvp(block, x, cond, dx, dcond, dtheta)
    assert_rel(y, block(x, *cond))
    assert_rel(y, y_ref)
    assert_rel(dy, dy_ref)


def test_jvp_partial_tangents(case):
    block, x, cond, _ = case
    zeros_x = torch.zeros_like(x)
    zeros_c = tuple(torch.zeros_like(c) for c in cond)
    zeros_t = tuple(torch.zeros_like(p) for p in block.parameters())
    dx = randn(*x.shape)
    dtheta = tuple(randn(*p.shape) for p in block.parameters())

    _, dy = block.jvp(x, *cond)
    assert torch.count_nonzero(dy) == 0
    _, dy = block.jvp(x, *cond, dx=dx)
    assert_rel(dy, func_jvp(block, x, cond, dx, zeros_c, zeros_t)[1])
    _, dy = block.jvp(x, *cond, dtheta=dtheta)
    assert_rel(dy, func_jvp(block, x, cond, zeros_x, zeros_c, dtheta)[1])
    # None entries of dtheta are zero tangents
    partial = (None,) + dtheta[1:]
    _, dy = block.jvp(x, *cond, dtheta=partial)
    assert_rel(dy, func_jvp(block, x, cond, zeros_x, zeros_c, (zeros_t[0],) + dtheta[1:])[1])
    if cond:
        dcond = tuple(randn(*c.shape) for c in cond)
        _, dy = block.jvp(x, *cond, dcond=dcond)
        assert_rel(dy, func_jvp(block, x, cond, zeros_x, dcond, zeros_t)[1])


def test_inputs_not_mutated(case):
    block, x, cond, dy = case
    dx = randn(*x.shape)
    dcond = tuple(randn(*c.shape) for c in cond)
    dtheta = tuple(randn(*p.shape) for p in block.parameters())
    tensors = [x, *cond, dy, dx, *dcond, *dtheta, *block.parameters()]
    saved = [t.detach().clone() for t in tensors]
    block.backward(dy, x, *cond)
    block.vjp(dy, x, *cond)
    block.jvp(x, *cond, dx=dx, dtheta=dtheta, dcond=dcond)
    block(x, *cond)
    for t, s in zip(tensors, saved):
        assert torch.equal(t.detach(), s)
    assert not x.requires_grad and all(not c.requires_grad for c in cond)


def test_frozen_parameters(case):
    block, x, cond, dy = case
    params = list(block.parameters())
    frozen = [params[0], params[-1]]
    for p in frozen:
        p.requires_grad_(False)
    is_frozen = [any(p is f for f in frozen) for p in params]
    dx_ref, dcond_ref, grads_ref = autograd_grads(block, dy, x, cond)

    reference = copy.deepcopy(block)
    reference(x, *cond).backward(dy)  # p.grad as torch sets it (None where frozen or unused)

    block.zero_grad(set_to_none=True)
    out = block.backward(dy, x, *cond)
    assert_rel(out[0] if cond else out, dx_ref)
    for p, q, fz in zip(params, reference.parameters(), is_frozen):
        if fz or q.grad is None:
            assert p.grad is None
        else:
            assert_rel(p.grad, q.grad)

    _, dtheta, *_ = block.vjp(dy, x, *cond)
    for g, p, fz in zip(dtheta, params, is_frozen):
        if fz:
            assert torch.count_nonzero(g) == 0
        else:
            assert_rel(g, grads_ref[p])

    # the tangent of a frozen parameter is ignored
    dx = randn(*x.shape)
    dcond = tuple(randn(*c.shape) for c in cond)
    dtheta = tuple(randn(*p.shape) for p in params)
    masked = tuple(torch.zeros_like(t) if fz else t for t, fz in zip(dtheta, is_frozen))
    _, dy_full = block.jvp(x, *cond, dx=dx, dtheta=dtheta, dcond=dcond)
    _, dy_masked = block.jvp(x, *cond, dx=dx, dtheta=masked, dcond=dcond)
    _, dy_ref = func_jvp(block, x, cond, dx, dcond, dtheta)
    assert_rel(dy_full, dy_ref)
    assert_rel(dy_full, dy_masked)


# =========================================================================== ResidualBlock
SPATIAL = {1: (5,), 2: (3, 4), 3: (2, 3, 2)}


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("mode", list(MODES))
def test_residual_block_shapes(ndim, mode):
    rb = ResidualBlock(2, 3, n_out=6, ndim=ndim, **MODES[mode]).to(DT)
    y = rb(randn(2, 2, *SPATIAL[ndim]))
    assert y.shape == (2, 3 if mode == "galu" else 6, *SPATIAL[ndim])
    assert y.dtype == DT


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_residual_block_default_n_out(ndim):
    x = randn(2, 3, *SPATIAL[ndim])
    assert ResidualBlock(3, 4, ndim=ndim).n_out == 6
    assert ResidualBlock(3, 4, ndim=ndim).to(DT)(x).shape == (2, 3, *SPATIAL[ndim])
    assert ResidualBlock(3, 4, fan=True, ndim=ndim).to(DT)(x).shape == (2, 6, *SPATIAL[ndim])


def test_residual_block_parameters_match_reference():
    # reference order [W1, W2, W3, b1, b2]; torch layouts (out, in, k...) and (in, out, k...)
    rb = ResidualBlock(2, 3, n_out=5, k1=4, k2=1, fan=True, ndim=2)
    names = [n for n, _ in rb.named_parameters()]
    assert names == ["W1", "W2", "W3", "b1", "b2"]
    assert rb.W1.shape == (3, 2, 4, 4)
    assert rb.W2.shape == (3, 3, 1, 1)
    assert rb.W3.shape == (3, 5, 4, 4)
    assert rb.b1.shape == rb.b2.shape == (3,)


@pytest.mark.parametrize(
    "spatial", [(8,), (4, 8), (4, 4, 4), (12,)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("fan", [True, False])
def test_residual_block_stride4(spatial, fan):
    rb = ResidualBlock(2, 3, n_out=4, k1=4, p1=0, s1=4, fan=fan, ndim=len(spatial)).to(DT)
    y = rb(randn(2, 2, *spatial))
    assert y.shape == (2, 4 if fan else 2, *spatial)


@pytest.mark.parametrize(
    "spatial",
    [(1,), (2,), (5,), (6,), (7,), (5, 7), (6, 5), (7, 4), (2, 3), (5, 6, 7), (3, 2, 5)],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("fan", [True, False])
def test_residual_block_stride2_restores_even_and_odd_sizes(spatial, fan):
    rb = ResidualBlock(2, 3, n_out=4, k1=3, p1=1, s1=2, fan=fan, ndim=len(spatial)).to(DT)
    y = rb(randn(2, 2, *spatial))
    assert y.shape == (2, 4 if fan else 2, *spatial)


@pytest.mark.parametrize("spatial", [(3,), (2, 8)], ids=lambda s: "x".join(map(str, s)))
def test_residual_block_unrestorable_size_raises_value_error(spatial):
    rb = ResidualBlock(2, 3, k1=4, p1=0, s1=4, ndim=len(spatial)).to(DT)
    with pytest.raises(ValueError, match="ResidualBlock"):
        rb(randn(1, 2, *spatial))


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("mode", list(MODES))
def test_residual_block_zero_init(ndim, mode):
    rb = ResidualBlock(2, 3, n_out=4, zero_init=True, ndim=ndim, **MODES[mode]).to(DT)
    assert torch.count_nonzero(rb.W3) == 0
    y = rb(randn(2, 2, *SPATIAL[ndim]))
    assert y.shape[1] == (2 if mode == "galu" else 4)
    assert torch.count_nonzero(y) == 0
    # the first layers are not zero, so training can move W3
    assert torch.count_nonzero(rb.W1) > 0


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_residual_block_final_activation(ndim):
    x = randn(2, 2, *SPATIAL[ndim])
    lin = ResidualBlock(2, 3, n_out=4, fan=True, final_activation=False, ndim=ndim).to(DT)
    act = ResidualBlock(2, 3, n_out=4, fan=True, final_activation=True, ndim=ndim).to(DT)
    act.load_state_dict(lin.state_dict())
    y_lin, y_act = lin(x), act(x)
    assert (y_lin < 0).any()
    assert (y_act >= 0).all()
    assert torch.equal(y_act, torch.relu(y_lin))
    # final_activation only applies with fan=True
    g1 = ResidualBlock(2, 3, n_out=4, fan=False, final_activation=True, ndim=ndim).to(DT)
    g0 = ResidualBlock(2, 3, n_out=4, fan=False, final_activation=False, ndim=ndim).to(DT)
    g0.load_state_dict(g1.state_dict())
    assert torch.equal(g1(x), g0(x))


FORMULA_CASES = [
    # ndim, spatial, k1, p1, s1, k2, p2, s2, output_padding of the transposed convolution
    (1, (5,), 3, 1, 1, 3, 1, 1, (0,)),
    (2, (3, 4), 3, 1, 1, 1, 0, 1, (0, 0)),
    (3, (2, 3, 2), 3, 1, 1, 3, 1, 1, (0, 0, 0)),
    (1, (6,), 3, 1, 2, 3, 1, 1, (1,)),
    (2, (5, 6), 3, 1, 2, 3, 1, 1, (0, 1)),
    (2, (8, 4), 4, 0, 4, 3, 1, 1, (0, 0)),
    (3, (4, 5, 7), 3, 1, 2, 1, 0, 1, (1, 0, 0)),
    (1, (7,), 5, 2, 1, 5, 2, 1, (0,)),
]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize(
    "ndim,spatial,k1,p1,s1,k2,p2,s2,out_pad", FORMULA_CASES, ids=[str(c) for c in FORMULA_CASES]
)
def test_residual_block_matches_formula(mode, ndim, spatial, k1, p1, s1, k2, p2, s2, out_pad):
    rb = ResidualBlock(
        2, 3, n_out=4, k1=k1, p1=p1, s1=s1, k2=k2, p2=p2, s2=s2, ndim=ndim, **MODES[mode]
    ).to(DT)
    randomize_parameters(rb)
    x = randn(2, 2, *spatial)
    expected = rb_formula(
        x, rb.W1, rb.W2, rb.W3, rb.b1, rb.b2, p1=p1, s1=s1, p2=p2, s2=s2, out_pad=out_pad, mode=mode
    )
    assert expected.shape[2:] == x.shape[2:]
    assert_rel(rb(x), expected.detach())


def _tiny_rb(**kwargs):
    """n_in=1, n_hidden=1, n_out=2, 1x1 kernels, weights set by hand."""
    rb = ResidualBlock(1, 1, n_out=2, k1=1, k2=1, p1=0, p2=0, ndim=1, **kwargs).to(DT)
    with torch.no_grad():
        rb.W1.fill_(2.0)
        rb.b1.fill_(-1.0)
        rb.W2.fill_(0.5)
        rb.b2.fill_(0.25)
        rb.W3.copy_(torch.tensor([[[3.0], [-1.0]]], dtype=DT))
    return rb


def test_residual_block_hand_computed():
    x = torch.tensor([[[1.0, 0.0, -2.0]]], dtype=DT)
    # Y1 = 2x - 1 = [1, -1, -5]; X2 = [1, 0, 0]; Y2 = 1.5 X2 + 0.25 = [1.75, .25, .25] = X3
    # Y3 = [3 X3; -X3]
    y3 = torch.tensor([[[5.25, 0.75, 0.75], [-1.75, -0.25, -0.25]]], dtype=DT)
    assert_rel(_tiny_rb(fan=True, final_activation=False)(x), y3)
    assert_rel(_tiny_rb(fan=True, final_activation=True)(x), torch.relu(y3))
    sig = [1.0 / (1.0 + math.exp(v)) for v in (1.75, 0.25, 0.25)]  # sigmoid(-X3)
    galu = torch.tensor([[[5.25 * sig[0], 0.75 * sig[1], 0.75 * sig[2]]]], dtype=DT)
    assert_rel(_tiny_rb(fan=False)(x), galu)


@pytest.mark.parametrize(
    "k2,p2,s2,spatial",
    [
        (1, 1, 1, (1,)),  # hidden size 1 grows to 3
        (1, 1, 1, (1, 1)),
        pytest.param(1, 1, 1, (5, 6), id="grow"),
        pytest.param(3, 0, 1, (5, 6), id="shrink"),
        pytest.param(3, 1, 2, (5, 6), id="s2"),
        pytest.param(5, 0, 1, (3,), id="k2-too-large"),
        pytest.param(3, 0, 1, (3,), id="shrink-to-1"),
        pytest.param(3, 0, 2, (4, 4), id="s2-to-1"),
    ],
)
def test_residual_block_inner_shape_change_raises(k2, p2, s2, spatial):
    rb = ResidualBlock(2, 3, k2=k2, p2=p2, s2=s2, ndim=len(spatial)).to(DT)
    with pytest.raises(ValueError, match="inner convolution.*preserve the hidden shape"):
        rb(randn(2, 2, *spatial))


@pytest.mark.parametrize(
    "shape",
    [(2, 3, 4, 4), (2, 1, 4, 4), (2, 2, 4), (2, 2, 4, 4, 4), (2, 4, 4), (2, 2)],
    ids=["channels+", "channels-", "rank1d", "rank3d", "unbatched", "dense"],
)
def test_residual_block_wrong_input_raises(shape):
    rb = ResidualBlock(2, 3, ndim=2).to(DT)
    with pytest.raises(ValueError, match=r"ResidualBlock: x must have shape \(B, 2, \*, \*\)"):
        rb(randn(*shape))


def test_residual_block_constructor_errors():
    with pytest.raises(ValueError, match="even n_out"):
        ResidualBlock(2, 3, n_out=5, fan=False)
    ResidualBlock(2, 3, n_out=5, fan=True)  # odd n_out is fine with fan=True
    for ndim in (0, 4):
        with pytest.raises(ValueError, match="ndim must be 1, 2 or 3"):
            ResidualBlock(2, 3, ndim=ndim)
        with pytest.raises(ValueError, match="ndim must be 1, 2 or 3"):
            ConditionalResidualBlock(2, 2, 3, ndim=ndim)
    with pytest.raises(ValueError, match="channel counts"):
        ResidualBlock(0, 3)
    with pytest.raises(ValueError, match="n_cond"):
        ConditionalResidualBlock(2, 0, 3)


# ============================================================== ConditionalResidualBlock
@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("kind", ["image", "dense"])
@pytest.mark.parametrize("mode", list(MODES))
def test_conditional_residual_block_matches_formula(ndim, kind, mode):
    spatial = {1: (7,), 2: (5, 4), 3: (3, 2, 3)}[ndim]
    crb = ConditionalResidualBlock(2, 3, 4, n_out=4, k1=3, p1=1, s1=2, ndim=ndim, **MODES[mode]).to(
        DT
    )
    randomize_parameters(crb)
    x = randn(2, 2, *spatial)
    if kind == "image":
        c = randn(2, 3, *spatial)
        extra = _CONV[ndim](c, crb.W0, stride=2, padding=1)
    else:
        c = randn(2, 3)
        # a vector condition is a constant image of the input's size, convolved like one
        constant = c.reshape(2, 3, *(1,) * ndim).expand(2, 3, *spatial)
        extra = _CONV[ndim](constant, crb.W0, stride=2, padding=1)
    out_pad = tuple((n - 1) % 2 for n in spatial)  # k1=3, p1=1, s1=2
    expected = rb_formula(
        x, crb.W1, crb.W2, crb.W3, crb.b1, crb.b2, p1=1, s1=2, p2=1, s2=1,
        out_pad=out_pad, mode=mode, extra=extra,
    )  # fmt: skip
    y = crb(x, c)
    assert y.shape == (2, 2 if mode == "galu" else 4, *spatial)
    assert_rel(y, expected.detach())
    # the condition matters
    assert not torch.allclose(y, crb(x, 2 * c))


@pytest.mark.parametrize(
    "cshape",
    [(3, 2, 4, 5), (3, 4, 4, 5), (3, 3, 4, 6), (3, 3, 5, 5), (3, 3, 4), (3, 2), (3, 4), (2, 3)],
    ids=[
        "image-channels-",
        "image-channels+",
        "image-width",
        "image-height",
        "image-rank",
        "dense-channels-",
        "dense-channels+",
        "dense-batch",
    ],
)
def test_conditional_residual_block_condition_errors(cshape):
    crb = ConditionalResidualBlock(2, 3, 4, ndim=2).to(DT)
    with pytest.raises(ValueError) as err:
        crb(randn(3, 2, 4, 5), randn(*cshape))
    msg = str(err.value)
    assert "(3, 3)" in msg and "(3, 3, 4, 5)" in msg and str(cshape) in msg


def test_conditional_residual_block_image_batch_mismatch_raises_value_error():
    crb = ConditionalResidualBlock(2, 3, 4, ndim=2).to(DT)
    with pytest.raises(ValueError, match=r"\(3, 3, 4, 5\)"):
        crb(randn(3, 2, 4, 5), randn(2, 3, 4, 5))


def test_conditional_residual_block_image_batch_one_rejected():
    crb = ConditionalResidualBlock(2, 3, 4, ndim=2).to(DT)
    with pytest.raises(ValueError, match=r"\(3, 3, 4, 5\)"):
        crb(randn(3, 2, 4, 5), randn(1, 3, 4, 5))


def test_conditional_residual_block_wrong_input_raises():
    crb = ConditionalResidualBlock(2, 3, 4, ndim=2).to(DT)
    with pytest.raises(ValueError, match="ConditionalResidualBlock: x must have shape"):
        crb(randn(3, 1, 4, 5), randn(3, 3))
    with pytest.raises(ValueError, match="ConditionalResidualBlock: x must have shape"):
        crb(randn(3, 2, 4), randn(3, 3))


# =========================================================================== TorchBlock / MLPBlock
@pytest.mark.parametrize(
    "obj", [lambda x: x, torch.zeros(3), None, torch.relu], ids=["lambda", "tensor", "None", "fn"]
)
def test_torch_block_rejects_non_module(obj):
    with pytest.raises(TypeError, match="TorchBlock: expected a torch.nn.Module"):
        TorchBlock(obj)


def test_torch_block_wraps_module():
    net = _seq().to(DT)
    tb = TorchBlock(net)
    assert [id(p) for p in tb.parameters()] == [id(p) for p in net.parameters()]
    x = randn(2, 2, 5)
    assert torch.equal(tb(x), net(x))
    cn = CondNet().to(DT)
    x, c = randn(4, 3), randn(4, 2)
    assert torch.equal(TorchBlock(cn)(x, c), cn(x, c))


def test_mlp_block_matches_formula():
    mlp = MLPBlock(5, 4, 2, n_layers=2, activation=torch.tanh).to(DT)
    randomize_parameters(mlp)
    x, c = randn(3, 3), randn(3, 2)
    h = torch.cat([x, c], dim=1)
    for layer in mlp.layers[:-1]:
        h = torch.tanh(h @ layer.weight.T + layer.bias)
    expected = h @ mlp.layers[-1].weight.T + mlp.layers[-1].bias
    assert len(mlp.layers) == 3
    assert_rel(mlp(x, c), expected.detach())


def test_mlp_block_zero_init():
    x, c = randn(4, 3), randn(4, 2)
    assert torch.count_nonzero(MLPBlock(3, 5, 2, zero_init=True).to(DT)(x)) == 0
    y = MLPBlock(5, 5, 2, zero_init=True).to(DT)(x, c)
    assert y.shape == (4, 2) and torch.count_nonzero(y) == 0
    assert torch.count_nonzero(MLPBlock(3, 5, 2).to(DT)(x)) > 0


@pytest.mark.parametrize(
    "shapes",
    [((4, 4),), ((4, 2),), ((4, 3, 1),), ((4, 3), (4, 1)), ((4, 3), (4, 3)), ((4, 1), (4, 2))],
    ids=["x+", "x-", "rank3", "cond-", "cond+", "x-cond"],
)
def test_mlp_block_wrong_features_raises(shapes):
    n_in = 3 if len(shapes) == 1 else 5
    mlp = MLPBlock(n_in, 4, 2).to(DT)
    with pytest.raises(ValueError, match=rf"MLPBlock: .*shape \(B, {n_in}\)"):
        mlp(*(randn(*s) for s in shapes))


def test_mlp_block_constructor_errors():
    for args in [(0, 4, 2), (3, 0, 2), (3, 4, 0)]:
        with pytest.raises(ValueError, match="MLPBlock: sizes must be >= 1"):
            MLPBlock(*args)
    with pytest.raises(ValueError, match="MLPBlock: sizes must be >= 1"):
        MLPBlock(3, 4, 2, n_layers=0)
