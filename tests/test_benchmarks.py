"""Smoke runs of the benchmark scripts in ``benchmarks/`` at tiny sizes.

Each script runs end to end (hidden width 4, K 1-2, 8x8 images, one timed repetition, one
thread) and must print its table, write its JSON and its plot. At these sizes memory and time
are noise, so only what cannot flake is asserted: values are finite and of the right sign, the
memory-free and plain-autograd versions of a network give the same loss, and the sub-network
evaluation counts (deterministic) are those of each method. The Glow depth sweep goes through
fresh worker processes as in a real run; the other runs use ``--in-process`` to stay quick.
normflows, MemCNN and deepinv are optional: without them their systems must be skipped with a
message.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import glow_memory_time  # noqa: E402
import irim_unrolled  # noqa: E402
import jacobian_cost  # noqa: E402
import unrolled_vs_deepinv  # noqa: E402
from _deepinv import import_deepinv  # noqa: E402

TINY = ["--hidden", "4", "--batch", "2", "--repeats", "1", "--threads", "1"]


def _have(*names: str) -> bool:
    return all(importlib.util.find_spec(name) is not None for name in names)


@pytest.fixture(autouse=True)
def _restore_threads():
    """In-process runs set torch's thread count; give the rest of the suite its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def run(main, args: list[str], out: Path, capsys) -> str:
    main([*args, "--results", str(out), "--plots", str(out)])
    return capsys.readouterr().out


def check_point(p: dict) -> None:
    assert "error" not in p, p.get("error")
    assert p["peak"] > 0 and p["peak_increase"] >= 0
    assert p["params"] > 0 and p["optimizer"] >= 2 * p["params"]  # Adam: two moments
    assert p["step"]["median"] > 0 and math.isfinite(p["loss"])
    assert p["runtime"]["torch_threads"] == 1


def by_system(points: list[dict], key: str) -> dict:
    return {(p["system"], p[key]): p for p in points}


def test_glow_point_in_a_fresh_process_without_peers(tmp_path, capsys, monkeypatch):
    # the peers count as absent here whether or not they are installed
    monkeypatch.setitem(sys.modules, "normflows", None)
    monkeypatch.setitem(sys.modules, "memcnn", None)
    args = ["--sweep", "size", "--sizes", "8", "--K", "1", *TINY]
    out = run(
        glow_memory_time.main, [*args, "--systems", "invops", "normflows-memcnn"], tmp_path, capsys
    )

    assert "skipping normflows-memcnn: normflows, memcnn not installed (pip install" in out
    assert "| nx | params MB |" in out and "| nx | invops s/step |" in out
    result = json.loads((tmp_path / "glow_size_cpu.json").read_text())
    assert list(result["skipped"]) == ["normflows-memcnn"]
    assert result["machine"]["cores"] >= 1 and result["machine"]["versions"]["torch"]
    (point,) = result["points"]
    check_point(point)
    assert point["system"] == "invops" and point["forward"]["median"] > 0
    assert (point["evals"]["forward"], point["evals"]["backward"]) == (1, 1)
    assert (tmp_path / "glow_size_cpu.png").stat().st_size > 0


def test_glow_depth_sweep_in_process(tmp_path, capsys):
    args = ["--depths", "1", "2", "--nx", "8", "--in-process", *TINY]
    out = run(glow_memory_time.main, args, tmp_path, capsys)
    assert "| K | params MB |" in out and "flat in depth: K=1->2" in out
    result = json.loads((tmp_path / "glow_depth_cpu.json").read_text())
    points = by_system(result["points"], "K")
    systems = [s for s in glow_memory_time.SYSTEMS if s not in result["skipped"]]
    assert set(points) == {(s, k) for s in systems for k in (1, 2)}
    for p in points.values():
        check_point(p)
    # deterministic: evaluations per sub-network and step of each method
    expected = {"invops": (1, 1), "invops-plain": (1, 0), "normflows": (1, 0)}
    expected["normflows-memcnn"] = (1, 2)
    for (system, _), p in points.items():
        assert (p["evals"]["forward"], p["evals"]["backward"]) == expected[system], system
        if system == "invops":  # memory-free and plain steps alternating in one process
            assert len(p["interleaved"]["times"]["invops-plain"]) == 1
            assert p["interleaved"]["ratio"] > 0
    pairs = [("invops", "invops-plain"), ("normflows", "normflows-memcnn")]
    for a, b in pairs:
        for k in (1, 2):
            if (a, k) in points and (b, k) in points:
                assert points[(a, k)]["loss"] == pytest.approx(points[(b, k)]["loss"], rel=1e-5)
    assert len(result["targets"]) >= 3


