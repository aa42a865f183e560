"""Sparse-view CT: an i-RIM against LSQR and total variation with 30 projection angles.

Phantoms: random ellipse phantoms, generated procedurally: an elliptical body of soft tissue
with a brighter rim, three to eight random inner "organs" of random attenuation, zero to two
small dense inclusions and a smooth random texture (3%), 64x64, inside the disc that every view
sees. They are projected by a parallel-beam CT operator with 30 angles equispaced over 180
degrees, built from PyLops' ``Radon2D`` slant stacks (``invops.physics.ct_operator``), with
additive Gaussian noise of 5% of the mean sinogram value (the noise level of Adler and Oktem's
learned primal-dual ellipse benchmark).

The i-RIM (``invops.NetworkLoop(4, 16, 6)``, one real model channel, Putzky and Welling's
additive iteration; ``--type proximal`` gives ``NetworkLoop(2, 16, 6, type="proximal",
step_size=1 / |A|^2)``, which at the same 311 steps reached 22.2 dB against this loop's 28.2:
gradient steps of that size make little progress on the ill-conditioned projector in 6
iterations, where the additive loop's normalised gradient does not depend on the operator's
scale) applies the projector and
its adjoint inside each of its 6 unrolled iterations as ``invops.physics.TorchCT`` (torch sparse
products; the tests prove it equal to the ``Radon2D`` operator). It starts from the scaled
back-projection :math:`\\alpha A^T d` (passed as the input state ``eta``; :math:`\\alpha` fitted
by least squares on training data; the memory starts at zero) and is trained with memory-free
backpropagation on ``1 - SSIM`` plus 10 times the L1 error, for a fixed time (``--minutes``,
default 8) or number of steps (``--steps``).

Baselines, on the same data and operator (as ``pylops.MatrixMult`` of
``invops.physics.ct_matrix``, checked against the ``Radon2D`` operator when the example starts),
run in a second process beside the training:

- scaled back-projection :math:`\\alpha A^T d` (the i-RIM's start);
- LSQR: ``pylops.optimization.basic.lsqr`` from zero, the number of iterations (early stopping)
  and the damping tuned on 8 training phantoms for the best mean PSNR;
- TV: ``pylops.optimization.sparsity.splitbregman`` with anisotropic total variation, the
  weight tuned likewise.

PSNR and SSIM (scikit-image, data range of the true image) on the held-out phantoms are printed
and a figure (``examples/output/irim_ct.png``: truth, sinogram, reconstructions and error maps
with shared colour scales) is written.

Run: ``python examples/irim_ct.py`` (under ten minutes on 2 CPU cores); ``--quick`` for a
smoke run; ``--steps``, ``--views``, ``--noise``, ``--test`` change the problem.
"""

from __future__ import annotations

import os

# one BLAS thread (set before numpy loads it): on our shared two-core machine, OpenBLAS threads
# competing with other processes made the baselines' small vector operations 5x slower
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import pylops
import scipy.sparse.linalg
import torch
import torch.nn.functional as F
from pylops.optimization.basic import lsqr
from pylops.optimization.sparsity import splitbregman
from scipy.ndimage import gaussian_filter
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from tqdm import tqdm

import invops
from invops.physics import TorchCT, ct_angles, ct_matrix, ct_operator

# the helpers these examples share live beside them (the examples folder is not a package)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _imaging_training import (  # noqa: E402
    add_run_options,
    cosine_lr,
    in_background,
    ssim_torch,
)


