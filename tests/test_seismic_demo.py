"""Smoke test of the main demo (``examples/irim_seismic.py``) at reduced size, and its physics."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pylops.utils import dottest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "irim_seismic.py"


def load_demo():
    spec = importlib.util.spec_from_file_location("example_irim_seismic", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("physics", ["poststack", "conv"])
def test_irim_seismic_runs_and_scores(tmp_path, physics):
    demo = load_demo()
    out = tmp_path / "figs" / "seismic.png"
    small = ["--size", "32", "--crop", "32", "--train", "6", "--test", "2", "--tune", "1"]
    cheap = ["--steps", "3", "--batch", "2", "--iterations", "2", "--hidden", "4", "--memory", "1"]
    solvers = ["--lsqr-iter", "5", "--tv-iter", "2"]
    results = demo.main([*small, *cheap, *solvers, "--physics", physics, "--out", str(out)])
    assert out.is_file() and out.stat().st_size > 10_000
    for method in ("background model", "PoststackInversion", "SplitBregman TV", "i-RIM"):
        for metric in ("psnr", "ssim", "rmse", "anomaly_rmse"):
            assert math.isfinite(results[method][metric]), (method, metric, results)
    assert len(results["ps_best"]) == 2 and len(results["tv_best"]) == 2


def test_earth_models_have_anomalies_and_differ_by_seed():
    demo = load_demo()
    models, masks = demo.earth_models(3, 32, seed=0)
    other, _ = demo.earth_models(3, 32, seed=1)
    assert models.shape == masks.shape == (3, 32, 32)
    assert all(mask.any() for mask in masks)
    assert not np.allclose(models, other)


@pytest.mark.parametrize("physics", ["poststack", "conv"])
def test_physics_is_linear_with_exact_adjoint_and_matches_its_torch_version(physics):
    demo = load_demo()
    op = demo.make_physics(physics, 20)
    dottest(op, op.shape[0], op.shape[1], rtol=1e-10, raiseerror=True)
    m = np.random.default_rng(0).standard_normal((2, 20, 20))
    forward, adjoint = demo.torch_operator_pair(physics, scale=1.0)
    got = forward(torch.as_tensor(m)).numpy()
    want = np.stack([(op @ x.ravel()).reshape(20, 20) for x in m])
    np.testing.assert_allclose(got, want, atol=1e-12)
    got_adj = adjoint(torch.as_tensor(m)).numpy()
    want_adj = np.stack([(op.H @ x.ravel()).reshape(20, 20) for x in m])
    np.testing.assert_allclose(got_adj, want_adj, atol=1e-12)
    # no padding artefact: a laterally constant model gives no response away from the edges
    # in depth for the post-stack operator, and a smooth one everywhere for the convolution
    flat = op @ np.full(400, 8.5)
    if physics == "poststack":
        np.testing.assert_allclose(flat, 0.0, atol=1e-12)
    else:
        np.testing.assert_allclose(flat, flat[0], atol=1e-12)
