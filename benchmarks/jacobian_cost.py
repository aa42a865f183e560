"""Cost of Jacobian products relative to a forward pass, for a Glow and an i-RIM loop.

What is measured. At one linearization point, the median time (after a warm-up call) of

- ``forward``: the network without a graph;
- ``jvp``: forward mode with an input tangent (``module.jvp``);
- ``J @ v``: the same through the ``JacobianOperator`` (numpy vector in and out);
- ``J.H @ w (input)`` and ``J.H @ w (input+params)``: the memory-free reverse mode of
  ``jacobian(x, wrt="input")`` and ``wrt="both"``, from the output stored when the operator was
  built (the input is recomputed by inversion), as a solver calls it;
- ``plain vjp``: a forward with stored activations (``plain_autograd()``) plus
  ``torch.autograd.grad`` to the input and the parameters, the usual cost of a reverse product;

for two multiscale ``NetworkGlow`` configurations (``glow``: 64 hidden channels, L=2, K=4, 32x32,
the size a newcomer tries first; ``glow-injl``: InvertibleNetworks.jl's benchmark configuration
of ``glow_memory_time.py``, 256 hidden channels, L=3, at 64x64) and a ``NetworkLoop`` calling a
PyLops blur (the configuration of ``irim_unrolled.py``). The operations of one network are timed
alternating, one call of each per round, so that a slow phase of the machine hits them alike.

Why. The Jacobian of a network is a ``pylops.LinearOperator`` used inside iterative solvers,
which apply it and its adjoint many times; the targets are ``jvp`` at most 2.2
forwards with an input tangent and 3 with input and parameter tangents (issue 16), and
``J.H @ w`` at most the plain VJP. CPU only: the operator's vectors are numpy arrays (on a
GPU they would be cupy).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from _common import (
    add_common_args,
    fmt,
    machine_info,
    markdown_table,
    new_figure,
    runtime_info,
    save_figure,
    setup_torch,
    write_json,
)

# targets of issue 16, as multiples of a forward pass (and J.H @ w against the plain VJP)
JVP_TARGET = 2.2
JVP_BOTH_TARGET = 3.0


def glow_operations(args) -> tuple[dict[str, Callable[[], object]], dict]:
    """The timed operations of the small Glow, and its description."""
    return _glow_operations(args, args.hidden, args.levels, args.K, args.nx)


def glow_injl_operations(args) -> tuple[dict[str, Callable[[], object]], dict]:
    """The timed operations of InvertibleNetworks.jl's Glow configuration."""
    return _glow_operations(args, args.injl_hidden, 3, args.injl_K, args.injl_nx)


def _glow_operations(args, hidden, levels, K, nx) -> tuple[dict[str, Callable[[], object]], dict]:
    import numpy as np
    import torch

    import invops

    net = invops.NetworkGlow(3, hidden, L=levels, K=K, split_scales=True)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.rand(args.batch, 3, nx, nx, generator=gen)
    with torch.no_grad():
        net(x)  # ActNorm initialisation
    dx = torch.randn(x.shape, generator=gen)
    rng = np.random.default_rng(args.seed)
    v = rng.standard_normal(x.numel()).astype(np.float32)
    w = rng.standard_normal(x.numel()).astype(np.float32)
    params = [p for p in net.parameters() if p.requires_grad]
    dtheta = [torch.randn(p.shape, generator=gen) for p in net.parameters()]

    def plain_vjp():
        xr = x.clone().requires_grad_()
        with invops.plain_autograd():
            z, _ = net(xr)
        torch.autograd.grad(z, [xr, *params], torch.from_numpy(w).reshape(z.shape))

    J, J_both = net.jacobian(x), net.jacobian(x, wrt="both")
    ops = {
        "forward": lambda: _no_grad(net, x),
        "jvp": lambda: net.jvp(x, dx=dx),
        "jvp (input+params)": lambda: net.jvp(x, dx=dx, dtheta=dtheta),
        "J @ v": lambda: J @ v,
        "J.H @ w (input)": lambda: J.H @ w,
        "J.H @ w (input+params)": lambda: J_both.H @ w,
        "plain vjp": plain_vjp,
    }
    info = {"K": K, "L": levels, "hidden": hidden, "nx": nx}
    return ops, {**info, "params": sum(p.numel() for p in params)}