# ----------------------------------------------------------------------------- phantoms
def ellipse_phantoms(n_images: int, size: int, seed: int, supersample: int = 2) -> np.ndarray:
    """Random ellipse phantoms ``(n_images, size, size)`` with values in about [0, 1]."""
    rng = np.random.default_rng(seed)
    m = size * supersample
    # unit = the radius of the disc seen by every view, n / (2 sqrt 2) pixels
    unit = 1.0 / math.sqrt(2)
    y, x = np.meshgrid(np.linspace(-1, 1, m), np.linspace(-1, 1, m), indexing="ij")

    def ellipse(a, b, x0, y0, phi):
        c, s = math.cos(phi), math.sin(phi)
        u, v = (x - x0) * c + (y - y0) * s, -(x - x0) * s + (y - y0) * c
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0

    out = np.empty((n_images, size, size))
    for i in range(n_images):
        img = np.zeros((m, m))
        a, b = unit * rng.uniform(0.75, 0.95), unit * rng.uniform(0.6, 0.85)
        phi = rng.uniform(0, np.pi)
        img[ellipse(a, b, 0, 0, phi)] = rng.uniform(0.5, 0.7)  # rim
        img[ellipse(0.9 * a, 0.9 * b, 0, 0, phi)] = rng.uniform(0.2, 0.3)  # soft tissue
        for _ in range(rng.integers(3, 9)):
            r = rng.uniform(0, 0.55)
            t = rng.uniform(0, 2 * np.pi)
            img[
                ellipse(
                    rng.uniform(0.05, 0.25) * a,
                    rng.uniform(0.05, 0.25) * b,
                    r * a * math.cos(t),
                    r * b * math.sin(t),
                    rng.uniform(0, np.pi),
                )
            ] = rng.uniform(0.0, 0.6)
        for _ in range(rng.integers(0, 3)):
            r, t = rng.uniform(0, 0.6), rng.uniform(0, 2 * np.pi)
            img[ellipse(0.04, 0.04, r * a * math.cos(t), r * b * math.sin(t), 0.0)] = 1.0
        img = img.reshape(size, supersample, size, supersample).mean(axis=(1, 3))
        body = gaussian_filter((img > 0.05).astype(float), 0.7)
        texture = gaussian_filter(rng.standard_normal((size, size)), 1.5)
        out[i] = np.clip(img + 0.03 * body * texture / texture.std(), 0, None)
    return out


# ----------------------------------------------------------------------------- baselines
def as_pylops(A, n: int, views: int) -> pylops.LinearOperator:
    op = pylops.MatrixMult(A)
    op.dims, op.dimsd = (n, n), (views, n)
    return op


def lsqr_path(op, datum, niter, damp):
    """LSQR iterates 1..niter from zero (the callback records each)."""
    path = []
    lsqr(
        op,
        datum.ravel(),
        x0=np.zeros(op.shape[1]),
        damp=damp,
        niter=niter,
        atol=0,
        btol=0,
        callback=lambda x: path.append(x.reshape(op.dims).copy()),
    )
    return path + path[-1:] * (niter - len(path))  # LSQR may stop early on convergence


def tv_solve(op, datum, weight, coupling, outer=20, inner=5):
    r"""Anisotropic TV: :math:`\min_x \tfrac12\|Ax - d\|^2 + w\,(\|D_y x\|_1 + \|D_x x\|_1)`.

    PyLops' Split Bregman with split (coupling) weight ``coupling``: in its parametrisation the
    L1 weights are ``eps = w / coupling`` and the data weight ``mu = w / coupling**2``.
    """
    grads = [pylops.FirstDerivative(op.dims, axis=a, edge=True, kind="backward") for a in (0, 1)]
    eps = weight / coupling
    x, _, _ = splitbregman(
        op,
        datum.ravel(),
        grads,
        niter_outer=outer,
        niter_inner=1,
        mu=eps / coupling,
        epsRL1s=[eps, eps],
        tol=1e-10,
        tau=1.0,
        x0=np.zeros(op.shape[1]),
        **dict(iter_lim=inner, damp=1e-8),
    )
    return x.reshape(op.dims)


def metrics(estimate, truth):
    rng = truth.max() - truth.min()
    return (
        peak_signal_noise_ratio(truth, estimate, data_range=rng),
        structural_similarity(truth, estimate, data_range=rng),
    )


def mean_metrics(estimates, truths):
    return np.array([metrics(e, t) for e, t in zip(estimates, truths)]).mean(axis=0)


