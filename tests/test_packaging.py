"""The distribution: ``python -m build`` gives a wheel and an sdist; the wheel ships ``py.typed``
and the license and no tests, benchmarks, examples or docs, and installs into a fresh virtual
environment from which ``invops`` imports (from another directory than the checkout).

The fresh environment takes its dependencies (torch, pylops, ...) from the running interpreter
through a ``.pth`` file instead of downloading them, so the test runs offline; invops itself comes
only from the wheel. Slow (a build and a venv): ``pytest -m slow tests/test_packaging.py``; CI
runs it as a step.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _setuptools_is_recent() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 77


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "build", "--wheel", "--sdist", "--outdir", str(out), str(ROOT)]
    if _setuptools_is_recent():
        cmd.insert(3, "--no-isolation")  # offline, and faster; else build fetches setuptools
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_wheel_contents(dist):
    (wheel,) = dist.glob("invops-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "invops/py.typed" in names
    assert "invops/__init__.py" in names and "invops/networks/irim.py" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    top = {n.split("/")[0] for n in names}
    assert not top & {"tests", "benchmarks", "examples", "docs"}, sorted(top)
    assert all(n.startswith(("invops/", "invops-")) for n in names), sorted(top)
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "License-Expression: MIT" in text, text[:800]


def test_sdist_contents(dist):
    (sdist,) = dist.glob("invops-*.tar.gz")
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    for required in ("pyproject.toml", "README.md", "LICENSE", "invops/py.typed"):
        assert required in names, required


def test_wheel_installs_and_imports_in_a_fresh_venv(dist, tmp_path):
    (wheel,) = dist.glob("invops-*.whl")
    env_dir = tmp_path / "env"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    env_site = Path(
        subprocess.check_output(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            text=True,
        ).strip()
    )
    # the dependencies, from this interpreter; never the checkout
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    deps |= set(site.getsitepackages())
    deps = {d for d in deps if Path(d).is_dir() and Path(d).resolve() != ROOT}
    (env_site / "_invops_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps"]
    proc = subprocess.run(
        [*install, "--no-index", "--quiet", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = (
        "import pathlib, torch, invops\n"
        "f = pathlib.Path(invops.__file__).resolve()\n"
        "assert (f.parent / 'py.typed').is_file()\n"
        "y, logdet = invops.NetworkGlow(1, 4, L=1, K=1)(torch.randn(2, 1, 4, 4))\n"
        "assert logdet.shape == (2,)\n"
        "print(f, invops.__version__)\n"
    )
    proc = subprocess.run(
        [str(python), "-c", probe],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=elsewhere,
        env=clean_env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    path, version = proc.stdout.split()
    assert Path(path).is_relative_to(env_dir.resolve()), path
    assert version == wheel.name.split("-")[1], (version, wheel.name)
