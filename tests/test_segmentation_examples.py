"""Smoke tests of the segmentation scenarios at reduced size: the 4D change-detection example,
the weakly supervised example and the 4D memory benchmark.

Each runs end to end in a few seconds and must compute its metrics (finite numbers in range)
and write its figure; the values at these sizes are not asserted, except where they are exact
properties rather than results of training (the two gradient routes agree).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load(folder: str, name: str):
    """Import ``<folder>/<name>.py`` as a module (examples/ and benchmarks/ are not packages)."""
    if folder == "benchmarks" and str(ROOT / folder) not in sys.path:
        sys.path.insert(0, str(ROOT / folder))  # the benchmark imports its sibling _common
    spec = importlib.util.spec_from_file_location(f"{folder}_{name}", ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_segmentation_4d_runs_and_computes_its_metrics(tmp_path):
    example = load("examples", "segmentation_4d")
    out = tmp_path / "figs" / "seg4d.png"
    argv = ["--size", "12", "--bands", "4", "--steps", "2", "--points", "5", "--hidden", "4"]
    results = example.main([*argv, "--depth", "3", "--threads", "1", "--out", str(out)])
    assert out.is_file() and out.stat().st_size > 10_000
    for key in ("accuracy", "balanced_invertible_hyperbolic_network", "points_accuracy"):
        assert 0.0 <= results[key] <= 1.0, (key, results)
    for method in ("no_change_everywhere", "spectral_difference", "per_pixel_logistic_regression"):
        assert 0.0 <= results[f"accuracy_{method}"] <= 1.0, (method, results)
        assert 0.0 <= results[f"iou_{method}"] <= 1.0, (method, results)
    assert math.isfinite(results["loss_last"]) and results["train_time"] > 0


def test_weak_supervision_runs_and_computes_its_metrics(tmp_path):
    example = load("examples", "weak_supervision")
    out = tmp_path / "figs" / "weak.png"
    argv = ["--steps", "2", "--train", "2", "--test", "1", "--height", "16", "--width-px", "32"]
    results = example.main([*argv, "--points", "5", "--width", "0.5", "--out", str(out)])
    assert out.is_file() and out.stat().st_size > 10_000
    for key in ("accuracy_weak", "accuracy_weak_autograd", "accuracy_points"):
        assert 0.0 <= results[key] <= 1.0, (key, results)
    for name in ("weak (explicit backward)", "point labels alone", "full labels (reference)"):
        assert math.isfinite(results[f"{name}: final distance"]), name
    assert results["weak (explicit backward): mean sweeps"] >= 1
    # net.backward(y - P_D(y), y) and loss.backward() on distance_squared: the same gradient
    assert results["grad_rel_diff"] < 1e-5


def test_weak_supervision_data_respect_the_prior():
    example = load("examples", "weak_supervision")
    import numpy as np

    rng = np.random.default_rng(1)
    lithos, labels = example.make_sections(3, 16, 32, rng)
    fractions = labels.mean(axis=(1, 2))
    assert np.all((fractions >= example.FRACTION[0]) & (fractions <= example.FRACTION[1]))
    d = example.modalities(lithos, rng)
    assert d.shape == (3, len(example.MODALITIES), 16, 32)
    assert np.allclose(d.mean(axis=(2, 3)), 0, atol=1e-9)
    mask = example.point_annotations(labels, 4, rng)
    assert mask.sum() == 12 and np.all(labels[mask] == 1)


@pytest.mark.filterwarnings("ignore:Data has no positive values")
def test_segmentation_memory_benchmark_in_process(tmp_path, capsys):
    bench = load("benchmarks", "segmentation_memory")
    args = ["--shapes", "6x4x4", "8x6x4", "--depths", "1", "2", "--widths", "2", "4"]
    args += ["--in-process", "--threads", "1", "--results", str(tmp_path), "--plots", str(tmp_path)]
    payload = bench.main(args)
    out = capsys.readouterr().out
    assert "| volume | L | C |" in out and "extrapolated to 307x241x154" in out
    assert json.loads((tmp_path / "segmentation_memory_cpu.json").read_text())["points"]
    assert (tmp_path / "segmentation_memory_cpu.png").stat().st_size > 0
    points = payload["points"]
    assert len(points) == 3 * 5 and all("error" not in p for p in points)
    for p in points:
        assert p["tensor_peak"] > 0 and math.isfinite(p["loss"])
    for system in bench.SYSTEMS:
        fit = payload["fits"][f"{system}/tensor_peak"]
        assert fit["n_points"] == 5 and math.isfinite(fit["r2"])
        assert math.isfinite(payload["extrapolation"]["systems"][system]["tensors_gb"])
    # the three systems compute the same kind of loss on the same data: finite, comparable
    losses = {p["system"]: p["loss"] for p in points if p["depth"] == 1 and p["width"] == 4}
    assert set(losses) == set(bench.SYSTEMS)


def test_segmentation_memory_worker_reports_one_point(capsys):
    bench = load("benchmarks", "segmentation_memory")
    cfg = {"system": "invops", "shape": [4, 4, 2], "depth": 2, "width": 2}
    bench.main(["--worker", json.dumps({**cfg, "threads": 1, "seed": 0, "phases": ["memory"]})])
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("BENCH_RESULT "))
    point = json.loads(line[len("BENCH_RESULT ") :])
    assert point["voxels"] == 32 and point["tensor_peak"] > 0 and "rss_increase" in point


def test_memory_model_fit_recovers_known_coefficients():
    bench = load("benchmarks", "segmentation_memory")
    coef = [1e5, 8.0, 24.0, 12.0, 40.0]
    points = [
        {
            "voxels": v,
            "width": c,
            "depth": L,
            "peak": sum(a * f for a, f in zip(coef, bench.features(v, c, L))),
        }
        for v in (100, 400, 1600)
        for c in (4, 8)
        for L in (1, 3)
    ]
    model = bench.fit(points, "peak")
    assert model["r2"] > 1 - 1e-12 and model["max_rel_err"] < 1e-9
    assert [model["coef"][f] for f in bench.FEATURES] == pytest.approx(coef, rel=1e-6)
    assert bench.predict(model, 10**7, 128, 18) == pytest.approx(
        sum(a * f for a, f in zip(coef, bench.features(10**7, 128, 18))), rel=1e-9
    )
