"""4D segmentation: land-use change in a time-lapse hyperspectral volume from 35 points per class.

The InvertibleNetworks.jl scenario (Peters et al.): a single large 4D volume (two spatial axes,
a spectral axis, two acquisition times), an invertible hyperbolic network with 3D convolutions
over (x, y, spectrum) with the two times as channels, trained from 35 point annotations per
class ("change" / "no change") and predicting change everywhere.

- **Data.** Made by this script: a land-cover map (water, forest, cropland, grassland, urban,
  bare soil) at the first acquisition, with patch-shaped land-use changes at the second
  (clearing, urbanisation, reforestation, flooding, drying). Each pixel's spectrum (``--bands``
  bands from 400 to 2500 nm) mixes its class's reflectance curve with its neighbours' at class
  boundaries (mixed pixels), and carries a random per-pixel brightness. Between the two
  acquisitions the vegetation changes with the season (cropland harvested, grass drier,
  forest slightly) without any change of land use, the illumination and atmosphere differ (a
  smooth per-band gain and offset over the scene), and both images are noisy: a simple spectral
  difference therefore also flags the seasonal changes.
- **Labels.** The hidden full change map; the network sees 35 annotated pixels of each class.
- **Network.** ``invops.NetworkHyperbolic(2, ..., ndim=3)`` on ``cat(v, v)`` with ``v`` the
  volume (2 channels: the two times; 3D convolutions over x, y and the spectrum; each band
  standardised), with a Haar squeeze and unsqueeze, followed by a linear read-out per pixel of
  its output (2 states x 2 channels x every band) to the two class scores. With the network at
  the identity the read-out is a per-pixel logistic regression; the network adds context.
- **Training.** Adam on the cross-entropy at the 70 annotated pixels through ``loss.backward()``
  (the memory-free autograd bridge: no activations are stored between layers), with a small
  learning rate for the network and a larger one for the read-out (with 70 labels a fast
  network fits them in a few steps and generalises worse).

Reported: accuracy and change-class IoU against the hidden full labels, for the network and two
baselines that get the same 70 labels: the spectral-difference magnitude ``|v2 - v1|``
thresholded where it best separates the annotated pixels, and a per-pixel logistic regression
on the two spectra. The memory side of the scenario (the seed's 17 GB against 307 GB) is
measured by ``benchmarks/segmentation_memory.py``.

Run: ``python examples/segmentation_4d.py`` (50 s of CPU time on one thread; four minutes of wall
time on the shared 2-core project machine). Options: ``--size``, ``--bands``, ``--steps``,
``--points``, ``--hidden``, ``--depth``, ``--seed``, ``--out`` for the figure.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

import invops

CLASSES = ("water", "forest", "cropland", "grassland", "urban", "bare soil")
WATER, FOREST, CROP, GRASS, URBAN, BARE = range(len(CLASSES))
# land-use changes between the acquisitions: (from, to)
TRANSITIONS = [
    (FOREST, BARE),  # clearing
    (CROP, URBAN),  # urbanisation
    (GRASS, URBAN),
    (BARE, FOREST),  # reforestation
    (BARE, WATER),  # flooding
    (WATER, BARE),  # drying
    (GRASS, CROP),  # conversion to cropland
]


# ----------------------------------------------------------------------------- spectra
def reflectance(wavelengths: np.ndarray) -> dict[str, np.ndarray]:
    """Schematic reflectance curves (0-1) of the classes, and their seasonal variants."""
    wl = wavelengths / 1000.0  # micrometres

    def bump(c, s):
        return np.exp(-0.5 * ((wl - c) / s) ** 2)

    red_edge = 1 / (1 + np.exp(-(wl - 0.72) / 0.015))
    water_abs = 1 - 0.6 * bump(1.45, 0.05) - 0.7 * bump(1.95, 0.07)

    def vegetation(green, nir, dry):
        visible = 0.04 + green * bump(0.55, 0.03)
        return (visible + (nir - visible) * red_edge) * water_abs * (1 - dry * 0.3 * wl) + dry * (
            0.1 * wl
        )

    soil = 0.1 + 0.18 * wl - 0.05 * bump(2.2, 0.05)
    return {
        "water": 0.06 * np.exp(-(wl - 0.4) / 0.15) + 0.01,
        "forest": vegetation(0.05, 0.40, 0.0),
        "forest_t2": vegetation(0.045, 0.36, 0.05),  # a little later in the season
        "cropland": vegetation(0.09, 0.55, 0.0),
        "cropland_t2": 0.7 * soil + 0.3 * vegetation(0.03, 0.25, 0.8),  # harvested
        "grassland": vegetation(0.07, 0.45, 0.1),
        "grassland_t2": vegetation(0.04, 0.32, 0.6),  # dry season
        "urban": 0.16 + 0.05 * wl + 0.02 * np.sin(8 * wl),
        "bare soil": soil,
    }


def smooth_field(shape, corr, rng) -> np.ndarray:
    f = gaussian_filter(rng.standard_normal(shape), corr, mode="wrap")
    return (f - f.mean()) / (f.std() + 1e-12)


def land_cover(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Class maps (n, n) at both acquisitions."""
    fields = np.stack([smooth_field((n, n), n / 10, rng) for _ in CLASSES])
    fields[WATER] -= 0.8  # less water
    t1 = fields.argmax(0)
    t2 = t1.copy()
    # land-use changes: smooth patches where one transition applies to the pixels of its class
    for source, target in TRANSITIONS:
        patches = smooth_field((n, n), n / 16, rng) > 1.1
        t2[patches & (t1 == source)] = target
    return t1, t2


