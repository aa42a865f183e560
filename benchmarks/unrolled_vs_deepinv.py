"""Learned unrolled reconstruction: invops' i-RIM against deepinv's unrolled PGD and DEQ.

What is measured. Two small inverse problems on 32x32 piecewise-constant images (random
rectangles and ellipses, intensities in [0, 1]):

- ``deblur``: Gaussian blur of standard deviation 2 pixels (15x15 kernel, circular boundary),
  white noise of standard deviation 0.02;
- ``mri``: single-coil Cartesian MRI, 4x acceleration (one fixed mask of whole phase-encoding
  lines with a fully sampled centre, ``invops.physics.cartesian_mask(rng=0)``), orthonormal
  centred 2D FFT, noise of standard deviation 0.02 on each of the real and imaginary parts.
  Images are complex-valued in the model (two real channels, real part first, as deepinv's MRI
  physics has them); the true imaginary part is zero, every system is trained on both channels
  and scored on the magnitude of its output.

Every learned system runs 6 iterations with about 60k parameters, trained for ``--steps``
Adam steps (1500) on batches of 8 on the same stream of training images and noise (drawn from
the seed, the same for every system), mean squared error of the final estimate:

- ``irim-proximal``: ``invops.NetworkLoop(type="proximal", init="steepest")``, invops'
  recommended configuration: each iteration takes a gradient step on the data fit and corrects
  it with a full-resolution conditioner through a damped velocity (an invertible proximal
  gradient step with memory); ``irim-proximal-tied`` the same with one conditioner shared by
  every iteration (wider);
- ``irim-zero``: ``invops.NetworkLoop`` (additive i-RIM, one set of conditioner weights per
  iteration) started from zero;
- ``irim-adjoint``: the same, started from ``w * A^T d`` (``init="adjoint"``, ``w`` learned);
- ``irim-steepest``: started from ``w t(d) A^T d``, ``t(d) = |A^T d|^2 / |A A^T d|^2`` the
  exact line-search step from zero (``init="steepest"``, invops' recommended start);
- ``irim-steepest-tied``: the same, one set of conditioner weights shared by every iteration
  (``tied=True``), wider to have about as many parameters;
- ``irim-steepest-fullres``: as ``irim-steepest`` with conditioners at full resolution
  (3x3 convolutions, stride 1) instead of the default quarter resolution (a 4x4 stride-4
  convolution first, as in InvertibleNetworks.jl); ``irim-zero-fullres`` the same from zero;
- ``dinv-pgd``: deepinv's unrolled proximal gradient descent (``deepinv.optim.PGD(...,
  unfold=True)``, started from ``A^T d``, learned step sizes) with one DnCNN per iteration;
- ``dinv-pgd-tied``: the same with one DnCNN shared by all iterations (wider);
- ``dinv-deq``: deepinv's deep equilibrium PGD (``DEQ=True``: forward fixed-point iterations
  without graph, implicit gradient by a backward fixed-point solve), one shared DnCNN.

Baselines without training, their weight tuned on 32 validation images by a grid search:
``adjoint`` (``A^T d``), ``tikhonov`` (conjugate gradients on ``(A^T A + lam I) x = A^T d``)
and ``tv`` (deepinv's ``TVPrior`` in its PGD solver, 200 iterations; needs deepinv).

Every system sees the same physics: one torch implementation (:class:`Deblur`,
:class:`CartesianMRI`) with ``A`` and ``A_adjoint``, handed to deepinv as a
``deepinv.physics.LinearPhysics`` and to invops as a ``(forward, adjoint)`` pair. It agrees
with ``deepinv.physics.Blur(padding="circular")`` and ``deepinv.physics.MRI`` (checked at
start when deepinv is installed, and by the test).

Reported: PSNR and SSIM (scikit-image, data range 1) over ``--test-images`` held-out images
per seed and their mean over the seeds, parameter counts, the median training-step time, the
memory-free i-RIM step against the same loop under ``invops.plain_autograd()``, and the peak
tensor memory of one training step (forward and backward, gradients included) against the
number of iterations, measured with ``invops.testing.TensorMemoryTracker`` for invops and
deepinv alike (every tensor storage alive during the step, wherever it is held).

deepinv is optional (``make bench-deps``); without it its systems and the TV baseline are
skipped with a message and the rest runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from _common import (
    MB,
    PLOTS,
    RESULTS,
    fmt,
    machine_info,
    markdown_table,
    new_figure,
    save_figure,
    write_json,
)
from _deepinv import DEEPINV_INSTALL, import_deepinv

SIZE = 32
ITERATIONS = 6
BATCH = 8
NOISE = 0.02
BLUR_SIGMA = 2.0
ACCELERATION = 4
VALIDATION_IMAGES = 32
TEST_SEED, VALIDATION_SEED = 10_000, 20_000

# widths giving about 60k parameters at 6 iterations (printed with every run)
IRIM_MEMORY = {"deblur": 4, "mri": 4}  # memory channels (the data-fit gradient goes in n_model)
IRIM_HIDDEN = {
    ("deblur", "untied"): 29,
    ("mri", "untied"): 28,
    ("deblur", "tied"): 76,
    ("mri", "tied"): 76,
    ("deblur", "fullres"): 31,
    ("mri", "fullres"): 31,
    ("deblur", "proximal"): 31,
    ("mri", "proximal"): 30,
    ("deblur", "proximal-tied"): 80,
    ("mri", "proximal-tied"): 79,
}
DNCNN = {"untied": (6, 16), "tied": (8, 32)}  # (depth, width)
LEARNING_RATES = {"irim": 3e-3, "dinv": 3e-3}  # best of 1e-3, 3e-3, 1e-2 at 200 steps
# deepinv's DEQ diverged at 3e-3 (deblurring, seed 0: loss 870 after 1500 steps)
SYSTEM_LEARNING_RATES = {"dinv-deq": 1e-3}

SYSTEMS = (
    "irim-proximal",
    "irim-proximal-tied",
    "irim-zero",
    "irim-adjoint",
    "irim-steepest",
    "irim-steepest-tied",
    "irim-steepest-fullres",
    "irim-zero-fullres",
    "dinv-pgd",
    "dinv-pgd-tied",
    "dinv-deq",
)
BASELINES = ("adjoint", "tikhonov", "tv")
NEEDS_DEEPINV = {"dinv-pgd", "dinv-pgd-tied", "dinv-deq", "tv"}
MEMORY_ITERATIONS = (2, 4, 8, 16, 32)
MEMORY_SYSTEMS = ("irim-proximal", "irim-steepest", "irim-steepest-tied", "dinv-pgd", "dinv-deq")


# ------------------------------------------------------------------------------ data
def phantoms(n: int, rng, size: int = SIZE):
    """``n`` piecewise-constant images ``(n, size, size)``: 3 to 6 rectangles and ellipses."""
    import numpy as np

    yy, xx = np.mgrid[0:size, 0:size] / size
    images = np.zeros((n, size, size))
    for image in images:
        for _ in range(rng.integers(3, 7)):
            cy, cx = rng.uniform(0.15, 0.85, 2)
            ry, rx = rng.uniform(0.06, 0.35, 2)
            if rng.random() < 0.5:
                inside = (np.abs(yy - cy) < ry) & (np.abs(xx - cx) < rx)
            else:
                inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
            image[inside] = rng.uniform(0, 1)
    return images


class Deblur:
    """Circular Gaussian blur of ``(B, 1, n, n)`` images (deepinv's kernel for this sigma)."""

    name, n_model = "deblur", 1

    def __init__(self, size: int = SIZE, sigma: float = BLUR_SIGMA) -> None:
        import torch

        half = int(sigma / 0.3 + 1)  # deepinv's gaussian_blur support: 2 * half + 1 pixels
        t = torch.arange(-half, half + 1, dtype=torch.float64)
        g = torch.exp(-0.5 * (t / sigma) ** 2)
        kernel = torch.outer(g, g)
        self.kernel = kernel / kernel.sum()
        padded = torch.zeros(size, size, dtype=torch.float64)
        padded[: 2 * half + 1, : 2 * half + 1] = self.kernel
        self.otf = torch.fft.fft2(torch.roll(padded, (-half, -half), dims=(0, 1)))

    def A(self, x):
        import torch

        otf = self.otf.to(x.device, torch.complex64 if x.dtype == torch.float32 else None)
        return torch.fft.ifft2(torch.fft.fft2(x) * otf).real

    def A_adjoint(self, y):
        import torch

        otf = self.otf.to(y.device, torch.complex64 if y.dtype == torch.float32 else None)
        return torch.fft.ifft2(torch.fft.fft2(y) * otf.conj()).real

    def truth(self, images):
        return images[:, None]

    def observe(self, data):
        return data


class CartesianMRI:
    """Masked orthonormal centred FFT of ``(B, 2, n, n)`` real-stacked complex images."""

    name, n_model = "mri", 2

    def __init__(self, size: int = SIZE, acceleration: int = ACCELERATION) -> None:
        import torch

        from invops.physics import cartesian_mask

        self.mask = torch.as_tensor(cartesian_mask((size, size), acceleration, rng=0))

    def _fft(self, z, inverse: bool):
        import torch

        fft = torch.fft.ifft2 if inverse else torch.fft.fft2
        return torch.fft.fftshift(fft(torch.fft.ifftshift(z, dim=(-2, -1)), norm="ortho"), (-2, -1))

    def A(self, x):
        import torch

        k = self._fft(torch.complex(x[:, 0], x[:, 1]), inverse=False) * self.mask.to(x)
        return torch.stack((k.real, k.imag), dim=1)

    def A_adjoint(self, y):
        import torch

        z = self._fft(torch.complex(y[:, 0], y[:, 1]) * self.mask.to(y), inverse=True)
        return torch.stack((z.real, z.imag), dim=1)

    def truth(self, images):
        import torch

        return torch.stack((images, torch.zeros_like(images)), dim=1)

    def observe(self, data):
        """Unsampled k-space is not measured: zero there, noise included."""
        return data * self.mask.to(data)


def make_physics(task: str):
    return Deblur() if task == "deblur" else CartesianMRI()


def measure(physics, images, rng):
    """``(truth, data)``: images as the model's channels and their noisy data (float32)."""
    import torch

    x = physics.truth(torch.as_tensor(images, dtype=torch.float32))
    clean = physics.A(x)
    noise = torch.as_tensor(rng.standard_normal(tuple(clean.shape)), dtype=torch.float32)
    return x, physics.observe(clean + NOISE * noise)


def training_batch(physics, seed: int, step: int, batch: int = BATCH):
    """Batch ``step`` of seed ``seed``'s training stream (the same for every system)."""
    import numpy as np

    rng = np.random.default_rng([seed, step])
    return measure(physics, phantoms(batch, rng), rng)


def held_out(physics, n: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    return measure(physics, phantoms(n, rng), rng)


def check_against_deepinv(dinv, physics) -> float:
    """Largest difference between this physics and deepinv's own on random images."""
    import torch
    from deepinv.physics.functional.blur import gaussian_blur

    x = torch.rand(2, physics.n_model, SIZE, SIZE)
    if physics.name == "deblur":
        kernel = gaussian_blur(sigma=(BLUR_SIGMA, BLUR_SIGMA))
        theirs = dinv.physics.Blur(filter=kernel, padding="circular")
    else:
        theirs = dinv.physics.MRI(mask=physics.mask.float(), img_size=(2, SIZE, SIZE))
    y = physics.A(x)
    return max(
        float((theirs.A(x) - y).abs().max()),
        float((theirs.A_adjoint(y) - physics.A_adjoint(y)).abs().max()),
    )


# ------------------------------------------------------------------------------ systems
def _irim_module():
    import torch

    import invops

    class IRIM(torch.nn.Module):
        """``NetworkLoop`` from zero, ``w A^T d`` (``init="adjoint"``) or ``w t(d) A^T d``
        (``"steepest"``, ``t`` the exact line-search step from zero), as ``x = f(d, physics)``.
        """

        def __init__(
            self,
            task: str,
            iterations: int,
            init: str,
            tied: bool,
            full_resolution: bool,
            proximal: bool = False,
        ) -> None:
            super().__init__()
            self.n_model = 1 if task == "deblur" else 2
            # the proximal iteration's memory is its velocity, one channel per model channel
            self.n_memory = self.n_model if proximal else IRIM_MEMORY[task]
            kind = "fullres" if full_resolution else "tied" if tied else "untied"
            if proximal:
                kind = "proximal-tied" if tied else "proximal"
            hidden = IRIM_HIDDEN[task, kind]
            # the default conditioners work at a quarter of the resolution (InvertibleNetworks.jl's
            # i-RIM); "fullres" gives them 3x3 convolutions at full resolution, as a DnCNN has;
            # the proximal iteration's default conditioners are full-resolution already
            options: dict = dict(k1=3, p1=1, s1=1) if full_resolution else {}
            if proximal:
                options["type"] = "proximal"
            if tied:
                options["tied"] = True
            if init != "zero":
                options["init"] = init
            self.loop = invops.NetworkLoop(
                self.n_model + self.n_memory, hidden, iterations, n_model=self.n_model, **options
            )
            self.plain = False

        def forward(self, d, physics):
            # the start is the loop's own (init=); NetworkLoop takes any object with A and
            # A_adjoint (deepinv's physics) as its operator
            eta = d.new_zeros(d.shape[0], self.n_model, SIZE, SIZE)
            s = d.new_zeros(d.shape[0], self.n_memory, SIZE, SIZE)
            with invops.plain_autograd() if self.plain else contextlib.nullcontext():
                return self.loop(eta, s, d, physics)[0]

    return IRIM


def build(system: str, task: str, iterations: int = ITERATIONS, dinv=None):
    """The model ``f`` of a system: ``x = f(d, physics)`` with ``physics`` the system's kind."""
    if system.startswith("irim"):
        proximal = system.startswith("irim-proximal")
        init = "steepest" if proximal else system.split("-")[1]
        return _irim_module()(
            task, iterations, init, system.endswith("tied"), system.endswith("fullres"), proximal
        )
    n_channels = 1 if task == "deblur" else 2
    tied = system != "dinv-pgd"
    depth, width = DNCNN["tied" if tied else "untied"]

    def dncnn():
        return dinv.models.DnCNN(
            n_channels, n_channels, depth=depth, nf=width, pretrained=None, device="cpu"
        )

    prior = (
        dinv.optim.PnP(dncnn()) if tied else [dinv.optim.PnP(dncnn()) for _ in range(iterations)]
    )
    return dinv.optim.PGD(
        data_fidelity=dinv.optim.data_fidelity.L2(),
        prior=prior,
        stepsize=1.0,
        g_param=0.05,
        max_iter=iterations,
        unfold=True,
        trainable_params=["stepsize", "g_param"],
        DEQ=system == "dinv-deq",
    )


def system_physics(system: str, physics, dinv):
    """What a system's model is called with (deepinv wants its own LinearPhysics)."""
    if system.startswith("dinv") or system == "tv":
        return dinv.physics.LinearPhysics(A=physics.A, A_adjoint=physics.A_adjoint)
    return physics


def n_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------ metrics
def scores(estimate, truth) -> dict:
    """Mean PSNR and SSIM (data range 1) of the images (the magnitude for two channels)."""
    import numpy as np
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    def image(t):
        t = t.detach().double()
        return (t[:, 0] if t.shape[1] == 1 else t.square().sum(1).sqrt()).numpy()

    est, ref = image(estimate), image(truth)
    psnr = [peak_signal_noise_ratio(r, e, data_range=1.0) for r, e in zip(ref, est)]
    ssim = [structural_similarity(r, e, data_range=1.0) for r, e in zip(ref, est)]
    return {"psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssim))}


def reconstruct(model, d, physics, chunk: int = 16):
    import torch

    with torch.no_grad():
        return torch.cat([model(d[i : i + chunk], physics) for i in range(0, len(d), chunk)])


# ------------------------------------------------------------------------------ training
def train(
    system: str, task: str, seed: int, steps: int, lr: float, dinv, progress: bool = True
) -> tuple:
    """Train one system; ``(model, its physics, step times in s, final losses)``."""
    import torch

    physics = make_physics(task)
    torch.manual_seed(seed)
    model = build(system, task, dinv=dinv)
    phys = system_physics(system, physics, dinv)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    times, losses = [], []
    bar = _progress(steps, f"{task} {system} seed {seed}", progress)
    for step in range(steps):
        x, d = training_batch(physics, seed, step)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(d, phys), x)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"{system}: loss {losses[-1]} at step {step}")
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.2e}", refresh=False)
    bar.close()
    return model, phys, times, losses


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=not enabled, mininterval=5)


