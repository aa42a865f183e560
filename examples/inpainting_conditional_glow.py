"""Conditional Glow inpainting on small synthetic images: posterior mean, variance and samples.

The images are made here: 16x16 smooth Gaussian random fields (white noise smoothed by
``scipy.ndimage.gaussian_filter``, scaled to unit variance) plus a little white "grain". Each one
is observed with a random rectangular hole (5 to 9 pixels a side) and a little noise outside it.
An ``invops.NetworkConditionalGlow(1, 2, 32, L=2, K=6, split_scales=True)`` (Haar squeezes)
learns the posterior of the image ``x`` given the condition ``c = cat(masked observation, mask)``
(2 channels, the image's size) by maximum likelihood (``flow_nll``) with Adam and
``loss.backward()`` through invops' memory-free autograd bridge. Fresh images and holes are
drawn at every step.

On held-out observations the script draws many posterior samples per observation
(``net.sample(c, n)``), forms the pixelwise posterior mean and standard deviation, and reports
inside the hole: the RMSE of the posterior mean against the truth, next to two baselines
(filling the hole with the mean of the observed pixels, and harmonic inpainting: Laplace's
equation in the hole with the observed pixels around it as boundary values), and the fraction of
true pixels inside the central 95% posterior interval (0.95 for a calibrated posterior). Because
the smoothing is linear, the images are Gaussian with a covariance this script computes exactly,
so the exact posterior is available too: it is the best any method can do (lowest expected RMSE,
exact coverage, lowest expected NLL) and is reported as the reference.

Run: ``python examples/inpainting_conditional_glow.py`` (two to four minutes on 2 CPU cores,
depending on how busy they are). Options: ``--steps``, ``--seed``, ``--out`` for the figure, and
the sizes below; more steps bring the flow closer to the exact posterior. ``--threads`` sets
torch's intra-op threads: the default 1 is about as fast as 2 on idle cores for tensors this
small, and many times faster when the cores are shared with other busy processes.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

import invops
from invops.objectives import flow_nll

SIZE = 16  # image side (a multiple of 4: two squeezes)
TRUNCATE = 4.0  # gaussian_filter's truncation, in standard deviations


# ----------------------------------------------------------------------------- images
class RandomFields:
    """Smooth Gaussian random fields ``x = a * crop(gaussian_filter(w)) + grain * e``.

    ``w`` is white noise on a padded grid (so that the crop has no boundary effects), ``a``
    scales the smooth part to unit variance and ``e`` is white noise. The map from ``w`` to the
    smooth part is linear, so the covariance of ``x`` is exact: ``a^2 G G^T + grain^2 I`` with
    the columns of ``G`` the smoothed unit impulses.
    """

    def __init__(self, size: int, corr: float, grain: float) -> None:
        self.size, self.corr, self.grain = size, corr, grain
        self.pad = int(math.ceil(TRUNCATE * corr))
        n = size + 2 * self.pad
        impulses = np.eye(n * n).reshape(n * n, n, n)
        G = self._smooth(impulses).reshape(n * n, size * size).T  # (pixels, noise entries)
        self.amplitude = 1.0 / math.sqrt(float(np.mean(np.sum(G**2, axis=1))))
        smooth_cov = self.amplitude**2 * (G @ G.T)
        self.cov = smooth_cov + grain**2 * np.eye(size * size)

    def _smooth(self, w: np.ndarray) -> np.ndarray:
        s = gaussian_filter(w, sigma=(0, self.corr, self.corr), mode="constant", truncate=TRUNCATE)
        return s[:, self.pad : self.pad + self.size, self.pad : self.pad + self.size]

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        side = self.size + 2 * self.pad
        smooth = self.amplitude * self._smooth(rng.standard_normal((n, side, side)))
        return smooth + self.grain * rng.standard_normal((n, self.size, self.size))


def random_holes(n: int, size: int, lo: int, hi: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` masks (1 in the hole): rectangles with sides in ``[lo, hi]``, inside the image."""
    masks = np.zeros((n, size, size))
    for i in range(n):
        h, w = rng.integers(lo, hi + 1, size=2)
        top, left = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
        masks[i, top : top + h, left : left + w] = 1.0
    return masks


