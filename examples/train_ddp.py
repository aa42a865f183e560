"""Data-parallel training of a multiscale Glow with ``torchrun``, with checkpoints and resume.

Each process trains on its share of every batch; gradients are averaged across processes either
by ``DistributedDataParallel`` (``loss.backward()`` through invops' memory-free bridge fires DDP's
all-reduce hooks) or, with ``--explicit``, by the explicit reverse API ``net.backward(...)``
followed by :func:`invops.distributed.all_reduce_gradients` (the explicit API accumulates into
``p.grad`` locally and communicates nothing by itself). ActNorm layers initialise from the
global first batch, so the replicas start identical.

The data are made here: 16x16 single-channel images, each a sum of three Gaussian blobs with
random centres, widths and amplitudes, plus a little noise (a dataset of ``--train`` images and a
held-out set of ``--test`` images, the same in every process). The script reports the held-out
negative log-likelihood in bits per dimension before and after training, writes a checkpoint
every ``--every`` steps and at the end, and with ``--resume`` continues a run from its
checkpoint exactly where it stopped (model, Adam state, ActNorm state, data order, RNGs).

Run (2 processes on one machine, CPU and gloo; about a minute)::

    torchrun --standalone --nproc-per-node=2 examples/train_ddp.py --steps 200
    torchrun --standalone --nproc-per-node=2 examples/train_ddp.py --steps 300 --resume

``python examples/train_ddp.py`` (without torchrun) trains in a single process. On GPUs use
``--backend nccl``: each process takes the GPU of its local rank.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch
from torch import distributed
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import invops
from invops.checkpoint import load_checkpoint, save_checkpoint
from invops.distributed import all_reduce_gradients
from invops.objectives import flow_nll

SIDE = 16


def blob_images(n: int, seed: int) -> torch.Tensor:
    """``n`` images ``(n, 1, SIDE, SIDE)``: three random Gaussian blobs each, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    grid = torch.linspace(0, 1, SIDE)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    centres = torch.rand(n, 3, 2, generator=gen)
    widths = 0.05 + 0.15 * torch.rand(n, 3, 1, 1, generator=gen)
    amplitudes = 0.5 + torch.rand(n, 3, 1, 1, generator=gen)
    dist2 = (yy - centres[..., 0, None, None]) ** 2 + (xx - centres[..., 1, None, None]) ** 2
    images = (amplitudes * torch.exp(-dist2 / (2 * widths**2))).sum(1, keepdim=True)
    return images + 0.02 * torch.randn(images.shape, generator=gen)


def bits_per_dim(net: torch.nn.Module, images: torch.Tensor) -> float:
    """Held-out NLL of continuous images, in bits per dimension."""
    with torch.no_grad():
        z, logdet = net(images)
        nll = flow_nll(z, logdet).mean().item()
    return nll / (math.log(2) * images[0].numel())


def setup() -> tuple[int, int, torch.device, bool]:
    """Rank, world size and device; a process group only when launched by torchrun."""
    launched = "RANK" in os.environ
    if not launched:
        return 0, 1, torch.device("cpu"), False
    backend = os.environ.get("INVOPS_BACKEND", "gloo")
    distributed.init_process_group(backend)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return distributed.get_rank(), distributed.get_world_size(), device, True


def explicit_step(net: invops.InvertibleModule, x: torch.Tensor) -> float:
    """The mean NLL's gradient by the explicit reverse API, then averaged across processes."""
    with torch.no_grad():
        z, logdet = net(x)
    dz, dlogdet = invops.objectives.flow_nll_grad(z, logdet)
    size = x.shape[0]
    net.backward(dz / size, z, dlogdet=dlogdet / size)
    all_reduce_gradients(net)
    return flow_nll(z, logdet).mean().item()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="total training steps")
    parser.add_argument("--batch", type=int, default=32, help="global batch (all processes)")
    parser.add_argument("--train", type=int, default=2048)
    parser.add_argument("--test", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--K", type=int, default=4, help="steps per scale (L=2 scales)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--every", type=int, default=100, help="checkpoint interval (steps)")
    parser.add_argument("--checkpoint", type=Path, default=Path("examples/output/train_ddp.pt"))
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    parser.add_argument("--explicit", action="store_true", help="explicit backward + all-reduce")
    parser.add_argument("--backend", default="gloo", help="gloo (CPU) or nccl (GPU)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    os.environ.setdefault("INVOPS_BACKEND", args.backend)
    rank, world, device, launched = setup()
    if args.batch % world:
        raise ValueError(f"--batch {args.batch} must be divisible by the {world} processes")
    torch.manual_seed(args.seed)  # the same initial weights in every process
    train, test = blob_images(args.train, seed=1), blob_images(args.test, seed=2).to(device)
    net = invops.NetworkGlow(1, args.hidden, L=2, K=args.K, split_scales=True).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    sampler = DistributedSampler(
        TensorDataset(train), num_replicas=world, rank=rank, shuffle=True, seed=args.seed
    )
    loader = DataLoader(TensorDataset(train), batch_size=args.batch // world, sampler=sampler)
    step = 0
    if args.resume:
        step = load_checkpoint(args.checkpoint, net, optimizer, map_location=device)["step"]
    before = math.nan
    if step == 0:
        sampler.set_epoch(0)
        with torch.no_grad():  # ActNorm initialises from the first (global) training batch
            net(next(iter(loader))[0].to(device))
        before = bits_per_dim(net, test)
    model = DistributedDataParallel(net) if launched and not args.explicit else net

    start, epoch, losses = time.perf_counter(), step // len(loader), []
    while step < args.steps:
        sampler.set_epoch(epoch)  # a different, reproducible shuffle per epoch
        for i, (x,) in enumerate(loader):
            if epoch * len(loader) + i < step:
                continue  # batches already used before a resume
            x = x.to(device)
            optimizer.zero_grad()
            if args.explicit:
                losses.append(explicit_step(net, x))
            else:
                z, logdet = model(x)
                loss = flow_nll(z, logdet).mean()
                loss.backward()
                losses.append(loss.item())
            optimizer.step()
            step += 1
            if rank == 0 and (step % args.every == 0 or step == args.steps):
                args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
                save_checkpoint(args.checkpoint, net, optimizer, step=step)
            if step == args.steps:
                break
        epoch += 1
    after = bits_per_dim(net, test)
    if rank == 0:
        print(
            f"{world} process(es), {'explicit backward' if args.explicit else 'DDP'}: "
            f"steps {step}, held-out bits/dim {before:.3f} -> {after:.3f}, "
            f"{time.perf_counter() - start:.1f} s"
        )
    if launched:
        distributed.barrier()  # the checkpoint is complete before any process leaves
        distributed.destroy_process_group()
    return {"before": before, "after": after, "last_loss": losses[-1] if losses else math.nan}


if __name__ == "__main__":
    main()
