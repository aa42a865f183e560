"""Smoke tests of the example scripts at reduced sizes."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    """Import ``examples/<name>.py`` as a module (the examples folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_density_banana(tmp_path):
    example = load_example("density_banana")
    out = tmp_path / "figs" / "banana.png"
    argv = ["--steps", "60", "--train", "2000", "--test", "1000", "--hidden", "32"]
    sizes = ["--glow-k", "4", "--hint-k", "4", "--spline-k", "2"]
    results = example.main([*argv, *sizes, "--out", str(out)])
    assert out.is_file() and out.stat().st_size > 10_000
    for key in ("glow", "hint", "spline", "gaussian", "true"):
        assert math.isfinite(results[key]), (key, results)
    # training lowers the held-out NLL of both flows, and the banana is not Gaussian
    assert results["glow"] < results["glow_before"] - 0.3, results
    assert results["hint"] < results["hint_before"] - 0.3, results
    assert results["spline"] < results["spline_before"] - 0.3, results
    assert results["true"] < results["gaussian"] - 1.0, results
    # no model beats the true density by more than sampling noise (a wrong log-Jacobian would)
    assert min(results["glow"], results["hint"], results["spline"]) > results["true"] - 0.1, results


def test_posterior_linear_gaussian(tmp_path):
    example = load_example("posterior_linear_gaussian")
    out = tmp_path / "figs" / "posterior.png"
    argv = ["--steps", "100", "--lr", "1e-2", "--hidden", "32", "--depth", "2", "--obs", "2"]
    results = example.main([*argv, "--samples", "4000", "--test", "1000", "--out", str(out)])
    assert out.is_file() and out.stat().st_size > 10_000
    # training lowers the held-out conditional NLL, which cannot go (much) below the exact one
    assert results["nll_after"] < results["nll_before"] - 1.0, results
    assert results["nll_after"] > results["nll_exact"] - 0.05, results
    # the learned posterior is far closer to the exact one than the prior is
    assert results["HINT_kl"] < 0.1 * results["prior_kl"], results
    assert results["HINT_mean_err"] < 0.5 * results["prior_mean_err"], results


def test_inpainting_conditional_glow(tmp_path):
    example = load_example("inpainting_conditional_glow")
    out = tmp_path / "figs" / "inpainting.png"
    argv = ["--steps", "60", "--batch", "32", "--K", "2", "--hidden", "16", "--test", "8"]
    results = example.main([*argv, "--samples", "8", "--out", str(out)])
    assert out.is_file() and out.stat().st_size > 10_000
    for key in ("nll_after", "rmse_glow", "rmse_exact", "coverage_glow"):
        assert math.isfinite(results[key]), (key, results)
    # training lowers the held-out conditional NLL and the training loss
    assert results["nll_after"] < results["nll_before"] - 0.3, results
    assert results["train_loss_last"] < results["train_loss_first"] - 0.2, results
    # no flow beats the exact Gaussian posterior (a wrong log-Jacobian could), and the exact
    # posterior mean beats filling the hole with the mean of the observed pixels
    assert results["nll_after"] > results["nll_exact"] - 0.05, results
    assert results["rmse_exact"] < results["rmse_observed_mean"], results


def _torchrun(tmp_path, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    small = ["--train", "256", "--test", "64", "--hidden", "8", "--K", "2", "--batch", "16"]
    proc = subprocess.run(
        [*cmd, str(EXAMPLES / "train_ddp.py"), *small, *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,  # the checkpoints are relative paths
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(EXAMPLES.parent), *sys.path])},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_train_ddp_with_torchrun_resumes_bit_identically(tmp_path):
    straight = _torchrun(tmp_path, "--steps", "8", "--checkpoint", "straight.pt")
    assert "2 process(es), DDP: steps 8" in straight
    before, after = map(float, re.search(r"bits/dim (\S+) -> (\S+),", straight).groups())
    assert after < before, straight
    _torchrun(tmp_path, "--steps", "4", "--checkpoint", "resumed.pt")
    _torchrun(tmp_path, "--steps", "8", "--checkpoint", "resumed.pt", "--resume")
    want = torch.load(tmp_path / "straight.pt", weights_only=True)
    got = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert got["step"] == 8
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), name
