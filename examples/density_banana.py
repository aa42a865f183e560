"""Density estimation of a 2D banana distribution with small Glow, HINT and spline Glow flows.

The data are made here: the banana of InvertibleNetworks.jl's ``sample_banana`` (``c = [1, 4]``),
``y1 = x1 / c1``, ``y2 = c1 x2 + c1 c2 (x1^2 + c1^2)`` with ``x ~ N(0, I)``, as dense ``(B, 2)``
samples. Three flows are fitted by maximum likelihood with Adam and ``loss.backward()`` through
invops' memory-free autograd bridge: ``invops.NetworkGlow(2, ..., L=1, ndim=0)`` (ActNorm,
orthogonal 1x1 mixing, affine coupling with an MLP conditioner, split 1 + 1),
``invops.NetworkMultiScaleHINT(2, ..., L=1, ndim=0)`` (ActNorm, HINT coupling) and the same Glow
with rational-quadratic spline couplings (``coupling=invops.Spline(...)``, a neural spline flow).

The flows see standardised data ``u = (y - m) / s`` (mean and standard deviation of the training
set); the reported negative log-likelihoods are those of the original data ``y``:
``NLL_y = NLL_u + sum(log s)`` (the log-Jacobian of the standardisation). They are compared, on
held-out samples, with two references: a single Gaussian fitted by moment matching (closed form)
and the true banana density, known because the banana is a transformation ``y = T(x)`` of a
standard Gaussian with ``NLL_true(y) = gaussian_nll(T^-1(y)) - log|det dT^-1/dy|`` (here the
determinant is 1). The script prints the table and the time taken, and writes a scatter plot of
the data and of samples drawn from each flow.

Run: ``python examples/density_banana.py`` (one to two minutes on 2 CPU cores). Options:
``--steps``, ``--seed``, ``--out`` for the figure, ``--threads`` (default 1) and the sizes below.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import invops
from invops.objectives import flow_nll, gaussian_nll

BANANA_C = (1.0, 4.0)


# ----------------------------------------------------------------------------- banana
def sample_banana(n: int, seed: int, c: tuple[float, float] = BANANA_C) -> np.ndarray:
    """``n`` samples ``y = T(x)``, ``x ~ N(0, I)``, shape (n, 2), float64 (reference formula)."""
    x = np.random.default_rng(seed).standard_normal((n, 2))
    return banana_forward(x, c)


def banana_forward(x: np.ndarray, c: tuple[float, float] = BANANA_C) -> np.ndarray:
    c1, c2 = c
    y1 = x[:, 0] / c1
    y2 = x[:, 1] * c1 + c1 * c2 * (x[:, 0] ** 2 + c1**2)
    return np.stack([y1, y2], axis=1)


def banana_inverse(y: np.ndarray, c: tuple[float, float] = BANANA_C) -> tuple[np.ndarray, float]:
    """``x = T^-1(y)`` and ``log|det dT^-1/dy|`` (a constant: the Jacobian is triangular)."""
    c1, c2 = c
    x1 = y[:, 0] * c1
    x2 = (y[:, 1] - c1 * c2 * (x1**2 + c1**2)) / c1
    logdet = math.log(abs(c1)) - math.log(abs(c1))  # diagonal dx1/dy1 = c1, dx2/dy2 = 1/c1
    return np.stack([x1, x2], axis=1), logdet


def true_nll(y: np.ndarray) -> np.ndarray:
    """Exact per-sample NLL of the banana density: ``gaussian_nll(T^-1(y)) - log|det|``."""
    x, logdet = banana_inverse(y)
    return gaussian_nll(x) - logdet


def gaussian_fit_nll(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Per-sample NLL of ``test`` under the Gaussian with ``train``'s mean and covariance."""
    mean = train.mean(axis=0)
    chol = np.linalg.cholesky(np.cov(train, rowvar=False, bias=True))
    z = np.linalg.solve(chol, (test - mean).T).T  # whitened: N(0, I) under the fit
    return gaussian_nll(z) + np.log(np.diag(chol)).sum()


# ----------------------------------------------------------------------------- flows
def train_flow(
    name: str,
    flow: invops.InvertibleModule,
    train: torch.Tensor,
    steps: int,
    batch: int,
    lr: float,
) -> list[float]:
    """Maximum likelihood with Adam and a cosine schedule; returns the loss per step."""
    opt = torch.optim.Adam(flow.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    losses = []
    progress = tqdm(range(steps), desc=f"training {name}", unit="step")
    for step in progress:
        u = train[torch.randint(0, len(train), (batch,))]
        opt.zero_grad()
        z, logdet = flow(u)
        loss = flow_nll(z, logdet).mean()
        loss.backward()  # memory-free: layer inputs are recomputed by inversion
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 25 == 0:
            progress.set_postfix(nll=f"{loss.item():.3f}")
    return losses


def flow_test_nll(flow: invops.InvertibleModule, u: torch.Tensor, log_scale: float) -> np.ndarray:
    """Per-sample NLL of the original data: NLL of the standardised data + sum(log s)."""
    with torch.no_grad():
        z, logdet = flow(u)
        return (flow_nll(z, logdet) + log_scale).double().numpy()


def flow_samples(
    flow: invops.InvertibleModule, n: int, mean: np.ndarray, std: np.ndarray
) -> np.ndarray:
    with torch.no_grad():
        u, _ = flow.inverse(torch.randn(n, 2))
    return u.double().numpy() * std + mean


# ----------------------------------------------------------------------------- demo
def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the demo; returns the held-out NLLs (nats per sample) and the time taken."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="training steps per flow")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--hidden", type=int, default=64, help="conditioner width")
    parser.add_argument("--glow-k", type=int, default=8, help="Glow steps (ActNorm + coupling)")
    parser.add_argument("--hint-k", type=int, default=8, help="HINT steps (ActNorm + coupling)")
    parser.add_argument(
        "--spline-k", type=int, default=6, help="spline Glow steps (ActNorm + spline coupling)"
    )
    parser.add_argument("--bins", type=int, default=8, help="bins of every spline")
    parser.add_argument(
        "--bound", type=float, default=5.0, help="splines act on [-bound, bound] (standardised)"
    )
    parser.add_argument("--train", type=int, default=20000, help="training samples")
    parser.add_argument("--test", type=int, default=5000, help="held-out samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (0: leave torch's default)"
    )
    parser.add_argument("--out", default="examples/output/density_banana.png")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads > 0:
        # The tensors are tiny ((256, 2) batches, 64 hidden features): one thread is as fast as
        # several, and with other processes on the cores torch's thread pool slowed training by
        # 6x (measured on 2 busy cores).
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)  # main() may be called from other code (the tests)