def observe(x: np.ndarray, mask: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Noisy pixels outside the hole, zeros (the prior mean) inside it."""
    return (x + noise * rng.standard_normal(x.shape)) * (1.0 - mask)


def condition(y: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    """``c = cat(masked observation, mask)``: (B, 2, size, size), float32."""
    return torch.from_numpy(np.stack([y, mask], axis=1)).float()


def image(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x[:, None]).float()


# ----------------------------------------------------------------------------- baselines
def observed_mean_fill(y: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The hole filled with the mean of the observed pixels of the same image."""
    means = (y * (1 - mask)).sum(axis=(1, 2)) / (1 - mask).sum(axis=(1, 2))
    return np.where(mask > 0, means[:, None, None], y)


def harmonic_fill(y: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Laplace's equation in the hole (4-neighbour stencil), the observed pixels as boundary."""
    out = y.copy()
    size = y.shape[-1]
    for b in range(len(y)):
        hole = np.argwhere(mask[b] > 0)
        index = {(i, j): k for k, (i, j) in enumerate(hole)}
        A = np.zeros((len(hole), len(hole)))
        rhs = np.zeros(len(hole))
        for k, (i, j) in enumerate(hole):
            for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                p, q = i + di, j + dj
                if not (0 <= p < size and 0 <= q < size):
                    continue  # no neighbour: zero normal derivative at the image edge
                A[k, k] += 1.0
                if (p, q) in index:
                    A[k, index[(p, q)]] -= 1.0
                else:
                    rhs[k] += y[b, p, q]
        out[b][mask[b] > 0] = np.linalg.solve(A, rhs)
    return out


def exact_posterior(
    cov: np.ndarray, x: np.ndarray, y: np.ndarray, mask: np.ndarray, noise: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """The Gaussian posterior of ``x`` given the observed pixels: pixelwise mean and std, and
    the mean negative log-likelihood of the truth ``x`` under it (nats per pixel).

    Computed with torch in float64 (numpy's multithreaded BLAS is slow on small, shared cores).
    """
    n = y.shape[-1]
    cov_t = torch.from_numpy(cov)
    means, stds, nll = np.empty_like(y), np.empty_like(y), 0.0
    for b in range(len(y)):
        obs = torch.from_numpy(mask[b].ravel() == 0)
        c_xo = cov_t[:, obs]
        c_oo = cov_t[obs][:, obs] + noise**2 * torch.eye(int(obs.sum()), dtype=torch.float64)
        gain = torch.linalg.solve(c_oo, c_xo.T).T
        mean = gain @ torch.from_numpy(y[b].ravel())[obs]
        post_cov = cov_t - gain @ c_xo.T
        chol = torch.linalg.cholesky(0.5 * (post_cov + post_cov.T))
        r = torch.linalg.solve_triangular(
            chol, (torch.from_numpy(x[b].ravel()) - mean)[:, None], upper=False
        )
        nll += float(0.5 * r.pow(2).sum() + chol.diagonal().log().sum()) + 0.5 * n * n * math.log(
            2 * math.pi
        )
        means[b] = mean.reshape(n, n).numpy()
        stds[b] = post_cov.diagonal().clamp_min(0).sqrt().reshape(n, n).numpy()
    return means, stds, nll / (len(y) * n * n)


# ----------------------------------------------------------------------------- flow
def held_out_nll(net: invops.NetworkConditionalGlow, x: torch.Tensor, c: torch.Tensor) -> float:
    """Mean negative log-likelihood of ``x`` given ``c``, in nats per pixel."""
    with torch.no_grad():
        z, logdet = net(x, c)
        return float(flow_nll(z, logdet).mean()) / x[0].numel()


def posterior_samples(
    net: invops.NetworkConditionalGlow, c: torch.Tensor, n: int, chunk: int = 256
) -> np.ndarray:
    """``n`` posterior samples per condition, shape (n, B, size, size)."""
    out = []
    for start in range(0, len(c), chunk):
        out.append(net.sample(c[start : start + chunk], n)[:, :, 0].double().numpy())
    return np.concatenate(out, axis=1)


# ----------------------------------------------------------------------------- demo
def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the demo; returns the held-out metrics (RMSE and coverage in the hole) and timings."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=6e-3)
    parser.add_argument("--hidden", type=int, default=32, help="conditioner width")
    parser.add_argument("--K", type=int, default=6, help="flow steps per scale (2 scales)")
    parser.add_argument("--squeeze", default="haar", choices=("haar", "checkerboard", "patch"))
    parser.add_argument("--corr", type=float, default=2.0, help="smoothing length [pixels]")
    parser.add_argument("--grain", type=float, default=0.1, help="white part of the images")
    parser.add_argument("--noise", type=float, default=0.1, help="observation noise std")
    parser.add_argument("--hole", type=int, nargs=2, default=(5, 9), help="hole side range")
    parser.add_argument("--test", type=int, default=64, help="held-out observations")
    parser.add_argument("--samples", type=int, default=200, help="posterior samples each")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="examples/output/inpainting_conditional_glow.png")
    args = parser.parse_args(argv)
    lo, hi = args.hole
    if not 1 <= lo <= hi < SIZE:
        parser.error(f"--hole needs 1 <= min <= max < {SIZE}, got {lo} {hi}")
    if args.samples < 2 or args.test < 1:
        parser.error("--samples must be >= 2 and --test >= 1")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(previous_threads)  # leave the caller's setting as it was


def run(args: argparse.Namespace) -> dict[str, float]:
    """Train, sample, evaluate, print the table and write the figure."""
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    lo, hi = args.hole

    fields = RandomFields(SIZE, args.corr, args.grain)

    def draw(n: int, rng: np.random.Generator):
        x = fields.sample(n, rng)
        mask = random_holes(n, SIZE, lo, hi, rng)
        return x, observe(x, mask, args.noise, rng), mask

    train_rng = np.random.default_rng(args.seed)
    test_x, test_y, test_mask = draw(args.test, np.random.default_rng(args.seed + 10_000))
    test_c = condition(test_y, test_mask)

    net = invops.NetworkConditionalGlow(
        1, 2, args.hidden, L=2, K=args.K, split_scales=True, squeeze=args.squeeze
    )
    init_x, init_y, init_mask = draw(256, train_rng)
    with torch.no_grad():
        net(image(init_x), condition(init_y, init_mask))  # data-dependent ActNorm initialisation
    results: dict[str, float] = {"nll_before": held_out_nll(net, image(test_x), test_c)}
    n_params = sum(p.numel() for p in net.parameters())
    print(
        f"conditional Glow: L=2, K={args.K}, hidden {args.hidden}, {n_params} parameters; "
        f"{args.steps} steps, batch {args.batch}"
    )

    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(args.steps, 1))
    t0 = time.perf_counter()
    losses = []
    progress = tqdm(range(args.steps), desc="training conditional Glow", unit="step")
    for step in progress:
        x, y, mask = draw(args.batch, train_rng)
        opt.zero_grad()
        z, logdet = net(image(x), condition(y, mask))
        loss = flow_nll(z, logdet).mean() / x[0].size  # nats per pixel
        loss.backward()  # memory-free: layer inputs are recomputed by inversion
        torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 20 == 0:
            progress.set_postfix(nll=f"{loss.item():.3f}")
    results["train_time"] = time.perf_counter() - t0
    results["nll_after"] = held_out_nll(net, image(test_x), test_c)
    window = max(1, min(50, len(losses) // 5))
    results["train_loss_first"] = float(np.mean(losses[:window])) if losses else math.nan
    results["train_loss_last"] = float(np.mean(losses[-window:])) if losses else math.nan

    t0 = time.perf_counter()
    samples = posterior_samples(net, test_c, args.samples)  # (n, B, size, size)
    results["sample_time"] = time.perf_counter() - t0
    post_mean, post_std = samples.mean(axis=0), samples.std(axis=0)
    q_lo, q_hi = np.quantile(samples, [0.025, 0.975], axis=0)
    exact_mean, exact_std, results["nll_exact"] = exact_posterior(
        fields.cov, test_x, test_y, test_mask, args.noise
    )

    hole = test_mask > 0

    def rmse(estimate: np.ndarray) -> float:
        return float(np.sqrt(np.mean((estimate - test_x)[hole] ** 2)))

    results["rmse_observed_mean"] = rmse(observed_mean_fill(test_y, test_mask))
    results["rmse_harmonic"] = rmse(harmonic_fill(test_y, test_mask))
    results["rmse_glow"] = rmse(post_mean)
    results["rmse_exact"] = rmse(exact_mean)
    inside = (test_x >= q_lo) & (test_x <= q_hi)
    results["coverage_glow"] = float(inside[hole].mean())
    z95 = 1.959964
    results["coverage_exact"] = float((np.abs(test_x - exact_mean) <= z95 * exact_std)[hole].mean())
    results["std_glow"] = float(np.sqrt(np.mean(post_std[hole] ** 2)))
    results["std_exact"] = float(np.sqrt(np.mean(exact_std[hole] ** 2)))

    print(
        f"\nheld-out observations: {args.test}, {SIZE}x{SIZE} fields (smoothing {args.corr:g} px, "
        f"grain {args.grain:g}), holes {lo}-{hi} px a side, noise {args.noise:g}"
    )
    print(
        f"held-out NLL [nats/pixel]: {results['nll_before']:.3f} after ActNorm initialisation, "
        f"{results['nll_after']:.3f} after training, {results['nll_exact']:.3f} for the exact "
        "posterior"
    )
    print("inside the hole; posterior statistics from", args.samples, "samples per observation")
    print(f"{'method':<36}{'RMSE':>8}{'95% cover':>11}{'RMS std':>9}")
    print(f"{'fill with mean of observed pixels':<36}{results['rmse_observed_mean']:>8.3f}")
    print(f"{'harmonic (Laplace) inpainting':<36}{results['rmse_harmonic']:>8.3f}")
    for label, key in (
        ("conditional Glow posterior", "glow"),
        ("exact Gaussian posterior", "exact"),
    ):
        print(
            f"{label:<36}{results['rmse_' + key]:>8.3f}{results['coverage_' + key]:>11.3f}"
            f"{results['std_' + key]:>9.3f}"
        )
    print(
        f"training: {args.steps} steps in {results['train_time']:.0f} s; sampling: "
        f"{args.samples} x {args.test} in {results['sample_time']:.0f} s"
    )

    fig_path = write_figure(
        args.out, test_x, test_y, test_mask, post_mean, post_std, samples, exact_mean, exact_std
    )
    if fig_path:
        print(f"figure written to {fig_path}")
    results["time"] = time.perf_counter() - start
    print(f"time taken: {results['time']:.1f} s")
    if not math.isfinite(results["nll_after"]) or not math.isfinite(results["rmse_glow"]):
        raise SystemExit("training diverged: non-finite held-out NLL or posterior mean")
    return results


def write_figure(
    out: str,
    truth: np.ndarray,
    obs: np.ndarray,
    mask: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    samples: np.ndarray,
    exact_mean: np.ndarray,
    exact_std: np.ndarray,
) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle
    except ImportError:  # pragma: no cover - matplotlib is in the examples extra
        print("matplotlib not installed: no figure written")
        return None
    rows = min(3, len(truth))
    vmax = 2.5
    smax = float(max(std[:rows].max(), exact_std[:rows].max()))
    field_cmap = plt.get_cmap("RdBu_r").with_extremes(bad="0.6")  # the hole: gray
    std_columns = (3, 7)
    fig, axes = plt.subplots(rows, 8, figsize=(15, 2.2 * rows + 1.1), squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.92, bottom=0.14, top=0.86, wspace=0.08, hspace=0.3)
    for r in range(rows):
        hole = mask[r] > 0
        (top, left), (bottom, right) = np.argwhere(hole).min(axis=0), np.argwhere(hole).max(axis=0)
        err = np.sqrt(np.mean((mean[r] - truth[r])[hole] ** 2))
        exact_err = np.sqrt(np.mean((exact_mean[r] - truth[r])[hole] ** 2))
        panels = [
            ("truth", truth[r]),
            ("observation", np.where(hole, np.nan, obs[r])),
            (f"Glow mean (RMSE {err:.2f})", mean[r]),
            ("Glow std", std[r]),
            ("Glow sample 1", samples[0, r]),
            ("Glow sample 2", samples[1, r]),
            (f"exact mean (RMSE {exact_err:.2f})", exact_mean[r]),
            ("exact std", exact_std[r]),
        ]
        for col, (ax, (title, img)) in enumerate(zip(axes[r], panels)):
            if col in std_columns:
                im_std = ax.imshow(img, cmap="magma", vmin=0, vmax=smax)
            else:
                im = ax.imshow(img, cmap=field_cmap, vmin=-vmax, vmax=vmax)
            outline = Rectangle(
                (left - 0.5, top - 0.5),
                right - left + 1,
                bottom - top + 1,
                fill=False,
                edgecolor="w" if col in std_columns else "k",
                linewidth=1.2,
                linestyle="--",
            )
            ax.add_patch(outline)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.colorbar(im, cax=fig.add_axes((0.935, 0.25, 0.012, 0.5)), label="value")
    for col in std_columns:
        box = axes[-1, col].get_position()
        sax = fig.add_axes((box.x0, box.y0 - 0.04, box.width, 0.015))
        fig.colorbar(im_std, cax=sax, orientation="horizontal")
        sax.tick_params(labelsize=8)
    fig.suptitle(
        "conditional Glow inpainting of held-out fields (dashed: the hole); "
        "the exact Gaussian posterior on the right for reference"
    )
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


if __name__ == "__main__":
    main()
