"""i-RIM: peak memory and time of one training step against the number of unrolled iterations.

What is measured. One training step (the unrolled loop from a zero state, mean squared error of
the final estimate against the true model, backward, Adam step) of an i-RIM
(``invops.NetworkLoop``, additive couplings, identity link) that applies a PyLops operator and
its adjoint in every iteration (a 2D Gaussian blur, ``pylops.signalprocessing.Convolve2D``),
for 1 to 32 iterations and two systems:

- ``invops``: the memory-free reverse pass, the PyLops operator passed as it is;
- ``plain``: the same loop under ``invops.plain_autograd()``, with ``J`` and ``J^T`` applied
  through ``pylops.TorchOperator``: the plain-autograd i-RIM one writes with PyLops' torch
  bridge, which stores every iteration's activations.

Why. Unrolled inversion stores a full state and the conditioners' activations per iteration
under plain autograd, which limits the number of iterations and the model size; a memory-free
reverse pass, which recomputes every iteration's input by inversion, should keep the peak flat.

How. As in ``glow_memory_time.py``: one fresh process per (system, iterations) point with a
warm-up step, one step whose peak memory over the memory in use just before it is recorded
(resident set size, ``MALLOC_MMAP_THRESHOLD_`` set), ``--repeats`` timed steps and as many
timed forwards without graph (medians), and one step under the sub-network evaluation counter.
As for Glow, the physical limit of a memory-free step is the plain step plus one pass undoing
every iteration, timed as a forward. CPU only: the PyLops operator works on numpy arrays here
(on a GPU it would need cupy).
"""

from __future__ import annotations

import argparse
import json
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

SYSTEMS = ("invops", "plain")