def run(args: argparse.Namespace) -> dict[str, float]:
    """The demo proper, with parsed arguments (see :func:`main`)."""
    start = time.perf_counter()

    train_y = sample_banana(args.train, seed=args.seed)
    test_y = sample_banana(args.test, seed=args.seed + 1)
    mean, std = train_y.mean(axis=0), train_y.std(axis=0)
    log_scale = float(np.log(std).sum())  # NLL_y = NLL_u + log_scale for u = (y - mean) / std

    def standardise(y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((y - mean) / std).float()

    train_u, test_u = standardise(train_y), standardise(test_y)

    # each flow is built and trained from the same seed, so none depends on the others' draws
    # (initial weights and batch order come from torch's global generator)
    flows = {
        "glow": (
            f"Glow (K={args.glow_k})",
            lambda: invops.NetworkGlow(2, args.hidden, L=1, K=args.glow_k, ndim=0),
        ),
        "hint": (
            f"HINT (K={args.hint_k})",
            lambda: invops.NetworkMultiScaleHINT(2, args.hidden, L=1, K=args.hint_k, ndim=0),
        ),
        "spline": (
            f"spline Glow (K={args.spline_k})",
            lambda: invops.NetworkGlow(
                2,
                args.hidden,
                L=1,
                K=args.spline_k,
                ndim=0,
                coupling=invops.Spline(bins=args.bins, bound=args.bound),
            ),
        ),
    }
    results: dict[str, float] = {}
    samples: dict[str, np.ndarray] = {}
    times: dict[str, float] = {}
    for key, (label, build) in flows.items():
        torch.manual_seed(args.seed)
        flow = build()
        n_params = sum(p.numel() for p in flow.parameters())
        print(f"{label}: {n_params} parameters, {args.steps} steps, batch {args.batch}")
        with torch.no_grad():
            flow(train_u[:1024])  # data-dependent ActNorm initialisation
        results[f"{key}_before"] = float(flow_test_nll(flow, test_u, log_scale).mean())
        t0 = time.perf_counter()
        train_flow(label, flow, train_u, args.steps, args.batch, args.lr)
        times[key] = time.perf_counter() - t0
        results[key] = float(flow_test_nll(flow, test_u, log_scale).mean())
        samples[label] = flow_samples(flow, args.test, mean, std)

    results["gaussian"] = float(gaussian_fit_nll(train_y, test_y).mean())
    results["true"] = float(true_nll(test_y).mean())

    print(f"\nheld-out samples: {args.test} (training: {args.train}), banana c = {BANANA_C}")
    print("NLL of the original data in nats per sample (flows: standardisation log-Jacobian")
    print("included); 'before' is the flow after ActNorm initialisation, before training")
    print(f"{'model':<22}{'before':>9}{'NLL':>9}{'- true':>9}{'train [s]':>11}")

    def row(label: str, nll: float, before: str = "", seconds: str = "") -> None:
        gap = nll - results["true"]
        print(f"{label:<22}{before:>9}{nll:>9.3f}{gap:>9.3f}{seconds:>11}")

    row("Gaussian fit", results["gaussian"])
    for key, (label, _) in flows.items():
        row(label, results[key], f"{results[key + '_before']:.3f}", f"{times[key]:.1f}")
    row("true banana density", results["true"])

    fig_path = write_figure(args.out, test_y, samples)
    if fig_path:
        print(f"figure written to {fig_path}")
    results["time"] = time.perf_counter() - start
    print(f"time taken: {results['time']:.1f} s")
    if not all(math.isfinite(results[key]) for key in flows):
        raise SystemExit("training diverged: non-finite held-out NLL")
    return results


def write_figure(out: str, data: np.ndarray, samples: dict[str, np.ndarray]) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the examples extra
        print("matplotlib not installed: no figure written")
        return None
    n = min(2000, len(data))
    panels = {"data (held-out)": data[:n]} | {f"{k} samples": v[:n] for k, v in samples.items()}
    lo = np.percentile(data, 0.5, axis=0)
    hi = np.percentile(data, 99.5, axis=0)
    pad = 0.1 * (hi - lo)
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4 * len(panels), 4.2), sharex=True, sharey=True
    )
    for ax, (title, pts) in zip(axes, panels.items()):
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.4, color="C0" if "data" in title else "C1")
        ax.set_title(title)
        ax.set_xlabel("$y_1$")
        ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
        ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
    axes[0].set_ylabel("$y_2$")
    fig.suptitle("banana density: data and samples of the fitted flows")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


if __name__ == "__main__":
    main()
