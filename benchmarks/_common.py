"""Shared machinery of the benchmarks: machine info, peak memory, fresh-process points, timing.

Memory is measured in a fresh process per point so that nothing a previous configuration
allocated (caches, allocator arenas, autograd leftovers) is counted: the parent script starts
worker processes with :func:`run_config` and collects the JSON they print. On CPU the peak is
the resident set size (``VmHWM``, reset through ``/proc/self/clear_refs``), with
``MALLOC_MMAP_THRESHOLD_`` low enough that glibc returns freed tensors to the system at once;
on a GPU it is ``torch.cuda.max_memory_allocated``. That allocator setting turns every large
allocation into fresh pages, so times are taken in a second fresh process with the default
allocator. Sub-network evaluations are counted at the aten level (:func:`make_eval_counter`),
the same way for every system.

The parent imports neither torch nor the systems it measures: a worker reports what it ran with.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PLOTS = ROOT / "docs" / "benchmarks"
MARKER = "BENCH_RESULT "
MB = 2**20

PEER_INSTALL = "pip install --no-deps normflows==1.7.3 memcnn==1.5.2"


# ------------------------------------------------------------------------------ command line
def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Options every benchmark script takes."""
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for the JSON")
    parser.add_argument("--plots", type=Path, default=PLOTS, help="folder for the PNG plots")


def add_point_args(parser: argparse.ArgumentParser) -> None:
    """Options of the scripts that run each point in a fresh process."""
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run every point in this process: quicker for trying settings, but memory peaks "
        "then include what earlier points left behind (report fresh-process numbers)",
    )
    parser.add_argument("--timeout", type=float, help="seconds allowed per point")
    parser.add_argument(
        "--allocator",
        choices=("default", "tuned"),
        default="default",
        help="glibc malloc settings of the timing processes: 'default', or 'tuned' "
        f"({' '.join(f'{k}={v}' for k, v in TUNED_MALLOC.items())}), which keeps freed "
        "memory in the heap for reuse instead of returning it to the system",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one point, in a fresh process


# glibc returns large freed blocks to the system by default, so every large tensor of the next
# layer starts with page faults; these settings keep freed memory in the heap for reuse (the
# effect that jemalloc or tcmalloc, which PyTorch recommends for CPU training, also has)
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "68719476736"}


def setup_torch(threads: int | None, seed: int) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------ machine info
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine_info(device: str, dtype: str, threads: int | None) -> dict:
    """Where and with what a benchmark ran (the workers add their ``runtime``)."""
    packages = ("torch", "pylops", "numpy", "normflows", "memcnn")  # invops: see "git"
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "dtype": dtype,
        "threads_requested": threads,
        "versions": {name: _version(name) for name in packages},
        "git": _git_commit(),
    }


