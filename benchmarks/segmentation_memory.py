"""4D segmentation: training-step memory of a 3D hyperbolic network, fitted and extrapolated.

What is measured. One training step (forward, cross-entropy at 70 annotated pixels of the class
scores, backward) of the network of ``examples/segmentation_4d.py``: a time-lapse volume of
``D x H x W`` voxels with 2 channels (the two times), ``invops.NetworkHyperbolic(2, [("none",
C)] * L, ndim=3)`` on ``cat(v, v)``, float32, batch 1, for three systems:

- ``invops``: the memory-free autograd bridge (``loss.backward()``);
- ``invops-plain``: the same network and math under ``invops.plain_autograd()`` (every
  activation stored);
- ``resnet``: a non-invertible network of the same depth and width in plain torch: the
  first-order residual form of the same layers, ``x <- x - alpha K^T tanh(K x + b)`` on the
  2-channel volume with the same kernels ``K`` (C x 2 x 3 x 3 x 3), trained by ordinary autograd.

Why. InvertibleNetworks.jl's 4D segmentation (an 18-layer hyperbolic network with 3D
convolutions and 128 channels on a 307 x 241 x 154 x 2 volume) is reported to need 17 GB,
against 307 GB for the non-invertible equivalent. Those sizes do not fit a CPU, so the step is
measured at several reduced sizes ``V = D H W``, depths ``L`` and widths ``C``, the memory is
fitted by the model ``m = a + b V C + c V + d L V C + e L V`` (every stored tensor is a voxel
field of ``C`` or of a few channels, once or once per layer), and the fit is evaluated at the
seed's size.

How. As in ``glow_memory_time.py``: every (system, size, depth, width) point runs in a fresh
process, with a warm-up step (which also allocates the parameter gradients), then one step whose
peak is recorded two ways: live tensor storage (``invops.testing.TensorMemoryTracker``: exact,
deterministic, what a GPU caching allocator must at least hold) and the resident set size over
the memory in use before the step (``VmHWM``, with ``MALLOC_MMAP_THRESHOLD_`` low so freed
tensors leave it; it adds the convolution library's work buffers and allocator overhead).
Parameters and their gradients exist before the measured step and are not in either figure
(at the seed's size they are 2 MB). With ``--in-process`` only the live tensors are recorded (the
resident set would carry what earlier points left behind).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from _common import (
    MB,
    PeakMemory,
    add_common_args,
    add_point_args,
    fmt,
    machine_info,
    markdown_table,
    new_figure,
    run_config,
    runtime_info,
    save_figure,
    setup_torch,
    tensor_bytes,
    worker_reply,
    write_json,
)

SYSTEMS = ("invops", "invops-plain", "resnet")
LABELS = {
    "invops": "invops memory-free",
    "invops-plain": "invops plain_autograd",
    "resnet": "non-invertible ResNet",
}
SEED_SHAPE = (307, 241, 154)  # the seed's volume, 2 time steps as channels
SEED_WIDTH, SEED_DEPTH = 128, 18
SEED_REPORTED_GB = {"invops": 17.0, "resnet": 307.0}  # InvertibleNetworks.jl slides
FEATURES = ("1", "V*C", "V", "L*V*C", "L*V")
GB = 1e9
ALPHA = 0.5
N_POINTS = 35  # annotated pixels per class


# ------------------------------------------------------------------------------ the systems
def build_resnet(width: int, depth: int):
    """The non-invertible baseline: ``x <- x - alpha K^T tanh(K x + b)``, ``L`` times."""
    import torch
    import torch.nn.functional as F

    class ResidualNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            bound = math.sqrt(6.0 / ((2 + width) * 27))  # glorot, as invops' leapfrog kernels
            self.kernels = torch.nn.ParameterList(
                torch.nn.Parameter(torch.empty(width, 2, 3, 3, 3).uniform_(-bound, bound))
                for _ in range(depth)
            )
            self.biases = torch.nn.ParameterList(
                torch.nn.Parameter(torch.zeros(width)) for _ in range(depth)
            )

        def forward(self, x):
            for K, b in zip(self.kernels, self.biases):
                h = torch.tanh(F.conv3d(x, K, b, padding=1))
                x = x - ALPHA * F.conv_transpose3d(h, K, padding=1)
            return x

    return ResidualNet()


def make_system(system: str, width: int, depth: int):
    """``(model, scores(v))``: the class scores (1, 2, D, H) of a volume (1, 2, D, H, W)."""
    import torch

    import invops

    if system == "resnet":
        model = build_resnet(width, depth)
        return model, lambda v: model(v).mean(dim=-1)
    net = invops.NetworkHyperbolic(2, [("none", width)] * depth, alpha=ALPHA, ndim=3, logdet=False)
    # the same map and parameters without NetworkHyperbolic's per-call shape probe of every
    # layer on the meta device (it allocates nothing, but costs seconds per point here)
    net = invops.Chain(*net.layers, logdet=False)
    plain = system == "invops-plain"

    def scores(v):
        with invops.plain_autograd(plain):
            out = net(torch.cat([v, v], dim=1))
        return out[:, 2:].mean(dim=-1)

    return net, scores


# ------------------------------------------------------------------------------ one point
def measure(cfg: dict) -> dict:
    """A warm-up step, then one step under each memory probe."""
    import torch
    import torch.nn.functional as F

    from invops.testing import TensorMemoryTracker

    setup_torch(cfg["threads"], cfg["seed"])
    model, scores = make_system(cfg["system"], cfg["width"], cfg["depth"])
    d, h, w = cfg["shape"]
    gen = torch.Generator().manual_seed(cfg["seed"] + 1)
    v = torch.randn(1, 2, d, h, w, generator=gen)
    rows = torch.randint(0, d, (2 * N_POINTS,), generator=gen)
    cols = torch.randint(0, h, (2 * N_POINTS,), generator=gen)
    target = torch.arange(2 * N_POINTS) % 2

    def step():
        for p in model.parameters():
            p.grad = None if p.grad is None else p.grad.zero_()
        loss = F.cross_entropy(scores(v)[0][:, rows, cols].T, target)
        loss.backward()
        return loss.item()

    out = {**cfg, "runtime": runtime_info("cpu"), "voxels": d * h * w}
    out["loss"] = step()  # also allocates the parameter gradients
    if cfg.get("rss", True):
        with PeakMemory("cpu") as mem:
            step()
        out.update(rss_increase=mem.increase, rss_peak=mem.peak, rss_before=mem.before)
    with TensorMemoryTracker() as tracker:
        step()
    out["tensor_peak"] = tracker.peak
    out["params"] = tensor_bytes(model.parameters())
    return out


# ------------------------------------------------------------------------------ the fit
def features(voxels: float, width: float, depth: float) -> list[float]:
    return [1.0, voxels * width, voxels, depth * voxels * width, depth * voxels]


def fit(points: list[dict], key: str) -> dict:
    """Least squares of ``key`` on :data:`FEATURES`; coefficients, R^2, worst relative error."""
    import numpy as np

    A = np.array([features(p["voxels"], p["width"], p["depth"]) for p in points])
    y = np.array([p[key] for p in points], dtype=float)
    # columns scaled to unit norm so that the constant and the V*L*C column are both resolved
    norms = np.linalg.norm(A, axis=0)
    coef = np.linalg.lstsq(A / norms, y, rcond=None)[0] / norms
    pred = A @ coef
    ss_res, ss_tot = float(np.sum((y - pred) ** 2)), float(np.sum((y - y.mean()) ** 2))
    return {
        "coef": dict(zip(FEATURES, coef.tolist())),
        "r2": 1 - ss_res / ss_tot if ss_tot > 0 else 1.0,
        "max_rel_err": float(np.max(np.abs(pred - y) / np.maximum(np.abs(y), 1.0))),
        "n_points": len(points),
    }


def predict(model: dict, voxels: float, width: float, depth: float) -> float:
    return sum(c * f for c, f in zip(model["coef"].values(), features(voxels, width, depth)))


# ------------------------------------------------------------------------------ reporting
def describe(point: dict) -> str:
    if "error" in point:
        return f"ERROR {point['error']}"
    text = f"tensors {point['tensor_peak'] / MB:8.1f} MB"
    if "rss_increase" in point:
        text += f", RSS +{point['rss_increase'] / MB:8.1f} MB"
    return text


def points_table(points: list[dict], systems: list[str]) -> str:
    table = {(p["system"], tuple(p["shape"]), p["depth"], p["width"]): p for p in points}
    configs = sorted({(tuple(p["shape"]), p["depth"], p["width"]) for p in points})
    headers = ["volume", "L", "C"]
    headers += [f"{LABELS[s]} tensors / RSS MB" for s in systems]
    headers += ["plain / memory-free (tensors)"]
    rows = []
    for shape, depth, width in configs:
        row = ["x".join(map(str, shape)), depth, width]
        for s in systems:
            p = table.get((s, shape, depth, width))
            if p is None or "error" in p:
                row.append("-")
            else:
                rss = p.get("rss_increase")
                row.append(
                    f"{p['tensor_peak'] / MB:.1f} / {fmt(None if rss is None else rss / MB, 1)}"
                )
        a, b = (
            table.get(("invops-plain", shape, depth, width)),
            table.get(("invops", shape, depth, width)),
        )
        ok = a and b and "error" not in a and "error" not in b
        row.append(fmt(a["tensor_peak"] / b["tensor_peak"], 1) if ok else "-")
        rows.append(row)
    return markdown_table(headers, rows)


def fit_table(fits: dict) -> str:
    headers = ["system", "measure", *[f"{f} [B]" for f in FEATURES], "R^2", "max rel. err"]
    rows = []
    for (system, key), m in fits.items():
        rows.append(
            [LABELS[system], "tensors" if key == "tensor_peak" else "RSS"]
            + [f"{m['coef'][f]:.4g}" for f in FEATURES]
            + [f"{m['r2']:.6f}", f"{m['max_rel_err']:.2%}"]
        )
    return markdown_table(headers, rows)


def extrapolation(fits: dict, systems: list[str]) -> tuple[str, dict]:
    voxels = math.prod(SEED_SHAPE)
    out, rows = {}, []
    for system in systems:
        tensors = fits.get((system, "tensor_peak"))
        rss = fits.get((system, "rss_increase"))
        t = None if tensors is None else predict(tensors, voxels, SEED_WIDTH, SEED_DEPTH) / GB
        r = None if rss is None else predict(rss, voxels, SEED_WIDTH, SEED_DEPTH) / GB
        reported = SEED_REPORTED_GB.get(system)
        out[system] = {"tensors_gb": t, "rss_gb": r, "seed_gb": reported}
        rows.append([LABELS[system], fmt(t, 1), fmt(r, 1), "-" if reported is None else reported])
    headers = ["system", "tensors GB (fit)", "RSS GB (fit)", "InvertibleNetworks.jl slides GB"]
    return markdown_table(headers, rows), out


def plot(points: list[dict], fits: dict, extrap: dict, systems: list[str], path: Path) -> Path:
    import numpy as np

    fig, (ax_fit, ax_bar) = new_figure(2)
    for system in systems:
        done = [p for p in points if p["system"] == system and "error" not in p]
        if not done or (system, "tensor_peak") not in fits:
            continue
        measured = np.array([p["tensor_peak"] for p in done]) / MB
        fitted = (
            np.array(
                [
                    predict(fits[(system, "tensor_peak")], p["voxels"], p["width"], p["depth"])
                    for p in done
                ]
            )
            / MB
        )
        ax_fit.loglog(fitted, measured, "o", label=LABELS[system], alpha=0.8)
    lims = ax_fit.get_xlim()
    ax_fit.plot(lims, lims, "k--", lw=0.8, label="measured = fit")
    ax_fit.set(
        xlabel="fitted peak tensor memory [MB]",
        ylabel="measured peak tensor memory [MB]",
        title="training step, reduced sizes: fit " + " + ".join(FEATURES),
    )
    ax_fit.legend(fontsize=8)
    ax_fit.grid(alpha=0.3, which="both")
    names = [LABELS[s] for s in systems]
    x = np.arange(len(systems))
    ours = [extrap[s]["tensors_gb"] or 0 for s in systems]
    ax_bar.bar(x - 0.2, ours, 0.4, label="invops fit, tensors (this benchmark)")
    seed = [extrap[s]["seed_gb"] or 0 for s in systems]
    ax_bar.bar(x + 0.2, seed, 0.4, label="InvertibleNetworks.jl slides")
    for xi, value in zip(x - 0.2, ours):
        ax_bar.text(xi, value, f"{value:.0f}", ha="center", va="bottom", fontsize=8)
    for xi, value in zip(x + 0.2, seed):
        if value:
            ax_bar.text(xi, value, f"{value:.0f}", ha="center", va="bottom", fontsize=8)
    ax_bar.set_xticks(x, names, fontsize=8)
    ax_bar.set(
        ylabel="memory of a training step [GB]",
        yscale="log",
        title=f"extrapolated: {'x'.join(map(str, SEED_SHAPE))}x2, C={SEED_WIDTH}, L={SEED_DEPTH}",
    )
    ax_bar.legend(fontsize=8)
    ax_bar.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)


# ------------------------------------------------------------------------------ main
def default_configs(shapes, depths, widths) -> list[tuple]:
    """Every size x depth at the middle width, and every width at the middle and largest size."""
    mid_w = widths[len(widths) // 2]
    configs = [(s, L, mid_w) for s in shapes for L in depths]
    for shape in (shapes[len(shapes) // 2], shapes[-1]):
        for L in (depths[len(depths) // 2], depths[-1]):
            configs += [(shape, L, w) for w in widths if w != mid_w]
    return list(dict.fromkeys(configs))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=["32x24x16", "48x36x24", "64x48x32"],
        help="volumes DxHxW (the seed's aspect is about 2:1.6:1)",
    )
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    add_common_args(parser)
    add_point_args(parser)
    args = parser.parse_args(argv)
    try:
        args.shapes = [tuple(int(n) for n in s.lower().split("x")) for s in args.shapes]
    except ValueError:
        parser.error(f"--shapes must look like 32x24x16, got {args.shapes}")
    if any(len(s) != 3 or min(s) < 1 for s in args.shapes):
        parser.error(f"--shapes must be three positive sizes DxHxW, got {args.shapes}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        worker_reply(measure(json.loads(args.worker)))
        return {}
    # in one process the resident set carries what earlier points left: only live tensors
    base = {"threads": args.threads, "seed": args.seed, "rss": not args.in_process}
    configs = default_configs(args.shapes, args.depths, args.widths)
    points = []
    for shape, depth, width in configs:
        for system in args.systems:
            cfg = {**base, "system": system, "shape": list(shape), "depth": depth, "width": width}
            point = run_config(Path(__file__), measure, cfg, args, phases=("memory",))
            label = f"{'x'.join(map(str, shape)):>9s} L={depth:<2d} C={width:<3d}"
            print(f"  {system:13s} {label} {describe(point)}", flush=True)
            points.append(point)
    ok = [p for p in points if "error" not in p]
    fits = {}
    for system in args.systems:
        mine = [p for p in ok if p["system"] == system]
        if len(mine) >= len(FEATURES):
            for key in ("tensor_peak", "rss_increase"):
                if all(key in p for p in mine):
                    fits[(system, key)] = fit(mine, key)
    print("\npeak memory of one training step (MB): live tensors / resident set increase\n")
    print(points_table(ok, args.systems))
    print(f"\nfit m = {' + '.join(f'{k}*{f}' for k, f in zip('abcde', FEATURES))}\n")
    print(fit_table(fits))
    extrap_md, extrap = extrapolation(fits, [s for s in args.systems if (s, "tensor_peak") in fits])
    print(
        f"\nextrapolated to {'x'.join(map(str, SEED_SHAPE))} x 2 channels, C={SEED_WIDTH}, "
        f"L={SEED_DEPTH}, float32, batch 1 (GB = 1e9 bytes)\n"
    )
    print(extrap_md)
    png = args.plots / "segmentation_memory_cpu.png"
    if extrap:
        png = plot(ok, fits, extrap, list(extrap), png)
        print(f"\nplot: {png}")
    payload = {
        "benchmark": "segmentation_memory",
        "machine": machine_info("cpu", "float32", args.threads),
        "config": {**base, "shapes": args.shapes, "depths": args.depths, "widths": args.widths},
        "points": points,
        "fits": {f"{s}/{k}": m for (s, k), m in fits.items()},
        "extrapolation": {
            "shape": SEED_SHAPE,
            "width": SEED_WIDTH,
            "depth": SEED_DEPTH,
            "systems": extrap,
        },
    }
    path = write_json(args.results / "segmentation_memory_cpu.json", payload)
    print(f"results: {path}")
    return payload


if __name__ == "__main__":
    main()
