"""Data-parallel training: two gloo processes on localhost against one process on the whole batch.

``ddp_worker.py`` runs under ``torchrun`` and writes, per process, the gradients obtained through
``DistributedDataParallel`` + ``loss.backward()`` and through the explicit reverse API +
``all_reduce_gradients``, and the parameters after ActNorm's first-call initialisation. Each
process only sees half of the batch, so agreement with the single-process gradient of the whole
batch shows that DDP's all-reduce hooks fire through the memory-free bridge, that the helper
averages correctly, and that ActNorm initialises from the global batch.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_worker import CASES, explicit_gradients, mean_loss

import invops
from invops.distributed import all_reduce_gradients

WORKER = Path(__file__).with_name("ddp_worker.py")
TOL = 1e-10


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    """Run the two-process job once for the module; bounded in time."""
    out = tmp_path_factory.mktemp("ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    proc = subprocess.run(
        [*cmd, str(WORKER), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {
        (case, rank): torch.load(out / f"{case}_rank{rank}.pt", weights_only=True)
        for case in CASES
        for rank in (0, 1)
    }


def _single_process(case):
    """Gradient of the mean loss over the whole batch in one process, plain autograd."""
    model, batch, constants = CASES[case]()
    with invops.plain_autograd():
        mean_loss(case, model(*batch, *constants)).backward()
    return model


def _assert_close(got, want, what):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        scale = w.abs().max().clamp(min=1e-12)
        assert (g - w).abs().max() <= TOL * scale, f"{what}: tensor {i} differs"


@pytest.mark.parametrize("case", list(CASES))
def test_ddp_gradients_equal_single_process_gradients(ddp_results, case):
    reference = _single_process(case)
    want = [p.grad for p in reference.parameters()]
    assert all(w.abs().max() > 0 for w in want[:4]), "vacuous: zero reference gradients"
    for rank in (0, 1):
        _assert_close(ddp_results[case, rank]["ddp"], want, f"{case} DDP rank {rank}")


@pytest.mark.parametrize("case", list(CASES))
def test_explicit_backward_with_all_reduce_equals_single_process(ddp_results, case):
    reference = _single_process(case)
    want = [p.grad for p in reference.parameters()]
    for rank in (0, 1):
        _assert_close(ddp_results[case, rank]["explicit"], want, f"{case} explicit rank {rank}")


@pytest.mark.parametrize("case", list(CASES))
def test_actnorm_initialises_from_the_global_batch(ddp_results, case):
    reference = _single_process(case)
    want = [p.detach() for p in reference.parameters()]
    for rank in (0, 1):
        _assert_close(ddp_results[case, rank]["params"], want, f"{case} params rank {rank}")


def test_half_batch_gradients_differ_from_the_global_ones():
    """The comparisons above can fail: one process's half batch gives another gradient."""
    model, batch, constants = CASES["glow"]()
    explicit_gradients("glow", model, tuple(t[:2] for t in batch), constants)
    local = [p.grad for p in model.parameters()]
    reference = [p.grad for p in _single_process("glow").parameters()]
    assert max((g - w).abs().max() for g, w in zip(local, reference, strict=True)) > 1e-3


def test_all_reduce_gradients_without_a_process_group_fills_missing_grads():
    net = invops.NetworkGlow(2, 4, L=1, K=1).double()
    frozen = net.parameters().__next__()
    frozen.requires_grad_(False)
    all_reduce_gradients(net)
    assert frozen.grad is None
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in trainable)
