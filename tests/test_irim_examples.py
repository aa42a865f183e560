"""Smoke tests of the i-RIM imaging examples (``examples/irim_mri.py``, ``examples/irim_ct.py``).

Each runs in its ``--quick`` mode (small images, a handful of training steps): the pipeline runs
end to end, every metric is computed and finite, and the figure is written.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytestmark = pytest.mark.usefixtures("one_thread")


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_irim_mri_quick(tmp_path):
    example = load_example("irim_mri")
    out = tmp_path / "figs" / "mri.png"
    results = example.main(["--quick", "--quiet", "--out", str(out)])
    assert out.is_file() and out.stat().st_size > 10_000
    for r in (4, 8):
        for name in ("zero-filled", "CG-SENSE", "TV", "i-RIM"):
            psnr, ssim = results[(r, name)]
            assert math.isfinite(psnr) and 0.0 < ssim <= 1.0, (r, name, psnr, ssim)
        # the tuned baselines improve on zero-filling
        assert results[(r, "TV")][0] > results[(r, "zero-filled")][0], results
        assert results[(r, "CG-SENSE")][0] > results[(r, "zero-filled")][0], results
        assert 1 <= results["chosen"][r]["cg_iter"] <= 5


def test_irim_ct_quick(tmp_path):
    example = load_example("irim_ct")
    out = tmp_path / "figs" / "ct.png"
    results = example.main(["--quick", "--quiet", "--out", str(out)])
    assert out.is_file() and out.stat().st_size > 10_000
    for name in ("back-projection", "LSQR", "TV", "i-RIM"):
        psnr, ssim = results[name]
        assert math.isfinite(psnr) and -1.0 <= ssim <= 1.0, (name, psnr, ssim)
    assert results["LSQR"][0] > results["back-projection"][0], results
