"""One rank of the distributed-operator test in ``test_operators_mpi.py`` (run by ``mpiexec``).

Every rank holds the same models and its share of the shots of a multi-shot operator
(``pylops_mpi.MPIVStack``), runs an i-RIM loop, an operator composition and two kinds of
data-parallel training through it, then feeds it bad input, and writes what it got to
``<out>/rank<r>.pt``. The test compares each rank's results with one process running the same
functions on the whole operator (``pylops.VStack`` of all shots); the functions below are shared
by both sides and import nothing from MPI.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

import numpy as np
import pylops
import torch

import invops
from invops.operators import as_operator

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "irim_multishot.py"
F64 = torch.float64
N = 8  # model side
SHOT_ROWS = (7, 5, 6, 2)  # data entries per shot: rank 0 of 2 holds 12, rank 1 holds 8
BATCH = 2


def shot_matrices() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.standard_normal((n, N * N)) / N for n in SHOT_ROWS]


def rank_shots(rank: int, size: int) -> list[int]:
    """Consecutive shots per rank, so the global data are the ranks' blocks in order."""
    return [int(i) for i in np.array_split(np.arange(len(SHOT_ROWS)), size)[rank]]


def data_rows(rank: int, size: int) -> slice:
    """The entries of the global data that ``rank`` holds."""
    shots = rank_shots(rank, size)
    start = sum(SHOT_ROWS[: shots[0]])
    return slice(start, start + sum(SHOT_ROWS[i] for i in shots))


def whole_operator() -> pylops.LinearOperator:
    return pylops.VStack([pylops.MatrixMult(m) for m in shot_matrices()])


def make_loop() -> invops.NetworkLoop:
    torch.manual_seed(0)
    loop = invops.NetworkLoop(3, 4, maxiter=2, link="softplus").to(F64)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in loop.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=F64))
    return loop


def loop_inputs(batch: int = BATCH) -> dict[str, torch.Tensor]:
    """Models, global data and tangents/cotangents, the same in every process."""
    gen = torch.Generator().manual_seed(2)
    n_data = sum(SHOT_ROWS)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    return {
        "eta": randn(batch, 1, N, N),
        "s": randn(batch, 2, N, N),
        "d": randn(batch, n_data),
        "deta": randn(batch, 1, N, N),
        "ds": randn(batch, 2, N, N),
        "dd": randn(batch, n_data),
        "v": randn(batch * 3 * N * N),
        "w": randn(batch * 3 * N * N),
    }


