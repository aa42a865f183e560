"""The InvertibleModule contract: arrays in and out, errors, reverse(), Chain, dlogdet handling."""

import numpy as np
import pytest
import torch
from conftest import randomize_parameters

import invops
from invops._arrays import from_torch, to_torch


def small_chain(channels=3, length=4):
    chain = invops.Chain(
        invops.ActNorm(channels), invops.Conv1x1(channels), invops.AffineLayer((channels, length))
    ).double()
    chain(torch.randn(4, channels, length, dtype=torch.float64))
    randomize_parameters(chain)
    return chain


# ---------------------------------------------------------------- arrays
def test_numpy_in_numpy_out_and_torch_in_torch_out():
    chain = small_chain()
    x_np = np.random.default_rng(1).standard_normal((2, 3, 4))
    y, logdet = chain(x_np)
    assert isinstance(y, np.ndarray) and isinstance(logdet, np.ndarray)
    assert y.dtype == np.float64 and logdet.shape == (2,)
    y_t, logdet_t = chain(torch.from_numpy(x_np))
    assert isinstance(y_t, torch.Tensor)
    assert y_t.requires_grad  # torch in: attached to autograd through the bridge
    np.testing.assert_array_equal(y, y_t.detach().numpy())
    dx, dtheta, x_rec = chain.vjp(np.ones_like(y), y)
    assert isinstance(dx, np.ndarray) and all(isinstance(d, np.ndarray) for d in dtheta)
    y2, dy, ld, dld = chain.jvp(x_np, dx=np.ones_like(x_np))
    assert isinstance(dy, np.ndarray) and isinstance(dld, np.ndarray)


def test_numpy_zero_copy_both_ways():
    a = np.arange(12.0).reshape(3, 4)
    t = to_torch(a)
    assert t.data_ptr() == a.ctypes.data
    back = from_torch(t, "numpy")
    assert back.ctypes.data == a.ctypes.data


def test_negative_stride_and_read_only_inputs_are_safe():
    chain = small_chain()
    base = np.random.default_rng(2).standard_normal((2, 3, 4))
    flipped = base[:, :, ::-1]  # negative strides abort torch.from_dlpack in torch 2.13
    y, _ = chain(flipped)
    y_ref, _ = chain(np.ascontiguousarray(flipped))
    np.testing.assert_array_equal(y, y_ref)
    read_only = base.copy()
    read_only.setflags(write=False)
    t = to_torch(read_only)
    assert t.data_ptr() != read_only.ctypes.data  # a private copy: torch could write into it
    y, _ = chain(read_only)
    chain.backward(np.ones_like(y), y)
    np.testing.assert_array_equal(read_only, base)


def test_inputs_are_never_mutated():
    chain = small_chain()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    x_copy = x.clone()
    y, logdet = chain(x)
    y_copy, dy = y.clone(), torch.randn_like(y)
    dy_copy = dy.clone()
    chain.inverse(y)
    chain.backward(dy, y, dlogdet=torch.ones(2, dtype=torch.float64))
    chain.vjp(dy, y)
    chain.backward_inverse(dy, x)
    chain.jvp(x, dx=dy)
    chain.jacobian(x, wrt="both").H @ dy.numpy().ravel()
    assert torch.equal(x, x_copy) and torch.equal(y, y_copy) and torch.equal(dy, dy_copy)


# ---------------------------------------------------------------- errors
def test_dtype_mismatch_raises_type_error():
    chain = small_chain()
    with pytest.raises(TypeError, match=r"expected dtype torch.float64.*got torch.float32"):
        chain(np.zeros((2, 3, 4), dtype=np.float32))
    with pytest.raises(TypeError, match="floating-point"):
        chain(np.zeros((2, 3, 4), dtype=np.int64))
    with pytest.raises(TypeError, match="torch.Tensor, numpy.ndarray or cupy.ndarray"):
        chain([[1.0, 2.0]])


