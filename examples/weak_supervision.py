"""Weakly supervised segmentation: map aquifers from partial point labels and a fraction prior.

The InvertibleNetworks.jl scenario (Peters et al.): the network output ``y = g(K, d)`` is not
fitted to labels but pushed into a convex set ``D`` built from what is known, by minimising the
squared point-to-set distance ``0.5 * ||P_D(y) - y||^2`` over the weights; its gradient with
respect to the output is ``y - P_D(y)``. Here:

- **Data.** Synthetic 2D geological sections (depth x distance), made by this script: layered
  sediments with undulating interfaces, lenses, a limestone bedrock and a water table, each
  pixel one lithology (clay, silt, sand, gravel, bedrock, and unsaturated sand or gravel above
  the water table). Class 1 ("aquifer") is saturated sand and gravel; class 2 is everything
  else and covers 50-65% of every section. The network sees six "geophysical" modalities, none
  of which separates the classes alone: airborne-EM log-resistivity (blurred more with depth;
  bedrock and dry sand are as resistive as gravel), a gamma-ray-like clay indicator (low in
  bedrock and dry sand too), seismic velocity (with a compaction trend), a seismic image
  (reflectivity: interfaces, not classes), a smooth gravity-like density, and induced-
  polarisation chargeability; all noisy.
- **Labels.** Class 1: a few point annotations per section (``--points``, drawn inside the
  aquifers, as from wells). Class 2: no labels at all, only the prior that it covers 50-65% of
  each section.
- **Constraint set.** ``D = PointAnnotations(mask, 1) ∩ FractionBounds(0.35, 0.50)`` on the
  class-1 score ``y`` (the first channel of the network's last state): ``y = 1`` on the
  annotated points, ``0 <= y <= 1``, and the mean of ``y`` over a section (the expected aquifer
  fraction) between 35% and 50%. ``P_D`` is computed by Dykstra's algorithm
  (``invops.Intersection``).
- **Network.** ``invops.NetworkHyperbolic`` (2D leapfrog layers with two Haar squeezes and
  unsqueezes) on ``cat(d, d)``.
- **Training.** Full-batch Adam on the training sections, in two ways that compute the same
  gradient: the explicit reverse API as in the seed, ``net.backward(dy, y)`` with ``dy`` equal
  to ``y - P_D(y)`` on the score channel and zero elsewhere, and ``loss.backward()`` on
  ``invops.distance_squared(y, D)`` through the memory-free autograd bridge.

Baselines, trained and evaluated the same way: the point labels alone
(``D = PointAnnotations ∩ Box(0, 1)``, no fraction prior), and, as an upper reference, the
hidden full labels (``D`` = the single label map: the loss is then the squared error). A
non-learned baseline uses the same information as the weak network: the modality whose
annotated points stand out most is thresholded at the quantile that gives the prior's middle
fraction. Accuracy (score > 0.5 against the hidden full labels) is reported on the training
sections (whose labels were hidden) and on held-out sections.

Run: ``python examples/weak_supervision.py`` (about four minutes of CPU time on one thread for
the four trainings; 23 minutes of wall time on the shared 2-core project machine under a load
average of 11). Options: ``--steps``, ``--train``, ``--test``, ``--points``, ``--seed``,
``--no-reference`` (skip the full-label reference), ``--out`` for the figure.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter, gaussian_filter1d
from tqdm import tqdm

import invops

CLAY, SILT, SAND, GRAVEL, BEDROCK, DRY = range(6)
LITHOLOGIES = ("clay", "silt", "sand", "gravel", "bedrock", "dry sand/gravel")
AQUIFER = (SAND, GRAVEL)
MODALITIES = (
    "log-resistivity (AEM)",
    "gamma ray",
    "velocity",
    "seismic image",
    "density",
    "chargeability",
)
# per lithology: log-resistivity, gamma, velocity [km/s], density, chargeability
PROPERTIES = np.array(
    [
        [0.6, 1.0, 1.8, 2.0, 0.9],  # clay
        [1.3, 0.55, 2.0, 2.1, 0.5],  # silt
        [2.0, 0.3, 2.2, 2.05, 0.3],  # sand
        [2.5, 0.2, 2.4, 2.15, 0.2],  # gravel
        [2.6, 0.2, 3.6, 2.6, 0.1],  # limestone bedrock: resistive, low gamma, but no aquifer
        [3.0, 0.25, 1.2, 1.8, 0.25],  # unsaturated sand/gravel above the water table
    ]
)
FRACTION = (0.35, 0.50)  # the prior on the aquifer fraction (class 2 covers 50-65%)


# ----------------------------------------------------------------------------- sections
def smooth_curve(n: int, length: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth random curve of unit standard deviation."""
    c = gaussian_filter1d(rng.standard_normal(n + 200), length, mode="wrap")[100:-100]
    return (c - c.mean()) / (c.std() + 1e-12)