def evaluate_system(system, task, seed, steps, lr, test, dinv, progress) -> dict:
    try:
        model, phys, times, losses = train(system, task, seed, steps, lr, dinv, progress)
    except FloatingPointError as error:  # reported as a failed run, the sweep goes on
        return {
            "system": system,
            "task": task,
            "seed": seed,
            "steps": steps,
            "lr": lr,
            "error": str(error),
            "psnr": float("nan"),
            "ssim": float("nan"),
        }
    x, d = test
    result = scores(reconstruct(model, d, phys), x)
    warm = times[min(5, len(times) - 1) :]
    result |= {
        "system": system,
        "task": task,
        "seed": seed,
        "steps": steps,
        "lr": lr,
        "params": n_parameters(model),
        "step_ms": 1e3 * statistics.median(warm),
        "final_loss": statistics.mean(losses[-min(50, len(losses)) :]),
    }
    # training that ends above where it started diverged, whatever the loss is at the end
    result["diverged"] = result["final_loss"] > statistics.mean(losses[: min(50, len(losses))])
    return result


# ------------------------------------------------------------------------------ baselines
def conjugate_gradient(apply, b, iterations: int = 100, tol: float = 1e-7):
    """Batched CG for ``apply(x) = b`` (one system per sample; ``apply`` symmetric positive)."""
    dims = tuple(range(1, b.ndim))
    x = b.new_zeros(b.shape)
    r = b.clone()
    p = r.clone()
    rr = (r * r).sum(dims, keepdim=True)
    for _ in range(iterations):
        ap = apply(p)
        alpha = rr / (p * ap).sum(dims, keepdim=True).clamp_min(1e-30)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = (r * r).sum(dims, keepdim=True)
        if float(rr_new.max().sqrt()) < tol:
            break
        p = r + rr_new / rr.clamp_min(1e-30) * p
        rr = rr_new
    return x