def loop_operations(args) -> tuple[dict[str, Callable[[], object]], dict]:
    """The timed operations of an i-RIM loop with a PyLops blur, and its description."""
    import numpy as np
    import torch
    from irim_unrolled import blur_operator

    import invops

    nx, batch = args.loop_nx, args.batch
    op = blur_operator(nx, 7)
    loop = invops.NetworkLoop(args.loop_channels, args.loop_hidden, maxiter=args.loop_maxiter)
    gen = torch.Generator().manual_seed(args.seed)
    eta = torch.rand(batch, 1, nx, nx, generator=gen)
    s = torch.randn(batch, args.loop_channels - 1, nx, nx, generator=gen)
    d = invops.operators.as_operator(op).apply(torch.rand(batch, nx, nx, generator=gen))
    with torch.no_grad():
        loop(eta, s, d, op)  # ActNorm initialisation
    deta, ds = torch.randn(eta.shape, generator=gen), torch.randn(s.shape, generator=gen)
    n = eta.numel() + s.numel()
    rng = np.random.default_rng(args.seed)
    v, w = (rng.standard_normal(n).astype(np.float32) for _ in range(2))
    params = [p for p in loop.parameters() if p.requires_grad]
    dtheta = [torch.randn(p.shape, generator=gen) for p in loop.parameters()]

    def forward():
        with torch.no_grad():
            return loop(eta, s, d, op)

    def plain_vjp():
        leaves = [eta.clone().requires_grad_(), s.clone().requires_grad_()]
        with invops.plain_autograd():
            outs = loop(*leaves, d, op)
        cot = torch.from_numpy(w).reshape(batch, args.loop_channels, nx, nx)
        torch.autograd.grad(outs, [*leaves, *params], (cot[:, :1], cot[:, 1:]))

    J = loop.jacobian(eta, s, d, op)
    J_both = loop.jacobian(eta, s, d, op, wrt="both")
    ops = {
        "forward": forward,
        "jvp": lambda: loop.jvp(eta, s, d, op, deta=deta, ds=ds),
        "jvp (input+params)": lambda: loop.jvp(eta, s, d, op, deta=deta, ds=ds, dtheta=dtheta),
        "J @ v": lambda: J @ v,
        "J.H @ w (input)": lambda: J.H @ w,
        "J.H @ w (input+params)": lambda: J_both.H @ w,
        "plain vjp": plain_vjp,
    }
    info = {
        "channels": args.loop_channels,
        "hidden": args.loop_hidden,
        "maxiter": args.loop_maxiter,
        "nx": nx,
    }
    return ops, {**info, "params": sum(p.numel() for p in params)}


def _no_grad(net, x):
    import torch

    with torch.no_grad():
        return net(x)


def time_operations(ops: dict[str, Callable[[], object]], repeats: int) -> dict:
    """``{name: {"median": s, "times": [...], "ratio": median / forward median}}``.

    One warm-up call of each, then ``repeats`` rounds calling every operation once in turn.
    """
    for fn in ops.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(repeats):
        for name, fn in ops.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    out = {name: {"median": statistics.median(t), "times": t} for name, t in times.items()}
    for entry in out.values():
        entry["ratio"] = entry["median"] / out["forward"]["median"]
    return out


def report(name: str, timings: dict) -> str:
    rows = [
        [op, fmt(t["median"], 4), fmt(t["ratio"]), _target(op, timings)]
        for op, t in timings.items()
    ]
    return f"{name}\n\n" + markdown_table(["operation", "median s", "x forward", "target"], rows)


def _target(op: str, timings: dict) -> str:
    value = timings[op]["ratio"]
    if op == "jvp":
        bound = JVP_TARGET
    elif op == "jvp (input+params)":
        bound = JVP_BOTH_TARGET
    elif op == "J.H @ w (input+params)":
        plain = timings["plain vjp"]["ratio"]
        return f"<= plain vjp ({fmt(plain)}): " + ("met" if value <= plain else "NOT met")
    else:
        return ""
    return f"<= {bound}: " + ("met" if value <= bound else "NOT met")


def plot(results: dict, path: Path) -> Path:
    fig, axes = new_figure(len(results))
    for ax, (name, timings) in zip(axes, results.items()):
        names = list(timings)
        ax.barh(names, [timings[op]["ratio"] for op in names], color="tab:blue")
        ax.axvline(1.0, color="k", lw=0.8)
        ax.axvline(JVP_TARGET, color="tab:red", ls="--", lw=0.8, label="jvp target")
        ax.invert_yaxis()
        ax.set(xlabel="time / forward time", title=name)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


# --networks key -> (name in the results, builder)
BUILDERS = {
    "glow": ("NetworkGlow", glow_operations),
    "glow-injl": ("NetworkGlow (IN.jl configuration)", glow_injl_operations),
    "loop": ("NetworkLoop", loop_operations),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", nargs="+", choices=tuple(BUILDERS), default=list(BUILDERS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--K", type=int, default=4, help="small Glow: steps per scale")
    parser.add_argument("--levels", type=int, default=2, help="small Glow: scales")
    parser.add_argument("--hidden", type=int, default=64, help="small Glow: hidden channels")
    parser.add_argument("--nx", type=int, default=32, help="small Glow: image side")
    parser.add_argument("--injl-K", type=int, default=8, help="IN.jl Glow: steps per scale")
    parser.add_argument("--injl-hidden", type=int, default=256, help="IN.jl Glow: hidden")
    parser.add_argument("--injl-nx", type=int, default=64, help="IN.jl Glow: image side")
    parser.add_argument("--loop-channels", type=int, default=4)
    parser.add_argument("--loop-hidden", type=int, default=64)
    parser.add_argument("--loop-maxiter", type=int, default=8)
    parser.add_argument("--loop-nx", type=int, default=128, help="a multiple of 4")
    add_common_args(parser)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_torch(args.threads, args.seed)
    results, configs = {}, {}
    for key in args.networks:
        name, build = BUILDERS[key]
        ops, configs[name] = build(args)
        results[name] = time_operations(ops, args.repeats)
        print(report(f"{name} {configs[name]}, batch {args.batch}", results[name]) + "\n")
    png = plot(results, args.plots / "jacobian_cost_cpu.png")
    payload = {
        "benchmark": "jacobian_cost",
        "machine": {**machine_info("cpu", "float32", args.threads), "runtime": runtime_info("cpu")},
        "config": {"batch": args.batch, "repeats": args.repeats, "networks": configs},
        "results": results,
    }
    path = write_json(args.results / "jacobian_cost_cpu.json", payload)
    print(f"plot: {png}\nresults: {path}")


if __name__ == "__main__":
    main()
