"""``torch.compile`` of networks: same outputs and gradients as eager mode, one graph for the
forward, and the memory-free reverse pass kept.

The default run uses the ``aot_eager`` backend (Dynamo capture plus AOT autograd, no C++ code
generation), which checks everything that depends on the captured graph in a few seconds. The
``inductor`` variant (code generation, ~40 s of compilation on two cores) is marked ``slow``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_parameters

import invops

F64 = torch.float64


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(n)


def _glow(K=2):
    torch.manual_seed(0)
    net = invops.NetworkGlow(3, 8, L=2, K=K, split_scales=True).to(F64)
    x = torch.randn(4, 3, 8, 8, dtype=F64)
    with torch.no_grad():
        net(x)  # ActNorm initialisation
    randomize_parameters(net, scale=0.1)
    return net, x


def _step(model, net, x):
    """Loss, parameter gradients and the autograd nodes of one training step's outputs."""
    net.zero_grad(set_to_none=True)
    z, logdet = model(x)
    nodes = _autograd_nodes(z, logdet)
    loss = (0.5 * z.square().flatten(1).sum(1) - logdet).mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in net.parameters()], nodes


def _autograd_nodes(*outputs):
    """``(node type, shapes of its saved tensors)`` for every node behind ``outputs``."""
    seen, stack = {}, [t.grad_fn for t in outputs]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            saved = getattr(node, "saved_tensors", ())
            seen[node] = (type(node).__name__, [tuple(t.shape) for t in saved])
            stack.extend(f for f, _ in node.next_functions)
    return list(seen.values())


def _counting(backend):
    """A backend that records the size of every graph Dynamo hands it."""
    graphs = []

    def compile_graph(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

    return compile_graph, graphs


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_forward_is_one_graph_and_matches_eager(backend):
    net, x = _glow()
    compiled = torch.compile(net, backend=backend, fullgraph=True)  # fails on any graph break
    with torch.no_grad():
        got = compiled(x)
        want = net(x)
    tol = 1e-12 if backend == "aot_eager" else 1e-10
    assert all(torch.allclose(g, w, rtol=tol, atol=tol) for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_training_step_matches_eager_and_stays_memory_free(backend):
    """Dynamo compiles the network's computation inside the memory-free bridge (the reverse
    pass, which inverts layer by layer, runs eagerly): same gradients as eager mode, and the
    autograd graph holds one bridge node that saved only the output."""
    net, x = _glow()
    counting, graphs = _counting(backend)
    loss, grads, nodes = _step(torch.compile(net, backend=counting), net, x)
    assert graphs and max(graphs) > 100, f"nothing substantial was compiled: {graphs}"
    loss_eager, grads_eager, _ = _step(net, net, x)
    assert torch.allclose(loss, loss_eager, rtol=1e-12, atol=0)
    for g, w in zip(grads, grads_eager, strict=True):
        assert torch.allclose(g, w, rtol=1e-9, atol=1e-12)
    assert max(w.abs().max() for w in grads_eager) > 0

    recorded = [(kind, saved) for kind, saved in nodes if kind != "AccumulateGrad"]
    assert recorded == [("_MemoryFreeFunctionBackward", [tuple(x.shape)])], recorded


def test_plain_autograd_graph_differs():
    """The structural check above can fail: plain autograd records every operation."""
    net, x = _glow()
    with invops.plain_autograd():
        _, _, nodes = _step(net, net, x)
    assert len({kind for kind, _ in nodes}) > 5


def test_compile_does_not_freeze_actnorm_initialisation():
    """ActNorm's first-call initialisation happens under compile, and a loaded state_dict is
    honoured (the compiled graph guards on the initialisation flag)."""
    torch.manual_seed(0)
    net = invops.NetworkGlow(2, 4, L=1, K=1).to(F64)
    compiled = torch.compile(net, backend="aot_eager")
    x = 3.0 + 2.0 * torch.randn(16, 2, 4, 4, dtype=F64)
    with torch.no_grad():
        compiled(x)
    actnorm = next(m for m in net.modules() if isinstance(m, invops.ActNorm))
    assert bool(actnorm.initialized) and actnorm.log_scale.abs().max() > 0.1

    fresh = invops.NetworkGlow(2, 4, L=1, K=1).to(F64)
    fresh.load_state_dict(net.state_dict())
    with torch.no_grad():
        want = net(x + 1.0)
        got = torch.compile(fresh, backend="aot_eager")(x + 1.0)
    assert all(torch.allclose(g, w, rtol=1e-12, atol=1e-12) for g, w in zip(got, want, strict=True))
