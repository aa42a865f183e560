"""The contract sweep: every public invertible module runs the whole operator contract.

``REGISTRY`` holds one or more tiny configurations per public ``InvertibleModule`` class in
``invops.__all__`` (and the i-RIM loop, through ``NetworkLoop.bind``). Adding a layer costs one
registry line; a public class without one fails ``test_every_public_module_is_registered``.
Each configuration is checked, in float64, for:

- invertibility (``check_invertible``, 1e-10);
- every reverse mode (``backward``, ``vjp``, ``backward_inverse``, the autograd bridge) against
  plain autograd and ``jvp`` against forward-mode AD (``check_against_autograd``, 1e-8);
- the Jacobian's dot test in every ``wrt`` (1e-10);
- the logdet against ``slogdet`` of the dense Jacobian on a tiny input;
- numpy in, numpy out, equal to the torch result;
- one conditioner evaluation per reverse pass, for modules holding couplings (counted per
  weight at the aten level, see ``test_coupling_cost.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pylops
import pytest
import torch
from conftest import randomize_parameters
from test_coupling_cost import REVERSE_MODES, _storage_key, measure_modes

import invops
from invops.layers.coupling import Coupling
from invops.module import InvertibleModule
from invops.networks.conditional_hint import TwoLaneNetwork
from invops.testing import check_against_autograd, check_invertible, check_logdet, dottest

pytestmark = pytest.mark.usefixtures("one_thread")

Case = tuple[Callable[[], InvertibleModule], tuple[int, ...], tuple[tuple[int, ...], ...]]


def _loop(**options) -> InvertibleModule:
    op = pylops.MatrixMult(np.random.default_rng(4).standard_normal((6, 16)))
    n_in, conv = (2, {}) if options.get("type") == "proximal" else (3, dict(k1=3, p1=1, s1=1))
    loop = invops.NetworkLoop(n_in, 4, maxiter=2, link="softplus", **conv, **options)
    return loop.bind(invops.operators.as_operator(op, model_shape=(4, 4)))


def _summarized() -> InvertibleModule:
    summary = torch.nn.Conv2d(2, 3, 3, padding=1)
    return invops.SummarizedNet(invops.NetworkConditionalGlow(2, 3, 4, L=1, K=1), summary)


# class name -> list of (builder, x shape, condition shapes); everything tiny, float64
REGISTRY: dict[str, list[Case]] = {
    "ActNorm": [(lambda: invops.ActNorm(3), (2, 3, 4), ())],
    "AffineLayer": [(lambda: invops.AffineLayer((3, 2)), (2, 3, 2), ())],
    "Conv1x1": [(lambda: invops.Conv1x1(5), (2, 5, 3), ())],
    "LeakyReLU": [(lambda: invops.LeakyReLU(0.2), (2, 3, 4), ())],
    "Sigmoid": [(lambda: invops.Sigmoid(-1.0, 2.0), (2, 3), ())],
    "Sigmoid2": [(lambda: invops.Sigmoid2(), (2, 3), ())],
    "ExpClamp": [(lambda: invops.ExpClamp(1.5), (2, 3, 2), ())],
    "Squeeze": [(lambda: invops.Squeeze(pattern="checkerboard"), (2, 2, 2, 4), ())],
    "HaarSqueeze": [(lambda: invops.HaarSqueeze(), (2, 1, 2, 2, 2), ())],
    "Identity": [(lambda: invops.Identity(), (2, 3), ())],
    "Chain": [(lambda: invops.Chain(invops.ActNorm(3), invops.Conv1x1(3)), (2, 3, 3), ())],
    "Parallel": [
        (
            lambda: invops.Parallel(invops.Identity(), invops.ActNorm(2), sizes=(1, 2)),
            (2, 3, 3),
            (),
        )
    ],
    "Reversed": [(lambda: invops.Reversed(invops.CouplingLayerBasic(3, 4, ndim=1)), (2, 3, 4), ())],
    "Coupling": [
        (lambda: invops.Coupling(4, invops.SubnetFactory(4, ndim=0), "affine", ndim=0), (3, 4), ()),
        (
            lambda: invops.Coupling(3, invops.SubnetFactory(4, ndim=1), "additive", ndim=1),
            (2, 3, 4),
            (),
        ),
    ],
    "CouplingLayerBasic": [(lambda: invops.CouplingLayerBasic(3, 4, ndim=1), (2, 3, 4), ())],
    "CouplingLayerGlow": [
        (lambda: invops.CouplingLayerGlow(3, 4), (1, 3, 2, 3), ()),
        (lambda: invops.CouplingLayerGlow(3, 6, ndim=0, law="spline"), (3, 3), ()),
    ],
    "CouplingLayerHINT": [(lambda: invops.CouplingLayerHINT(5, 4, "both", ndim=1), (2, 5, 3), ())],
    "CouplingLayerIRIM": [
        (lambda: invops.CouplingLayerIRIM(4, 4, ndim=1, k1=3, p1=1, s1=1), (2, 4, 4), ())
    ],
    "CouplingLayerSpline": [
        (lambda: invops.CouplingLayerSpline(3, 4, bins=4, bound=1.0, ndim=1), (2, 3, 4), ())
    ],
    "Conv1x1LU": [(lambda: invops.Conv1x1LU(3), (2, 3, 2, 2), ())],
    "AdditiveCoupling": [
        (
            lambda: invops.AdditiveCoupling(4, subnet=invops.SubnetFactory(4, ndim=0), ndim=0),
            (3, 4),
            (),
        )
    ],
    "HyperbolicLayer": [(lambda: invops.HyperbolicLayer(1, 3, "squeeze"), (2, 2, 2, 2), ())],
    "ConditionalLayerGlow": [
        (lambda: invops.ConditionalLayerGlow(3, 2, 4, ndim=1), (2, 3, 4), ((2, 2, 4),))
    ],
    "ConditionalLayerHINT": [
        (lambda: invops.ConditionalLayerHINT(2, 3, 4, ndim=0), (3, 2), ((3, 3),))
    ],
    "NetworkGlow": [
        (lambda: invops.NetworkGlow(1, 4, L=2, K=1, split_scales=True), (1, 1, 4, 4), ()),
        (lambda: invops.NetworkGlow(2, 6, L=1, K=2, ndim=0, coupling="spline"), (3, 2), ()),
    ],
    "NetworkMultiScaleHINT": [
        (
            lambda: invops.NetworkMultiScaleHINT(2, 4, L=2, K=1, ndim=1, split_scales=True),
            (2, 2, 4),
            (),
        )
    ],
    "NetworkConditionalGlow": [
        (lambda: invops.NetworkConditionalGlow(1, 1, 4, L=1, K=1), (2, 1, 2, 2), ((2, 1, 2, 2),))
    ],
    "NetworkConditionalHINT": [
        (lambda: invops.NetworkConditionalHINT(2, 2, 4, depth=1, ndim=0), (3, 2), ((3, 2),))
    ],
    "NetworkMultiScaleConditionalHINT": [
        (
            lambda: invops.NetworkMultiScaleConditionalHINT(1, 1, 4, L=2, K=1, ndim=1),
            (2, 1, 4),
            ((2, 1, 4),),
        )
    ],
    "SummarizedNet": [(_summarized, (2, 2, 2, 2), ((2, 2, 2, 2),))],
    "NetworkHyperbolic": [
        (lambda: invops.NetworkHyperbolic(1, [("squeeze", 3), ("unsqueeze", 3)]), (2, 2, 2, 2), ())
    ],
    "NetworkRevNet": [(lambda: invops.NetworkRevNet(2, 4, blocks=[1, 1], ndim=1), (2, 2, 4), ())],
    "NetworkUNet": [(lambda: invops.NetworkUNet(2, 4, blocks=[1, 1], ndim=1), (2, 2, 4), ())],
    "NetworkLoop": [
        (_loop, (2, 3, 4, 4), ((2, 6),)),
        # the start from the data (differentiated in d in every mode) and tied conditioners
        (lambda: _loop(init="steepest", tied=True), (2, 3, 4, 4), ((2, 6),)),
        (lambda: _loop(init="adjoint", tied=True, type="hint"), (2, 3, 4, 4), ((2, 6),)),
        # the proximal iteration: a gradient step, a damped velocity, full-resolution ReLU nets
        (lambda: _loop(type="proximal", init="steepest"), (2, 2, 4, 4), ((2, 6),)),
        (lambda: _loop(type="proximal", tied=True), (2, 2, 4, 4), ((2, 6),)),
    ],
}

_ABSTRACT = {"InvertibleModule"}


def _public_module_classes() -> set[str]:
    names = set()
    for name in invops.__all__:
        obj = getattr(invops, name)
        is_module = isinstance(obj, type) and issubclass(obj, InvertibleModule)
        if is_module or obj is invops.NetworkLoop:
            names.add(name)
    return names - _ABSTRACT


def test_every_public_module_is_registered():
    missing = _public_module_classes() - set(REGISTRY)
    assert not missing, f"public invertible modules without a contract registry entry: {missing}"
    stale = set(REGISTRY) - _public_module_classes()
    assert not stale, f"registry entries for names that are not public: {stale}"


CASES = [
    pytest.param(name, i, id=f"{name}-{i}")
    for name, cases in REGISTRY.items()
    for i in range(len(cases))
]


def _build(name: str, i: int):
    builder, xshape, cshapes = REGISTRY[name][i]
    torch.manual_seed(3)
    np.random.seed(3)  # noqa: NPY002 - builders that draw from numpy's global state
    module = builder().double()
    randomize_parameters(module, scale=0.1)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(xshape, generator=gen, dtype=torch.float64)
    cond = tuple(torch.randn(s, generator=gen, dtype=torch.float64) for s in cshapes)
    return module, x, cond


@pytest.mark.parametrize("name,i", CASES)
def test_contract(name, i):
    module, x, cond = _build(name, i)
    assert isinstance(module, InvertibleModule)
    check_invertible(module, x, *cond)
    check_against_autograd(
        module,
        x,
        *cond,
        jvp_oracle="forward_ad" if name == "NetworkLoop" else "torch.func",
    )
    has_params = any(p.requires_grad for p in module.parameters())
    for wrt in ("input", "params", "both") if has_params else ("input",):
        dottest(module.jacobian(x, *cond, wrt=wrt))
    if module.logdet:
        check_logdet(module, x[:1], *(c[:1] for c in cond))

    # numpy in, numpy out, the same numbers
    with torch.no_grad():
        ref = module(x, *cond)
        got = module(x.numpy(), *(c.numpy() for c in cond))
    ref = ref if isinstance(ref, tuple) else (ref,)
    got = got if isinstance(got, tuple) else (got,)
    for a, b in zip(got, ref):
        assert isinstance(a, np.ndarray)
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "name,i",
    [
        c
        for c in CASES
        if any(isinstance(m, Coupling) for m in _build(*c.values)[0].modules())
        and c.values[0] != "NetworkLoop"
    ],
)
def test_contract_one_conditioner_evaluation(name, i):
    module, x, cond = _build(name, i)
    with torch.no_grad():
        module(x, *cond)  # data-dependent initialisation first: it is not part of the count
    weights, counts = measure_modes(module, x, cond)
    assert weights
    fwd_evals, _ = counts["forward"]
    # The condition lane of the two-lane conditional HINT networks is the exception: the
    # condition enters at the input side, so a reverse pass from the output first runs the lane
    # forward to its end, then recovers it step by step by inversion (one evaluation each);
    # storing the lane's states instead would make memory grow with depth.
    lane = set()
    if isinstance(module, TwoLaneNetwork):
        lane = {weights[k] for k in map(_storage_key, module.y_lane.parameters()) if k in weights}
        assert lane
    expected = {n: 2 * c if n in lane else c for n, c in fwd_evals.items()}
    for mode in REVERSE_MODES:
        evals, _ = counts[mode]
        assert evals == expected, f"{mode}: {evals} != {expected}"
