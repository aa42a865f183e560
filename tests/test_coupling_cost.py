"""Cost and gradient-quality guarantees of the coupling layers.

1. The cost bar: in ``backward``, ``vjp``, ``backward_inverse`` and the autograd bridge, every
   sub-network (conditioner) of a coupling layer is evaluated exactly once, and that evaluation
   is the one backpropagated. Counted per weight at the aten level with a ``TorchDispatchMode``;
   a control shows that the counter catches a naive two-evaluation reverse pass.
2. HINT with 6, 7 and 12 channels: every branch of the recursion owns its weights and receives
   its own, correct gradient.
3. A float32 stack of 64 (ActNorm, Conv1x1, coupling) blocks inverts to 1e-4, and its
   memory-free gradients agree with plain float32 autograd and with a float64 copy to 1e-3
   (the default SiLU conditioners; ReLU conditioners to 1e-2, see the test). Figures: ``pytest -s``.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from conftest import randomize_parameters
from torch.autograd.function import BackwardCFunction
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import invops
from invops.layers.coupling import Coupling
from invops.module import Chain, InvertibleModule, Parallel

aten = torch.ops.aten

# ---------------------------------------------------------------------------------------------
# 1. the cost bar
# ---------------------------------------------------------------------------------------------

# ops that apply a weight to data: an evaluation of the sub-network when run outside autograd's
# backward formulas, a backpropagation through it when run inside one
_APPLY_OPS = {
    aten.convolution.default,  # F.conv*d and F.conv_transpose*d (transposed=True)
    aten.addmm.default,  # F.linear with bias on CPU: addmm(b, x, W.t())
    aten.mm.default,  # F.linear without bias, x @ W.T
    aten.bmm.default,
    aten.baddbmm.default,
    aten.mv.default,
    aten.addmv.default,
    aten.linear.default,
    aten.matmul.default,
}
_BACKWARD_OPS = _APPLY_OPS | {aten.convolution_backward.default}


def _storage_key(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return 0


class WeightCallCounter(TorchDispatchMode):
    """Count, per weight, the aten calls that apply it (evaluations) and backpropagate it.

    A weight is identified by its storage, so views (``W.t()`` inside ``F.linear``) count as the
    weight. An op runs inside a backward formula when autograd's current node is a built-in one
    (``ConvolutionBackward0``, ``AddmmBackward0``, ...); the backward of a custom
    ``autograd.Function`` (the memory-free bridge) is user code, where an evaluation is an
    evaluation.
    """

    def __init__(self, weights: dict[int, str]) -> None:
        super().__init__()
        self.weights = weights
        self.evals: Counter = Counter()
        self.backprops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = tree_flatten((args, kwargs))[0]
        # shape probes on the meta device (input validation) compute nothing
        on_meta = any(isinstance(t, torch.Tensor) and t.is_meta for t in flat)
        if func in _BACKWARD_OPS and not on_meta:
            hit = set()
            for t in flat:
                if isinstance(t, torch.Tensor):
                    name = self.weights.get(_storage_key(t))
                    if name is not None:
                        hit.add(name)
            if hit:
                node = torch._C._current_autograd_node()
                in_formula = node is not None and not isinstance(node, BackwardCFunction)
                if in_formula:
                    self.backprops.update(hit)
                elif func in _APPLY_OPS:
                    self.evals.update(hit)
        return func(*args, **kwargs)


def conditioner_weights(layer: torch.nn.Module) -> dict[int, str]:
    """Storage key -> name of every matrix/kernel of every coupling's sub-network.

    Includes the couplings inside ConditionalLayerHINT's condition lane (its ``cond_transform``).
    """
    ids = set()
    for m in layer.modules():
        if isinstance(m, Coupling):
            ids |= {id(p) for p in m.subnet.parameters() if p.ndim >= 2}
    return {
        _storage_key(p): name for name, p in layer.named_parameters() if id(p) in ids and p.numel()
    }


def _rand(shape, dtype, gen):
    return torch.randn(shape, generator=gen, dtype=dtype)


def _zero_grads(layer):
    for p in layer.parameters():
        p.grad = None


def measure_modes(layer, x, cond):
    """Per-weight (evals, backprops) for the forward pass and every reverse mode."""
    weights = conditioner_weights(layer)
    gen = torch.Generator().manual_seed(7)
    out = {}

    def counted(name, fn):
        counter = WeightCallCounter(weights)
        with counter:
            res = fn()
        out[name] = (dict(counter.evals), dict(counter.backprops))
        return res

    with torch.no_grad():
        y, _ = counted("forward", lambda: layer(x, *cond))
        counted("inverse", lambda: layer.inverse(y, *cond))
    dy, dld = _rand(y.shape, x.dtype, gen), _rand(y.shape[:1], x.dtype, gen)
    dx, dld_inv = _rand(x.shape, x.dtype, gen), _rand(x.shape[:1], x.dtype, gen)

    _zero_grads(layer)
    counted("backward", lambda: layer.backward(dy, y, *cond, dlogdet=dld))
    counted("vjp", lambda: layer.vjp(dy, y, *cond, dlogdet=dld))
    counted("backward_inverse", lambda: layer.backward_inverse(dx, x, *cond, dlogdet=dld_inv))

    # the autograd bridge: only loss.backward() is counted
    for inverse in (False, True):
        _zero_grads(layer)
        inp = (y if inverse else x).clone().requires_grad_()
        cond_r = [c.clone().requires_grad_() for c in cond]
        o, ld = (layer.inverse if inverse else layer)(inp, *cond_r)
        assert o.grad_fn is not None and "MemoryFree" in type(o.grad_fn).__name__
        cot, cot_ld = (dx, dld_inv) if inverse else (dy, dld)
        loss = (o * cot).sum() + (ld * cot_ld).sum()
        counted("bridge_inverse" if inverse else "bridge", loss.backward)

    # plain autograd, forward and backward: one evaluation and one backpropagation per weight
    _zero_grads(layer)

    def plain():
        inp = x.clone().requires_grad_()
        cond_r = [c.clone().requires_grad_() for c in cond]
        with invops.plain_autograd():
            o, ld = layer(inp, *cond_r)
            ((o * dy).sum() + (ld * dld).sum()).backward()

    counted("plain_autograd", plain)
    _zero_grads(layer)
    return weights, out


REVERSE_MODES = ("backward", "vjp", "backward_inverse", "bridge", "bridge_inverse")


def _additive_dense():
    F = torch.nn.Linear(2, 2)
    G = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    return invops.AdditiveCoupling(4, F, G, ndim=0)


def _additive_conv():
    F = torch.nn.Conv2d(2, 2, 3, padding=1)
    G = invops.ResidualBlock(2, 4, n_out=2, fan=True, final_activation=False)
    return invops.AdditiveCoupling(4, F, G, ndim=2)


# name: (builder, x shape, condition shape or None)
CASES = {
    "basic_2d": (lambda: invops.CouplingLayerBasic(4, 6), (2, 4, 8, 8), None),
    "basic_1d_odd": (lambda: invops.CouplingLayerBasic(5, 6, ndim=1), (2, 5, 8), None),
    "basic_dense": (lambda: invops.CouplingLayerBasic(5, 6, ndim=0), (3, 5), None),
    "glow_2d": (lambda: invops.CouplingLayerGlow(4, 6), (2, 4, 8, 8), None),
    "glow_3d": (lambda: invops.CouplingLayerGlow(3, 4, ndim=3), (2, 3, 4, 4, 4), None),
    "glow_dense": (lambda: invops.CouplingLayerGlow(3, 8, ndim=0), (5, 3), None),
    "hint5": (lambda: invops.CouplingLayerHINT(5, 4), (2, 5, 6, 6), None),
    "hint7_none": (lambda: invops.CouplingLayerHINT(7, 4), (2, 7, 6, 6), None),
    "hint7_lower": (lambda: invops.CouplingLayerHINT(7, 4, permute="lower"), (2, 7, 6, 6), None),
    "hint7_both": (lambda: invops.CouplingLayerHINT(7, 4, permute="both"), (2, 7, 6, 6), None),
    "hint7_full": (lambda: invops.CouplingLayerHINT(7, 4, permute="full"), (2, 7, 6, 6), None),
    "hint12_none": (lambda: invops.CouplingLayerHINT(12, 4), (2, 12, 4, 4), None),
    "hint12_both": (lambda: invops.CouplingLayerHINT(12, 4, permute="both"), (2, 12, 4, 4), None),
    "hint6_dense": (lambda: invops.CouplingLayerHINT(6, 8, ndim=0), (4, 6), None),
    "irim_2d": (lambda: invops.CouplingLayerIRIM(4, 6), (2, 4, 8, 8), None),
    # every law: additive and spline through the generic coupling (negate: hyperbolic layers)
    "basic_additive_dense": (
        lambda: invops.CouplingLayerBasic(4, 6, ndim=0, law="additive"),
        (3, 4),
        None,
    ),
    "spline_1d": (lambda: invops.CouplingLayerSpline(3, 6, bins=4, ndim=1), (2, 3, 8), None),
    "glow_spline_2d": (lambda: invops.CouplingLayerGlow(4, 6, law="spline"), (2, 4, 6, 6), None),
    "hint_spline": (lambda: invops.CouplingLayerHINT(5, 4, law="spline"), (2, 5, 4, 4), None),
    "hyperbolic_none": (lambda: invops.HyperbolicLayer(2, 4), (2, 4, 8, 8), None),
    "hyperbolic_squeeze": (
        lambda: invops.HyperbolicLayer(2, 4, action="squeeze"),
        (2, 4, 8, 8),
        None,
    ),
    "hyperbolic_unsqueeze": (
        lambda: invops.HyperbolicLayer(4, 4, action="unsqueeze"),
        (2, 8, 8, 8),
        None,
    ),
    "additive_conv": (_additive_conv, (2, 4, 6, 6), None),
    "additive_dense": (_additive_dense, (5, 4), None),
    "cond_glow_image": (lambda: invops.ConditionalLayerGlow(4, 3, 6), (2, 4, 6, 6), (2, 3, 6, 6)),
    "cond_glow_vector": (lambda: invops.ConditionalLayerGlow(4, 3, 6), (2, 4, 6, 6), (2, 3)),
    "cond_glow_dense": (lambda: invops.ConditionalLayerGlow(4, 3, 6, ndim=0), (5, 4), (5, 3)),
    "cond_hint": (lambda: invops.ConditionalLayerHINT(4, 3, 4), (2, 4, 6, 6), (2, 3, 6, 6)),
    "cond_hint_nopermute_deep": (
        lambda: invops.ConditionalLayerHINT(6, 5, 4, permute=False),
        (2, 6, 4, 4),
        (2, 5, 4, 4),
    ),
    "cond_hint_dense": (lambda: invops.ConditionalLayerHINT(5, 6, 8, ndim=0), (4, 5), (4, 6)),
}


def build_case(name, dtype=torch.float64):
    builder, xshape, cshape = CASES[name]
    torch.manual_seed(3)
    layer = builder().to(dtype)
    randomize_parameters(layer, scale=0.1)
    gen = torch.Generator().manual_seed(11)
    x = _rand(xshape, dtype, gen)
    cond = () if cshape is None else (_rand(cshape, dtype, gen),)
    return layer, x, cond


def _unused_ok(name: str) -> bool:
    # ConditionalResidualBlock holds a kernel for image conditions and a matrix for vector
    # conditions; only one of them is used for a given condition shape
    return name.endswith(".W0")


def _profile(counts: dict) -> str:
    """Compact per-weight counts: ``"1x9"`` is nine weights called once each."""
    by_value = Counter(counts.values())
    return "+".join(f"{v}x{n}" for v, n in sorted(by_value.items())) or "0"


@pytest.mark.parametrize("case", list(CASES))
def test_reverse_pass_evaluates_each_subnetwork_once(case):
    layer, x, cond = build_case(case)
    weights, counts = measure_modes(layer, x, cond)
    assert weights, "no conditioner weight found: the test would be vacuous"
    fwd_evals, _ = counts["forward"]
    unused = set(weights.values()) - set(fwd_evals)
    assert all(_unused_ok(n) for n in unused), f"weights never evaluated in forward: {unused}"
    assert fwd_evals, "the forward pass evaluated no conditioner weight"
    rows = [f"{case}: {len(fwd_evals)} weights, forward {_profile(fwd_evals)}"]
    # the plain-autograd baseline: one evaluation, its backpropagation
    plain_evals, plain_backprops = counts["plain_autograd"]
    assert plain_evals == fwd_evals
    assert set(plain_backprops) == set(fwd_evals)
    assert counts["inverse"][0] == fwd_evals
    for mode in REVERSE_MODES:
        evals, backprops = counts[mode]
        rows.append(f"{mode} {_profile(evals)}/{_profile(backprops)}")
        over = {n: (evals.get(n, 0), c) for n, c in fwd_evals.items() if evals.get(n, 0) > c}
        assert not over, f"{mode}: sub-network evaluated more often than in forward: {over}"
        # ... and not fewer: the reverse pass must evaluate (and backpropagate) every weight
        assert evals == fwd_evals, f"{mode}: {evals} != forward {fwd_evals}"
        assert backprops == plain_backprops, f"{mode}: {backprops} != {plain_backprops}"
    print("; ".join(rows))


def test_conditional_hint_condition_lane_counted_once():
    layer, x, cond = build_case("cond_hint_nopermute_deep")
    lane_ids = {id(p) for p in layer.y_lane.parameters() if p.ndim >= 2}
    weights, counts = measure_modes(layer, x, cond)
    names = {n for n, p in layer.named_parameters() if id(p) in lane_ids}
    lane = {n for n in weights.values() if n in names}
    # HINT(5): 3 couplings, each with a 3-kernel residual block
    assert len(lane) == 9, lane
    for mode in ("forward", *REVERSE_MODES):
        evals, backprops = counts[mode]
        assert {n: evals.get(n) for n in lane} == dict.fromkeys(lane, 1), mode
        if mode != "forward":
            assert {n: backprops.get(n) for n in lane} == dict.fromkeys(lane, 1), mode


def _naive_reverse(layer, y, cond, dy, dld):
    """What InvertibleNetworks.jl and MemCNN do: invert without a graph, then redo the forward
    pass with one, and backpropagate it."""
    with torch.no_grad():
        x, _ = layer.inverse(y, *cond)
    x = x.requires_grad_()
    with invops.plain_autograd():
        out, ld = layer(x, *cond)
        ((out * dy).sum() + (ld * dld).sum()).backward()
    return x.grad


@pytest.mark.parametrize(
    "case", ["basic_2d", "glow_dense", "hint7_both", "hyperbolic_none", "cond_hint"]
)
def test_counter_detects_a_two_evaluation_reverse_pass(case, monkeypatch):
    layer, x, cond = build_case(case)
    weights = conditioner_weights(layer)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad(), WeightCallCounter(weights) as fwd:
        y, _ = layer(x, *cond)
    dy, dld = _rand(y.shape, x.dtype, gen), _rand(y.shape[:1], x.dtype, gen)
    doubled = {n: 2 * c for n, c in fwd.evals.items()}

    with WeightCallCounter(weights) as naive:
        _naive_reverse(layer, y, cond, dy, dld)
    assert dict(naive.evals) == doubled

    # the library's generic reverse pass (invert without a graph, then backpropagate a fresh
    # local forward) in place of the coupling's one-evaluation pass: the counter must see it
    _zero_grads(layer)
    monkeypatch.setattr(Coupling, "_pullback", InvertibleModule._pullback)
    monkeypatch.setattr(Coupling, "_pullback_inverse", InvertibleModule._pullback_inverse)
    with WeightCallCounter(weights) as generic:
        layer.backward(dy, y, *cond, dlogdet=dld)
    assert dict(generic.evals) == doubled
    assert any(generic.evals[n] > c for n, c in fwd.evals.items())  # the cost bar would fail


def test_counter_sees_transposed_convolution_and_linear():
    conv = torch.nn.Parameter(torch.randn(4, 2, 3, 3))
    lin = torch.nn.Linear(3, 5)
    weights = {_storage_key(conv): "conv", _storage_key(lin.weight): "lin"}
    x = torch.randn(2, 2, 5, 5, requires_grad=True)
    v = torch.randn(7, 3, requires_grad=True)
    with WeightCallCounter(weights) as c:
        h = torch.nn.functional.conv2d(x, conv, padding=1)
        back = torch.nn.functional.conv_transpose2d(h, conv, padding=1)
        out = lin(v)
        nobias = v @ lin.weight.T
    assert dict(c.evals) == {"conv": 2, "lin": 2} and not c.backprops
    with WeightCallCounter(weights) as c:
        (back.sum() + out.sum() + nobias.sum()).backward()
    assert not c.evals and dict(c.backprops) == {"conv": 2, "lin": 2}


# ---------------------------------------------------------------------------------------------
# 2. HINT: every branch has its own weights and gradient
# ---------------------------------------------------------------------------------------------


def hint_tree(n: int, offset: int = 0, threshold: int = 4) -> list[tuple[int, int]]:
    """(offset, channels) of every coupling of HINT(n), in application order."""
    n_a = (n + 1) // 2
    out = [(offset, n)]
    if n > threshold:
        out += hint_tree(n_a, offset, threshold) if n_a >= 2 else []
        out += hint_tree(n - n_a, offset + n_a, threshold) if n - n_a >= 2 else []
    return out


def coupling_spans(module, offset=0):
    """(coupling, channel offset) of every coupling, walking the Chain/Parallel structure."""
    if isinstance(module, Coupling):
        yield module, offset
    elif isinstance(module, Parallel):
        for lane, size in zip(module.lanes, module.sizes):
            yield from coupling_spans(lane, offset)
            offset += size
    elif isinstance(module, Chain):
        for m in module.layers:
            yield from coupling_spans(m, offset)


def sibling_pairs(module):
    """Every Parallel of the tree: its two lanes."""
    return [tuple(m.lanes) for m in module.modules() if isinstance(m, Parallel)]


def build_hint(n, permute="none"):
    torch.manual_seed(0)
    layer = invops.CouplingLayerHINT(n, 4, permute=permute).double()
    randomize_parameters(layer, scale=0.3, seed=n)
    gen = torch.Generator().manual_seed(100 + n)
    x = _rand((3, n, 5, 4), torch.float64, gen)
    return layer, x, gen


@pytest.mark.parametrize("n, expected", [(6, 3), (7, 3), (12, 7)])
@pytest.mark.parametrize("permute", ["none", "both"])
def test_hint_every_branch_owns_its_weights(n, expected, permute):
    layer, _, _ = build_hint(n, permute)
    couplings = layer.couplings()
    spans = list(coupling_spans(layer))
    assert len(couplings) == expected == len(hint_tree(n))
    assert [c for c, _ in spans] == couplings
    assert [(o, c.n_channels) for c, o in spans] == hint_tree(n)
    subnet_params = [p for c in couplings for p in c.subnet.parameters()]
    assert len({id(p) for p in subnet_params}) == len(subnet_params)
    assert len({_storage_key(p) for p in subnet_params}) == len(subnet_params)
    all_params = list(layer.parameters())
    assert len({_storage_key(p) for p in all_params}) == len(all_params)
    n_mixers = {"none": 0, "both": 1}[permute]  # only the top block mixes
    assert len(all_params) == len(subnet_params) + n_mixers


def _plain_grads(layer, x, dy, dld):
    params = list(layer.parameters())
    xr = x.clone().requires_grad_()
    with invops.plain_autograd():
        y, ld = layer(xr)
        loss = (y * dy).sum() + (ld * dld).sum()
        grads = torch.autograd.grad(loss, [xr, *params])
    return grads[0], dict(zip(params, grads[1:]))


@pytest.mark.parametrize("n", [6, 7, 12])
@pytest.mark.parametrize("permute", ["none", "both"])
def test_hint_branch_gradients_match_autograd(n, permute):
    layer, x, gen = build_hint(n, permute)
    with torch.no_grad():
        y, _ = layer(x)
    dy, dld = _rand(y.shape, x.dtype, gen), _rand(y.shape[:1], x.dtype, gen)
    ref_dx, ref = _plain_grads(layer, x, dy, dld)
    _zero_grads(layer)
    dx, x_rec = layer.backward(dy, y, dlogdet=dld)
    assert torch.allclose(x_rec, x, rtol=0, atol=1e-12)
    assert float((dx - ref_dx).abs().max()) <= 1e-8 * float(ref_dx.abs().max())
    for name, p in layer.named_parameters():
        assert p.grad is not None, f"{name}: no gradient"
        g = ref[p]
        scale = float(g.abs().max())
        assert scale > 0, f"{name}: zero reference gradient"
        err = float((p.grad - g).abs().max()) / scale
        assert err <= 1e-8, f"{name}: relative error {err:.2e}"
    # siblings: their own gradients, different from each other (weight tying would equalise
    # them, or keep one branch's gradient for both)
    pairs = sibling_pairs(layer)
    assert len(pairs) == {6: 1, 7: 1, 12: 3}[n]
    compared = 0
    for a, b in pairs:
        for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
            assert na == nb
            if pa.shape != pb.shape:
                continue
            compared += 1
            assert pa is not pb
            diff = float((pa.grad - pb.grad).abs().max())
            assert diff > 1e-3 * max(float(pa.grad.abs().max()), float(pb.grad.abs().max()))
    assert compared >= 3


@pytest.mark.parametrize("n", [6, 7, 12])
@pytest.mark.parametrize("permute", ["none", "full"])
def test_hint_branch_perturbation_changes_only_its_subtree(n, permute):
    """Perturbing one coupling's conditioner changes exactly its changed channels' subtree.

    A coupling at channel offset ``o`` on ``c`` channels changes its last ``c - ceil(c/2)``
    channels, which the rest of the tree keeps inside ``[o + ceil(c/2), o + c)``. Mixing is
    inside a block, before its coupling (``"full"``), so it does not widen the range.
    """
    layer, x, _ = build_hint(n, permute)
    with torch.no_grad():
        y0, _ = layer(x)
        for coupling, offset in coupling_spans(layer):
            lo, hi = offset + coupling.n_first, offset + coupling.n_channels
            saved = [p.clone() for p in coupling.subnet.parameters()]
            for p in coupling.subnet.parameters():
                p.add_(0.05 * torch.randn_like(p))
            y1, _ = layer(x)
            for p, s in zip(coupling.subnet.parameters(), saved):
                p.copy_(s)
            change = (y1 - y0).abs().amax(dim=(0, 2, 3))
            inside = torch.zeros(n, dtype=torch.bool)
            inside[lo:hi] = True
            assert torch.all(change[~inside] == 0), (offset, coupling.n_channels, change)
            assert torch.all(change[inside] > 1e-6), (offset, coupling.n_channels, change)


# ---------------------------------------------------------------------------------------------
# 3. float32: a deep stack inverts and differentiates accurately
# ---------------------------------------------------------------------------------------------

DEPTH = 64


def deep_stack(kind: str, channels: int, activation: str, seed: int = 0) -> invops.Chain:
    """64 blocks (ActNorm, Conv1x1, coupling) in float32, non-trivial and well-conditioned.

    The conditioners start at zero (identity couplings), so every coupling is randomised (scale
    0.05) first; the ActNorms are then initialised from data on the actual network, as in
    training, which keeps every block's input normalised.
    """
    torch.manual_seed(seed)
    blocks = []
    for i in range(DEPTH):
        act = {"relu": torch.relu, "silu": None}[activation]  # None: the default, SiLU
        if kind == "glow":
            coupling = invops.CouplingLayerGlow(channels, 8, activation=act)
        else:
            coupling = invops.CouplingLayerHINT(channels, 8, activation=act)
        randomize_parameters(coupling, scale=0.05, seed=i + 100 * seed)
        blocks.append(invops.Chain(invops.ActNorm(channels), invops.Conv1x1(channels), coupling))
    net = invops.Chain(*blocks)
    expected = torch.relu if activation == "relu" else torch.nn.functional.silu
    assert all(
        m.activation is expected for m in net.modules() if isinstance(m, invops.ResidualBlock)
    )
    return net


def _flat(ts):
    return torch.cat([t.double().reshape(-1) for t in ts])


def _grad_errors(got, ref):
    """(global relative L2, max per-tensor relative max-norm) of ``got`` against ``ref``."""
    glob = float((_flat(got) - _flat(ref)).norm() / _flat(ref).norm())
    per = max(
        float((a.double() - b.double()).abs().max() / b.double().abs().max())
        for a, b in zip(got, ref)
    )
    return glob, per


def _plain_grads_of(module, x, dy, dld):
    params = list(module.parameters())
    xr = x.clone().requires_grad_()
    with invops.plain_autograd():
        out, logdet = module(xr)
        loss = (out * dy).sum() + (logdet * dld).sum()
        return list(torch.autograd.grad(loss, [xr, *params]))


def _memory_free_grads(module, y, dy, dld):
    _zero_grads(module)
    dx, x_rec = module.backward(dy, y, dlogdet=dld)
    grads = [dx, *(p.grad for p in module.parameters())]
    _zero_grads(module)
    return grads, x_rec


@pytest.mark.parametrize("activation", ["relu", "silu"])
@pytest.mark.parametrize("kind, channels", [("glow", 4), ("hint", 5)])
def test_float32_deep_stack_inverts_and_differentiates(kind, channels, activation):
    """Inversion to 1e-4 and memory-free gradients within 1e-3 of plain autograd (float32).

    ``silu`` is the default conditioner nonlinearity and ``relu`` the reference's. ReLU's
    derivative jumps at 0, so a pre-activation within
    the ~1e-5 reconstruction error of 0 flips a mask in the reverse pass and moves the gradient
    by a finite amount: the memory-free error then depends on the draw (HINT, 12 seeds: 4e-6 to
    3.3e-3 global, 3 of 12 above 1e-3; this draw gives 4e-4 on one thread, 4e-6 on two) and so
    does plain float32 autograd's (up to 6e-4 against float64). Replacing ReLU by
    ``softplus(beta=100)`` in the same networks brings it to ~1e-5, and with ``silu`` the error
    is the rounding error, ~2e-6, for every draw tried: the 1e-3 bar is asserted there, for
    every tensor. This is why the couplings' default conditioners use SiLU.
    """
    net = deep_stack(kind, channels, activation)
    gen = torch.Generator().manual_seed(1)
    x = 1.0 + 2.0 * _rand((4, channels, 8, 8), torch.float32, gen)
    with torch.no_grad():
        net(x)  # ActNorm data-dependent initialisation, on the randomised network
    net64 = copy.deepcopy(net).double()
    assert not any(m._pending_init() for m in net64.modules() if isinstance(m, InvertibleModule))

    with torch.no_grad():
        y, ld = net(x)
        x_rec, ld_inv = net.inverse(y)
        y64, _ = net64(x.double())
        # non-trivial: every coupling moves its input
        h, moves = x, []
        for block in net:
            for m in block.layers[:2]:
                h, _ = m(h)
            coupling = block.layers[2]
            if kind == "glow":
                h, _ = coupling.conv(h)
                coupling = coupling.coupling
            out, _ = coupling(h)
            moves.append(float((out - h).norm() / h.norm()))
            h = out
    moves.sort()
    inv_err = float((x_rec - x).norm() / x.norm())
    fwd_err = float((y.double() - y64).norm() / y64.norm())
    assert moves[0] > 0.05, moves

    dy = _rand(y.shape, torch.float32, gen)
    dld = _rand(y.shape[:1], torch.float32, gen)
    got, x_mf = _memory_free_grads(net, y, dy, dld)
    ref32 = _plain_grads_of(net, x, dy, dld)
    ref64 = _plain_grads_of(net64, x.double(), dy.double(), dld.double())
    got64, _ = _memory_free_grads(net64, y64, dy.double(), dld.double())

    mf_vs_32 = _grad_errors(got, ref32)
    mf_vs_64 = _grad_errors(got, ref64)
    p32_vs_64 = _grad_errors(ref32, ref64)
    mf64_vs_64 = _grad_errors(got64, ref64)
    rec_err = float((x_mf - x).norm() / x.norm())
    n_tensors = len(got)
    print(
        f"\n[float32 {kind}({channels}) {activation}: {DEPTH} x (ActNorm, Conv1x1, coupling), "
        f"{n_tensors} gradient tensors incl. dx; coupling moves its input by "
        f"{moves[0]:.2f}..{moves[-1]:.2f} (median {moves[len(moves) // 2]:.2f})]\n"
        f"  inversion ||x - inv(fwd(x))|| / ||x||   {inv_err:.2e}\n"
        f"  x recomputed by backward               {rec_err:.2e}\n"
        f"  forward, float32 vs float64            {fwd_err:.2e}\n"
        f"  max |logdet + logdet_inv|              {float((ld + ld_inv).abs().max()):.2e}"
        f" (|logdet| {float(ld.abs().max()):.0f})\n"
        f"  gradients                      global L2   per-tensor max\n"
        f"    memory-free f32 vs plain f32  {mf_vs_32[0]:.2e}    {mf_vs_32[1]:.2e}\n"
        f"    memory-free f32 vs f64        {mf_vs_64[0]:.2e}    {mf_vs_64[1]:.2e}\n"
        f"    plain f32 vs f64              {p32_vs_64[0]:.2e}    {p32_vs_64[1]:.2e}\n"
        f"    memory-free f64 vs plain f64  {mf64_vs_64[0]:.2e}    {mf64_vs_64[1]:.2e}"
    )
    assert inv_err <= 1e-4
    assert rec_err <= 1e-4
    assert mf64_vs_64[0] <= 1e-10  # the algorithm is exact: the float32 error is rounding
    if activation == "silu":
        assert mf_vs_32[0] <= 1e-3
        assert mf_vs_32[1] <= 1e-3  # every tensor, not only globally
        assert mf_vs_64[0] <= 1e-3
    else:
        # ReLU kinks: draw-dependent, up to 3.3e-3 seen over 12 draws (see the docstring);
        # plain float32 autograd meets the same kinks (7e-4 against float64 here)
        assert mf_vs_32[0] <= 1e-2
        assert mf_vs_64[0] <= 1e-2
