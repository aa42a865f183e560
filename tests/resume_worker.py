"""Training run for ``test_checkpoint.py``: a few steps of a Glow with Adam and a scheduler.

Every step draws its batch from torch's global generator and adds noise from numpy's and Python's
global generators, so a resumed run only matches if all three are restored. ``--save`` writes a
checkpoint after the run, ``--resume`` starts from one; the final state goes to ``--out``.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
import torch

import invops
from invops.checkpoint import load_checkpoint, save_checkpoint


def build():
    """Model, optimiser and scheduler, freshly constructed (as a new process would)."""
    model = invops.NetworkGlow(2, 8, L=2, K=2, split_scales=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler


def train_step(model, optimizer, scheduler) -> float:
    x = torch.randn(4, 2, 8, 8)
    x = x + torch.from_numpy(np.random.standard_normal(x.shape).astype(np.float32))  # noqa: NPY002
    x = x * random.uniform(0.5, 1.5)
    z, logdet = model(x)
    loss = (0.5 * z.square().flatten(1).sum(1) - logdet).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.item()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--save", type=Path)
    parser.add_argument("--resume", type=Path)
    parser.add_argument("--no-rng", action="store_true", help="resume without restoring RNGs")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    np.random.seed(0)  # noqa: NPY002
    random.seed(0)
    model, optimizer, scheduler = build()
    step = 0
    if args.resume:
        step = load_checkpoint(
            args.resume, model, optimizer, scheduler=scheduler, restore_rng=not args.no_rng
        )["step"]
    losses = [train_step(model, optimizer, scheduler) for _ in range(args.steps)]
    step += args.steps
    if args.save:
        save_checkpoint(args.save, model, optimizer, scheduler=scheduler, step=step)
    torch.save(
        {
            "step": step,
            "losses": losses,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