def run_baselines(A, n, views, tune_x, tune_d, test_d, args):
    """Tune LSQR and TV on training phantoms, then reconstruct the test data (numpy only)."""
    start = time.perf_counter()
    op = as_pylops(A, n, views)
    norm2 = float(scipy.sparse.linalg.svds(A, k=1, return_singular_vectors=False)[0]) ** 2
    lsqr_scores = {}
    for damp in args.damps:
        paths = [lsqr_path(op, d, args.lsqr_max, damp * math.sqrt(norm2)) for d in tune_d]
        curve = [mean_metrics([p[k] for p in paths], tune_x)[0] for k in range(args.lsqr_max)]
        lsqr_scores[damp] = (max(curve), int(np.argmax(curve)) + 1)
    damp = max(lsqr_scores, key=lambda k: lsqr_scores[k][0])
    niter = lsqr_scores[damp][1]
    coupling = args.tv_coupling * norm2
    tv_scores = {}
    for w in args.tv_weights:
        tv = [tv_solve(op, d, w * norm2, coupling, outer=args.tv_outer) for d in tune_d]
        tv_scores[w] = mean_metrics(tv, tune_x)[0]
    weight = max(tv_scores, key=tv_scores.get)
    line = (
        f"tuned on {len(tune_x)} training phantoms: LSQR damp {damp:g} |A|, {niter} iterations ("
        + ", ".join(f"damp {k:g}: {s:.2f} dB at {i} it." for k, (s, i) in lsqr_scores.items())
        + f"); TV weight {weight:g} |A|^2 ("
        + ", ".join(f"{w:g}: {s:.2f} dB" for w, s in tv_scores.items())
        + ")"
    )
    recon = {
        "LSQR": np.stack([lsqr_path(op, d, niter, damp * math.sqrt(norm2))[-1] for d in test_d]),
        "TV": np.stack(
            [tv_solve(op, d, weight * norm2, coupling, outer=args.tv_outer) for d in test_d]
        ),
    }
    chosen = dict(lsqr_damp=damp, lsqr_iter=niter, tv_weight=weight)
    return chosen, recon, line, time.perf_counter() - start


def training_loss(estimate: torch.Tensor, truth: torch.Tensor, kind: str) -> torch.Tensor:
    """``"ssim+mse"``: ``1 - SSIM`` plus 10 times the relative squared error; or ``"mse"``,
    or ``"ssim+l1"``: ``1 - SSIM`` plus 10 times the L1 error."""
    if kind == "mse":
        return F.mse_loss(estimate, truth)
    span = truth.flatten(1).amax(1) - truth.flatten(1).amin(1)
    ssim = ssim_torch(estimate, truth, span).mean()
    if kind == "ssim+l1":
        return 1 - ssim + 10 * (estimate - truth).abs().mean()
    return 1 - ssim + 10 * (estimate - truth).square().mean() / truth.square().mean()


def cgls_torch(op, d: torch.Tensor, n_iter: int) -> torch.Tensor:
    """``n_iter`` CGLS iterations from zero for every sample of a batch at once.

    Each sample has its own step sizes, so row ``i`` is exactly CGLS (= LSQR in exact
    arithmetic) on datum ``i``; ``op`` is a batched operator (:class:`invops.physics.TorchCT`).
    """
    x = d.new_zeros(d.shape[0], *op.model_shape)
    r = d.clone()
    s = op.adjoint(r)
    p = s.clone()
    gamma = s.flatten(1).square().sum(1)
    for _ in range(n_iter):
        q = op.apply(p)
        alpha = gamma / q.flatten(1).square().sum(1).clamp_min(1e-30)
        x = x + alpha.view(-1, 1, 1) * p
        r = r - alpha.view(-1, 1, 1) * q
        s = op.adjoint(r)
        gamma_new = s.flatten(1).square().sum(1)
        p = s + (gamma_new / gamma.clamp_min(1e-30)).view(-1, 1, 1) * p
        gamma = gamma_new
    return x


