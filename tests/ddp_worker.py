"""One process of the data-parallel test in ``test_distributed.py`` (run by ``torchrun``).

Each process takes its share of a global batch and computes the gradient of its mean loss twice:
through ``DistributedDataParallel`` and ``loss.backward()``, and through the explicit reverse
API followed by :func:`invops.distributed.all_reduce_gradients`. Both, and the parameters after
the (synchronised) ActNorm initialisation, are written to ``<out>/<case>_rank<r>.pt`` for the
test to compare with one process on the whole batch.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pylops
import torch
from torch import distributed
from torch.nn.parallel import DistributedDataParallel

import invops
from invops.distributed import all_reduce_gradients

F64 = torch.float64
GLOBAL_BATCH = 4
N = 8  # model side of the i-RIM case


def _randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Move the parameters off their initial values (zero-initialised conditioners would make
    most gradients vanish), identically in every process."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def _glow_case():
    torch.manual_seed(0)
    model = _randomized(invops.NetworkGlow(3, 4, L=2, K=2, split_scales=True).to(F64))
    x = torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=F64)
    return model, (x,), ()


def _loop_case():
    torch.manual_seed(0)
    model = _randomized(invops.NetworkLoop(3, 4, maxiter=3, link="softplus").to(F64))
    gen = torch.Generator().manual_seed(2)
    matrix = np.random.default_rng(3).standard_normal((20, N * N)) / N
    J = invops.operators.as_operator(pylops.MatrixMult(matrix), model_shape=(N, N))
    eta = torch.randn(GLOBAL_BATCH, 1, N, N, generator=gen, dtype=F64)
    s = torch.randn(GLOBAL_BATCH, 2, N, N, generator=gen, dtype=F64)
    d = torch.randn(GLOBAL_BATCH, 20, generator=gen, dtype=F64)
    return model, (eta, s, d), (J,)


CASES = {"glow": _glow_case, "loop": _loop_case}


def mean_loss(case: str, outputs) -> torch.Tensor:
    """The per-sample loss averaged over the batch: Glow's NLL, a data misfit for the loop."""
    if case == "glow":
        z, logdet = outputs
        return (0.5 * z.square().flatten(1).sum(1) - logdet).mean()
    eta, s = outputs
    return (eta.square().flatten(1).sum(1) + 0.1 * s.square().flatten(1).sum(1)).mean()


def explicit_gradients(case: str, model, batch, constants) -> None:
    """Gradient of the mean loss through the explicit reverse API (accumulated into p.grad)."""
    with torch.no_grad():
        outputs = model(*batch, *constants)
    size = batch[0].shape[0]
    if case == "glow":
        z, _ = outputs
        model.backward(z / size, z, dlogdet=torch.full((size,), -1.0 / size, dtype=F64))
    else:
        eta, s = outputs
        model.backward(2 * eta / size, 0.2 * s / size, eta, s, batch[2], *constants)


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    distributed.init_process_group("gloo")
    rank, world = distributed.get_rank(), distributed.get_world_size()
    torch.set_num_threads(1)
    for case, make in CASES.items():
        model, batch, constants = make()
        local = tuple(t.chunk(world)[rank] for t in batch)
        ddp = DistributedDataParallel(model)
        mean_loss(case, ddp(*local, *constants)).backward()
        through_ddp = _grads(model)
        params = [p.detach().clone() for p in model.parameters()]

        model, batch, constants = make()
        local = tuple(t.chunk(world)[rank] for t in batch)
        explicit_gradients(case, model, local, constants)
        all_reduce_gradients(model)
        torch.save(
            {"ddp": through_ddp, "explicit": _grads(model), "params": params},
            args.out / f"{case}_rank{rank}.pt",
        )
    distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