def baseline(name: str, weight: float, physics, d, dinv, iterations: int = 200):
    import torch

    if name == "adjoint":
        return physics.A_adjoint(d)
    if name == "tikhonov":
        d64 = d.double()
        return conjugate_gradient(
            lambda v: physics.A_adjoint(physics.A(v)) + weight * v, physics.A_adjoint(d64)
        ).float()
    solver = dinv.optim.PGD(
        data_fidelity=dinv.optim.data_fidelity.L2(),
        prior=dinv.optim.TVPrior(n_it_max=50),
        lambda_reg=weight,
        stepsize=1.0,
        max_iter=iterations,
    )
    with torch.no_grad():
        return solver(d, system_physics("tv", physics, dinv))


BASELINE_GRIDS = {
    "adjoint": (None,),
    "tikhonov": tuple(10.0**e for e in (-4, -3.5, -3, -2.5, -2, -1.5, -1, -0.5, 0)),
    "tv": tuple(10.0**e for e in (-3.5, -3, -2.75, -2.5, -2.25, -2, -1.75, -1.5, -1)),
}


def evaluate_baseline(name: str, task: str, validation, test, dinv, quick: bool) -> dict:
    """Tune the weight on the validation images (PSNR), then score the test images."""
    physics = make_physics(task)
    grid = BASELINE_GRIDS[name]
    if quick and len(grid) > 3:
        grid = grid[len(grid) // 2 - 1 : len(grid) // 2 + 2]
    xv, dv = validation
    n = 20 if quick else 200
    tuning = {w: scores(baseline(name, w, physics, dv, dinv, n), xv)["psnr"] for w in grid}
    best = max(tuning, key=tuning.__getitem__)
    x, d = test
    start = time.perf_counter()
    result = scores(baseline(name, best, physics, d, dinv, n), x)
    return result | {
        "system": name,
        "task": task,
        "weight": best,
        "validation_psnr": {str(k): v for k, v in tuning.items()},
        "seconds": time.perf_counter() - start,
        "params": 0,
    }


# ------------------------------------------------------------------------------ cost
def training_step(model, phys, x, d) -> None:
    import torch

    model.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(model(d, phys), x).backward()


def step_memory(system: str, task: str, iterations: int, dinv) -> dict:
    """Peak tensor memory of one training step (after a warm-up step), and its parameters."""
    import torch

    from invops.testing import TensorMemoryTracker

    physics = make_physics(task)
    torch.manual_seed(0)
    model = build(system, task, iterations, dinv=dinv)
    phys = system_physics(system, physics, dinv)
    x, d = training_batch(physics, 0, 0)
    training_step(model, phys, x, d)
    model.zero_grad(set_to_none=True)
    with TensorMemoryTracker() as mem:
        training_step(model, phys, x, d)
    return {
        "system": system,
        "task": task,
        "iterations": iterations,
        "peak_mb": mem.peak / MB,
        "params": n_parameters(model),
    }


TIMED_SYSTEMS = ("irim-zero", "irim-proximal")
COMPARED_SYSTEMS = ("irim-proximal", "irim-steepest", "dinv-pgd")


def step_times(task: str, systems: Sequence[str], repeats: int, dinv) -> dict:
    """Median training-step time of each system, the systems' steps alternating in one process
    (the training runs' own step times come from separate runs under whatever load there was)."""
    import torch

    physics = make_physics(task)
    x, d = training_batch(physics, 0, 0)
    models = {}
    for system in systems:
        torch.manual_seed(0)
        models[system] = (build(system, task, dinv=dinv), system_physics(system, physics, dinv))
    times: dict = {system: [] for system in systems}
    for repeat in range(repeats + 2):
        for system, (model, phys) in models.items():
            start = time.perf_counter()
            training_step(model, phys, x, d)
            if repeat >= 2:  # two warm-up rounds
                times[system].append(time.perf_counter() - start)
    return {"task": task} | {s: 1e3 * statistics.median(t) for s, t in times.items()}


def plain_vs_memory_free(task: str, repeats: int, system: str = "irim-zero") -> dict:
    """Median training-step time of an i-RIM, memory-free and under plain autograd."""
    import torch

    physics = make_physics(task)
    torch.manual_seed(0)
    model = build(system, task)
    x, d = training_batch(physics, 0, 0)
    out = {"task": task, "system": system}
    for plain in (False, True):
        model.plain = plain
        for _ in range(2):
            training_step(model, physics, x, d)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            training_step(model, physics, x, d)
            times.append(time.perf_counter() - start)
        out["plain_ms" if plain else "memory_free_ms"] = 1e3 * statistics.median(times)
    return out


# ------------------------------------------------------------------------------ driver
def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=("deblur", "mri", "both"), default="both")
    parser.add_argument("--steps", type=int, default=1500, help="Adam steps per system")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--test-images", type=int, default=64)
    parser.add_argument(
        "--systems",
        nargs="+",
        default=[*SYSTEMS, *BASELINES],
        choices=[*SYSTEMS, *BASELINES],
        metavar="SYSTEM",
        help=f"learned systems {SYSTEMS} and baselines {BASELINES} (default: all)",
    )
    parser.add_argument("--lr", type=float, nargs=2, metavar=("IRIM", "DEEPINV"))
    parser.add_argument("--memory-iterations", type=int, nargs="*", default=list(MEMORY_ITERATIONS))
    parser.add_argument(
        "--memory-systems",
        nargs="*",
        default=list(MEMORY_SYSTEMS),
        choices=SYSTEMS,
        metavar="SYSTEM",
        help=f"systems of the memory sweep (default: {' '.join(MEMORY_SYSTEMS)})",
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed steps (plain vs free)")
    parser.add_argument("--quick", action="store_true", help="smoke run: a few steps, 8 images")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the results already in the JSON (written after every system) and run only "
        "the missing (task, system, seed) entries",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="print the tables and draw the figure of the JSON already written, run nothing",
    )
    parser.add_argument(
        "--cost",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure memory against iterations and plain-autograd timing (default: yes)",
    )
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--plots", type=Path, default=PLOTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.test_images, args.repeats = min(args.steps, 3), 8, 2
        args.memory_iterations = [min(args.memory_iterations)]

    import torch

    torch.set_num_threads(args.threads)
    dinv = import_deepinv()
    tasks = ("deblur", "mri") if args.task == "both" else (args.task,)
    skipped = {}
    if dinv is None:
        skipped = {s: f"deepinv not installed ({DEEPINV_INSTALL})" for s in NEEDS_DEEPINV}
        for s in sorted(NEEDS_DEEPINV & set(args.systems)):
            print(f"skipping {s}: {skipped[s]}")
    systems = [s for s in args.systems if s not in skipped]
    lrs = dict(LEARNING_RATES)
    if args.lr:
        lrs = {"irim": args.lr[0], "dinv": args.lr[1]}
    n_validation = 8 if args.quick else VALIDATION_IMAGES
    path = args.results / f"unrolled_vs_deepinv{'_quick' if args.quick else ''}.json"
    previous = json.loads(path.read_text()) if args.resume and path.exists() else {}
    if args.report_only:
        previous = json.loads(path.read_text())
        done_tasks = [
            t for t in ("deblur", "mri") if any(r["task"] == t for r in previous["results"])
        ]
        report(previous, done_tasks)
        print(f"wrote {plot(previous, done_tasks, args.plots / path.with_suffix('.png').name)}")
        return previous
    results: list[dict] = previous.get("results", [])
    done = {(r["task"], r["system"], r.get("seed")) for r in results}
    agreement: dict = previous.get("settings", {}).get("physics_vs_deepinv_max_diff", {})

    def payload(memory=(), timing=(), steps=()) -> dict:
        return {
            "machine": machine_info("cpu", "float32", args.threads)
            | {"deepinv": getattr(dinv, "__version__", None)},
            "settings": {
                "steps": args.steps,
                "batch": BATCH,
                "iterations": ITERATIONS,
                "seeds": sorted({r.get("seed") for r in results} - {None} | set(args.seeds)),
                "test_images": args.test_images,
                "validation_images": n_validation,
                "noise": NOISE,
                "learning_rates": lrs if args.lr else lrs | SYSTEM_LEARNING_RATES,
                "irim_hidden": {"/".join(k): v for k, v in IRIM_HIDDEN.items()},
                "irim_memory": IRIM_MEMORY,
                "dncnn_depth_width": DNCNN,
                "physics_vs_deepinv_max_diff": agreement,
            },
            "skipped": skipped,
            "results": results,
            "memory": list(memory) or previous.get("memory", []),
            "timing": list(timing) or previous.get("timing", []),
            "step_times": list(steps) or previous.get("step_times", []),
        }

    for task in tasks:
        physics = make_physics(task)
        if dinv is not None:
            agreement[task] = check_against_deepinv(dinv, physics)
            if agreement[task] > 1e-5:
                raise RuntimeError(f"{task}: physics differ from deepinv's by {agreement[task]}")
        test = held_out(physics, args.test_images, TEST_SEED)
        validation = held_out(physics, n_validation, VALIDATION_SEED)
        for name in (s for s in systems if s in BASELINES and (task, s, None) not in done):
            results.append(evaluate_baseline(name, task, validation, test, dinv, args.quick))
            print(f"{task} {name}: PSNR {results[-1]['psnr']:.2f} dB", flush=True)
            write_json(path, payload())
        for seed in args.seeds:
            for system in (s for s in systems if s in SYSTEMS):
                if (task, system, seed) in done:
                    continue
                lr = lrs["irim" if system.startswith("irim") else "dinv"]
                if not args.lr:
                    lr = SYSTEM_LEARNING_RATES.get(system, lr)
                r = evaluate_system(
                    system, task, seed, args.steps, lr, test, dinv, not args.no_progress
                )
                results.append(r)
                if "error" in r:
                    print(f"{task} {system} seed {seed}: failed ({r['error']})", flush=True)
                else:
                    print(
                        f"{task} {system} seed {seed}: PSNR {r['psnr']:.2f} dB, SSIM "
                        f"{r['ssim']:.3f}, {r['params']} parameters, {r['step_ms']:.1f} ms/step",
                        flush=True,
                    )
                write_json(path, payload())

    if not args.cost:
        memory, timing, steps = [], [], []
    else:
        memory = [
            step_memory(system, task, n, dinv)
            for task in tasks
            for system in args.memory_systems
            if system not in skipped
            for n in args.memory_iterations
        ]
        irim = any(s.startswith("irim") for s in systems)
        timing = [
            plain_vs_memory_free(task, args.repeats, system)
            for task in tasks
            for system in TIMED_SYSTEMS
            if irim
        ]
        compared = [s for s in COMPARED_SYSTEMS if s not in skipped]
        steps = [step_times(task, compared, args.repeats, dinv) for task in tasks]
    final = payload(memory, timing, steps)
    report(final, tasks)
    write_json(path, final)
    figure = plot(final, tasks, args.plots / path.with_suffix(".png").name)
    print(f"wrote {path} and {figure}")
    return final