# ----------------------------------------------------------------------------- experiment
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--views", type=int, default=30)
    parser.add_argument(
        "--noise", type=float, default=0.05, help="noise std / mean absolute sinogram value"
    )
    parser.add_argument("--train", type=int, default=2000, help="training phantoms")
    parser.add_argument("--test", type=int, default=32, help="held-out phantoms")
    parser.add_argument("--tune", type=int, default=8, help="training phantoms for tuning")
    parser.add_argument("--lsqr-max", type=int, default=60)
    parser.add_argument("--damps", type=float, nargs="+", default=[0.0, 0.03, 0.1])
    parser.add_argument("--tv-weights", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    parser.add_argument("--tv-coupling", type=float, default=0.01)
    parser.add_argument("--tv-outer", type=int, default=20)
    parser.add_argument(
        "--minutes", type=float, default=8.0, help="i-RIM training time (without --steps)"
    )
    parser.add_argument("--steps", type=int, default=None, help="i-RIM training steps")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=6, help="unrolled i-RIM iterations")
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument(
        "--type",
        choices=("additive", "proximal"),
        default="additive",
        help="i-RIM iteration: Putzky and Welling's additive one, or the proximal one (a "
        "gradient step of 1 / |A|^2 at first, corrected through a damped velocity; 6 dB worse "
        "here at 311 steps: such steps make little progress on this ill-conditioned operator)",
    )
    parser.add_argument(
        "--memory", type=int, default=3, help="memory channels of the additive i-RIM"
    )
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument(
        "--start-iterations",
        type=int,
        default=0,
        # a CGLS start made training diverge within a few steps (loss 1e9 and more): the data-fit
        # ActNorm is initialised on the first batch's gradient, which is tiny at CGLS's point
        help="CGLS iterations of the i-RIM's start (default 0: scaled back-projection)",
    )
    add_run_options(parser, "irim_ct")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.views, args.train, args.test, args.tune = 32, 10, 32, 4, 2
        args.steps, args.iterations, args.hidden, args.lsqr_max = 3, 2, 8, 5
        args.damps, args.tv_weights, args.tv_outer = [0.0], [3e-4], 5
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), torch.float32
    log = print if not args.quiet else (lambda *a: None)
    t_start = time.perf_counter()
    n, v = args.size, args.views

    # the same projector three ways: Radon2D parts (reference), scipy matrix, torch
    A = ct_matrix(n, v)
    probe = np.random.default_rng(0).standard_normal(n * n)
    assert np.allclose(ct_operator(n, v) @ probe, A @ probe, rtol=0, atol=1e-10)
    J = TorchCT(n, v)

    rng = np.random.default_rng(args.seed + 5)
    train = ellipse_phantoms(args.train, n, args.seed)
    test = ellipse_phantoms(args.test, n, args.seed + 1)

    def observe(images):
        clean = (A @ images.reshape(len(images), -1).T).T.reshape(len(images), v, n)
        sigma = args.noise * np.abs(clean).mean()
        return clean + sigma * rng.standard_normal(clean.shape)

    train_d, test_d = observe(train), observe(test)

    # the baselines (numpy, one core) run in a forked process while the i-RIM trains
    job = (A, n, v, train[: args.tune], train_d[: args.tune], test_d, args)
    pending = None if args.sequential else in_background(run_baselines, *job)

    # i-RIM: start from CGLS (early-stopped least squares) or a scaled back-projection
    fit = min(256, len(train))
    backproj = (A.T @ train_d[:fit].reshape(fit, -1).T).T
    alpha = float((backproj * train[:fit].reshape(fit, -1)).sum() / (backproj**2).sum())
    if args.type == "proximal":  # gradient steps of 1 / |A|^2 at first, the velocity as memory
        norm2 = float(scipy.sparse.linalg.svds(A, k=1, return_singular_vectors=False)[0]) ** 2
        net = invops.NetworkLoop(
            2, args.hidden, args.iterations, type="proximal", step_size=1.0 / norm2
        )
    else:
        net = invops.NetworkLoop(1 + args.memory, args.hidden, args.iterations, k1=3, p1=1, s1=1)
    net = net.to(device)

    def start_of(d_t: torch.Tensor) -> torch.Tensor:
        if args.start_iterations:
            return cgls_torch(J, d_t, args.start_iterations)
        return alpha * J.adjoint(d_t)

    def run(d: np.ndarray) -> torch.Tensor:
        d_t = torch.as_tensor(d, dtype=dtype, device=device)
        eta = start_of(d_t)[:, None]
        s = torch.zeros(len(d), net.n_in - 1, n, n, dtype=dtype, device=device)
        return net(eta, s, d_t, J)[0][:, 0]

    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    progress = tqdm(total=args.steps, desc="training i-RIM", unit="step", disable=args.quiet)
    t0, steps, done = time.perf_counter(), 0, 0.0
    while done < 1.0:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(args.lr, done)
        idx = rng.choice(len(train), args.batch, replace=False)
        target = torch.as_tensor(train[idx], dtype=dtype, device=device)
        loss = training_loss(run(train_d[idx]), target, args.loss)
        opt.zero_grad()
        loss.backward()  # memory-free through every unrolled iteration
        opt.step()
        steps += 1
        elapsed = time.perf_counter() - t0
        done = steps / args.steps if args.steps else elapsed / (60.0 * args.minutes)
        progress.update()
        progress.set_postfix(loss=f"{loss.item():.3f}")
    progress.close()
    train_time = time.perf_counter() - t0

    with torch.no_grad():
        irim = run(test_d).double().cpu().numpy()
    result = pending if pending is not None else (lambda: run_baselines(*job))
    chosen, baselines, line, baseline_time = result()
    log(line)
    recon = {
        "back-projection": np.stack([alpha * (A.T @ d.ravel()).reshape(n, n) for d in test_d]),
        **baselines,
        "i-RIM": irim,
    }
    results = {name: mean_metrics(est, test) for name, est in recon.items()}
    labels = {
        "back-projection": "scaled back-projection",
        "LSQR": f"LSQR ({chosen['lsqr_iter']} it., damp {chosen['lsqr_damp']:g}|A|)",
        "TV": f"TV (weight {chosen['tv_weight']:g}|A|^2)",
        "i-RIM": f"i-RIM ({args.iterations} it.)",
    }
    log(
        f"\nheld-out phantoms: {args.test}, {n}x{n}, {v} views, "
        f"noise std {100 * args.noise:g}% of the mean sinogram value"
    )
    log(f"{'method':<34}{'PSNR [dB]':>11}{'SSIM':>8}")
    for name, (p, s) in results.items():
        log(f"{labels[name]:<34}{p:>11.2f}{s:>8.3f}")
    total = time.perf_counter() - t_start
    log(
        f"times: i-RIM training {steps} steps in {train_time:.0f} s; baselines (tuning and test) "
        f"{baseline_time:.0f} s {'after' if args.sequential else 'beside'} it; total {total:.0f} s "
        f"({args.threads} torch thread(s), {args.device})"
    )
    results.update(
        total_time=total,
        train_time=train_time,
        steps=steps,
        chosen=chosen,
        baseline_time=baseline_time,
    )
    write_figure(recon, labels, test, test_d, args, results)
    log(f"figure written to {args.out}")
    return results


