"""
Data-parallel training with torchrun (not run here)
===================================================

``examples/train_ddp.py`` trains a two-scale Glow on blob images with
``torch.nn.parallel.DistributedDataParallel``, with checkpoints every 100 steps and
``--resume``; ``--explicit`` uses the explicit reverse API with
:func:`invops.distributed.all_reduce_gradients` instead of ``loss.backward()``. It needs several
processes, so the documentation build does not run it; the test suite does (two gloo processes,
bit-identical resume). Run it with::

    torchrun --standalone --nproc-per-node=2 examples/train_ddp.py

What the script does, in short (see the file for the whole of it):
"""

import torch
from torch.nn.parallel import DistributedDataParallel

import invops
from invops.checkpoint import save_checkpoint


def train_step(model: DistributedDataParallel, batch: torch.Tensor, opt) -> float:
    """One step: the memory-free bridge fires DDP's all-reduce hooks like any torch model."""
    z, logdet = model(batch)
    loss = invops.flow_nll(z, logdet).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def checkpoint(path, model: DistributedDataParallel, opt, step: int) -> None:
    """Model (with ActNorm's initialisation state), optimiser, step and RNG states, atomically."""
    save_checkpoint(path, model.module, opt, step=step)