@pytest.mark.skipif(not _have("normflows", "memcnn"), reason="normflows and memcnn not installed")
def test_memcnn_wrapped_normflows_glow_is_the_same_function():
    """Loss and every parameter gradient of the wrapped Glow equal plain normflows' (float64)."""
    torch.manual_seed(0)
    plain = glow_memory_time.build_normflows(K=2, hidden=8, levels=3, nx=16).double()
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        plain(x)  # ActNorm initialisation, then the copies share it
    wrapped = glow_memory_time.wrap_memcnn(copy.deepcopy(plain))
    with torch.no_grad():  # move the zero-initialised last convolutions off zero
        for p in plain.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for p, q in zip(plain.parameters(), wrapped.parameters()):
            q.copy_(p)
    losses, grads = [], []
    for model in (plain, wrapped):
        loss = model(x).mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad for p in model.parameters()])
    assert torch.allclose(losses[0], losses[1], rtol=1e-12, atol=0)
    assert len(grads[0]) == len(grads[1]) > 0
    for g0, g1 in zip(*grads):
        assert torch.allclose(g0, g1, rtol=1e-9, atol=1e-12 * float(g0.abs().max()))


@pytest.mark.filterwarnings("ignore:Data has no positive values")  # in-process peaks can be 0
def test_irim_unrolled_in_process(tmp_path, capsys):
    args = ["--iterations", "1", "2", "--nx", "8", "--in-process", *TINY]
    out = run(irim_unrolled.main, args, tmp_path, capsys)
    assert "| iterations | params MB |" in out
    result = json.loads((tmp_path / "irim_unrolled_cpu.json").read_text())
    points = by_system(result["points"], "iterations")
    assert set(points) == {(s, n) for s in ("invops", "plain") for n in (1, 2)}
    for n in (1, 2):
        a, b = points[("invops", n)], points[("plain", n)]
        check_point(a)
        check_point(b)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["evals"]["total"] == 2 and b["evals"]["total"] == 1
    assert (tmp_path / "irim_unrolled_cpu.png").stat().st_size > 0


def test_jacobian_cost(tmp_path, capsys):
    args = ["--K", "1", "--nx", "8", "--loop-hidden", "4", "--loop-nx", "8", "--loop-maxiter", "1"]
    args += ["--injl-K", "1", "--injl-hidden", "4", "--injl-nx", "8"]
    out = run(jacobian_cost.main, [*args, *TINY], tmp_path, capsys)
    assert "| jvp |" in out and "J.H @ w (input+params)" in out
    result = json.loads((tmp_path / "jacobian_cost_cpu.json").read_text())
    assert set(result["results"]) == {
        "NetworkGlow",
        "NetworkGlow (IN.jl configuration)",
        "NetworkLoop",
    }
    for timings in result["results"].values():
        assert timings["forward"]["ratio"] == 1.0
        assert all(t["median"] > 0 and math.isfinite(t["ratio"]) for t in timings.values())
    assert (tmp_path / "jacobian_cost_cpu.png").stat().st_size > 0


def test_largest_fitting_doubles_then_bisects():
    tried = []

    def fits(n):
        tried.append(n)
        return n <= 600

    assert glow_memory_time.largest_fitting(fits, 256, 8, 4096) == 600
    assert tried[:3] == [256, 512, 1024]
    assert glow_memory_time.largest_fitting(lambda n: n <= 100, 256, 8, 4096) is None
    assert glow_memory_time.largest_fitting(lambda n: True, 256, 8, 1000) == 1000


def test_maxsize_sweep_needs_a_gpu(capsys):
    with pytest.raises(SystemExit):
        glow_memory_time.parse_args(["--sweep", "maxsize"])
    assert "needs a GPU" in capsys.readouterr().err


QUICK = ["--quick", "--threads", "1", "--no-progress", "--seeds", "0"]


