"""Hand-written forward mode (issue 16): no dual tensors on the hot path, fallbacks that mix.

Every built-in layer and network computes its tangent with hand-written rules (primal and
tangent together, ordinary torch ops); ``torch.autograd.forward_ad`` remains the fallback for
modules without a rule (a user's ``TorchBlock``, an unknown ``InvertibleModule`` subclass, a
subclass that changes a built-in layer's math) and the oracle of the tests. The values of every
rule, in both directions, are checked against ``torch.func.jvp`` to 1e-10 by the contract sweep
(``test_contract.py``); this file proves where dual tensors are (not) used, and checks the
fallbacks, their mixing with rules, and the activation rules.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from conftest import randomize_parameters
from test_contract import REGISTRY, _build

import invops
from invops._autodiff import tangent_rule_applies
from invops.testing import check_against_autograd

pytestmark = pytest.mark.usefixtures("one_thread")


class DualCounter:
    """Counts entries into forward-mode AD: ``make_dual`` calls and ``dual_level`` entries.

    ``torch.func.jvp`` also goes through ``torch.autograd.forward_ad.make_dual``, so it is
    counted too.
    """

    def __init__(self, monkeypatch) -> None:
        self.make_dual = 0
        self.levels = 0
        make_dual, enter = fwAD.make_dual, fwAD.dual_level.__enter__

        def counting_make_dual(*args, **kwargs):
            self.make_dual += 1
            return make_dual(*args, **kwargs)

        def counting_enter(level):
            self.levels += 1
            return enter(level)

        monkeypatch.setattr(fwAD, "make_dual", counting_make_dual)
        monkeypatch.setattr(fwAD.dual_level, "__enter__", counting_enter)

    @property
    def total(self) -> int:
        return self.make_dual + self.levels

    @contextlib.contextmanager
    def expect(self, n: int | None):
        """Assert that the block enters forward AD ``n`` times (None: at least once)."""
        before = self.total
        yield
        used = self.total - before
        if n is None:
            assert used > 0, "expected the dual-tensor fallback"
        else:
            assert used == n, f"forward AD entered {used} times, expected {n}"


# No built-in module, the i-RIM loop included (its data-fit gradient has a rule that applies the
# physics operator and its adjoint to the tangent), uses dual tensors.
NO_DUAL_CASES = [
    pytest.param(name, i, id=f"{name}-{i}")
    for name, cases in REGISTRY.items()
    for i in range(len(cases))
]


def _without_user_modules(name: str, i: int):
    module, x, cond = _build(name, i)
    if name == "SummarizedNet":
        # the registry's summary is a plain torch Conv2d (a user module, with its fallback):
        # with a built-in block as the summary, nothing may use dual tensors
        module.summary = invops.ResidualBlock(2, 4, n_out=3, fan=True).double()
        randomize_parameters(module.summary, scale=0.1)
    return module, x, cond


@pytest.mark.parametrize("name,i", NO_DUAL_CASES)
def test_builtin_modules_do_not_use_dual_tensors(name, i, monkeypatch):
    module, x, cond = _without_user_modules(name, i)
    with torch.no_grad():
        y = module(x, *cond)
    y = y[0] if module.logdet else y
    counter = DualCounter(monkeypatch)
    gen = torch.Generator().manual_seed(5)
    params = list(module.parameters())
    dtheta = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    dcond = [torch.randn(c.shape, generator=gen, dtype=c.dtype) for c in cond]
    trainable = {p: d for p, d in zip(params, dtheta) if p.requires_grad}
    with counter.expect(0):
        module.jvp(x, *cond, dx=torch.randn_like(x), dtheta=dtheta, dcond=dcond or None)
        module.jvp(x, *cond, dtheta=dtheta)  # parameter tangents only
        module._jvp(y, cond, torch.randn_like(y), tuple(dcond), trainable, inverse=True)
        module.reverse().jvp(y, *cond, dx=torch.randn_like(y))
        module.jacobian(x, *cond, wrt="both").matvec(
            torch.randn(
                x.numel() + sum(p.numel() for p in params if p.requires_grad), dtype=torch.float64
            ).numpy()
        )


def test_the_counter_sees_the_fallback(monkeypatch):
    """A coupling whose conditioner is a user's torch module: dual tensors there, and only there."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv1d(2, 4, 3, padding=1), torch.nn.Tanh())
    layer = invops.Chain(
        invops.ActNorm(4), invops.CouplingLayerGlow(4, subnet=net, ndim=1), invops.Conv1x1(4)
    ).double()
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    layer(x)
    counter = DualCounter(monkeypatch)
    with counter.expect(None):
        layer.jvp(x, dx=torch.randn_like(x))
    assert counter.levels == 1  # one fallback: the TorchBlock alone


