"""Regression tests of issue 11 (reliability under hostile input), one group per item.

Each test's docstring says how it failed on the code before the fix (commit 6d82b57); that was
checked by running this file against an unmodified checkout of that commit.
"""

from __future__ import annotations

import copy
import errno
import os
import random
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pylops
import pytest
import torch

import invops
from invops.checkpoint import load_checkpoint, save_checkpoint
from invops.operators import as_operator

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def _actnorms(net: torch.nn.Module) -> list[invops.ActNorm]:
    return [m for m in net.modules() if isinstance(m, invops.ActNorm)]


def _state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _untouched_and_uninitialised(net, before) -> None:
    assert _same_state(_state(net), before)
    assert all(not bool(a.initialized) and not a._ready for a in _actnorms(net))
    assert net._needs_init() if isinstance(net, invops.InvertibleModule) else True


# ------------------------------------------------------------------ 1. poisoned first batch
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_actnorm_non_finite_first_batch_raises_and_leaves_layer_uninitialised(bad):
    """Before the fix: no error, ``log_scale`` became NaN, ``initialized`` was set, and every
    later output (of a clean batch too) was NaN ("DID NOT RAISE")."""
    layer = invops.ActNorm(3).double()
    before = _state(layer)
    x = torch.randn(6, 3, 4, dtype=F64)
    x[2, 1, 3] = bad
    with pytest.raises(ValueError, match=r"ActNorm\(3\).*(NaN|Inf).*channel\(s\) \[1\]"):
        layer(x)
    _untouched_and_uninitialised(layer, before)
    y, logdet = layer(torch.randn(6, 3, 4, dtype=F64) * 2 + 1)  # a clean batch still works
    assert bool(layer.initialized) and torch.isfinite(y).all() and torch.isfinite(logdet).all()


def test_actnorm_and_networks_reject_an_empty_batch():
    """Before the fix: ActNorm initialised from B = 0 to NaN without an error, and the networks
    raised a RuntimeError from a reshape ("cannot reshape tensor of 0 elements")."""
    layer = invops.ActNorm(2)
    with pytest.raises(ValueError, match="empty batch"):
        layer(torch.randn(0, 2))
    assert not bool(layer.initialized)
    cases = [
        (invops.NetworkGlow(2, 4, L=1, K=1), (torch.randn(0, 2, 4, 4),)),
        (invops.NetworkMultiScaleHINT(2, 4, L=1, K=1), (torch.randn(0, 2, 4, 4),)),
        (
            invops.NetworkConditionalHINT(2, 2, 4, depth=1, ndim=0),
            (torch.randn(0, 2), torch.randn(0, 2)),
        ),
    ]
    for net, args in cases:
        with pytest.raises(ValueError, match="empty batch"):
            net(*args)
        assert net._needs_init()
    loop = invops.NetworkLoop(2, 4, maxiter=1)
    op = as_operator(pylops.Identity(16), model_shape=(4, 4))
    with pytest.raises(ValueError, match="empty batch"):
        loop(torch.zeros(0, 1, 4, 4), torch.zeros(0, 1, 4, 4), torch.zeros(0, 16), op)


def _poisoned_network_cases():
    x = torch.randn(4, 2, 4, 4, dtype=F64)
    x[1, 0, 2, 3] = float("nan")
    y = torch.randn(4, 2, 4, 4, dtype=F64)
    y_bad = y.clone()
    y_bad[0, 1, 0, 0] = float("inf")
    op = as_operator(pylops.Identity(16), model_shape=(4, 4))
    d_bad = torch.randn(2, 16, dtype=F64)
    d_bad[1, 5] = float("nan")
    return [
        ("glow", lambda: invops.NetworkGlow(2, 4, L=1, K=2), (x,)),
        ("hint", lambda: invops.NetworkMultiScaleHINT(2, 4, L=1, K=2), (x,)),
        ("conditional-hint-x", lambda: invops.NetworkConditionalHINT(2, 2, 4, depth=2), (x, y)),
        (
            "conditional-hint-y",
            lambda: invops.NetworkConditionalHINT(2, 2, 4, depth=2),
            (torch.randn(4, 2, 4, 4, dtype=F64), y_bad),
        ),
        (
            "loop",
            lambda: invops.NetworkLoop(2, 4, maxiter=2),
            (torch.zeros(2, 1, 4, 4, dtype=F64), torch.zeros(2, 1, 4, 4, dtype=F64), d_bad, op),
        ),
    ]


