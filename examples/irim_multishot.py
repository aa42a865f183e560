"""An i-RIM trained through a multi-shot operator split over MPI ranks (pylops-mpi).

The physics operator has one block per shot, and each rank holds only its own shots: the
operator is a ``pylops_mpi.MPIVStack`` of the rank's shot operators. A shot illuminates a cone
below its source (wider with depth), the wavefield is band-limited (a Ricker wavelet in depth
times a Gaussian laterally, ``pylops.signalprocessing.Convolve2D``) and recorded in the
receiver aperture around the source (``pylops.Restriction``): a cheap stand-in for shot-wise
Born modelling with the same structure (model shared by all shots, data per shot). The data of
every training model are split the same way (each rank makes and keeps its shots' data, plus
2% noise).

Every rank trains the same i-RIM (``invops.NetworkLoop``, float64) on the same mini-batches;
inside each unrolled iteration the data-fit gradient ``J^T (J eta - d)`` is summed over the
ranks by pylops-mpi, so the network, its gradients and its updates are identical on every rank
and no gradient is communicated. Rank 0 then trains the same network again in a single process
with the whole operator (``pylops.VStack`` of all shots) and prints how far apart the two runs
are: they agree to rounding (the ranks sum ``J^T r`` in another order than one process; with
plain SGD the parameters agree to 1e-15, and Adam, which divides by ``sqrt(v) + eps``, magnifies
the rounding of near-zero gradient entries to about 1e-9). The baseline is pylops-mpi's CGLS
on the same distributed operator.

Run: ``mpiexec -n 2 python -m mpi4py examples/irim_multishot.py`` (about eight minutes on 2
busy CPU cores, half of it the single-process rerun; ``python -m mpi4py`` stops every rank if
one fails). Without ``mpiexec`` it runs on one
rank. Options: ``--shots``, ``--size``, ``--steps``, ``--no-compare``, ``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pylops
import torch
from mpi4py import MPI
from pylops_mpi import DistributedArray, MPIVStack, Partition
from pylops_mpi.optimization.basic import cgls
from tqdm import tqdm

import invops
from invops.operators import as_operator

F64 = torch.float64


# ----------------------------------------------------------------------------- problem
def earth_models(n: int, size: int, seed: int) -> np.ndarray:
    """Layered media with dipping, curved interfaces, values in [0, 1]."""
    rng = np.random.default_rng(seed)
    z, x = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    models = np.empty((n, size, size))
    for i in range(n):
        depths = np.sort(rng.uniform(0.1, 0.9, rng.integers(2, 6)))
        values = np.cumsum(rng.uniform(0.1, 0.4, depths.size + 1))
        surface = z - rng.uniform(-0.3, 0.3) * (x - 0.5)
        surface -= rng.uniform(-0.08, 0.08) * np.sin(2 * np.pi * x + rng.uniform(0, 2 * np.pi))
        model = np.full((size, size), values[0])
        for depth, value in zip(depths, values[1:]):
            model[surface > depth] = value
        models[i] = (model - model.min()) / (model.max() - model.min())
    return models


def shot_operators(n: int, n_shots: int) -> list[pylops.LinearOperator]:
    """One operator per shot: illumination cone, band-limited blur, receiver aperture."""
    half = n // 4
    t = np.arange(-half, half + 1) / (0.25 * half)
    kernel = np.outer((1 - 2 * t**2) * np.exp(-(t**2)), np.exp(-0.5 * (t / 0.8) ** 2))
    blur = pylops.signalprocessing.Convolve2D(
        (n, n), h=kernel / np.abs(kernel).sum(), offset=(half, half)
    )
    z, x = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    sources = np.linspace(0, n - 1, n_shots)
    cones = [np.exp(-0.5 * ((x - xs) / (2.0 + 0.5 * z)) ** 2) for xs in sources]
    total = np.sum(cones, axis=0)  # normalised: the shots together illuminate evenly
    ops = []
    for xs, cone in zip(sources, cones):
        aperture = np.flatnonzero(np.abs(np.arange(n) - xs) <= 0.35 * n)
        record = pylops.Restriction((n, n), aperture, axis=1)
        ops.append(record @ blur @ pylops.Diagonal((cone / total).ravel()))
    return ops


def shot_data(ops, shots, models: np.ndarray, noise: float, seed: int) -> np.ndarray:
    """The data of ``shots`` (their blocks side by side), each with its own seeded noise."""
    blocks = []
    for i in shots:
        clean = np.stack([(ops[i] @ m.ravel()).ravel() for m in models])
        rng = np.random.default_rng([seed, i])
        rms = np.sqrt(np.mean(clean**2))
        blocks.append(clean + noise * rms * rng.standard_normal(clean.shape))
    return np.concatenate(blocks, axis=1)


def psnr(estimate: np.ndarray, truth: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((estimate - truth) ** 2)))


# ----------------------------------------------------------------------------- training
def train(J, train_m, train_d, test_d, args, show: bool):
    """The i-RIM trained on (models, data) through ``J``; its test estimates and parameters."""
    n = args.size
    torch.manual_seed(args.seed)
    net = invops.NetworkLoop(4, args.hidden, args.iterations, k1=3, p1=1, s1=1).to(F64)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    picks = np.random.default_rng(args.seed + 1)

    def run(d):
        zeros = torch.zeros(d.shape[0], 4, n, n, dtype=F64)
        return net(zeros[:, :1], zeros[:, 1:], d, J)[0][:, 0]

    for _ in tqdm(range(args.steps), desc="i-RIM training", disable=not show):
        idx = picks.choice(len(train_m), args.batch, replace=False)
        eta = run(train_d[idx])
        loss = (eta - train_m[idx]).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        estimates = run(test_d)
    return estimates.numpy(), [p.detach().clone() for p in net.parameters()]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=24, help="model side (a multiple of 4)")
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=4, help="unrolled i-RIM iterations")
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--test", type=int, default=16)
    parser.add_argument("--noise", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-compare", action="store_true", help="skip the single-process rerun on rank 0"
    )
    parser.add_argument("--out", default="examples/output/irim_multishot.png")
    args = parser.parse_args(argv)
    if args.size % 4:
        raise SystemExit(f"--size must be a multiple of 4, got {args.size}")
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if args.shots < size:
        raise SystemExit(f"--shots ({args.shots}) must be at least the number of ranks ({size})")
    n = args.size
    ops = shot_operators(n, args.shots)
    mine = [int(i) for i in np.array_split(np.arange(args.shots), size)[rank]]

    # every rank: the same models, its own shots' data
    train_m = torch.as_tensor(earth_models(args.train, n, args.seed))
    test_m = earth_models(args.test, n, args.seed + 1)
    train_d = torch.as_tensor(shot_data(ops, mine, train_m.numpy(), args.noise, args.seed + 2))
    test_d = torch.as_tensor(shot_data(ops, mine, test_m, args.noise, args.seed + 3))
    J_mpi = MPIVStack([ops[i] for i in mine])
    J = as_operator(J_mpi, model_shape=(n, n))

    start = time.perf_counter()
    estimates, params = train(J, train_m, train_d, test_d, args, show=rank == 0)
    seconds = time.perf_counter() - start

    # baseline: damped CGLS with pylops-mpi on the same distributed operator
    baseline = np.empty_like(test_m)
    for i, d in enumerate(test_d.numpy()):
        y = DistributedArray(
            global_shape=J_mpi.shape[0],
            local_shapes=J_mpi.local_shapes_n,
            local_array=np.ascontiguousarray(d),
        )
        x0 = DistributedArray(
            global_shape=n * n, partition=Partition.BROADCAST, local_array=np.zeros(n * n)
        )
        baseline[i] = cgls(J_mpi, y, x0, niter=30, damp=1e-2, tol=0)[0].local_array.reshape(n, n)

    results = {
        "ranks": size,
        "irim_psnr": float(np.mean([psnr(e, t) for e, t in zip(estimates, test_m)])),
        "cgls_psnr": float(np.mean([psnr(e, t) for e, t in zip(baseline, test_m)])),
        "seconds": seconds,
    }
    # every rank must hold the same network: compare with rank 0's
    theta = torch.cat([p.reshape(-1) for p in params])
    spread = comm.allreduce(float((theta - comm.bcast(theta, root=0)).abs().max()), op=MPI.MAX)
    results["max_param_difference_between_ranks"] = spread

    if rank == 0:
        print(
            f"ranks: {size}, shots: {args.shots} (rank 0 holds {len(mine)}), model {n}x{n}, "
            f"{args.test} test models, noise {args.noise:.0%}"
        )
        print(
            f"i-RIM ({args.iterations} it., {args.steps} steps in {seconds:.0f} s): "
            f"PSNR {results['irim_psnr']:.2f} dB;  CGLS (pylops-mpi, 30 it.): "
            f"PSNR {results['cgls_psnr']:.2f} dB"
        )
        print(f"largest parameter difference between the ranks: {spread:.3g}")
    if size > 1 and not args.no_compare:
        if rank == 0:
            whole = as_operator(pylops.VStack(ops), model_shape=(n, n))
            everything = list(range(args.shots))
            single_train = torch.as_tensor(
                shot_data(ops, everything, train_m.numpy(), args.noise, args.seed + 2)
            )
            single_test = torch.as_tensor(
                shot_data(ops, everything, test_m, args.noise, args.seed + 3)
            )
            ref_estimates, ref_params = train(
                whole, train_m, single_train, single_test, args, show=False
            )
            theta_ref = torch.cat([p.reshape(-1) for p in ref_params])
            d_theta = float((theta - theta_ref).abs().max() / theta_ref.abs().max())
            d_eta = float(np.abs(estimates - ref_estimates).max() / np.abs(ref_estimates).max())
            results["single_process_param_difference"] = d_theta
            results["single_process_estimate_difference"] = d_eta
            verdict = "equal to rounding" if max(d_theta, d_eta) < 1e-6 else "DIFFERENT"
            print(
                "single process with the whole operator (pylops.VStack): relative difference "
                f"of the parameters {d_theta:.2g}, of the test estimates {d_eta:.2g}: {verdict}"
            )
        # the other ranks wait without spinning (MPI's blocking barrier would take a core)
        request = comm.Ibarrier()
        while not request.Test():
            time.sleep(0.05)

    if rank == 0 and args.out:
        figure(test_m[0], test_d[0].numpy(), ops[mine[0]], baseline[0], estimates[0], args.out)
    return results


def figure(truth, data, shot_op, baseline, estimate, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shot = data[: shot_op.shape[0]].reshape(shot_op.dimsd)
    panels = [
        ("true model", truth),
        ("data of shot 0 (aperture)", shot),
        ("CGLS (pylops-mpi)", baseline),
        ("i-RIM", estimate),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.4))
    for ax, (title, image) in zip(axes, panels):
        lim = (0, 1) if title != panels[1][0] else (None, None)
        im = ax.imshow(
            image,
            cmap="gray" if lim[0] is not None else "seismic",
            vmin=lim[0],
            vmax=lim[1],
            aspect="auto",
        )
        ax.set_title(title)
        ax.set_xlabel("x (samples)")
        ax.set_ylabel("depth (samples)")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    print(f"figure: {out}")


if __name__ == "__main__":
    main()
