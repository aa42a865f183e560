"""Peak memory of a reverse pass does not grow with depth (measured by live tensor storage)."""

import pytest
import torch

import invops
from invops.testing import TensorMemoryTracker


def deep_chain(depth, channels=4, size=16):
    layers = []
    for _ in range(depth):
        layers += [
            invops.ActNorm(channels),
            invops.Conv1x1(channels),
            invops.AffineLayer((channels, size, size)),
        ]
    net = invops.Chain(*layers).double()
    net(torch.randn(2, channels, size, size, dtype=torch.float64))
    return net


def param_bytes(net):
    return sum(p.numel() * p.element_size() for p in net.parameters())


def peak_of(fn):
    with TensorMemoryTracker() as tracker:
        fn()
    return tracker.peak


def plain_peak(net, x):
    def run():
        xx = x.clone().requires_grad_()
        with invops.plain_autograd():
            y, logdet = net(xx)
            (0.5 * (y**2).sum() - logdet.sum()).backward()

    return peak_of(run)


@pytest.mark.parametrize("mode", ["backward", "bridge"])
def test_reverse_pass_peak_is_flat_in_depth(mode):
    x = torch.randn(8, 4, 16, 16, dtype=torch.float64)
    peaks, params = {}, {}
    for depth in (2, 8, 32):
        net = deep_chain(depth)
        params[depth] = param_bytes(net)
        if mode == "backward":
            with torch.no_grad():
                y, _ = net(x)

            def run(net=net, y=y):
                net.backward(y, y, dlogdet=1.0)
        else:

            def run(net=net):
                xx = x.clone().requires_grad_()
                y, logdet = net(xx)
                (0.5 * (y**2).sum() - logdet.sum()).backward()

        peaks[depth] = peak_of(run)
    # growth allowed: the parameter gradients themselves, plus 10%
    assert peaks[32] <= 1.1 * peaks[2] + (params[32] - params[2]), peaks
    assert peaks[32] < plain_peak(deep_chain(32), x) / 4, peaks


def test_plain_autograd_grows_with_depth():
    x = torch.randn(8, 4, 16, 16, dtype=torch.float64)
    peaks = {depth: plain_peak(deep_chain(depth), x) for depth in (2, 32)}
    assert peaks[32] > 5 * peaks[2], peaks