def mean_loss(eta: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (eta.square().flatten(1).sum(1) + 0.1 * s.square().flatten(1).sum(1)).mean()


def run_loop(J, rows: slice) -> dict:
    """Every mode of an i-RIM loop with operator ``J``; ``rows``: this process's data entries."""
    J = as_operator(J, model_shape=(N, N))
    x = loop_inputs()
    d, dd = x["d"][:, rows], x["dd"][:, rows]
    loop = make_loop()
    out: dict = {}
    eta_out, s_out = loop(x["eta"], x["s"], d, J)  # the first call initialises ActNorm
    out["params_after_init"] = [p.detach().clone() for p in loop.parameters()]
    out["forward"] = [eta_out, s_out]
    out["inverse"] = list(loop.inverse(eta_out, s_out, d, J))
    loop.zero_grad()
    *back, dd_back = loop.backward(x["deta"], x["ds"], eta_out, s_out, d, J)
    out["backward"] = back
    out["backward_dd"] = dd_back
    out["backward_grads"] = [p.grad.clone() for p in loop.parameters()]
    deta_in, ds_in, dtheta, eta_in, s_in, dd_vjp = loop.vjp(
        x["deta"], x["ds"], eta_out, s_out, d, J
    )
    out["vjp"] = [deta_in, ds_in, *dtheta, eta_in, s_in]
    out["vjp_dd"] = dd_vjp
    gen = torch.Generator().manual_seed(5)
    tangents = [torch.randn(p.shape, generator=gen, dtype=F64) for p in loop.parameters()]
    out["jvp"] = list(
        loop.jvp(x["eta"], x["s"], d, J, deta=x["deta"], ds=x["ds"], dtheta=tangents, dd=dd)
    )
    jac = loop.jacobian(x["eta"], x["s"], d, J)
    np.random.seed(0)  # noqa: NPY002 - dottest draws from the global state: the same on all ranks
    out["jacobian_dottest"] = bool(pylops.utils.dottest(jac, rtol=1e-10))
    out["jacobian"] = [
        torch.as_tensor(jac @ x["v"].numpy()),
        torch.as_tensor(jac.H @ x["w"].numpy()),
    ]
    jac_params = loop.jacobian(x["eta"], x["s"], d, J, wrt="params")
    np.random.seed(1)  # noqa: NPY002
    out["jacobian_params_dottest"] = bool(pylops.utils.dottest(jac_params, rtol=1e-10))
    return out


def make_flow() -> invops.NetworkGlow:
    torch.manual_seed(0)
    flow = invops.NetworkGlow(1, 4, L=2, K=1).to(F64)
    flow(torch.randn(8, 1, N, N, generator=torch.Generator().manual_seed(6), dtype=F64))
    return flow


def run_composition(J, rows: slice) -> dict:
    """``A @ G^-1`` with a physics operator ``A``: output, gradients of the (global) misfit."""
    flow = make_flow()
    F = as_operator(J, model_shape=(1, N, N)) @ flow.reverse()
    x = loop_inputs()
    z = x["eta"].clone().requires_grad_()
    y = F.apply(z)
    # this rank's data misfit: its backward sums J_r^H over the ranks, so the gradient is the
    # gradient of the misfit of all the data
    (0.5 * (y - x["d"][:, rows]).square().sum()).backward()
    jac = F.jacobian(x["eta"].detach())
    return {
        "output": y.detach(),
        "grads": [z.grad, *[p.grad.clone() for p in flow.parameters()]],
        "jacobian": [
            torch.as_tensor(jac @ x["v"][: BATCH * N * N].numpy()),
            torch.as_tensor(jac.H @ x["d"][:, rows].reshape(-1).numpy()),
        ],
        "_jacobian_operator": jac,
    }


def train_step(loop, J, x: dict, rows: slice, model=None) -> dict:
    """One SGD step on the mean loss; ``model`` (e.g. the DDP wrapper) is what gets called."""
    model = loop if model is None else model
    eta, s = model(x["eta"], x["s"], x["d"][:, rows], as_operator(J, model_shape=(N, N)))
    mean_loss(eta, s).backward()
    grads = [p.grad.clone() for p in loop.parameters()]
    with torch.no_grad():
        for p in loop.parameters():
            p -= 0.1 * p.grad
    return {"grads": grads, "params": [p.detach().clone() for p in loop.parameters()]}


def chunk(x: dict, index: int, n: int) -> dict:
    return {k: v.chunk(n)[index] if k != "v" and k != "w" else v for k, v in x.items()}


# ----------------------------------------------------------------------------- the MPI side
def _errors(comm, J, rows) -> dict:
    """Bad input on one rank (or a wrong operator): what every rank raised."""
    from pylops_mpi import MPIBlockDiag

    rank = comm.Get_rank()
    x = loop_inputs()
    loop = make_loop()
    d = x["d"][:, rows]
    J = as_operator(J, model_shape=(N, N))
    cases = {
        # the model split across ranks (each rank 32 of the 64 model entries)
        "model_split": lambda: loop(
            x["eta"],
            x["s"],
            d,
            as_operator(
                MPIBlockDiag([pylops.MatrixMult(shot_matrices()[rank][:, :32])]),
                model_shape=(N, N),
            ),
        ),
        "data_size_one_rank": lambda: loop(x["eta"], x["s"], d[:, :-1] if rank == 1 else d, J),
        "model_differs": lambda: loop(x["eta"] + rank, x["s"], d, J),
        "data_batch_one_rank": lambda: loop(
            x["eta"], x["s"], torch.cat([d, d[:1]]) if rank == 1 else d, J
        ),
    }
    raised = {}
    for name, call in cases.items():
        try:
            call()
            raised[name] = None
        except ValueError as e:
            raised[name] = str(e)
    comm.Barrier()  # every rank got here: nobody is left waiting in a collective call
    return raised


def groups_step(ranks_per_operator: int) -> dict:
    """Operator groups: each group holds all the shots (split over its ranks) and its share of
    a batch of ``2 * BATCH`` per two groups; one DDP step over all the ranks."""
    from pylops_mpi import MPIVStack
    from torch.nn.parallel import DistributedDataParallel

    from invops.operators_mpi import operator_groups

    group = operator_groups(ranks_per_operator)
    k, mine = group.comm.Get_size(), group.comm.Get_rank()
    mats = shot_matrices()
    J = MPIVStack([pylops.MatrixMult(mats[i]) for i in rank_shots(mine, k)], base_comm=group.comm)
    loop = make_loop()
    x = chunk(loop_inputs(BATCH * group.n_replicas), group.replica, group.n_replicas)
    return train_step(loop, J, x, data_rows(mine, k), DistributedDataParallel(loop))


def main() -> None:
    from mpi4py import MPI
    from pylops_mpi import MPIVStack
    from torch.nn.parallel import DistributedDataParallel

    from invops.operators_mpi import dottest, init_torch_distributed, mpi_operator

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--groups-of", type=int, default=0, help="only the operator-groups DDP step, groups of N"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if args.groups_of:
        init_torch_distributed("gloo")
        result = {"ddp_groups": groups_step(args.groups_of)}
        torch.distributed.destroy_process_group()
        torch.save(result, args.out / f"rank{rank}.pt")
        return
    mats = shot_matrices()
    J = MPIVStack([pylops.MatrixMult(mats[i]) for i in rank_shots(rank, size)])
    rows = data_rows(rank, size)
    result: dict = {"loop": run_loop(J, rows)}
    # pylops-mpi's own route, one sample at a time (the default batches a plain MPIVStack)
    result["loop_per_sample"] = run_loop(mpi_operator(J, model_shape=(N, N), batched=False), rows)
    composition = run_composition(J, rows)
    composition["distributed_dottest"] = dottest(
        composition.pop("_jacobian_operator"), comm, rtol=1e-10
    )
    result["composition"] = composition
    result["errors"] = _errors(comm, J, rows)

    # DDP over the same ranks, the same batch on every rank (the operator needs every rank)
    init_torch_distributed("gloo")
    loop = make_loop()
    x = loop_inputs()
    result["ddp_same_batch"] = train_step(loop, J, x, rows, DistributedDataParallel(loop))
    result["ddp_groups"] = groups_step(1)
    torch.distributed.destroy_process_group()

    # the example, at a reduced size, in the same launch (one start-up for the whole module)
    spec = importlib.util.spec_from_file_location("irim_multishot", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    small = ["--size", "16", "--shots", "4", "--steps", "3", "--train", "12", "--test", "2"]
    result["example"] = example.main([*small, "--out", str(args.out / "irim_multishot.png")])
    torch.save(result, args.out / f"rank{rank}.pt")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