def volume(
    t1: np.ndarray, t2: np.ndarray, n_bands: int, noise: float, rng: np.random.Generator
) -> np.ndarray:
    """The time-lapse volume (2, n, n, n_bands): spectra of both acquisitions."""
    n = t1.shape[0]
    wavelengths = np.linspace(400, 2500, n_bands)
    refl = reflectance(wavelengths)
    out = np.empty((2, n, n, n_bands))
    for time_index, classes in enumerate((t1, t2)):
        # mixed pixels at class boundaries: blurred class abundances
        abundance = np.stack([gaussian_filter((classes == c).astype(float), 0.7) for c in range(6)])
        abundance /= abundance.sum(0, keepdims=True)
        spectra = np.zeros((n, n, n_bands))
        for c, name in enumerate(CLASSES):
            key = f"{name}_t2" if time_index == 1 and f"{name}_t2" in refl else name
            spectra += abundance[c][..., None] * refl[key][None, None, :]
        brightness = 1 + 0.1 * rng.standard_normal((n, n))  # slope, moisture, texture
        # illumination and atmosphere: a smooth per-band gain and a haze offset over the scene
        gain = 1 + 0.15 * smooth_field((n, n), n / 4, rng)[..., None] * np.linspace(1, 0.3, n_bands)
        haze = (0.02 + 0.02 * rng.random()) * np.exp(-(wavelengths - 400) / 300)
        out[time_index] = spectra * brightness[..., None] * gain + haze
        out[time_index] += noise * rng.standard_normal((n, n, n_bands))
    return out


