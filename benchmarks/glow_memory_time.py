"""Multiscale Glow: peak memory and time of one training step, against depth and image size.

What is measured. One training step (forward, Gaussian negative log-likelihood averaged over
the batch, backward, Adam step) of a multiscale Glow in the configuration of
InvertibleNetworks.jl's own benchmark (``examples/benchmarks/memory_usage_normflows.py``:
L=3 scales, 256 hidden channels, batch 8, 3-channel images, K steps per scale), float32,
random images ``torch.rand``, for four systems:

- ``invops``: ``invops.NetworkGlow`` trained through the memory-free autograd bridge;
- ``invops-plain``: the same network and math under ``invops.plain_autograd()``, which stores
  every activation (the baseline with identical arithmetic);
- ``normflows``: normflows 1.7.3 ``MultiscaleFlow`` of ``GlowBlock`` s, built as in the
  InvertibleNetworks.jl script (plain autograd);
- ``normflows-memcnn``: the same Glow with every ``GlowBlock`` wrapped in MemCNN 1.5.2's
  ``InvertibleModuleWrapper`` (recomputation by inversion through generic autograd), the
  log-determinant carried through the wrapper as a second tensor.

Why. A memory-free reverse pass should keep the peak memory of a step flat in depth and stay
close in time to the physical limit of such a pass: one extra evaluation of every layer
(to undo it) on top of a plain step, about 4/3 of a plain step when a backward costs two
forwards. Each point therefore also times a forward pass without graph (the measured limit is
``(plain step + forward) / plain step``) and counts the sub-network evaluations per step.

How. Every (system, K, image size) point runs in two fresh processes, each starting with a
warm-up step (ActNorm initialisation, optimizer state): the first records the peak memory of
one step over the memory in use just before it (CPU: resident set size; GPU:
``torch.cuda.max_memory_allocated``), the second, with the default allocator, times
``--repeats`` steps and as many forwards without graph (medians) and counts sub-network
evaluations in one more step. Parameter and optimizer-state memory are reported separately.
Ratios are taken between systems of the same run.

Sweeps: ``depth`` (K at fixed image size; 64x64 on CPU, 256x256 on a GPU), ``size`` (image size
at fixed K), ``maxsize`` (GPU only: the largest image whose training step fits, by doubling and
bisection). normflows and MemCNN are optional (``make bench-deps``); absent ones are skipped.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

from _common import (
    MB,
    PeakMemory,
    add_common_args,
    add_point_args,
    count_evals,
    fmt,
    machine_info,
    markdown_table,
    median_time,
    missing_peers,
    new_figure,
    optimizer_bytes,
    ratio,
    run_config,
    runtime_info,
    save_figure,
    setup_torch,
    tensor_bytes,
    worker_reply,
    write_json,
)

SYSTEMS = ("invops", "invops-plain", "normflows", "normflows-memcnn")
NEEDS = {"normflows": ("normflows",), "normflows-memcnn": ("normflows", "memcnn")}
CHANNELS = 3
DEFAULTS = {  # per device: depth-sweep image size, size-sweep sizes
    "cpu": {"nx": 64, "sizes": [32, 64, 128, 256]},
    "cuda": {"nx": 256, "sizes": [64, 128, 256, 512]},
}


# ------------------------------------------------------------------------------ the systems
def invops_loss(net, plain: bool) -> Callable:
    """Mean NLL of ``invops.NetworkGlow``; ``plain`` runs it under ``plain_autograd()``."""
    import invops

    def loss(x):
        with invops.plain_autograd(plain):
            z, logdet = net(x)
        return invops.flow_nll(z, logdet).mean()

    return loss


def build_normflows(K: int, hidden: int, levels: int, nx: int):
    """normflows' multiscale Glow exactly as in InvertibleNetworks.jl's benchmark script.

    Level ``i`` holds ``K`` ``GlowBlock(3 * 2**(L+1-i), hidden)`` and a ``Squeeze``; the data
    direction runs the finest level (``i = L-1``) first, and the latents have shapes
    ``(48, nx/8, nx/8)``, ``(12, nx/4, nx/4)``, ``(6, nx/2, nx/2)`` for L=3.
    """
    import normflows as nf

    q0, merges, flows = [], [], []
    for i in range(levels):
        blocks = [
            nf.flows.GlowBlock(
                CHANNELS * 2 ** (levels + 1 - i), hidden, split_mode="channel", scale=True
            )
            for _ in range(K)
        ]
        flows.append([*blocks, nf.flows.Squeeze()])
        if i > 0:
            merges.append(nf.flows.Merge())
            shape = (CHANNELS * 2 ** (levels - i), nx // 2 ** (levels - i))
        else:
            shape = (CHANNELS * 2 ** (levels + 1), nx // 2**levels)
        q0.append(nf.distributions.DiagGaussian((shape[0], shape[1], shape[1]), trainable=False))
    return nf.MultiscaleFlow(q0, flows, merges)


def wrap_memcnn(model):
    """Put every ``GlowBlock`` of a normflows ``MultiscaleFlow`` behind MemCNN's wrapper.

    The data direction of a normflows flow is its ``inverse``. The wrapped function maps
    ``(z, logdet) -> (z', logdet + ld)``, which is invertible, so MemCNN frees each block's
    input (``keep_input=False``) and recomputes it by inversion in the backward pass. Each
    block starts from a zero log-det tensor and ``MultiscaleFlow`` sums the results as it does
    for plain blocks. Modifies ``model`` in place (parameters keep their order) and returns it.
    """
    # imported and defined here: the parent process of a sweep never imports torch
    import memcnn
    import normflows as nf
    import torch

    class CarryLogdet(torch.nn.Module):
        def __init__(self, block) -> None:
            super().__init__()
            self.block = block

        def forward(self, z, logdet):
            z, ld = self.block.inverse(z)
            return z, logdet + ld

        def inverse(self, z, logdet):
            z, ld = self.block.forward(z)
            return z, logdet + ld

    class Wrapped(nf.flows.Flow):
        def __init__(self, block) -> None:
            super().__init__()
            self.wrapper = memcnn.InvertibleModuleWrapper(
                CarryLogdet(block), keep_input=False, keep_input_inverse=False
            )

        def inverse(self, z):
            return self.wrapper(z, z.new_zeros(z.shape[0]))

        def forward(self, z):
            return self.wrapper.inverse(z, z.new_zeros(z.shape[0]))

    for level in model.flows:
        for j, flow in enumerate(level):
            if isinstance(flow, nf.flows.GlowBlock):
                level[j] = Wrapped(flow)
    return model


def make_system(system: str, K: int, hidden: int, levels: int, nx: int):
    """``(loss(x), module holding the parameters, sub-networks)`` of one system."""
    if system.startswith("invops"):
        import invops

        net = invops.NetworkGlow(CHANNELS, hidden, L=levels, K=K, split_scales=True)
        subnets = [m for m in net.modules() if isinstance(m, invops.ResidualBlock)]
        return invops_loss(net, plain=system == "invops-plain"), net, subnets
    import normflows as nf

    model = build_normflows(K, hidden, levels, nx)
    if system == "normflows-memcnn":
        wrap_memcnn(model)
    subnets = [m for m in model.modules() if isinstance(m, nf.nets.ConvNet2d)]
    return (lambda x: model(x).mean()), model, subnets


# ------------------------------------------------------------------------------ one point
def measure(cfg: dict) -> dict:
    """A warm-up step, then the phases of ``cfg["phases"]``.

    ``memory``: one step under :class:`PeakMemory`; ``time``: timed steps and forwards
    without graph, then one step under the evaluation counter.
    """
    import torch

    setup_torch(cfg["threads"], cfg["seed"])
    device, dtype = cfg["device"], getattr(torch, cfg["dtype"])
    loss_fn, model, subnets = make_system(
        cfg["system"], cfg["K"], cfg["hidden"], cfg["levels"], cfg["nx"]
    )
    model.to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(cfg["seed"] + 1)
    x = torch.rand(cfg["batch"], CHANNELS, cfg["nx"], cfg["nx"], generator=gen)
    x = x.to(device=device, dtype=dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(x)
        loss.backward()
        optimizer.step()
        return loss.detach()

    out = {**cfg, "runtime": runtime_info(device)}
    try:
        out["loss"] = float(step())
        if "memory" in cfg["phases"]:
            with PeakMemory(device) as mem:
                step()
            out.update(peak_increase=mem.increase, peak=mem.peak, before=mem.before)
    except torch.cuda.OutOfMemoryError:
        return {**out, "oom": True}
    out.update(params=tensor_bytes(model.parameters()), optimizer=optimizer_bytes(optimizer))
    if "time" in cfg["phases"]:
        out["step"] = median_time(step, cfg["repeats"], device)
        with torch.no_grad():
            out["forward"] = median_time(lambda: loss_fn(x), cfg["repeats"], device)
        optimizer.zero_grad(set_to_none=True)
        out["evals"] = count_evals(lambda: loss_fn(x), lambda loss: loss.backward(), subnets)
        if cfg["system"] == "invops":
            out["interleaved"] = interleaved_times(model, x, optimizer, cfg, device)
    return out


def interleaved_times(net, x, optimizer, cfg: dict, device: str) -> dict:
    """Memory-free and plain steps of the same network, alternating in one process.

    On a shared machine the speed drifts by 10-20% between runs and processes; alternating
    the two steps exposes both to the same conditions, so their ratio is the robust one.
    """
    import time

    import torch

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    times: dict = {"invops": [], "invops-plain": []}
    losses = {name: invops_loss(net, plain=name == "invops-plain") for name in times}
    for _ in range(cfg["repeats"]):
        for name, loss_fn in losses.items():
            optimizer.zero_grad(set_to_none=True)
            sync()
            start = time.perf_counter()
            loss_fn(x).backward()
            optimizer.step()
            sync()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    ratio_ = medians["invops"] / medians["invops-plain"]
    return {"times": times, "medians": medians, "ratio": ratio_}


# ------------------------------------------------------------------------------ sweeps
def run_sweep(args, systems: list[str], key: str, values: list[int], base: dict) -> list[dict]:
    points = []
    for value in values:
        for system in systems:
            point = run_config(
                Path(__file__), measure, {**base, "system": system, key: value}, args
            )
            print(f"  {system:17s} {key}={value:<4d} {describe(point)}", flush=True)
            points.append(point)
    return points


def describe(point: dict) -> str:
    if "error" in point:
        return f"ERROR {point['error']}"
    if point.get("oom"):
        return "out of memory"
    text = f"peak +{point['peak_increase'] / MB:.1f} MB"
    if "step" in point:
        text += f", {point['step']['median']:.3f} s/step, {point['evals']['total']:g} evals"
    return text


def largest_fitting(fits: Callable[[int], bool], start: int, step: int, limit: int) -> int | None:
    """Largest multiple of ``step`` up to ``limit`` with ``fits``: doubling, then bisection.

    ``start`` (a multiple of ``step``) is tried first; ``None`` if even it does not fit.
    """
    limit -= limit % step
    if not fits(start):
        return None
    lo, hi = start, None
    while hi is None and lo < limit:
        n = min(2 * lo, limit)
        if fits(n):
            lo = n
        else:
            hi = n
    while hi is not None and hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def run_maxsize(args, systems: list[str], base: dict) -> tuple[list[dict], dict]:
    points, largest = [], {}
    for system in systems:

        def fits(nx: int, system=system) -> bool:
            cfg = {**base, "system": system, "nx": nx}
            point = run_config(Path(__file__), measure, cfg, args, phases=("memory",))
            print(f"  {system:17s} nx={nx:<5d} {describe(point)}", flush=True)
            points.append(point)
            return "error" not in point and not point.get("oom")

        largest[system] = largest_fitting(fits, args.start_nx, 2**args.levels, args.max_nx)
    return points, largest


# ------------------------------------------------------------------------------ reporting
def by_system(points: list[dict], key: str) -> dict:
    """``{system: {key value: point}}`` of the points that ran."""
    table: dict = {}
    for p in points:
        if "error" not in p and not p.get("oom"):
            table.setdefault(p["system"], {})[p[key]] = p
    return table


def _get(table, system, value, *path):
    node = table.get(system, {}).get(value)
    for name in path:
        if node is None:
            return None
        node = node.get(name)
    return node


def memory_table(table: dict, key: str, values: list[int], systems: list[str]) -> str:
    headers = [key, "params MB", "Adam MB"] + [f"{s} MB" for s in systems]
    headers += ["plain / invops", "normflows / invops"]
    rows = []
    for v in values:
        ref = next((table[s][v] for s in ("invops", "invops-plain") if v in table.get(s, {})), {})
        peaks = {s: _get(table, s, v, "peak_increase") for s in systems}
        rows.append(
            [v, fmt(_mb(ref.get("params"))), fmt(_mb(ref.get("optimizer")))]
            + [fmt(_mb(peaks[s]), 1) for s in systems]
            + [
                fmt(ratio(peaks.get("invops-plain"), peaks.get("invops")), 1),
                fmt(ratio(peaks.get("normflows"), peaks.get("invops")), 1),
            ]
        )
    return markdown_table(headers, rows)


def _mb(value):
    return None if value is None else value / MB


def time_table(table: dict, key: str, values: list[int], systems: list[str]) -> str:
    headers = [key] + [f"{s} s/step" for s in systems]
    headers += ["invops / plain", "interleaved", "limit / plain", "invops / limit"]
    headers += ["invops / memcnn"]
    headers += [f"evals {s}" for s in systems]
    rows = []
    for v in values:
        t = {s: _get(table, s, v, "step", "median") for s in systems}
        limit = physical_limit(table, v)
        rows.append(
            [v]
            + [fmt(t[s], 3) for s in systems]
            + [
                fmt(ratio(t.get("invops"), t.get("invops-plain"))),
                fmt(_get(table, "invops", v, "interleaved", "ratio")),
                fmt(ratio(limit, t.get("invops-plain"))),
                fmt(ratio(t.get("invops"), limit)),
                fmt(ratio(t.get("invops"), t.get("normflows-memcnn"))),
            ]
            + [_evals(_get(table, s, v, "evals")) for s in systems]
        )
    return markdown_table(headers, rows)


def physical_limit(table: dict, value: int) -> float | None:
    """Plain step + one pass undoing every layer (timed as a forward without graph)."""
    step = _get(table, "invops-plain", value, "step", "median")
    forward = _get(table, "invops-plain", value, "forward", "median")
    return None if step is None or forward is None else step + forward


def _evals(evals: dict | None) -> str:
    if evals is None:
        return "-"
    return f"{evals['forward']:g}+{evals['backward']:g}"


def targets(table: dict, values: list[int]) -> list[str]:
    """The issue's targets, checked on the depth sweep."""
    mf, plain, memcnn = (table.get(s, {}) for s in ("invops", "invops-plain", "normflows-memcnn"))
    done = [v for v in values if v in mf]
    lines = []
    if len(done) >= 2:
        a, b = mf[done[0]], mf[done[-1]]
        growth = b["peak_increase"] - a["peak_increase"]
        allowed = (b["params"] + b["optimizer"]) - (a["params"] + a["optimizer"])
        allowed += 0.1 * a["peak_increase"]
        lines.append(
            f"flat in depth: K={done[0]}->{done[-1]} peak grows {growth / MB:.1f} MB, allowed "
            f"{allowed / MB:.1f} MB (parameter + optimizer growth + 10%): "
            + _verdict(growth <= allowed)
        )
    if done and done[-1] in plain:
        r = ratio(plain[done[-1]]["peak_increase"], mf[done[-1]]["peak_increase"])
        ok = r is not None and r >= 20
        lines.append(
            f"K={done[-1]}: plain autograd / invops peak = {fmt(r, 1)} (>= 20): {_verdict(ok)}"
        )
    step = {v: mf[v]["step"]["median"] for v in done}
    worst = max((step[v] / plain[v]["step"]["median"] for v in done if v in plain), default=None)
    if worst is not None:
        lines.append(f"time <= 1.4x own plain step: worst {worst:.2f}: {_verdict(worst <= 1.4)}")
    alternating = [mf[v]["interleaved"]["ratio"] for v in done if "interleaved" in mf[v]]
    if alternating:
        worst = max(alternating)
        lines.append(
            f"time <= 1.4x own plain step, interleaved in one process: worst {worst:.2f}: "
            + _verdict(worst <= 1.4)
        )
    vs = [step[v] / memcnn[v]["step"]["median"] for v in done if v in memcnn]
    if vs:
        lines.append(f"faster than normflows+MemCNN: worst {max(vs):.2f}: {_verdict(max(vs) < 1)}")
    return lines


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def plot(table: dict, key: str, values: list[int], systems: list[str], title: str, path: Path):
    fig, (ax_mem, ax_time) = new_figure(2)
    for s in systems:
        xs = [v for v in values if v in table.get(s, {})]
        if not xs:
            continue
        ax_mem.plot(xs, [table[s][v]["peak_increase"] / MB for v in xs], "o-", label=s)
        if all("step" in table[s][v] for v in xs):
            ax_time.plot(xs, [table[s][v]["step"]["median"] for v in xs], "o-", label=s)
    ref = table.get("invops") or table.get("invops-plain") or {}
    xs = [v for v in values if v in ref]
    if xs:
        extra = [(ref[v]["params"] + ref[v]["optimizer"]) / MB for v in xs]
        ax_mem.plot(xs, extra, "k--", label="invops params + Adam state")
    label = {"K": "steps per scale K", "nx": "image side nx"}[key]
    ax_mem.set(ylabel="peak memory of a step [MB]", yscale="log", title=title)
    ax_time.set(ylabel="time per training step [s]", title=title)
    for ax in (ax_mem, ax_time):
        ax.set_xscale("log", base=2)
        ax.set_xticks(values, [str(v) for v in values])
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


# ------------------------------------------------------------------------------ main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", choices=("depth", "size", "maxsize"), default="depth")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--K", type=int, default=8, help="depth of the size sweeps")
    parser.add_argument("--nx", type=int, help="image side of the depth sweep (64 CPU, 256 GPU)")
    parser.add_argument("--sizes", type=int, nargs="+", help="image sides of the size sweep")
    parser.add_argument("--start-nx", type=int, default=256, help="maxsize: first size tried")
    parser.add_argument("--max-nx", type=int, default=4096, help="maxsize: largest size tried")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--levels", type=int, default=3, help="scales L")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    add_common_args(parser)
    add_point_args(parser)
    args = parser.parse_args(argv)
    defaults = DEFAULTS["cuda" if args.device.startswith("cuda") else "cpu"]
    args.nx = args.nx or defaults["nx"]
    args.sizes = args.sizes or defaults["sizes"]
    if args.sweep == "maxsize" and not args.device.startswith("cuda"):
        parser.error(
            "--sweep maxsize needs a GPU (--device cuda): on CPU running out of memory "
            "kills the process instead of raising"
        )
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_reply(measure(json.loads(args.worker)))
        return
    skipped = missing_peers(args.systems, NEEDS)
    systems = [s for s in args.systems if s not in skipped]
    for system, reason in skipped.items():
        print(f"skipping {system}: {reason}")
    base = {
        "K": args.K,
        "hidden": args.hidden,
        "levels": args.levels,
        "batch": args.batch,
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads,
        "seed": args.seed,
        "repeats": args.repeats,
        "allocator": args.allocator,
    }
    if args.sweep == "depth":
        base["nx"] = args.nx
    payload = {
        "benchmark": "glow_memory_time",
        "sweep": args.sweep,
        "machine": machine_info(args.device, args.dtype, args.threads),
        "config": base,
        "skipped": skipped,
    }
    device = args.device.split(":")[0]
    device += "_tuned" if args.allocator == "tuned" else ""
    if args.sweep == "maxsize":
        payload |= maxsize_report(args, systems, base)
    else:
        png = args.plots / f"glow_{args.sweep}_{device}.png"
        payload |= sweep_report(args, systems, base, png)
    path = write_json(args.results / f"glow_{args.sweep}_{device}.json", payload)
    print(f"results: {path}")


def sweep_report(args, systems: list[str], base: dict, png: Path) -> dict:
    """Run the depth or size sweep; print its tables (and targets), plot it."""
    title = f"Glow L={args.levels}, hidden {args.hidden}, batch {args.batch}, {args.device}"
    if args.sweep == "depth":
        key, values, title = "K", args.depths, title + f", {args.nx}x{args.nx}"
    else:
        key, values, title = "nx", args.sizes, title + f", K={args.K}"
    points = run_sweep(args, systems, key, values, base)
    table = by_system(points, key)
    print("\npeak memory increase of one training step (MB)\n")
    print(memory_table(table, key, values, systems))
    print("\ntime per training step (median, s); evals per sub-network: forward+backward\n")
    print(time_table(table, key, values, systems))
    out = {"points": points}
    if args.sweep == "depth":
        out["targets"] = targets(table, values)
        print("\n" + "\n".join(out["targets"]))
    print(f"\nplot: {plot(table, key, values, systems, title, png)}")
    return out


def maxsize_report(args, systems: list[str], base: dict) -> dict:
    """Find and print the largest image whose training step fits, per system."""
    points, largest = run_maxsize(args, systems, base)
    peaks = {(p["system"], p["nx"]): p.get("peak") for p in points}
    rows = [[s, n, fmt(_mb(peaks.get((s, n))), 0)] for s, n in largest.items()]
    print(markdown_table(["system", "largest nx", "peak MB there"], rows))
    return {"points": points, "largest_nx": largest}


if __name__ == "__main__":
    main()