def test_unrolled_vs_deepinv_without_deepinv(tmp_path, capsys, monkeypatch):
    # deepinv counts as absent here whether or not it is installed
    monkeypatch.setattr(unrolled_vs_deepinv, "import_deepinv", lambda: None)
    systems = [
        "irim-proximal",
        "irim-zero",
        "irim-adjoint",
        "dinv-pgd",
        "tikhonov",
        "tv",
        "adjoint",
    ]
    memory = ["irim-proximal", "irim-steepest", "irim-steepest-tied"]
    args = [*QUICK, "--task", "deblur", "--systems", *systems, "--memory-systems", *memory]
    out = run(unrolled_vs_deepinv.main, args, tmp_path, capsys)

    assert "skipping dinv-pgd: deepinv not installed (pip install" in out
    assert "skipping tv: deepinv not installed" in out
    assert "| system | PSNR (dB) per seed |" in out and "memory-free (ms)" in out
    result = json.loads((tmp_path / "unrolled_vs_deepinv_quick.json").read_text())
    assert set(result["skipped"]) == {"dinv-pgd", "dinv-pgd-tied", "dinv-deq", "tv"}
    runs = {r["system"]: r for r in result["results"]}
    assert set(runs) == {"irim-proximal", "irim-zero", "irim-adjoint", "tikhonov", "adjoint"}
    for r in runs.values():
        assert "error" not in r and math.isfinite(r["psnr"]) and -1 <= r["ssim"] <= 1
    for system in ("irim-proximal", "irim-zero", "irim-adjoint"):  # ~60k parameters, as DnCNNs
        assert 54_000 <= runs[system]["params"] <= 66_000
        assert runs[system]["step_ms"] > 0
    # a tuned Tikhonov is no worse than its own weakest weight, and beats the plain adjoint
    assert runs["tikhonov"]["psnr"] >= min(runs["tikhonov"]["validation_psnr"].values()) - 3
    assert runs["tikhonov"]["psnr"] > runs["adjoint"]["psnr"]
    assert {m["system"] for m in result["memory"]} == set(memory)
    assert all(m["peak_mb"] > 0 for m in result["memory"])
    assert {t["system"] for t in result["timing"]} == {"irim-zero", "irim-proximal"}
    (steps,) = result["step_times"]  # deepinv absent: its PGD is not timed
    assert set(steps) == {"task", "irim-proximal", "irim-steepest"}
    assert all(v > 0 for k, v in steps.items() if k != "task")
    assert "alternating in one process (ms)" in out
    assert all(t["memory_free_ms"] > 0 and t["plain_ms"] > 0 for t in result["timing"])
    assert (tmp_path / "unrolled_vs_deepinv_quick.png").stat().st_size > 0


@pytest.mark.skipif(import_deepinv() is None, reason="deepinv not installed")
def test_unrolled_vs_deepinv_with_deepinv(tmp_path, capsys):
    systems = ["irim-proximal", "irim-adjoint", "dinv-pgd", "dinv-deq", "tv"]
    args = [*QUICK, "--task", "both", "--systems", *systems, "--no-cost"]
    out = run(unrolled_vs_deepinv.main, args, tmp_path, capsys)

    assert "skipping" not in out
    result = json.loads((tmp_path / "unrolled_vs_deepinv_quick.json").read_text())
    # one physics for every system: the same as deepinv's Blur (circular) and MRI
    assert set(result["settings"]["physics_vs_deepinv_max_diff"]) == {"deblur", "mri"}
    assert max(result["settings"]["physics_vs_deepinv_max_diff"].values()) < 1e-5
    runs = {(r["task"], r["system"]): r for r in result["results"]}
    assert set(runs) == {(t, s) for t in ("deblur", "mri") for s in systems}
    for task in ("deblur", "mri"):
        pgd = runs[task, "dinv-pgd"]
        assert "error" not in pgd and math.isfinite(pgd["psnr"])
        for irim in (runs[task, "irim-adjoint"], runs[task, "irim-proximal"]):
            assert abs(pgd["params"] - irim["params"]) <= 0.1 * irim["params"]  # equal size
        assert math.isfinite(runs[task, "tv"]["psnr"]) and runs[task, "tv"]["weight"] > 0


def test_unrolled_vs_deepinv_physics_are_adjoint():
    """<A x, y> = <x, A^T y> for both tasks' physics (float64)."""
    torch.manual_seed(0)
    for physics in (unrolled_vs_deepinv.Deblur(), unrolled_vs_deepinv.CartesianMRI()):
        x = torch.randn(2, physics.n_model, 32, 32, dtype=torch.float64)
        y = torch.randn(2, physics.n_model, 32, 32, dtype=torch.float64)
        lhs, rhs = (physics.A(x) * y).sum(), (x * physics.A_adjoint(y)).sum()
        assert torch.allclose(lhs, rhs, rtol=1e-12)