def summary(results: list[dict], task: str) -> list[dict]:
    """One row per system: scores per seed and their mean."""
    rows = {}
    for r in results:
        if r["task"] == task:
            rows.setdefault(r["system"], []).append(r)
    out = []
    for system, runs in rows.items():
        ok = [r for r in runs if "error" not in r]
        row = {
            "system": system,
            "psnr": statistics.mean(r["psnr"] for r in runs),
            "ssim": statistics.mean(r["ssim"] for r in runs),
            "psnr_seeds": [r["psnr"] for r in runs],
            "ssim_seeds": [r["ssim"] for r in runs],
            "params": ok[0]["params"] if ok else "-",
            "step_ms": statistics.mean(r["step_ms"] for r in ok)
            if ok and "step_ms" in ok[0]
            else None,
            "weight": runs[0].get("weight"),
            "failed": [r["error"] for r in runs if "error" in r]
            + [f"diverged (final loss {r['final_loss']:.3g})" for r in runs if r.get("diverged")],
        }
        out.append(row)
    return out


def _score(value: float, digits: int = 2) -> str:
    return "diverged" if math.isnan(value) else fmt(value, digits)


def report(payload: dict, tasks: Sequence[str]) -> None:
    for task in tasks:
        rows = summary(payload["results"], task)
        print(f"\n### {task}: PSNR / SSIM over {payload['settings']['test_images']} test images")
        print(
            markdown_table(
                (
                    "system",
                    "PSNR (dB) per seed",
                    "PSNR mean",
                    "SSIM per seed",
                    "SSIM mean",
                    "parameters",
                    "step (ms)",
                    "tuned weight",
                ),
                [
                    (
                        r["system"] + (f" ({'; '.join(r['failed'])})" if r["failed"] else ""),
                        " / ".join(_score(v) for v in r["psnr_seeds"]),
                        _score(r["psnr"]),
                        " / ".join(_score(v, 3) for v in r["ssim_seeds"]),
                        _score(r["ssim"], 3),
                        r["params"],
                        fmt(r["step_ms"], 1),
                        "-" if r["weight"] is None else f"{r['weight']:.2g}",
                    )
                    for r in rows
                ],
            )
        )
    if payload["memory"]:
        its = sorted({m["iterations"] for m in payload["memory"]})
        print("\n### peak tensor memory of one training step (MB) against iterations")
        table = {}
        for m in payload["memory"]:
            table.setdefault((m["task"], m["system"]), {})[m["iterations"]] = m
        print(
            markdown_table(
                ("task", "system", *(f"{n} it." for n in its), f"params at {its[-1]} it."),
                [
                    (
                        task,
                        system,
                        *(fmt(v[n]["peak_mb"]) if n in v else "-" for n in its),
                        v[its[-1]]["params"] if its[-1] in v else "-",
                    )
                    for (task, system), v in table.items()
                ],
            )
        )
    if payload["timing"]:
        print("\n### i-RIM training step at 6 iterations: memory-free against plain autograd")
        print(
            markdown_table(
                ("task", "system", "memory-free (ms)", "plain autograd (ms)", "ratio"),
                [
                    (
                        t["task"],
                        t.get("system", "irim-zero"),
                        fmt(t["memory_free_ms"], 1),
                        fmt(t["plain_ms"], 1),
                        fmt(t["memory_free_ms"] / t["plain_ms"]),
                    )
                    for t in payload["timing"]
                ],
            )
        )
    if payload.get("step_times"):
        print("\n### Training step at 6 iterations, the systems alternating in one process (ms)")
        names = [k for k in payload["step_times"][0] if k != "task"]
        print(
            markdown_table(
                ("task", *names),
                [(t["task"], *(fmt(t[n], 1) for n in names)) for t in payload["step_times"]],
            )
        )
    for system, reason in payload["skipped"].items():
        print(f"skipped {system}: {reason}")


