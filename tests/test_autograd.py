"""The memory-free autograd bridge against plain autograd, mixed with ordinary torch layers."""

import pytest
import torch
from conftest import randomize_parameters

import invops


def flow(channels=3, length=4, ndim=2):
    spatial = (length,) * ndim
    net = invops.Chain(
        invops.ActNorm(channels),
        invops.Conv1x1(channels),
        invops.AffineLayer((channels, *spatial)),
        invops.ActNorm(channels),
        invops.Conv1x1(channels),
    ).double()
    net(torch.randn(4, channels, *spatial, dtype=torch.float64))
    randomize_parameters(net)
    return net


class Mixed(torch.nn.Module):
    """Conv2d -> invertible flow -> Conv2d, trained end to end."""

    def __init__(self):
        super().__init__()
        self.pre = torch.nn.Conv2d(2, 3, 3, padding=1).double()
        self.flow = flow()
        self.post = torch.nn.Conv2d(3, 1, 3, padding=1).double()

    def forward(self, x):
        z, logdet = self.flow(self.pre(x))
        return self.post(torch.tanh(z)), logdet


def grads_of(model, x, plain):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    ctx = invops.plain_autograd() if plain else torch.enable_grad()
    with ctx:
        out, logdet = model(x)
        loss = (out**2).sum() - 0.3 * logdet.sum()
    loss.backward()
    return [x.grad] + [p.grad.clone() for p in model.parameters()]


def test_bridge_matches_plain_autograd_with_torch_layers_around():
    model = Mixed()
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    bridged = grads_of(model, x, plain=False)
    plain = grads_of(model, x, plain=True)
    for a, b in zip(bridged, plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_bridge_saves_only_the_output():
    net = flow()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y, logdet = net(x)
    assert len(saved) == 1 and saved[0].shape == y.shape


def test_memory_free_flag_falls_back_to_plain_autograd():
    net = flow()
    net.memory_free = False
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        net(x)
    assert len(saved) > 1
    assert not invops.is_plain_autograd()
    with invops.plain_autograd():
        assert invops.is_plain_autograd()


def test_inverse_direction_through_the_bridge():
    net = flow()
    z = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    results = []
    for plain in (False, True):
        net.zero_grad(set_to_none=True)
        zz = z.clone().requires_grad_()
        with invops.plain_autograd(plain):
            x, logdet = net.inverse(zz)
            ((x**3).sum() + logdet.sum()).backward()
        results.append([zz.grad] + [p.grad.clone() for p in net.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_explicit_backward_equals_loss_backward():
    net = flow()
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    net.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_()
    y, logdet = net(xx)
    (0.5 * (y**2).sum() - logdet.sum()).backward()
    ref = [xx.grad] + [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    with torch.no_grad():
        y, logdet = net(x)
    dx, _ = net.backward(y, y, dlogdet=-1.0)
    for a, b in zip([dx] + [p.grad for p in net.parameters()], ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_adam_trains_a_small_chain():
    torch.manual_seed(3)
    data = (
        torch.randn(64, 3, 4, 4, dtype=torch.float64)
        * torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64).reshape(1, 3, 1, 1)
        + 1.0
    )
    net = flow()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        z, logdet = net(data)
        loss = (0.5 * (z**2).flatten(1).sum(1) - logdet).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


def test_double_backward_is_refused_clearly():
    net = flow()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    y, _ = net(x)
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()