def annotate(change: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` random pixels of each class: a (2k, 2) array of (row, col), and their labels."""
    picks = []
    for value in (0, 1):
        idx = np.flatnonzero(change.ravel() == value)
        picks.append(rng.choice(idx, size=min(k, idx.size), replace=False))
    flat = np.concatenate(picks)
    return np.stack(np.unravel_index(flat, change.shape), axis=1), change.ravel()[flat]


# ----------------------------------------------------------------------------- network
def build_network(hidden: int, depth: int, alpha: float, seed: int) -> invops.Chain:
    """``depth`` hyperbolic layers (3D convolutions): half before a Haar squeeze, half after
    the unsqueeze, with twice the hidden width in between.

    Returned as the Chain of the ``NetworkHyperbolic``'s layers (the same map and parameters):
    ``NetworkHyperbolic`` checks every call's input shape by running all its layers on the meta
    device, which cost about a third of a training step here; the shape is fixed, and the
    Chain checks only its first layer.
    """
    torch.manual_seed(seed)
    half = max(1, depth // 2 - 1)
    arch = (
        [("none", hidden)] * half
        + [("squeeze", 2 * hidden), ("unsqueeze", hidden)]
        + [("none", hidden)] * (depth - half - 2)
    )
    net = invops.NetworkHyperbolic(2, arch, alpha=alpha, ndim=3, logdet=False)
    return invops.Chain(*net.layers, logdet=False)


class ChangeSegmenter(torch.nn.Module):
    """The invertible 3D network and a linear read-out of its output, pixel by pixel.

    The read-out maps the network's output at a pixel (2 states x 2 channels x every band) to
    the two class scores; with the network at the identity it is a per-pixel logistic
    regression on the two spectra, and the network adds spatial and spectral context.
    """

    def __init__(self, hidden: int, depth: int, alpha: float, n_bands: int, seed: int) -> None:
        super().__init__()
        self.net = build_network(hidden, depth, alpha, seed)
        self.head = torch.nn.Linear(4 * n_bands, 2)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """(1, 2, n, n) class scores of a volume ``cat(v, v)`` (1, 4, n, n, bands)."""
        out = self.net(v)  # memory-free under grad mode: only the output is stored
        return self.head(out.permute(0, 2, 3, 1, 4).flatten(3)).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- baselines
def difference_baseline(vol: np.ndarray, rows, cols, labels) -> np.ndarray:
    """|v2 - v1| per pixel, thresholded where it best separates the annotated pixels."""
    diff = np.linalg.norm(vol[1] - vol[0], axis=-1)
    values = diff[rows, cols]
    candidates = np.sort(values)
    accs = [((values > t) == (labels > 0)).mean() for t in candidates]
    threshold = candidates[int(np.argmax(accs))]
    return (diff > threshold).astype(np.int64)


def logistic_baseline(vol: np.ndarray, rows, cols, labels, steps: int = 500) -> np.ndarray:
    """A per-pixel logistic regression on both spectra (L2-regularised), fit on the points."""
    feats = torch.from_numpy(np.concatenate([vol[0], vol[1]], axis=-1)).float()
    feats = (feats - feats.mean((0, 1))) / feats.std((0, 1))
    x = feats[rows, cols]
    y = torch.from_numpy(labels).float()
    model = torch.nn.Linear(x.shape[1], 1)
    opt = torch.optim.LBFGS(model.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(model(x)[:, 0], y)
        loss = loss + 1e-2 * model.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (model(feats)[..., 0] > 0).long().numpy()


def accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    return float((pred == truth).mean())


def balanced_accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    """The mean of the recalls of the two classes (change is rare: plain accuracy hides it)."""
    return 0.5 * float((pred[truth == 0] == 0).mean() + (pred[truth == 1] == 1).mean())


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    p, t = pred > 0, truth > 0
    return float((p & t).sum() / max((p | t).sum(), 1))


# ----------------------------------------------------------------------------- demo
def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the demo; returns accuracies and timings."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=48, help="pixels a side (even)")
    parser.add_argument("--bands", type=int, default=12, help="spectral bands (even)")
    parser.add_argument("--points", type=int, default=35, help="annotations per class")
    parser.add_argument("--no-figure", action="store_true", help="skip the figure")
    parser.add_argument("--hidden", type=int, default=12, help="hidden channels")
    parser.add_argument("--depth", type=int, default=6, help="hyperbolic layers (>= 3)")
    parser.add_argument("--alpha", type=float, default=0.2, help="leapfrog step size")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=3e-4, help="learning rate of the network")
    parser.add_argument("--head-lr", type=float, default=1e-2, help="learning rate of the read-out")
    parser.add_argument("--noise", type=float, default=0.02, help="sensor noise (reflectance)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: on shared cores more threads were many times slower)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="examples/output/segmentation_4d.png")
    args = parser.parse_args(argv)
    if args.size % 2 or args.bands % 2:
        parser.error("--size and --bands must be even (one Haar squeeze)")
    if args.depth < 3 or args.steps < 1 or args.points < 1:
        parser.error("--depth must be >= 3, --steps and --points >= 1")
    previous = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(previous)


def run(args: argparse.Namespace) -> dict[str, float]:
    start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    t1, t2 = land_cover(args.size, rng)
    change = (t1 != t2).astype(np.int64)
    vol = volume(t1, t2, args.bands, args.noise, rng)
    points, point_labels = annotate(change, args.points, rng)
    rows, cols = points[:, 0], points[:, 1]

    # each band of each acquisition standardised over the scene, as is usual for spectral data
    mean, std = vol.mean(axis=(1, 2), keepdims=True), vol.std(axis=(1, 2), keepdims=True)
    v = torch.from_numpy((vol - mean) / std).float()[None]  # (1, 2, n, n, bands)
    v = torch.cat([v, v], dim=1)  # the leapfrog starts from rest
    target = torch.from_numpy(point_labels)
    r, c = torch.from_numpy(rows), torch.from_numpy(cols)

    model = ChangeSegmenter(args.hidden, args.depth, args.alpha, args.bands, args.seed)
    net = model.net
    n_params = sum(p.numel() for p in net.parameters())
    print(
        f"volume {args.size} x {args.size} x {args.bands} bands x 2 times; change covers "
        f"{change.mean():.1%} of the pixels; {args.points} annotated pixels per class"
    )
    print(
        f"NetworkHyperbolic (3D): {len(net.layers)} layers, hidden {args.hidden}, "
        f"{n_params} parameters, and a linear read-out; {args.steps} Adam steps"
    )
    opt = torch.optim.Adam(
        [
            {"params": net.parameters(), "lr": args.lr},
            {"params": model.head.parameters(), "lr": args.head_lr},
        ]
    )
    t0 = time.perf_counter()
    progress = tqdm(range(args.steps), desc="training", unit="step")
    losses = []
    for step in progress:
        opt.zero_grad(set_to_none=True)
        scores = model(v)[0]  # (2, n, n)
        loss = F.cross_entropy(scores[:, r, c].T, target)
        loss.backward()  # memory-free: the layers' inputs are recomputed by inversion
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0:
            progress.set_postfix(loss=f"{losses[-1]:.3f}")
    train_time = time.perf_counter() - t0
    with torch.no_grad():
        scores = model(v)[0]
    pred = scores.argmax(0).numpy()
    prob = torch.softmax(scores, 0)[1].numpy()

    diff_pred = difference_baseline(vol, rows, cols, point_labels)
    logit_pred = logistic_baseline(vol, rows, cols, point_labels)
    results = {
        "train_time": train_time,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "points_accuracy": accuracy(pred[rows, cols], point_labels),
    }
    table = [
        ("no change everywhere", np.zeros_like(change)),
        ("spectral difference, threshold", diff_pred),
        ("per-pixel logistic regression", logit_pred),
        ("invertible hyperbolic network", pred),
    ]
    print("\naccuracy against the hidden full change map")
    print(f"{'method':<34}{'accuracy':>10}{'balanced':>10}{'change IoU':>12}")
    for name, p in table:
        key = name.split(",")[0].replace(" ", "_").replace("-", "_")
        results[f"accuracy_{key}"] = accuracy(p, change)
        results[f"balanced_{key}"] = balanced_accuracy(p, change)
        results[f"iou_{key}"] = iou(p, change)
        print(
            f"{name:<34}{accuracy(p, change):>10.3f}{balanced_accuracy(p, change):>10.3f}"
            f"{iou(p, change):>12.3f}"
        )
    results["accuracy"] = results["accuracy_invertible_hyperbolic_network"]
    print(
        f"training: {args.steps} steps in {train_time:.0f} s; loss {losses[0]:.3f} -> "
        f"{losses[-1]:.3f}; accuracy on the {len(rows)} annotated pixels "
        f"{results['points_accuracy']:.3f}"
    )
    fig = None
    if not args.no_figure:
        fig = write_figure(args, vol, t1, t2, change, prob, pred, diff_pred, logit_pred, rows, cols)
    if fig:
        print(f"figure written to {fig}")
    results["time"] = time.perf_counter() - start
    print(f"time taken: {results['time']:.1f} s")
    if not all(math.isfinite(x) for x in results.values()):
        raise SystemExit("training diverged: non-finite result")
    return results


def write_figure(args, vol, t1, t2, change, prob, pred, diff_pred, logit_pred, rows, cols):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import BoundaryNorm, ListedColormap
    except ImportError:  # pragma: no cover - matplotlib is in the examples extra
        print("matplotlib not installed: no figure written")
        return None
    n_bands = vol.shape[-1]
    rgb_bands = [int(round(b * (n_bands - 1))) for b in (0.14, 0.07, 0.0)]  # ~700, 550, 400 nm

    def composite(v):
        img = v[..., rgb_bands]
        lo, hi = np.percentile(vol[..., rgb_bands], [1, 99])
        return np.clip((img - lo) / (hi - lo), 0, 1)

    cover_cmap = ListedColormap(["#2c7fb8", "#1b7837", "#d9b365", "#a6d96a", "#7f7f7f", "#8c510a"])
    cover_norm = BoundaryNorm(np.arange(len(CLASSES) + 1) - 0.5, len(CLASSES))
    binary_cmap = ListedColormap(["#f0f0f0", "#d7301f"])
    binary_norm = BoundaryNorm([-0.5, 0.5, 1.5], 2)

    def metrics(p):
        return f"acc {accuracy(p, change):.3f}, IoU {iou(p, change):.2f}"

    fig, axes = plt.subplots(2, 4, figsize=(17, 8.6))
    panels = [
        (axes[0, 0], composite(vol[0]), "image at time 1 (bands ~700/550/400 nm)", None),
        (axes[0, 1], composite(vol[1]), "image at time 2 (season and illumination differ)", None),
        (axes[0, 2], t1, "land cover at time 1", "cover"),
        (axes[0, 3], t2, "land cover at time 2", "cover"),
        (axes[1, 0], change, f"hidden change map and the {len(rows)} annotated pixels", "binary"),
        (axes[1, 1], prob, f"network: P(change) ({metrics(pred)})", "prob"),
        (axes[1, 2], diff_pred, f"spectral difference threshold ({metrics(diff_pred)})", "binary"),
        (
            axes[1, 3],
            logit_pred,
            f"per-pixel logistic regression ({metrics(logit_pred)})",
            "binary",
        ),
    ]
    for ax, img, title, kind in panels:
        if kind == "cover":
            im = ax.imshow(img, cmap=cover_cmap, norm=cover_norm, interpolation="nearest")
            bar = fig.colorbar(im, ax=ax, ticks=range(len(CLASSES)), fraction=0.046, pad=0.03)
            bar.ax.set_yticklabels(CLASSES, fontsize=8)
        elif kind == "binary":
            im = ax.imshow(img, cmap=binary_cmap, norm=binary_norm, interpolation="nearest")
            bar = fig.colorbar(im, ax=ax, ticks=[0, 1], fraction=0.046, pad=0.03)
            bar.ax.set_yticklabels(["no change", "change"], fontsize=8)
        elif kind == "prob":
            im = ax.imshow(img, cmap="magma", vmin=0, vmax=1, interpolation="nearest")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, label="probability of change")
        else:
            ax.imshow(img, interpolation="nearest")
            # keep the panels the same size as those with a colorbar
            fig.colorbar(plt.cm.ScalarMappable(cmap="gray"), ax=ax, fraction=0.046, pad=0.03)
            ax.figure.axes[-1].set_visible(False)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("x [pixel]")
        ax.set_ylabel("y [pixel]")
    labelled = change[rows, cols]
    for value, marker, colour in ((0, "o", "#1f78b4"), (1, "^", "k")):
        sel = labelled == value
        axes[1, 0].scatter(
            cols[sel],
            rows[sel],
            s=22,
            marker=marker,
            facecolors="none",
            edgecolors=colour,
            linewidths=1.2,
            label="annotated " + ("change" if value else "no change"),
        )
    axes[1, 0].legend(loc="lower left", fontsize=7, framealpha=0.8)
    fig.suptitle(
        f"time-lapse volume {args.size}x{args.size}x{args.bands} bands x 2 times: change "
        f"detection by a 3D invertible hyperbolic network from {args.points} points per class"
    )
    fig.subplots_adjust(left=0.04, right=0.94, bottom=0.07, top=0.9, wspace=0.4, hspace=0.3)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    plt.close(fig)
    return args.out


if __name__ == "__main__":
    main()