@pytest.mark.parametrize(
    "build,args",
    [c[1:] for c in _poisoned_network_cases()],
    ids=[c[0] for c in _poisoned_network_cases()],
)
def test_networks_reject_a_poisoned_first_batch_and_stay_uninitialised(build, args):
    """Before the fix: every one of these calls returned NaN or Inf without an error and left
    the networks' ActNorm layers initialised to NaN for good ("DID NOT RAISE")."""
    net = build().double()
    before = _state(net)
    with pytest.raises(ValueError, match=r"layer '.*' \(ActNorm\) could not be initialised"):
        net(*args)
    _untouched_and_uninitialised(net, before)


# ------------------------------------------------------------------ 2. all-or-nothing first call
def test_a_first_call_that_fails_midway_initialises_nothing():
    """An operator that raises in iteration 2 of the first NetworkLoop call. Before the fix the
    first iteration's ActNorm kept the statistics of that batch and its ``initialized`` flag
    (the assertion that the state is unchanged failed)."""
    torch.manual_seed(0)
    calls = {"n": 0}
    A = torch.randn(20, 16, dtype=F64)

    def forward(x):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("the solver crashed")
        return x.reshape(x.shape[0], -1) @ A.T

    def adjoint(r):
        return (r @ A).reshape(r.shape[0], 4, 4)

    op = as_operator((forward, adjoint), model_shape=(4, 4), data_shape=(20,))
    loop = invops.NetworkLoop(3, 4, maxiter=3).double()
    reference = copy.deepcopy(loop)
    before = _state(loop)
    eta, s = torch.randn(2, 1, 4, 4, dtype=F64), torch.randn(2, 2, 4, 4, dtype=F64)
    d = torch.randn(2, 20, dtype=F64)
    with pytest.raises(RuntimeError, match="the solver crashed"):
        loop(eta, s, d, op)
    assert _same_state(_state(loop), before)
    assert not any(bool(a.initialized) or a._ready for a in _actnorms(loop))

    # the next call initialises every layer, from its own batch, as a fresh network would
    out = loop(eta, s, d, op)
    want = reference(eta, s, d, op)
    assert all(torch.equal(a, b) for a, b in zip(out, want, strict=True))
    assert _same_state(_state(loop), _state(reference))


def test_a_failed_first_call_of_a_chain_rolls_back_every_layer():
    """A layer in the middle of a network sees Inf (an overflow upstream) in the first call.
    Before the fix nothing was raised ("DID NOT RAISE"): the first ActNorm was initialised from
    the batch and the second one to NaN."""

    class Overflow(invops.InvertibleModule):
        def _forward(self, x, *cond):
            return x * 1e300, x.new_zeros(x.shape[0])

        def _inverse(self, y, *cond):
            return y / 1e300, y.new_zeros(y.shape[0])

    net = invops.Chain(invops.ActNorm(2), Overflow(), invops.ActNorm(2)).double()
    before = _state(net)
    with pytest.raises(ValueError, match=r"layer 'layers.2' \(ActNorm\)"):
        net(torch.randn(5, 2, dtype=F64) * 1e10)
    _untouched_and_uninitialised(net, before)