# -------------------------------------------------------------------------- fallbacks that mix
class Cube(invops.InvertibleModule):
    """A user layer without a tangent rule: y = x^3 + a x (a > 0 per channel)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.ones(n))

    def _forward(self, x, *cond):
        a = self.a.reshape(1, -1, *([1] * (x.ndim - 2)))
        y = x**3 + a * x
        return y, torch.log(3 * x**2 + a).flatten(1).sum(1)

    def _inverse(self, y, *cond):  # a few Newton steps: enough for the tests' tiny inputs
        x = y / 2
        a = self.a.reshape(1, -1, *([1] * (y.ndim - 2)))
        for _ in range(60):
            x = x - (x**3 + a * x - y) / (3 * x**2 + a)
        return x, -torch.log(3 * x**2 + a).flatten(1).sum(1)


class ScaledActNorm(invops.ActNorm):
    """A subclass that changes ActNorm's math: it must not inherit ActNorm's tangent rule."""

    def _forward(self, x, *cond):
        y, logdet = super()._forward(x)
        return 2.0 * y, logdet + x[0].numel() * torch.log(torch.tensor(2.0, dtype=x.dtype))

    def _inverse(self, y, *cond):
        x, logdet = super()._inverse(y / 2.0)
        return x, logdet - y[0].numel() * torch.log(torch.tensor(2.0, dtype=y.dtype))


def test_rules_and_fallbacks_mix_in_one_network(monkeypatch):
    torch.manual_seed(1)
    user_net = torch.nn.Sequential(torch.nn.Conv1d(2, 2, 3, padding=1), torch.nn.Softsign())
    chain = invops.Chain(
        invops.ActNorm(4),
        Cube(4),  # no rule
        invops.CouplingLayerGlow(4, 6, ndim=1),  # rules
        ScaledActNorm(4),  # changed math: falls back
        invops.CouplingLayerBasic(4, subnet=user_net, ndim=1, law="additive"),  # TorchBlock
        invops.Conv1x1(4).reverse(),
    ).double()
    x = 0.5 * torch.randn(3, 4, 6, dtype=torch.float64)
    chain(x)
    randomize_parameters(chain, scale=0.1)
    assert not tangent_rule_applies(Cube) and not tangent_rule_applies(ScaledActNorm)
    assert tangent_rule_applies(invops.ActNorm) and tangent_rule_applies(invops.Chain)
    check_against_autograd(chain, x)
    counter = DualCounter(monkeypatch)
    with counter.expect(None):
        chain.jvp(x, dx=torch.randn_like(x))
    assert counter.levels == 3  # Cube, ScaledActNorm and the TorchBlock, nothing else


def test_user_law_with_parameters_falls_back_inside_a_rule():
    class Tilt(invops.CouplingLaw):
        """y = x + w * h, with a learned weight w: the law's own parameter gets a tangent."""

        n_params = 1

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(0.7))

        def forward(self, x, h):
            return x + self.w * h, x.new_zeros(x.shape[0])

        def inverse(self, y, h):
            return y - self.w * h, y.new_zeros(y.shape[0])

    layer = invops.CouplingLayerGlow(3, 4, ndim=1, law=Tilt()).double()
    randomize_parameters(layer, scale=0.2)
    check_against_autograd(layer, torch.randn(2, 3, 5, dtype=torch.float64))


# --------------------------------------------------------------------------- activation rules
ACTIVATIONS = {
    "relu": torch.relu,
    "F.relu": F.relu,
    "invops.relu": invops.activations.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "softplus": F.softplus,
    "gelu": F.gelu,
    "elu": F.elu,
    "leaky_relu": F.leaky_relu,
    "nn.SiLU": torch.nn.SiLU(),
    "nn.Softplus": torch.nn.Softplus(beta=2.0, threshold=3.0),
    "nn.GELU(tanh)": torch.nn.GELU(approximate="tanh"),
    "nn.ELU": torch.nn.ELU(alpha=0.5),
    "nn.LeakyReLU": torch.nn.LeakyReLU(0.2),
    "nn.Tanh": torch.nn.Tanh(),
    "unknown": lambda t: torch.sin(t) + 0.1 * t,  # differentiated with dual tensors
}


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_rules_match_forward_ad(name, monkeypatch):
    act = ACTIVATIONS[name]
    block = invops.ResidualBlock(2, 3, n_out=4, fan=True, activation=act, ndim=1).double()
    randomize_parameters(block, scale=0.5)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 7, generator=gen, dtype=torch.float64)
    dx = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    dtheta = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in block.parameters()]
    counter = DualCounter(monkeypatch)
    with counter.expect(None if name == "unknown" else 0):
        y, dy = block.jvp(x, dx=dx, dtheta=dtheta)
    names = [n for n, _ in block.named_parameters()]

    def f(x_, params_):
        return torch.func.functional_call(block, dict(zip(names, params_)), (x_,))

    params = tuple(p.detach() for p in block.parameters())
    y_ref, dy_ref = torch.func.jvp(f, (x, params), (dx, tuple(dtheta)))
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-14)
    torch.testing.assert_close(dy, dy_ref, rtol=1e-10, atol=1e-10 * float(dy_ref.abs().max()))
