"""Checkpoint and resume: a run interrupted, saved and resumed in a new process continues with the
same bits as the uninterrupted run (model, ActNorm state, Adam moments, scheduler, RNG streams)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import invops
from invops.checkpoint import load_checkpoint, save_checkpoint

WORKER = Path(__file__).with_name("resume_worker.py")


def _run(tmp_path, name, *args):
    out = tmp_path / f"{name}.pt"
    proc = subprocess.run(
        [sys.executable, str(WORKER), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


def _tensors(state):
    """Every tensor of a final state, flattened to (name, tensor) pairs."""
    pairs = list(state["model"].items())
    for index, moments in state["optimizer"]["state"].items():
        pairs += [(f"adam[{index}].{k}", v) for k, v in moments.items()]
    return pairs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    ckpt = tmp / "ckpt.pt"
    return {
        "straight": _run(tmp, "straight", "--steps", "6"),
        "first": _run(tmp, "first", "--steps", "3", "--save", str(ckpt)),
        "resumed": _run(tmp, "resumed", "--steps", "3", "--resume", str(ckpt)),
        "no_rng": _run(tmp, "no_rng", "--steps", "3", "--resume", str(ckpt), "--no-rng"),
    }


def test_resume_in_a_new_process_is_bit_identical(runs):
    straight, first, resumed = runs["straight"], runs["first"], runs["resumed"]
    assert resumed["step"] == 6
    assert first["losses"] + resumed["losses"] == straight["losses"]
    got, want = _tensors(resumed), _tensors(straight)
    assert [name for name, _ in got] == [name for name, _ in want]
    for (name, g), (_, w) in zip(got, want, strict=True):
        assert torch.equal(g, w), name
    assert resumed["optimizer"]["param_groups"] == straight["optimizer"]["param_groups"]


def test_resume_without_the_random_states_diverges(runs):
    """The bit-identity above is not automatic: the data stream depends on restored RNGs."""
    assert runs["no_rng"]["losses"] != runs["resumed"]["losses"]


def test_actnorm_is_not_reinitialised_on_resume(tmp_path):
    net = invops.NetworkGlow(2, 4, L=1, K=1)
    net(torch.randn(8, 2, 4, 4) * 5 + 3)  # initialise on a batch with large statistics
    path = tmp_path / "c.pt"
    save_checkpoint(path, net)
    fresh = invops.NetworkGlow(2, 4, L=1, K=1)
    load_checkpoint(path, fresh, restore_rng=False)
    fresh(torch.randn(8, 2, 4, 4))  # a new batch must not change the loaded ActNorm
    for (name, p), q in zip(net.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_checkpoint_of_a_data_parallel_wrapper_loads_into_a_bare_model(tmp_path):
    net = invops.ActNorm(3)
    net(torch.randn(5, 3))

    class Wrapper(torch.nn.parallel.DistributedDataParallel):
        def __init__(self, module):  # no process group needed to hold a module
            torch.nn.Module.__init__(self)
            self.module = module

    save_checkpoint(tmp_path / "w.pt", Wrapper(net), step=7)
    fresh = invops.ActNorm(3)
    assert load_checkpoint(tmp_path / "w.pt", fresh)["step"] == 7
    assert torch.equal(fresh.bias, net.bias)


def test_bad_checkpoints_raise(tmp_path):
    net = invops.ActNorm(2)
    torch.save({"model": net.state_dict()}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not an invops checkpoint"):
        load_checkpoint(tmp_path / "plain.pt", net)
    save_checkpoint(tmp_path / "c.pt", net)
    with pytest.raises(ValueError, match="no optimizer state"):
        load_checkpoint(tmp_path / "c.pt", net, torch.optim.SGD(net.parameters(), lr=1.0))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        save_checkpoint(tmp_path / "d.pt", net.state_dict())
    with pytest.raises(ValueError, match="size mismatch"):
        load_checkpoint(tmp_path / "c.pt", invops.ActNorm(3))
