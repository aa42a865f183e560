"""Helpers shared by the medical-imaging i-RIM examples (``irim_mri.py`` and ``irim_ct.py``).

Not part of the library: a differentiable SSIM for the training loss, the learning-rate schedule
and a way to run the classical baselines in a second process while the i-RIM trains.
"""

from __future__ import annotations

import math
import multiprocessing

import torch
import torch.nn.functional as F

__all__ = ["add_run_options", "cosine_lr", "in_background", "ssim_torch"]


def ssim_torch(
    estimate: torch.Tensor, truth: torch.Tensor, data_range: torch.Tensor
) -> torch.Tensor:
    """Differentiable SSIM per image of ``(B, H, W)`` batches, as scikit-image computes it.

    7x7 uniform windows, K1 = 0.01, K2 = 0.03, sample covariances, averaged over the windows
    that fit inside the image (scikit-image crops the same border).
    """
    x, y = estimate[:, None], truth[:, None]
    win, n = 7, 49

    def mean(t):
        return F.avg_pool2d(t, win, stride=1)

    ux, uy = mean(x), mean(y)
    norm = n / (n - 1)
    vx, vy = norm * (mean(x * x) - ux * ux), norm * (mean(y * y) - uy * uy)
    vxy = norm * (mean(x * y) - ux * uy)
    c1 = (0.01 * data_range).reshape(-1, 1, 1, 1) ** 2
    c2 = (0.03 * data_range).reshape(-1, 1, 1, 1) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))


def cosine_lr(base: float, progress: float, warmup: float = 0.05) -> float:
    """Linear warm-up over the first ``warmup`` of training, then cosine decay to zero."""
    ramp = min(1.0, progress / warmup) if warmup else 1.0
    return base * ramp * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def in_background(fn, *args):
    """Start ``fn(*args)`` in a forked process; return a function that waits for its result.

    Forking (not spawning) hands the child the arrays without pickling and lets it call
    functions of a script that is not an importable module.
    """
    ctx = multiprocessing.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)

    def target():
        try:
            sender.send(("ok", fn(*args)))
        except BaseException as err:  # the parent re-raises it
            sender.send(("error", f"{type(err).__name__}: {err}"))
        sender.close()

    process = ctx.Process(target=target, daemon=True)
    process.start()
    sender.close()  # the child holds the only sending end: its death ends recv()

    def result():
        status, value = receiver.recv()
        process.join()
        if status != "ok":
            raise RuntimeError(f"the baselines' process failed: {value}")
        return value

    return result


def add_run_options(parser, name: str) -> None:
    """The options both examples share: loss, threads, scheduling, device, seed, sizes, output."""
    parser.add_argument("--loss", choices=["ssim+l1", "ssim+mse", "mse"], default="ssim+l1")
    # one intra-op thread: on our shared two-core machine, two torch threads competing with other
    # processes made a training step 7x slower (OpenMP threads waiting on each other); the
    # second core runs the baselines meanwhile (see --sequential)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--sequential", action="store_true", help="run the baselines after training, not beside"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--out", default=f"examples/output/{name}.png")