def lithology_section(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """One (h, w) section of lithology codes: layers, lenses and a bedrock at the bottom."""
    x = np.arange(w)
    depth = np.arange(h)[:, None]
    litho = np.full((h, w), CLAY)
    n_layers = rng.integers(5, 8)
    tops = np.sort(rng.uniform(0, 0.8 * h, n_layers))
    tops[0] = -1.0
    kinds = rng.choice([CLAY, SILT, SAND, GRAVEL], n_layers, p=[0.3, 0.2, 0.3, 0.2])
    for top, kind in zip(tops, kinds):
        surface = top + 0.06 * h * smooth_curve(w, rng.uniform(8, 20), rng)
        surface += rng.uniform(-0.05, 0.05) * h * (x / w - 0.5)  # a gentle dip
        litho[depth >= surface[None, :]] = kind
    for _ in range(rng.integers(3, 7)):  # lenses, elongated along the layers
        cz, cx = rng.uniform(0, h), rng.uniform(0, w)
        az, ax = rng.uniform(2, 5), rng.uniform(8, 25)
        inside = ((depth - cz) / az) ** 2 + ((x[None, :] - cx) / ax) ** 2 < 1
        litho[inside] = rng.choice([CLAY, SAND, GRAVEL])
    bedrock = 0.85 * h + 0.08 * h * smooth_curve(w, 25, rng)
    litho[depth >= bedrock[None, :]] = BEDROCK
    water_table = rng.uniform(0.1, 0.25) * h + 0.04 * h * smooth_curve(w, 30, rng)
    litho[(depth < water_table[None, :]) & np.isin(litho, AQUIFER)] = DRY
    return litho


def make_sections(n: int, h: int, w: int, rng: np.random.Generator):
    """``n`` sections whose aquifer fraction lies inside the prior, as (lithology, labels)."""
    lithos = []
    while len(lithos) < n:
        litho = lithology_section(h, w, rng)
        if FRACTION[0] + 0.01 <= np.isin(litho, AQUIFER).mean() <= FRACTION[1] - 0.01:
            lithos.append(litho)
    lithos = np.stack(lithos)
    return lithos, np.isin(lithos, AQUIFER).astype(np.float64)


def modalities(litho: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The six noisy geophysical images of each section, standardised: (n, 6, h, w)."""
    n, h, w = litho.shape
    props = PROPERTIES[litho]  # (n, h, w, 5)
    depth = np.linspace(0, 1, h)[None, :, None]
    out = np.empty((n, len(MODALITIES), h, w))
    for i in range(n):
        # airborne EM: the resolution degrades with depth (blur from 0.8 to 4 px)
        res = (1 - depth[0]) * gaussian_filter(props[i, ..., 0], 0.8) + depth[0] * gaussian_filter(
            props[i, ..., 0], 4.0
        )
        gamma = gaussian_filter(props[i, ..., 1], 1.0)
        vel = props[i, ..., 2] + 0.8 * depth[0]  # compaction trend
        vel = gaussian_filter(vel, 1.5)
        impedance = props[i, ..., 2] * props[i, ..., 3]
        reflect = np.diff(impedance, axis=0, prepend=impedance[:1])
        seismic = gaussian_filter1d(reflect, 1.5, axis=0, order=1)  # a band-limited wavelet
        dens = gaussian_filter(props[i, ..., 3], 6.0)
        charge = gaussian_filter(props[i, ..., 4], 2.0)
        stack = np.stack([res, gamma, vel, seismic, dens, charge])
        noise = np.array([0.3, 0.4, 0.2, 0.3, 0.05, 0.5])[:, None, None]  # x each image's std
        stack = stack + noise * stack.std(axis=(1, 2), keepdims=True) * rng.standard_normal(
            stack.shape
        )
        mean = stack.mean(axis=(1, 2), keepdims=True)
        std = stack.std(axis=(1, 2), keepdims=True)
        out[i] = (stack - mean) / std
    return out


def point_annotations(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` annotated class-1 points per section: a boolean mask (n, h, w)."""
    mask = np.zeros(labels.shape, dtype=bool)
    for i in range(len(labels)):
        idx = np.flatnonzero(labels[i] > 0.5)
        mask[i].flat[rng.choice(idx, size=min(k, idx.size), replace=False)] = True
    return mask


# ----------------------------------------------------------------------------- network
ARCHITECTURE = [
    ("none", 16),
    ("squeeze", 32),
    ("none", 32),
    ("none", 32),
    ("unsqueeze", 16),
    ("none", 16),
]


def build_network(n_in: int, width: float, alpha: float, seed: int) -> invops.Chain:
    """The hyperbolic network, returned as a Chain of its layers (same map, same parameters).

    ``NetworkHyperbolic`` checks every call's input shape by running all its layers on the meta
    device, which costs as much as the whole forward pass at this size; the shape is fixed
    here, so the plain Chain of its layers (which checks only the first layer) is used.
    """
    torch.manual_seed(seed)
    arch = [(a, max(1, round(c * width))) for a, c in ARCHITECTURE]
    net = invops.NetworkHyperbolic(n_in, arch, alpha=alpha, logdet=False)
    return invops.Chain(*net.layers, logdet=False)


def score(out: torch.Tensor, n_in: int) -> torch.Tensor:
    """The class-1 score: the first channel of the network's last state, (B, h, w)."""
    return out[:, n_in]


# ----------------------------------------------------------------------------- training
def train(
    name: str,
    data: torch.Tensor,
    D: invops.ConvexSet,
    args: argparse.Namespace,
    explicit: bool,
) -> tuple[invops.Chain, dict]:
    """Adam on the squared distance of the score to ``D``; the net and a training record."""
    n_in = data.shape[1] // 2
    net = build_network(n_in, args.width, args.alpha, args.seed)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    n_pix = data[0, 0].numel()
    losses, sweeps = [], []
    start = time.perf_counter()
    progress = tqdm(range(args.steps), desc=f"{name:<24}", unit="step")
    for step in progress:
        opt.zero_grad(set_to_none=True)
        if explicit:
            # the seed's training step: a forward pass without graph, then the reverse pass
            # from the output with the distance gradient y - P_D(y) on the score channel
            with torch.no_grad():
                out = net(data)
            y = score(out, n_in)
            if isinstance(D, invops.Intersection):
                p, info = D.project_with_info(y)
                sweeps.append(info.iterations)
            else:
                p = D.project(y)
            dy = torch.zeros_like(out)
            dy[:, n_in] = (y - p) / n_pix
            net.backward(dy, out)
            loss = 0.5 * float((y - p).pow(2).sum()) / n_pix
        else:
            out = net(data)  # the memory-free autograd bridge
            dist = invops.distance_squared(score(out, n_in), D).sum() / n_pix
            dist.backward()
            loss = dist.item()
        opt.step()
        losses.append(loss)
        if step % 10 == 0:
            progress.set_postfix(distance=f"{loss:.2e}")
    record = {"losses": losses, "sweeps": sweeps, "seconds": time.perf_counter() - start}
    return net, record


def predict(net: invops.Chain, data: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return score(net(data), data.shape[1] // 2).double().numpy()


def pick_modality(d: np.ndarray, mask: np.ndarray) -> tuple[int, float]:
    """The modality whose annotated points stand out most from the rest of the training
    sections (in standard deviations), and the sign of the difference."""
    z = [(d[:, m][mask].mean() - d[:, m].mean()) / d[:, m].std() for m in range(d.shape[1])]
    best = int(np.argmax(np.abs(z)))
    return best, float(np.sign(z[best]))


def quantile_baseline(d: np.ndarray, modality: int, sign: float) -> np.ndarray:
    """Class 1 where the chosen modality is in its top 42.5% (the prior's middle fraction) in
    each section: a baseline with the weak network's information (points and prior)."""
    chosen = sign * d[:, modality]
    cut = np.quantile(chosen.reshape(len(d), -1), 1 - 0.5 * sum(FRACTION), axis=1)
    return (chosen > cut[:, None, None]).astype(np.float64)


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    return float(((pred > 0.5) == (labels > 0.5)).mean())


def iou(pred: np.ndarray, labels: np.ndarray) -> float:
    p, t = pred > 0.5, labels > 0.5
    return float((p & t).sum() / max((p | t).sum(), 1))


# ----------------------------------------------------------------------------- demo
def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the demo; returns accuracies, fractions and timings."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--train", type=int, default=4, help="training sections")
    parser.add_argument("--test", type=int, default=4, help="held-out sections")
    parser.add_argument("--height", type=int, default=48, help="section depth (multiple of 4)")
    parser.add_argument("--width-px", type=int, default=128, help="section length (multiple of 4)")
    parser.add_argument("--points", type=int, default=30, help="class-1 annotations per section")
    parser.add_argument("--width", type=float, default=1.0, help="network width multiplier")
    parser.add_argument("--alpha", type=float, default=0.2, help="leapfrog step size")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--dykstra-tol", type=float, default=1e-6)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: on shared cores more threads were many times slower)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-reference",
        dest="reference",
        action="store_false",
        help="skip the reference network trained on the full labels",
    )
    parser.add_argument("--no-figure", action="store_true", help="skip the figure")
    parser.add_argument("--out", default="examples/output/weak_supervision.png")
    args = parser.parse_args(argv)
    if args.height % 4 or args.width_px % 4:
        parser.error("--height and --width-px must be multiples of 4 (two Haar squeezes)")
    if min(args.train, args.test, args.points, args.steps) < 1:
        parser.error("--train, --test, --points and --steps must be >= 1")
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
    h, w = args.height, args.width_px
    lithos, labels = make_sections(args.train + args.test, h, w, rng)
    d = modalities(lithos, rng)
    mask = point_annotations(labels[: args.train], args.points, rng)
    d_train, d_test = d[: args.train], d[args.train :]
    lab_train, lab_test = labels[: args.train], labels[args.train :]

    def as_input(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a).float()
        return torch.cat([t, t], dim=1)  # the leapfrog starts from rest: (d, d)

    x_train, x_test = as_input(d_train), as_input(d_test)
    tol = args.dykstra_tol
    mask_t = torch.from_numpy(mask)
    weak = invops.Intersection(
        invops.PointAnnotations(mask_t, 1.0),
        invops.FractionBounds(*FRACTION),
        tol=tol,
        max_iter=2000,
    )
    points_only = invops.Intersection(
        invops.PointAnnotations(mask_t, 1.0), invops.Box(0.0, 1.0), tol=tol, max_iter=2000
    )
    full = invops.PointAnnotations(torch.ones_like(mask_t), torch.from_numpy(lab_train).float())

    # the two routes give the same gradient: check it once on a fresh network
    probe = build_network(d.shape[1], args.width, args.alpha, args.seed)
    out = probe(x_train)
    (invops.distance_squared(score(out, d.shape[1]), weak).sum()).backward()
    g_auto = [p.grad.clone() for p in probe.parameters()]
    probe.zero_grad()
    with torch.no_grad():
        out = probe(x_train)
    dy = torch.zeros_like(out)
    dy[:, d.shape[1]] = invops.distance_squared_grad(score(out, d.shape[1]), weak)
    probe.backward(dy, out)
    grad_diff = max(
        float((p.grad - g).abs().max()) / max(float(g.abs().max()), 1e-30)
        for p, g in zip(probe.parameters(), g_auto)
    )
    _, info = weak.project_with_info(score(out, d.shape[1]))

    n_params = sum(p.numel() for p in probe.parameters())
    print(
        f"{args.train} training and {args.test} held-out sections of {h}x{w} px, "
        f"{len(MODALITIES)} modalities; {args.points} class-1 points per training section "
        f"({100 * args.points / (h * w):.2f}% of the pixels); aquifer fraction prior "
        f"{FRACTION[0]:.0%}-{FRACTION[1]:.0%}"
    )
    print(
        f"NetworkHyperbolic: {len(ARCHITECTURE)} layers, {n_params} parameters; "
        f"{args.steps} full-batch Adam steps each"
    )
    print(
        f"gradient check at initialisation: net.backward(y - P_D(y), y) vs loss.backward(): "
        f"max relative difference {grad_diff:.1e}; Dykstra: {info.iterations} sweeps to "
        f"tol {tol:g}"
    )

    runs = {
        "weak (explicit backward)": (weak, True),
        "weak (loss.backward)": (weak, False),
        "point labels alone": (points_only, True),
        "full labels (reference)": (full, True),
    }
    if not args.reference:
        del runs["full labels (reference)"]
    results: dict[str, float] = {"grad_rel_diff": grad_diff, "dykstra_sweeps": info.iterations}
    scores = {}
    for name, (D, explicit) in runs.items():
        net, record = train(name, x_train, D, args, explicit)
        scores[name] = (predict(net, x_train), predict(net, x_test))
        results[f"{name}: seconds"] = record["seconds"]
        results[f"{name}: final distance"] = record["losses"][-1]
        if record["sweeps"]:
            results[f"{name}: mean sweeps"] = float(np.mean(record["sweeps"]))
            results[f"{name}: max sweeps"] = float(np.max(record["sweeps"]))
    modality, sign = pick_modality(d_train, mask)
    baselines = {
        f"quantile of {MODALITIES[modality]}": (
            quantile_baseline(d_train, modality, sign),
            quantile_baseline(d_test, modality, sign),
        ),
        "all class 2 (no aquifer)": (np.zeros_like(lab_train), np.zeros_like(lab_test)),
    }

    print(
        "\naccuracy against the hidden full labels (score > 0.5), aquifer IoU and predicted "
        f"aquifer fraction (true: {lab_train.mean():.1%} train, {lab_test.mean():.1%} held-out)"
    )
    print(f"{'method':<40}{'acc train':>10}{'acc test':>10}{'IoU test':>10}{'frac test':>10}")
    accs = {}
    for name, (p_train, p_test) in {**scores, **baselines}.items():
        a_tr, a_te = accuracy(p_train, lab_train), accuracy(p_test, lab_test)
        frac = float((p_test > 0.5).mean())
        accs[name] = {"train": a_tr, "test": a_te}
        results[f"{name}: acc train"], results[f"{name}: acc test"] = a_tr, a_te
        results[f"{name}: iou test"] = iou(p_test, lab_test)
        results[f"{name}: fraction test"] = frac
        print(f"{name:<40}{a_tr:>10.3f}{a_te:>10.3f}{iou(p_test, lab_test):>10.3f}{frac:>10.3f}")
    for name in runs:
        line = f"{name}: {results[f'{name}: seconds']:.0f} s"
        if f"{name}: mean sweeps" in results:
            line += (
                f", Dykstra sweeps per step {results[f'{name}: mean sweeps']:.1f} on average, "
                f"{results[f'{name}: max sweeps']:.0f} at most (tol {args.dykstra_tol:g})"
            )
        print(line)
    results["accuracy_weak"] = results["weak (explicit backward): acc test"]
    results["accuracy_weak_autograd"] = results["weak (loss.backward): acc test"]
    results["accuracy_points"] = results["point labels alone: acc test"]

    fig = None
    if not args.no_figure:
        fig = write_figure(args, d, lithos, labels, mask, scores, accs)
    if fig:
        print(f"figure written to {fig}")
    results["time"] = time.perf_counter() - start
    print(f"time taken: {results['time']:.1f} s")
    if not all(math.isfinite(v) for v in results.values()):
        raise SystemExit("non-finite result")
    return results


def write_figure(args, d, lithos, labels, mask, scores, accs) -> str | None:
    """One training section (with its annotated points) and one held-out section."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import BoundaryNorm, ListedColormap
    except ImportError:  # pragma: no cover - matplotlib is in the examples extra
        print("matplotlib not installed: no figure written")
        return None
    litho_cmap = ListedColormap(["#6a3d9a", "#b2abd2", "#fdd49e", "#e08214", "#4d4d4d", "#ffffb3"])
    litho_norm = BoundaryNorm(np.arange(len(LITHOLOGIES) + 1) - 0.5, len(LITHOLOGIES))
    cases = [(0, "training section"), (args.train, "held-out section")]
    shown = [name for name in scores if not name.startswith("weak (loss")]
    ncols = 4 + len(shown)
    fig, axes = plt.subplots(len(cases), ncols, figsize=(3.2 * ncols, 2.3 * len(cases) + 1.2))
    h, w = labels.shape[1:]
    extent = (-0.5, w - 0.5, h - 0.5, -0.5)
    for row, (i, what) in enumerate(cases):
        split = "train" if i < args.train else "test"
        panels = [
            (d[i, 0], MODALITIES[0], "RdBu_r", (-2.5, 2.5), "standardised"),
            (d[i, 1], MODALITIES[1], "RdBu_r", (-2.5, 2.5), "standardised"),
            (lithos[i], "lithology", "litho", None, None),
            (labels[i], "aquifer (hidden labels)", "gray_r", (0, 1), "class 1"),
        ]
        for name in shown:
            train_scores, test_scores = scores[name]
            score = train_scores[i] if i < args.train else test_scores[i - args.train]
            panels.append(
                (
                    score,
                    f"{name}\nacc {accs[name][split]:.3f} ({split})",
                    "viridis",
                    (0, 1),
                    "score y",
                )
            )
        for col, (img, title, cmap, lims, label) in enumerate(panels):
            ax = axes[row, col]
            if cmap == "litho":
                im = ax.imshow(img, cmap=litho_cmap, norm=litho_norm, extent=extent, aspect="auto")
                bar = fig.colorbar(im, ax=ax, ticks=range(len(LITHOLOGIES)), fraction=0.05)
                bar.ax.set_yticklabels([n.split("/")[0] for n in LITHOLOGIES], fontsize=6)
            else:
                im = ax.imshow(
                    img, cmap=cmap, vmin=lims[0], vmax=lims[1], extent=extent, aspect="auto"
                )
                bar = fig.colorbar(im, ax=ax, fraction=0.05)
                bar.set_label(label, fontsize=7)
                bar.ax.tick_params(labelsize=6)
            ax.set_title(f"{what}: {title}" if col == 0 else title, fontsize=8)
            ax.set_xlabel("distance [px]", fontsize=7)
            ax.set_ylabel("depth [px]", fontsize=7)
            ax.tick_params(labelsize=6)
            if i < args.train and col in (3, 4):
                rr, cc = np.nonzero(mask[i])
                ax.scatter(
                    cc, rr, s=10, marker="o", facecolors="none", edgecolors="r", linewidths=0.8
                )
    fig.suptitle(
        f"weakly supervised aquifer mapping: {args.points} class-1 points per section (red "
        f"circles) and a class-fraction prior of {FRACTION[0]:.0%}-{FRACTION[1]:.0%}; "
        "score > 0.5 is class 1",
        fontsize=10,
    )
    fig.subplots_adjust(left=0.02, right=0.97, bottom=0.1, top=0.84, wspace=0.45, hspace=0.55)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    plt.close(fig)
    return args.out


if __name__ == "__main__":
    main()