def write_figure(recon, labels, truths, sinograms, args, results, indices=(0, 1)):
    """Truth, sinogram, reconstructions and error maps of two held-out phantoms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(recon)
    n_rows, n_cols = 2 * len(indices), len(names) + 1
    fig, axes = plt.subplots(
        n_rows,
        n_cols + 1,
        figsize=(2.2 * n_cols + 0.9, 2.45 * n_rows),
        gridspec_kw=dict(width_ratios=[1] * n_cols + [0.07], wspace=0.3, hspace=0.6),
    )
    ticks = [0, args.size // 2, args.size - 1]
    theta = np.rad2deg(ct_angles(args.views))
    for a, i in enumerate(indices):
        top, bottom = axes[2 * a], axes[2 * a + 1]
        truth = truths[i]
        vmax = truth.max()
        im = top[0].imshow(truth, cmap="gray", vmin=0, vmax=vmax)
        top[0].set_title(f"truth (phantom {i})", fontsize=8)
        bottom[0].imshow(
            sinograms[i],
            cmap="gray",
            aspect="auto",
            extent=(-0.5, args.size - 0.5, theta[-1], theta[0]),
        )
        bottom[0].set_title("sinogram (data)", fontsize=8)
        bottom[0].set_xlabel("detector bin", fontsize=7)
        bottom[0].set_ylabel("angle [deg]", fontsize=7)
        bottom[0].tick_params(labelsize=6)
        for j, name in enumerate(names, start=1):
            est = recon[name][i]
            p, s = metrics(est, truth)
            top[j].imshow(est, cmap="gray", vmin=0, vmax=vmax)
            top[j].set_title(f"{labels[name]}\n{p:.1f} dB, SSIM {s:.2f}", fontsize=7)
            err = bottom[j].imshow(np.abs(est - truth), cmap="magma", vmin=0, vmax=0.3 * vmax)
            bottom[j].set_title(f"|error| {name}", fontsize=8)
            bottom[j].set_xlabel("x [pixel]", fontsize=7)
        fig.colorbar(im, cax=top[-1]).set_label("attenuation", fontsize=8)
        fig.colorbar(err, cax=bottom[-1]).set_label("abs. error", fontsize=8)
        for ax in (*top[:-1], *bottom[1:-1]):
            ax.set_xticks(ticks)
            ax.set_yticks(ticks)
            ax.tick_params(labelsize=6)
        for ax in (top[0], bottom[1]):
            ax.set_ylabel("y [pixel]", fontsize=7)
    fig.suptitle(
        f"sparse-view CT, {args.views} views, held-out phantoms; mean over {args.test}: "
        f"i-RIM {results['i-RIM'][0]:.1f} dB, TV {results['TV'][0]:.1f} dB, "
        f"LSQR {results['LSQR'][0]:.1f} dB",
        fontsize=10,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