def runtime_info(device: str) -> dict:
    """What a worker actually ran with (threads, GPU name, cuDNN autotuning)."""
    import torch

    info = {"torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    if device.startswith("cuda"):
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    return info


def missing_peers(systems: Iterable[str], needs: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """``{system: reason}`` for every requested system whose packages cannot be imported."""
    skipped = {}
    for system in systems:
        absent = [name for name in needs.get(system, ()) if not _importable(name)]
        if absent:
            skipped[system] = f"{', '.join(absent)} not installed ({PEER_INSTALL})"
    return skipped


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# ------------------------------------------------------------------------------ memory
def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakMemory:
    """Peak memory of a block, and its increase over the memory in use just before it.

    CPU: resident set size, its high-water mark reset on entry (Linux ``clear_refs``); run under
    ``MALLOC_MMAP_THRESHOLD_`` (as :func:`run_point` does) so that freed tensors leave the RSS.
    CUDA: ``torch.cuda.max_memory_allocated`` (tensors only, not the CUDA context).
    """

    def __init__(self, device: str) -> None:
        self.device, self.cuda = device, device.startswith("cuda")
        self.before = self.peak = self.increase = 0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")
            self.before = _status_bytes("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = _status_bytes("VmHWM")
        self.increase = self.peak - self.before


def tensor_bytes(tensors: Iterable) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_bytes(optimizer) -> int:
    """Bytes of the optimizer's state tensors (Adam: two moments per parameter)."""
    import torch

    return tensor_bytes(
        v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)
    )


# ------------------------------------------------------------------------------ timing
def median_time(fn: Callable[[], Any], repeats: int, device: str) -> dict:
    """Median wall time of ``fn`` over ``repeats`` calls (the caller warms up first)."""
    import torch

    cuda = device.startswith("cuda")
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return {"median": statistics.median(times), "times": times}


# ------------------------------------------------------------------------------ eval counting
def _storage_key(t) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return 0


def make_eval_counter(subnets: Sequence):
    """An :class:`EvalCounter` for these sub-networks (built lazily: it needs torch)."""
    import torch
    from torch.autograd.function import BackwardCFunction
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    aten = torch.ops.aten
    apply_ops = {
        aten.convolution.default,
        aten.addmm.default,
        aten.mm.default,
        aten.linear.default,
        aten.matmul.default,
    }

    class EvalCounter(TorchDispatchMode):
        """Count evaluations of sub-networks: aten calls that apply a sub-network's first weight.

        A call inside one of autograd's built-in derivative formulas backpropagates; any other
        call, including a recomputation inside a custom ``autograd.Function``'s backward (the
        memory-free bridge, MemCNN's wrapper), is an evaluation.
        """

        def __init__(self) -> None:
            super().__init__()
            firsts = [next(p for p in net.parameters() if p.ndim >= 2) for net in subnets]
            self.keys = {_storage_key(p) for p in firsts}
            self.n_subnets = len(subnets)
            self.calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in apply_ops and self._applies_subnet(args, kwargs):
                node = torch._C._current_autograd_node()
                if node is None or isinstance(node, BackwardCFunction):
                    self.calls += 1
            return func(*args, **kwargs)

        def _applies_subnet(self, args, kwargs) -> bool:
            return any(
                isinstance(t, torch.Tensor) and _storage_key(t) in self.keys
                for t in tree_flatten((args, kwargs))[0]
            )

    return EvalCounter()


def count_evals(forward: Callable[[], Any], backward: Callable[[Any], None], subnets) -> dict:
    """Evaluations per sub-network in ``forward()`` and in ``backward(forward())``."""
    counter = make_eval_counter(subnets)
    with counter:
        out = forward()
    n_forward = counter.calls
    with counter:
        backward(out)
    per = counter.n_subnets
    return {
        "forward": n_forward / per,
        "backward": (counter.calls - n_forward) / per,
        "total": counter.calls / per,
        "subnets": per,
    }


# ------------------------------------------------------------------------------ processes
def run_point(script: Path, config: dict, timeout: float | None = None) -> dict:
    """Run one phase of a point in a fresh ``script --worker`` process; its JSON result.

    The memory phase runs with ``MALLOC_MMAP_THRESHOLD_=65536`` (freed tensors leave the RSS at
    once); the time phase with the default allocator, as a user would run, or with
    :data:`TUNED_MALLOC` when ``config["allocator"] == "tuned"``. A failed or
    timed-out worker gives ``{**config, "error": ...}`` instead of raising, so a sweep goes on.
    """
    env = {k: v for k, v in os.environ.items() if k not in TUNED_MALLOC}
    if "memory" in config["phases"]:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    elif config.get("allocator") == "tuned":
        env |= TUNED_MALLOC
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, str(script), "--worker", json.dumps(config)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**config, "error": f"timed out after {timeout} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {**config, "error": f"worker exited with {proc.returncode}: {' | '.join(tail)}"}


def run_config(
    script: Path,
    measure: Callable[[dict], dict],
    config: dict,
    args: argparse.Namespace,
    phases: Sequence[str] = ("memory", "time"),
) -> dict:
    """One point: each phase in its own fresh process, or all here with ``--in-process``.

    ``measure(config)`` runs the phases named in ``config["phases"]`` after a warm-up step. A
    point that fails or runs out of memory in its memory phase is not timed.
    """
    if args.in_process:
        return measure({**config, "phases": list(phases)})
    result: dict = {}
    for phase in phases:
        result |= run_point(script, {**config, "phases": [phase]}, args.timeout)
        if "error" in result or result.get("oom"):
            break
    result["phases"] = list(phases)
    return result


def worker_reply(result: dict) -> None:
    """Print a worker's result where :func:`run_point` looks for it."""
    print(MARKER + json.dumps(result), flush=True)


def write_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


# ------------------------------------------------------------------------------ reporting
def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def new_figure(ncols: int):
    """A matplotlib figure with ``ncols`` axes, on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4.2), squeeze=False)
    return fig, axes[0]


def save_figure(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