def blur_operator(nx: int, width: int):
    """A normalised Gaussian blur of ``width x width`` pixels on ``nx x nx`` models (float32)."""
    import numpy as np
    import pylops

    t = np.arange(width) - width // 2
    g = np.exp(-0.5 * (t / (width / 4)) ** 2)
    h = np.outer(g, g).astype(np.float32)
    h /= h.sum()
    return pylops.signalprocessing.Convolve2D(
        (nx, nx), h=h, offset=(width // 2, width // 2), dtype="float32"
    )


def torch_operator_pair(op, nx: int):
    """``J`` and ``J^T`` as batched torch callables through ``pylops.TorchOperator``."""
    import pylops

    top = pylops.TorchOperator(op, batch=True)

    def forward(m):
        return top.apply(m.reshape(m.shape[0], -1)).reshape(m.shape[0], nx, nx)

    def adjoint(r):
        return top.adjoint(r.reshape(r.shape[0], -1)).reshape(r.shape[0], nx, nx)

    return forward, adjoint


def measure(cfg: dict) -> dict:
    """A warm-up step, then the phases of ``cfg["phases"]`` (as in ``glow_memory_time.py``)."""
    import torch

    import invops

    setup_torch(cfg["threads"], cfg["seed"])
    nx, batch, plain = cfg["nx"], cfg["batch"], cfg["system"] == "plain"
    op = blur_operator(nx, cfg["kernel"])
    loop = invops.NetworkLoop(cfg["channels"], cfg["hidden"], maxiter=cfg["iterations"])
    subnets = [m for m in loop.modules() if isinstance(m, invops.ResidualBlock)]
    gen = torch.Generator().manual_seed(cfg["seed"] + 1)
    truth = torch.rand(batch, 1, nx, nx, generator=gen)
    d = invops.operators.as_operator(op).apply(truth[:, 0])
    J = torch_operator_pair(op, nx) if plain else op
    eta = torch.zeros(batch, 1, nx, nx)
    s = torch.zeros(batch, cfg["channels"] - 1, nx, nx)
    optimizer = torch.optim.Adam(loop.parameters(), lr=1e-4)

    def loss_fn():
        with invops.plain_autograd(plain):
            eta_out, _ = loop(eta, s, d, J)
        return (eta_out - truth).pow(2).mean()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        return loss.detach()

    out = {**cfg, "runtime": runtime_info("cpu"), "loss": float(step())}
    out.update(params=tensor_bytes(loop.parameters()), optimizer=optimizer_bytes(optimizer))
    if "memory" in cfg["phases"]:
        with PeakMemory("cpu") as mem:
            step()
        out.update(peak_increase=mem.increase, peak=mem.peak, before=mem.before)
    if "time" in cfg["phases"]:
        out["step"] = median_time(step, cfg["repeats"], "cpu")
        with torch.no_grad():
            out["forward"] = median_time(loss_fn, cfg["repeats"], "cpu")
        optimizer.zero_grad(set_to_none=True)
        out["evals"] = count_evals(loss_fn, lambda loss: loss.backward(), subnets)
    return out


def describe(point: dict) -> str:
    if "error" in point:
        return f"ERROR {point['error']}"
    return (
        f"peak +{point['peak_increase'] / MB:.1f} MB, {point['step']['median']:.3f} s/step, "
        f"{point['evals']['total']:g} evals"
    )


def report(points: list[dict], iterations: list[int]) -> tuple[str, list[str]]:
    """The markdown table and the growth of each system's peak over the sweep."""
    table = {(p["system"], p["iterations"]): p for p in points if "error" not in p}

    def get(system, n, name):
        p = table.get((system, n))
        return None if p is None else p[name]

    headers = ["iterations", "params MB", "Adam MB", "invops MB", "plain MB", "plain / invops"]
    headers += ["invops s/step", "plain s/step", "invops / plain", "invops / limit"]
    headers += ["evals invops", "evals plain"]
    rows = []
    for n in iterations:
        peak = {s: get(s, n, "peak_increase") for s in SYSTEMS}
        t = {s: (get(s, n, "step") or {}).get("median") for s in SYSTEMS}
        forward = (get("plain", n, "forward") or {}).get("median")
        limit = None if t["plain"] is None or forward is None else t["plain"] + forward
        ref = table.get(("invops", n)) or table.get(("plain", n)) or {}
        rows.append(
            [n, fmt(_mb(ref.get("params"))), fmt(_mb(ref.get("optimizer")))]
            + [fmt(_mb(peak["invops"]), 1), fmt(_mb(peak["plain"]), 1)]
            + [fmt(ratio(peak["plain"], peak["invops"]), 1)]
            + [fmt(t["invops"], 3), fmt(t["plain"], 3), fmt(ratio(t["invops"], t["plain"]))]
            + [fmt(ratio(t["invops"], limit))]
            + [_evals(get(s, n, "evals")) for s in SYSTEMS]
        )
    growth = []
    for system in SYSTEMS:
        done = [n for n in iterations if (system, n) in table]
        if len(done) >= 2:
            a, b = table[(system, done[0])], table[(system, done[-1])]
            extra = (b["params"] + b["optimizer"]) - (a["params"] + a["optimizer"])
            growth.append(
                f"{system}: peak grows {(b['peak_increase'] - a['peak_increase']) / MB:.1f} MB "
                f"from {done[0]} to {done[-1]} iterations (parameters + Adam state grow "
                f"{extra / MB:.1f} MB)"
            )
    return markdown_table(headers, rows), growth


def _mb(value):
    return None if value is None else value / MB


def _evals(evals: dict | None) -> str:
    return "-" if evals is None else f"{evals['forward']:g}+{evals['backward']:g}"


def plot(points: list[dict], iterations: list[int], title: str, path: Path) -> Path:
    fig, (ax_mem, ax_time) = new_figure(2)
    for system in SYSTEMS:
        done = [p for p in points if p["system"] == system and "error" not in p]
        if not done:
            continue
        xs = [p["iterations"] for p in done]
        ax_mem.plot(xs, [p["peak_increase"] / MB for p in done], "o-", label=system)
        ax_time.plot(xs, [p["step"]["median"] for p in done], "o-", label=system)
    ax_mem.set(ylabel="peak memory of a step [MB]", yscale="log", title=title)
    ax_time.set(ylabel="time per training step [s]", title=title)
    for ax in (ax_mem, ax_time):
        ax.set_xscale("log", base=2)
        ax.set_xticks(iterations, [str(n) for n in iterations])
        ax.set_xlabel("unrolled iterations")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--channels", type=int, default=4, help="state channels (eta + memory)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--nx", type=int, default=128, help="model side (a multiple of 4)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--kernel", type=int, default=7, help="blur width in pixels")
    add_common_args(parser)
    add_point_args(parser)
    return parser.parse_args(argv)


def _suffix(args) -> str:
    return "cpu_tuned" if args.allocator == "tuned" else "cpu"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_reply(measure(json.loads(args.worker)))
        return
    base = {
        "channels": args.channels,
        "hidden": args.hidden,
        "nx": args.nx,
        "batch": args.batch,
        "kernel": args.kernel,
        "threads": args.threads,
        "seed": args.seed,
        "repeats": args.repeats,
        "allocator": args.allocator,
    }
    points = []
    for n in args.iterations:
        for system in args.systems:
            point = run_config(
                Path(__file__), measure, {**base, "system": system, "iterations": n}, args
            )
            print(f"  {system:7s} iterations={n:<3d} {describe(point)}", flush=True)
            points.append(point)
    table, growth = report(points, args.iterations)
    print("\npeak memory increase (MB) and time (median s) of one training step\n")
    print(table + "\n\n" + "\n".join(growth))
    title = (
        f"i-RIM {args.channels} ch, hidden {args.hidden}, {args.nx}x{args.nx}, batch {args.batch}"
    )
    png = plot(points, args.iterations, title, args.plots / f"irim_unrolled_{_suffix(args)}.png")
    payload = {
        "benchmark": "irim_unrolled",
        "machine": machine_info("cpu", "float32", args.threads),
        "config": base,
        "points": points,
        "growth": growth,
    }
    path = write_json(args.results / f"irim_unrolled_{_suffix(args)}.json", payload)
    print(f"\nplot: {png}\nresults: {path}")


if __name__ == "__main__":
    main()