def test_wrong_channels_and_rank_raise_value_error():
    chain = small_chain()
    with pytest.raises(ValueError, match=r"must have 3 channels .* got 5"):
        chain(torch.zeros(2, 5, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"layout .* got a tensor of shape \(3,\)"):
        invops.ActNorm(3).double()(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"y must have shape \(B, 3, 4\), got \(2, 4, 4\)"):
        chain.inverse(torch.zeros(2, 4, 4, dtype=torch.float64))
    y, _ = chain(torch.zeros(2, 3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="cotangent of y: expected shape"):
        chain.backward(torch.zeros(2, 3, 5, dtype=torch.float64), y)
    with pytest.raises(ValueError, match=r"dlogdet: expected shape \(2,\)"):
        chain.backward(torch.zeros_like(y), y, dlogdet=torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="wrt"):
        chain.jacobian(torch.zeros(2, 3, 4, dtype=torch.float64), wrt="weights")
    with pytest.raises(TypeError, match="condition argument"):
        chain(torch.zeros(2, 3, 4, dtype=torch.float64), torch.zeros(2, 3, 4))


def test_wrong_device_raises_value_error():
    chain = small_chain()
    x = torch.zeros(2, 3, 4, dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match=r"expected a tensor on cpu .* got one on meta"):
        chain(x)


def test_dlogdet_rejected_without_logdet():
    layer = invops.ActNorm(2, logdet=False).double()
    x = torch.randn(3, 2, dtype=torch.float64)
    y = layer(x)
    assert isinstance(y, torch.Tensor)
    with pytest.raises(ValueError, match="logdet=False"):
        layer.backward(torch.ones_like(y), y, dlogdet=1.0)
    dx, x_rec = layer.backward(torch.ones_like(y), y)
    torch.testing.assert_close(x_rec, x)
    assert len(layer.jvp(x, dx=x)) == 2


def test_scalar_dlogdet_equals_broadcast_vector():
    chain = small_chain()
    y, _ = chain(torch.randn(3, 3, 4, dtype=torch.float64))
    dy = torch.randn_like(y)
    a = chain.vjp(dy, y, dlogdet=0.5)
    b = chain.vjp(dy, y, dlogdet=torch.full((3,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(a[0], b[0])
    for u, v in zip(a[1], b[1]):
        torch.testing.assert_close(u, v)


# ---------------------------------------------------------------- reverse and Chain
def test_reverse_shares_parameters_and_is_the_inverse():
    chain = small_chain()
    rev = chain.reverse()
    assert rev.reverse() is chain
    assert all(a is b for a, b in zip(rev.parameters(), chain.parameters()))
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    y, logdet = chain(x)
    x_back, logdet_rev = rev(y)
    torch.testing.assert_close(x_back, x)
    torch.testing.assert_close(logdet_rev, -logdet)
    with torch.no_grad():
        chain.layers[2].bias.add_(1.0)  # a change through one is seen by the other
    torch.testing.assert_close(rev(chain(x)[0])[0], x)
    for layer in chain:
        assert layer.reverse().reverse() is layer


def test_chain_logdets_add_and_inverse_order():
    chain = small_chain()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    y, logdet = chain(x)
    h, total = x, torch.zeros(2, dtype=torch.float64)
    for layer in chain:
        h, ld = layer(h)
        total = total + ld
    torch.testing.assert_close(y, h)
    torch.testing.assert_close(logdet, total)
    assert len(chain) == 3 and isinstance(chain[1], invops.Conv1x1)


def test_chain_rejects_non_invertible_members():
    with pytest.raises(TypeError, match="argument 1 must be an InvertibleModule"):
        invops.Chain(invops.ActNorm(2), torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="at least one"):
        invops.Chain()


def test_backward_accumulates_into_grad():
    chain = small_chain()
    y, _ = chain(torch.randn(2, 3, 4, dtype=torch.float64))
    dy = torch.randn_like(y)
    chain.backward(dy, y)
    first = [p.grad.clone() for p in chain.parameters()]
    chain.backward(dy, y)
    for g, p in zip(first, chain.parameters()):
        torch.testing.assert_close(p.grad, 2 * g)


def test_parameter_gradient_never_aliases_the_cotangent():
    layer = invops.AffineLayer((3,)).double()  # d(bias) = dy summed over a batch of one
    y, _ = layer(torch.randn(1, 3, dtype=torch.float64))
    dy = torch.randn_like(y)
    dy_copy = dy.clone()
    layer.backward(dy, y)
    layer.backward(dy, y)
    assert torch.equal(dy, dy_copy)


def test_parameterless_module_checks_cotangent_dtype_against_input():
    layer = invops.LeakyReLU(0.3)
    y, _ = layer(torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"dy: expected dtype torch.float64"):
        layer.backward(torch.ones(2, 3, dtype=torch.float32), y)


def test_jvp_leaves_shared_parameters_intact():
    # a convolution and its reverse() share one parameter under two names
    conv = invops.Conv1x1(3).double()
    chain = invops.Chain(conv, invops.ActNorm(3), conv.reverse()).double()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    params = list(chain.parameters())
    chain.jvp(x, dx=x, dtheta=[torch.randn_like(p) for p in params])
    assert all(a is b and b.requires_grad for a, b in zip(params, chain.parameters()))
    assert chain.layers[0].vectors is chain.layers[2].module.vectors


def test_scalar_dlogdet_takes_the_output_dtype_and_device():
    """A Python-number dlogdet on a parameterless layer means a (B,) tensor like the output,
    not one in torch's default dtype (which rounded it to float32 for float64 inputs)."""
    layer = invops.Sigmoid(-1.0, 2.0)
    x = torch.randn(3, 4, dtype=torch.float64)
    y, _ = layer(x)
    dy = torch.randn_like(y)
    want = layer.vjp(dy, y, dlogdet=torch.full((3,), 0.1, dtype=torch.float64))[0]
    assert torch.equal(layer.vjp(dy, y, dlogdet=0.1)[0], want)
    with torch.device("meta"):  # a default device other than the data's
        dx, _ = layer.backward(dy, y, dlogdet=0.1)
    assert dx.device == x.device
