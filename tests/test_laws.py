"""Coupling laws, conditioner factories and the multiscale skeleton (issue 12).

The laws' hand-written tangents against forward-mode AD, the spline coupling's Taylor tests and
bound handling, the conditioner factory (one call per conditioner, its errors), error names of
subclassed networks, and ``NetworkGlow(coupling="spline")``. The whole operator contract of every
public layer, spline and LU layers included, is in ``test_contract.py``; the one-evaluation cost
bar of every law in ``test_coupling_cost.py``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_parameters

import invops
from invops.layers.coupling import Coupling
from invops.testing import check_invertible, gradient_test

pytestmark = pytest.mark.usefixtures("one_thread")

LAWS = {
    "affine": lambda: invops.Affine(0.4, 3.0),
    "affine_low0": lambda: invops.Affine(0.0, 2.0),
    "additive": invops.Additive,
    "negate": invops.Negate,
    "spline": lambda: invops.Spline(bins=5, bound=2.0),
}


@pytest.mark.parametrize("name", LAWS)
@pytest.mark.parametrize("with_dh", [True, False])
def test_law_tangent_equals_forward_ad(name, with_dh):
    law = LAWS[name]()
    gen = torch.Generator().manual_seed(2)
    x = 1.5 * torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    h = torch.randn(3, law.n_params * 4, 5, generator=gen, dtype=torch.float64)
    dx = torch.randn_like(x)
    dh = torch.randn_like(h) if with_dh else None
    y, dy, ld, dld = law.tangent(x, h, dx, dh)
    (y_ref, ld_ref), (dy_ref, dld_ref) = torch.func.jvp(
        law.forward, (x, h), (dx, torch.zeros_like(h) if dh is None else dh)
    )
    for got, ref in ((y, y_ref), (dy, dy_ref), (ld, ld_ref), (dld, dld_ref)):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", LAWS)
def test_law_inverse_and_identity_at_zero(name):
    law = LAWS[name]()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    h = torch.randn(2, law.n_params * 3, 4, dtype=torch.float64)
    y, ld = law.forward(x, h)
    x_rec, ld_inv = law.inverse(y, h)
    torch.testing.assert_close(x_rec, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(ld_inv, -ld, rtol=0, atol=1e-12)
    if name != "negate":  # the negating law is -x + t, never the identity
        y0, ld0 = law.forward(x, torch.zeros_like(h))
        torch.testing.assert_close(y0, x, rtol=0, atol=1e-15)
        assert float(ld0.abs().max()) <= 1e-13  # log S(0) = log(1) up to rounding


def test_spline_coupling_taylor_and_outside_bound():
    torch.manual_seed(0)
    layer = invops.CouplingLayerSpline(4, 8, bins=6, bound=1.5, ndim=1).double()
    randomize_parameters(layer, scale=0.2)
    x = 1.2 * torch.randn(3, 4, 7, dtype=torch.float64)
    x[0, 2:, :3] = torch.tensor([-5.0, 1.5, 9.0], dtype=torch.float64)  # outside and on the bound
    y, logdet = layer(x)
    # the changed group passes unchanged where it is outside [-bound, bound]
    assert torch.equal(y[0, 2:, :3], x[0, 2:, :3])
    check_invertible(layer, x)

    # Taylor tests away from the bound: on it the log-slope has a kink (its derivative jumps
    # from the spline's to the identity's), so the remainder there is first order
    x[0, 2:, 1] = 2.5
    w = torch.randn_like(y)

    def loss(x_, *params):
        state = dict(zip([n for n, _ in layer.named_parameters()], params))
        with invops.plain_autograd():
            out, ld = torch.func.functional_call(layer, state, (x_,))
        return (out * w).sum() + ld.sum()

    params = [p.detach().clone() for p in layer.parameters()]
    x_r = x.clone().requires_grad_()
    with torch.enable_grad():
        out, ld = layer(x_r)
        ((out * w).sum() + ld.sum()).backward()
    grads = [x_r.grad] + [p.grad for p in layer.parameters()]
    gradient_test(loss, [x, *params], grads)


def test_subnet_factory_called_once_per_conditioner_with_own_weights():
    calls = []

    def factory(n_in, n_out):
        calls.append((n_in, n_out))
        return torch.nn.Conv1d(n_in, n_out, 3, padding=1)

    hint = invops.CouplingLayerHINT(7, ndim=1, subnet=factory)
    assert calls == [(4, 6), (2, 4), (2, 2)]  # HINT(7): one coupling, then HINT(4), HINT(3)
    subnets = [c.subnet for c in hint.couplings()]
    assert len({id(s) for s in subnets}) == 3
    y, _ = hint(torch.randn(2, 7, 5))
    check_invertible(hint.double(), torch.randn(2, 7, 5, dtype=torch.float64))

    cond_calls = []

    def cond_factory(n_in, n_out, n_cond=0):
        cond_calls.append((n_in, n_out, n_cond))
        return invops.SubnetFactory(4, ndim=1)(n_in, n_out, n_cond=n_cond)

    invops.ConditionalLayerGlow(3, 5, ndim=1, subnet=cond_factory)
    assert cond_calls == [(1, 4, 5)]


def test_spline_law_sizes_the_conditioner():
    layer = invops.CouplingLayerGlow(5, 8, ndim=0, law=invops.Spline(bins=4))
    # the changed group (first ceil(5/2) = 3 channels) needs 11 parameters per channel
    assert layer.coupling.subnet.layers[-1].out_features == 11 * 3


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (
            lambda: invops.CouplingLayerHINT(5, subnet=torch.nn.Conv2d(3, 4, 1)),
            TypeError,
            "needs several conditioners, so subnet must be a factory",
        ),
        (
            lambda: invops.CouplingLayerGlow(4, subnet=invops.SubnetFactory(), k1=5),
            TypeError,
            r"\['k1'\] configure the default conditioner",
        ),
        (
            lambda: invops.CouplingLayerGlow(4, kernel=5),
            TypeError,
            r"CouplingLayerGlow: unexpected keyword argument\(s\) \['kernel'\]",
        ),
        (lambda: invops.CouplingLayerGlow(4, subnet=3), TypeError, "subnet must be a factory"),
        (lambda: invops.CouplingLayerBasic(4, law="cubic"), ValueError, "law must be one of"),
        (
            lambda: invops.CouplingLayerBasic(4, law="spline", scale=(0.1, 3.0)),
            ValueError,
            "scale configures the 'affine' law only",
        ),
        (lambda: invops.Affine(1.0, 2.0), ValueError, "0 <= low < 1 < high"),
        (lambda: invops.AdditiveCoupling(4), TypeError, "give the residual functions F and G"),
        (
            lambda: invops.AdditiveCoupling(4, subnet=torch.nn.Linear(2, 2)),
            TypeError,
            "must be a factory",
        ),
    ],
)
def test_factory_and_law_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_subnet_output_of_the_wrong_size_names_the_public_layer():
    layer = invops.CouplingLayerGlow(4, ndim=0, subnet=lambda n_in, n_out: torch.nn.Linear(2, 3))
    with pytest.raises(ValueError, match=r"CouplingLayerGlow: the sub-network must return 4"):
        layer(torch.randn(2, 4))


def test_network_errors_name_the_subclass():
    class MyGlow(invops.NetworkGlow):
        pass

    net = MyGlow(2, 4, L=2, K=1)
    with pytest.raises(ValueError, match=r"MyGlow: with L=2 scales"):
        net(torch.randn(1, 2, 6, 6))
    with pytest.raises(ValueError, match=r"MyGlow: scale 0 would have 1 channel"):
        MyGlow(1, 4, L=2, K=1, ndim=0, split_scales=True)
    assert "n_in=2, L=2, K=1" in repr(net)


def test_n_conditions_attribute():
    assert invops.ConditionalLayerGlow(2, 3, 4).n_conditions == 1
    assert invops.NetworkGlow(2, 4, L=1, K=1).n_conditions == 0
    assert not hasattr(invops.InvertibleModule, "n_cond")


def test_spline_glow_and_coupling_law_objects():
    torch.manual_seed(0)
    net = invops.NetworkGlow(2, 8, L=2, K=1, ndim=1, coupling="spline").double()
    laws = [m.law for m in net.modules() if isinstance(m, Coupling)]
    assert len(laws) == 2 and all(isinstance(law, invops.Spline) for law in laws)
    assert laws[0] is not laws[1]
    randomize_parameters(net, scale=0.1)
    check_invertible(net, torch.randn(2, 2, 8, dtype=torch.float64))
    # a law object is shared by every coupling
    shared = invops.Spline(bins=3)
    net = invops.NetworkMultiScaleHINT(3, 4, L=1, K=2, ndim=0, coupling=shared)
    assert {id(m.law) for m in net.modules() if isinstance(m, Coupling)} == {id(shared)}