# ------------------------------------------------------------------ 3. scale-free normalisation
@pytest.mark.parametrize("scale", [1e-30, 1e-7, 1.0, 1e7, 1e30])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_actnorm_normalises_data_of_any_scale(scale, dtype):
    """Before the fix the degeneracy threshold was absolute (``std <= 1e-6 * max(|mean|, 1)``):
    data of scale 1e-7 (and 1e-30) kept unit scale, its output had std 1e-7 instead of 1."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 2, 8, generator=gen, dtype=F64) * scale + 0.3 * scale).to(dtype)
    layer = invops.ActNorm(2).to(dtype)
    y, logdet = layer(x)
    std = y.double().transpose(0, 1).flatten(1).std(dim=1, unbiased=False)
    assert torch.allclose(std, torch.ones(2, dtype=F64), rtol=1e-4), std
    assert torch.isfinite(logdet).all()
    x_rec, _ = layer.inverse(y)
    assert torch.allclose(x_rec.double(), x.double(), rtol=1e-4, atol=1e-6 * scale)


def test_actnorm_keeps_unit_scale_for_constant_channels():
    """Channels constant up to rounding (relative spread within 8 eps) are centred only: their
    scale would amplify rounding noise; a channel of scale 1e-7 is normalised. Before the fix
    that channel kept unit scale (``log_scale`` 0, the last assertion failed)."""
    x = torch.ones(16, 3, 5)
    x[:, 0] = 1000.0  # exactly constant
    x[:, 1] = 1000.0 + torch.randint(0, 2, (16, 5)) * 6.103515625e-05  # one ulp apart
    x[:, 2] = torch.randn(16, 5) * 1e-7  # tiny but genuine spread: normalised
    layer = invops.ActNorm(3)
    y, _ = layer(x)
    assert torch.isfinite(y).all()
    assert layer.log_scale[0] == 0 and layer.log_scale[1] == 0
    assert float(layer.log_scale[2].detach()) > 15


# ------------------------------------------------------------------ 4. what saves loads
def test_checkpoint_with_numpy_values_and_paths_loads(tmp_path):
    """Before the fix ``save_checkpoint`` accepted ``np.float64(0.5)`` and the load then failed
    with ``UnpicklingError`` (weights_only)."""
    net = invops.ActNorm(2)
    net(torch.randn(4, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    extra = {
        "best": np.float64(0.5),
        "epoch": np.int64(3),
        "flag": np.bool_(True),
        "curve": np.arange(3.0),
        "dir": tmp_path,
        "nested": [{"lr": np.float32(0.5)}, (np.int32(1), "a")],
    }
    path = tmp_path / "c.pt"
    save_checkpoint(path, net, opt, extra=extra)
    fresh = invops.ActNorm(2)
    out = load_checkpoint(path, fresh, torch.optim.SGD(fresh.parameters(), lr=0.1))["extra"]
    assert out["best"] == 0.5 and type(out["best"]) is float
    assert out["epoch"] == 3 and type(out["epoch"]) is int
    assert out["flag"] is True
    assert torch.equal(out["curve"], torch.arange(3.0, dtype=F64))
    assert out["dir"] == os.fspath(tmp_path)
    assert out["nested"] == [{"lr": 0.5}, (1, "a")]
    assert torch.equal(fresh.bias, net.bias)


@pytest.mark.parametrize(
    "value",
    [lambda: 1, object(), np.array(["a"], dtype=object), frozenset({1})],
    ids=["function", "object", "object-array", "frozenset"],
)
def test_checkpoint_refuses_what_could_not_load_and_writes_nothing(tmp_path, value):
    """Before the fix the object, the object array and the frozenset were written to a file
    that ``load_checkpoint`` could not read ("DID NOT RAISE TypeError"), and the function made
    ``torch.save`` fail with PicklingError, leaving ``c.pt.partial`` behind."""
    net = invops.ActNorm(2)
    with pytest.raises(TypeError, match=r"extra\['bad'\]"):
        save_checkpoint(tmp_path / "c.pt", net, extra={"bad": value})
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ 5. all-or-nothing load
def _trained_glow(hidden=4):
    torch.manual_seed(0)
    net = invops.NetworkGlow(2, hidden, L=1, K=1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    z, logdet = net(torch.randn(4, 2, 4, 4))
    (0.5 * z.square().sum() - logdet.sum()).backward()
    opt.step()
    return net, opt


def test_load_into_a_mismatched_model_changes_nothing(tmp_path):
    """Before the fix the load raised RuntimeError ("size mismatch") after overwriting the
    tensors whose shapes matched (the ActNorm scale and bias, the 1x1 convolution's vectors)."""
    net, opt = _trained_glow()
    save_checkpoint(tmp_path / "c.pt", net, opt)
    other, other_opt = _trained_glow(hidden=6)
    model_before, opt_before = _state(other), copy.deepcopy(other_opt.state_dict())
    with pytest.raises(ValueError, match=r"c\.pt.*size mismatch for layers\.2\."):
        load_checkpoint(tmp_path / "c.pt", other, other_opt)
    assert _same_state(_state(other), model_before)
    assert str(other_opt.state_dict()) == str(opt_before)


def test_load_with_a_mismatched_optimiser_changes_nothing(tmp_path):
    """Before the fix the model was loaded first and the optimiser's ValueError came after, so
    the model held the checkpoint's weights and the optimiser its old state."""
    net, opt = _trained_glow()
    save_checkpoint(tmp_path / "c.pt", net, opt)
    fresh = invops.NetworkGlow(2, 4, L=1, K=1)
    params = list(fresh.parameters())
    two_groups = torch.optim.Adam([{"params": params[:2]}, {"params": params[2:]}], lr=1e-2)
    before = _state(fresh)
    with pytest.raises(ValueError, match="parameter group"):
        load_checkpoint(tmp_path / "c.pt", fresh, two_groups)
    assert _same_state(_state(fresh), before)
    # an optimiser whose parameters come in another order: the moments would not fit
    shuffled = torch.optim.Adam(params[::-1], lr=1e-2)
    with pytest.raises(ValueError, match="does not fit the parameter's shape"):
        load_checkpoint(tmp_path / "c.pt", fresh, shuffled)
    assert _same_state(_state(fresh), before)
    assert not shuffled.state


# ------------------------------------------------------------------ 6. integrity
def test_corrupted_checkpoints_never_load_silently(tmp_path):
    """40 single-bit flips at random offsets. Before the fix, of these 40, 3 loaded without an
    error and with different weights (the issue measured 11 of 40 on another file), 34 loaded
    the same weights (flips in the optimiser or RNG states went unnoticed) and 3 raised
    RuntimeError, UnpicklingError or UnicodeDecodeError without naming the file; the test
    failed on the first RuntimeError. With the digest 29 raise ValueError naming the file and
    11 load the same data."""
    net, opt = _trained_glow()
    path = tmp_path / "c.pt"
    save_checkpoint(path, net, opt, step=5)
    data = path.read_bytes()
    reference = _state(net)
    rng = random.Random(0)
    outcomes = {"error": 0, "identical": 0}
    for _ in range(40):
        flipped = bytearray(data)
        offset = rng.randrange(len(flipped))
        flipped[offset] ^= 1 << rng.randrange(8)
        bad = tmp_path / "flipped.pt"
        bad.write_bytes(bytes(flipped))
        fresh, fresh_opt = _trained_glow()
        try:
            info = load_checkpoint(bad, fresh, fresh_opt, restore_rng=False)
        except ValueError as err:
            assert str(bad) in str(err)
            outcomes["error"] += 1
            continue
        assert _same_state(_state(fresh), reference), f"bit flip at {offset} loaded silently"
        assert info["step"] == 5
        outcomes["identical"] += 1
    # flips in bytes the reader skips (zip padding, unused header fields) load the same data
    assert outcomes["error"] > 0 and outcomes["error"] + outcomes["identical"] == 40, outcomes


def test_empty_and_truncated_checkpoints_name_the_file(tmp_path):
    """Before the fix an empty file gave a bare ``EOFError`` and a truncated one ``OSError:
    [Errno 22] Invalid argument``, neither naming the file (the test failed on the EOFError)."""
    net = invops.ActNorm(2)
    save_checkpoint(tmp_path / "c.pt", net)
    data = (tmp_path / "c.pt").read_bytes()
    for name, content in [("empty.pt", b""), ("half.pt", data[: len(data) // 2])]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            load_checkpoint(tmp_path / name, net)


# ------------------------------------------------------------------ 7. operator outputs
def _callable_pair(A, n_model_shape):
    return (
        lambda x: x.reshape(x.shape[0], -1) @ A.T,
        lambda y: (y @ A).reshape(y.shape[0], *n_model_shape),
    )


def test_wrong_operator_outputs_raise_naming_the_operator():
    """Before the fix a forward returning (B, 1) instead of (B, 40) was broadcast against the
    data without an error, a wrong-size adjoint raised a reshape RuntimeError, and a complex
    callable accepted real data (the matrix path raises TypeError)."""
    torch.manual_seed(0)
    A = torch.randn(40, 16, dtype=F64)
    forward, adjoint = _callable_pair(A, (4, 4))
    loop = invops.NetworkLoop(2, 4, maxiter=1).double()
    eta, s = torch.zeros(2, 1, 4, 4, dtype=F64), torch.zeros(2, 1, 4, 4, dtype=F64)
    d = torch.randn(2, 40, dtype=F64)
    loop(eta, s, d, (forward, adjoint))  # the correct pair works

    short = (lambda x: forward(x)[:, :1], adjoint)
    with pytest.raises(ValueError, match=r"callables.*forward map returned shape \(2, 1\)"):
        invops.NetworkLoop(2, 4, maxiter=1).double()(eta, s, d, short)
    wrong_adjoint = (forward, lambda y: (y @ A)[:, :10])
    with pytest.raises(ValueError, match=r"callables.*adjoint returned shape \(2, 10\)"):
        invops.NetworkLoop(2, 4, maxiter=1).double()(eta, s, d, wrong_adjoint)
    complex_pair = (
        lambda x: forward(x).to(torch.complex128),
        lambda y: adjoint(y.real),
    )
    with pytest.raises(TypeError, match="callables returns complex data"):
        invops.NetworkLoop(2, 4, maxiter=1).double()(eta, s, d, complex_pair)

    # the Operator methods check declared shapes too
    op = as_operator(short, model_shape=(4, 4), data_shape=(40,))
    with pytest.raises(ValueError, match=r"expected \(3, 40\)"):
        op.apply(torch.randn(3, 4, 4, dtype=F64))


def test_wrong_adjoint_is_caught_in_the_reverse_pass():
    """The reverse and forward modes call the user's maps on cotangents and tangents; before
    the fix a wrong-size result there surfaced as a broadcasting or reshape error."""
    A = torch.randn(12, 9, dtype=F64)
    forward, adjoint = _callable_pair(A, (3, 3))
    calls = {"n": 0}

    def flaky_adjoint(y):  # right in the forward pass, wrong in the reverse pass
        calls["n"] += 1
        out = adjoint(y)
        return out if calls["n"] <= 1 else out[:, :2]

    op = as_operator((forward, flaky_adjoint))
    x = torch.randn(2, 3, 3, dtype=F64, requires_grad=True)
    y = invops.operators.apply_adjoint(op, invops.operators.apply_operator(op, x) - 1.0)
    with pytest.raises(
        ValueError, match=r"adjoint returned shape \(2, 2, 3\).*expected \(2, 3, 3\)"
    ):
        y.sum().backward()


def test_dottest_accepts_an_operator():
    """Before the fix ``invops.testing.dottest(as_operator(...))`` raised AttributeError on
    ``dtype``."""
    A = torch.randn(5, 3, dtype=F64)
    good = as_operator((lambda x: x @ A.T, lambda y: y @ A), model_shape=(3,), data_shape=(5,))
    assert invops.testing.dottest(good)
    assert invops.testing.dottest(as_operator(pylops.FirstDerivative(7)))
    mri = pylops.medical.MRI2D((6, 6), "vertical-reg", nlines=3, perc_center=0.0)
    assert invops.testing.dottest(as_operator(mri))
    wrong = as_operator((lambda x: x @ A.T, lambda y: 2 * y @ A), model_shape=(3,), data_shape=(5,))
    with pytest.raises(AssertionError, match="fails the dot test"):
        invops.testing.dottest(wrong)


# ------------------------------------------------------------------ 8. threads
@pytest.fixture
def fast_thread_switching():
    """Switch threads every microsecond so that races show up within a few hundred rounds."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(previous)


def _run_in_threads(n_threads, rounds, work, between):
    barrier = threading.Barrier(n_threads + 1)
    errors = []

    def worker(i):
        try:
            for _ in range(rounds):
                barrier.wait()
                work(i)
                barrier.wait()
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    results = []
    try:
        for _ in range(rounds):
            barrier.wait()
            barrier.wait()
            results.append(between())
    finally:
        for t in threads:
            t.join()
    assert not errors, errors
    return results


def test_concurrent_backward_calls_accumulate_every_gradient(fast_thread_switching):
    """Two threads call ``backward`` on one network, 40 rounds. Before the fix p.grad's
    check-then-add raced: updates were lost in 5 of the 40 rounds on a loaded machine (11 to
    22 of 60 in earlier standalone runs)."""
    torch.manual_seed(0)
    net = invops.Chain(*[invops.ActNorm(1) for _ in range(64)]).double()
    x = torch.randn(3, 1, dtype=F64)
    y = net(x)[0].detach()
    dy = torch.randn_like(y)
    net.backward(dy, y)
    single = [p.grad.clone() for p in net.parameters()]
    params = list(net.parameters())

    def reset_and_check():
        ok = all(torch.allclose(p.grad, 2 * g) for p, g in zip(params, single))
        for p in params:
            p.grad = None
        return ok

    for p in params:
        p.grad = None
    results = _run_in_threads(2, 40, lambda i: net.backward(dy, y), reset_and_check)
    assert all(results), f"lost updates in {results.count(False)} of {len(results)} rounds"


def test_concurrent_first_calls_initialise_once(fast_thread_switching):
    """Two threads make the first call of one network with different batches, 30 rounds.
    Before the fix their ActNorm initialisations interleaved: in 26 to 28 of 30 rounds (four
    runs) the network ended with some layers initialised from one batch and some from the
    other."""
    torch.manual_seed(0)
    layers = []
    for _ in range(16):
        layers += [invops.ActNorm(2), invops.LeakyReLU(0.3)]
    template = invops.Chain(*layers).double()
    batches = [
        torch.randn(16, 2, dtype=F64),
        torch.rand(16, 2, dtype=F64) ** 3 * 5 + 1,
    ]
    alone = []
    for b in batches:
        net = copy.deepcopy(template)
        net(b)
        alone.append(_state(net))
    shared = {}

    def first_call(i):
        shared["net"](batches[i])

    def check():
        state = _state(shared["net"])
        shared["net"] = copy.deepcopy(template)
        return any(_same_state(state, s) for s in alone)

    shared["net"] = copy.deepcopy(template)
    results = _run_in_threads(2, 30, first_call, check)
    assert all(results), f"mixed initialisations in {results.count(False)} of 30 rounds"


# ------------------------------------------------------------------ 9. reconstruction check
def _diverged_hint(seed=0, scale=0.3):
    """Eight float32 HINT layers whose weights were pushed far from their start (as by a
    diverged run): the stack amplifies rounding errors when inverted."""
    torch.manual_seed(seed)
    net = invops.Chain(*[invops.CouplingLayerHINT(4, 16, permute="both", ndim=1) for _ in range(8)])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return net, torch.randn(8, 4, 16, generator=gen)


def _gradients(net, x, plain):
    net.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    with invops.plain_autograd(plain):
        z, logdet = net(x)
    (0.5 * z.square().flatten(1).sum(1) - logdet).mean().backward()
    return torch.cat([p.grad.flatten() for p in net.parameters()] + [x.grad.flatten()])


@pytest.fixture
def reconstruction_check_off_after():
    yield
    invops.set_reconstruction_check(None)


def test_reconstruction_check_flags_a_non_invertible_network(reconstruction_check_off_after):
    """Before the fix ``invops.set_reconstruction_check`` did not exist (AttributeError) and
    the memory-free gradient of this network was 2.5% off with nothing said."""
    net, x = _diverged_hint()
    reference = _gradients(copy.deepcopy(net).double(), x.double(), plain=True).float()
    memory_free = _gradients(net, x, plain=False)
    plain = _gradients(net, x, plain=True)
    err_free = float((memory_free - reference).norm() / reference.norm())
    err_plain = float((plain - reference).norm() / reference.norm())
    assert err_free > 1e-2 and err_plain < 1e-3, (err_free, err_plain)  # the silent failure

    assert invops.set_reconstruction_check(1e-3) is None
    with pytest.warns(invops._reconstruction.ReconstructionWarning, match=r"layer 'layers\.\d"):
        _gradients(net, x, plain=False)  # loss.backward() through the autograd bridge
    invops.set_reconstruction_check(1e-3, action="raise")
    z, _ = net(x)
    with pytest.raises(FloatingPointError, match=r"Chain is numerically non-invertible"):
        net.backward(torch.ones_like(z), z)  # the explicit reverse API


def test_reconstruction_check_is_silent_on_a_healthy_network(reconstruction_check_off_after):
    """A network near its initialisation passes a tight tolerance, through every entry point;
    the check off draws nothing and changes no gradient."""
    net, x = _diverged_hint(scale=0.05)
    off = _gradients(net, x, plain=False)
    coupling = invops.CouplingLayerBasic(4, 8, ndim=1)  # a single layer, not a Chain
    invops.set_reconstruction_check(1e-4, action="raise")
    state = torch.get_rng_state()
    on = _gradients(net, x, plain=False)
    z, _ = net(x)
    net.backward(torch.ones_like(z), z)
    net.vjp(torch.ones_like(z), z)
    net.backward_inverse(torch.ones_like(x), x)
    coupling.backward(torch.ones_like(x), x)
    assert torch.equal(state, torch.get_rng_state())  # the global random stream is untouched
    assert torch.equal(on, off)
    with pytest.raises(ValueError, match="action"):
        invops.set_reconstruction_check(1e-3, action="ignore")


# ------------------------------------------------------------------ 10. small ones
def test_coupling_errors_name_the_public_layer():
    """Before the fix these messages began with ``Coupling:``, a class users never built."""
    layer = invops.CouplingLayerGlow(3, 4)
    with pytest.raises(ValueError, match=r"^CouplingLayerGlow: x must have 3 channels"):
        layer(torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match=r"^CouplingLayerGlow: scale bounds"):
        invops.CouplingLayerGlow(3, 4, scale=(2.0, 3.0))
    with pytest.raises(ValueError, match=r"^CouplingLayerHINT: y must have 5 channels"):
        invops.CouplingLayerHINT(5, 4, ndim=1).inverse(torch.randn(2, 4, 6))


def test_identity_never_hands_back_the_callers_array():
    """Before the fix ``Identity()(x)`` returned ``x`` itself (and numpy input its own memory),
    so writing into the output changed the input."""
    layer = invops.Identity()
    for x in (torch.zeros(2, 3), np.zeros((2, 3))):
        y, _ = layer(x)
        y += 1.0
        x_back, _ = layer.inverse(x)
        x_back += 1.0
        dx, x_rec = layer.backward(x, x)
        dx += 1.0
        x_rec += 1.0
        assert float(abs(x).max()) == 0.0


def test_a_failed_save_leaves_no_partial_file_and_names_the_path(tmp_path, monkeypatch):
    """Before the fix a write that failed midway raised ``[Errno 28] No space left on device``
    without the path (the first assertion failed) and left ``c.pt.partial`` behind; a path in
    a missing directory gave torch's RuntimeError naming only the directory."""
    net = invops.ActNorm(2)
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    target = tmp_path / "c.pt"
    with pytest.raises(OSError, match=r"c\.pt") as info:
        save_checkpoint(target, net)
    assert info.value.errno == errno.ENOSPC and info.value.filename == os.fspath(target)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(torch, "save", real_save)

    missing = tmp_path / "no" / "such" / "dir" / "c.pt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        save_checkpoint(missing, net)
    (tmp_path / "taken.pt").mkdir()  # a directory where the file should go
    with pytest.raises(OSError, match=r"taken\.pt'"):
        save_checkpoint(tmp_path / "taken.pt", net)
    assert sorted(os.listdir(tmp_path)) == ["taken.pt"]
    assert os.listdir(tmp_path / "taken.pt") == []


def test_no_warning_on_ordinary_use(tmp_path):
    """The new checks stay quiet on ordinary training: save, load, step."""
    net, opt = _trained_glow()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_checkpoint(tmp_path / "c.pt", net, opt, step=1)
        fresh, fresh_opt = _trained_glow()
        assert load_checkpoint(tmp_path / "c.pt", fresh, fresh_opt)["step"] == 1
    assert _same_state(_state(fresh), _state(net))