def plot(payload: dict, tasks: Sequence[str], path: Path) -> Path:
    fig, axes = new_figure(len(tasks) + 1)
    for ax, task in zip(axes, tasks):
        rows = summary(payload["results"], task)
        names = [r["system"] for r in rows]
        finite = [v for r in rows if not r["failed"] for v in r["psnr_seeds"] if math.isfinite(v)]
        low = max(0.0, min(finite, default=3.0) - 3)
        colours = [
            "tab:blue" if n.startswith("irim") else "tab:orange" if n.startswith("dinv") else "0.6"
            for n in names
        ]  # invops, deepinv, classical baselines
        ax.bar(range(len(rows)), [r["psnr"] for r in rows], color=colours)
        for i, r in enumerate(rows):
            ax.plot([i] * len(r["psnr_seeds"]), r["psnr_seeds"], "k.", ms=4)
            if r["failed"]:
                ax.text(i, low + 0.3, f"diverged ({len(r['failed'])})", rotation=90, ha="center")
        ax.set_xticks(range(len(rows)), names, rotation=45, ha="right")
        ax.set_ylim(low, None)
        ax.set_ylabel("test PSNR (dB)")
        ax.set_title(f"{task}: mean over seeds (dots: each seed)\nblue invops, orange deepinv")
    ax = axes[-1]
    curves = {}
    for m in payload["memory"]:
        curves.setdefault((m["task"], m["system"]), []).append((m["iterations"], m["peak_mb"]))
    for (task, system), points in curves.items():
        points.sort()
        ax.plot(*zip(*points), "o-" if task == "deblur" else "s--", label=f"{system} ({task})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("unrolled iterations")
    ax.set_ylabel("peak tensor memory of a training step (MB)")
    ax.set_title("training-step memory (batch 8, 32x32)")
    if curves:
        ax.legend(fontsize=7)
    return save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
