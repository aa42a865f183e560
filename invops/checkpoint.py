r"""Save and resume training runs so that the continuation is bit-identical.

A checkpoint holds everything a training step reads: the model's ``state_dict`` (which includes
ActNorm's ``initialized`` flags, so a resumed model is not re-initialised from a new batch), the
optimiser's and learning-rate scheduler's states, the step counter, and the states of the global
random number generators (torch on the CPU and every CUDA device, numpy's global generator,
Python's ``random``). With the same code, threads and data order, training ``n`` steps, saving,
loading into freshly built objects and training ``m`` more gives the same bits as ``n + m``
steps in one go (on the CPU; CUDA kernels are bit-reproducible only in deterministic mode).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["load_checkpoint", "save_checkpoint"]

_FORMAT = "invops-checkpoint-1"


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a (Distributed)DataParallel wrapper, so checkpoints load either way."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _rng_states() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 - global state
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        # numpy's key array as a tensor, so the file loads with ``weights_only=True``
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "python": random.getstate(),
    }


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    random.setstate(states["python"])


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    scheduler: Any = None,
    step: int = 0,
    extra: dict[str, Any] | None = None,
) -> None:
    r"""Write a training checkpoint to ``path``, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Destination file. It is written to a temporary file next to it and then renamed, so an
        interrupted save never leaves a truncated checkpoint behind.
    model : torch.nn.Module
        The model; a ``DistributedDataParallel`` wrapper is unwrapped.
    optimizer : torch.optim.Optimizer, optional
        The optimiser, whose state (e.g. Adam's moments and step counts) is saved.
    scheduler : optional
        A learning-rate scheduler (anything with ``state_dict``/``load_state_dict``).
    step : int
        The number of training steps done, returned by :func:`load_checkpoint`.
    extra : dict, optional
        Anything else to keep (tensors, numbers, strings, lists and dicts of them), for
        example the state of your own ``torch.Generator`` (``gen.get_state()``).

    Notes
    -----
    The random number generator states saved are those of the calling process. In
    data-parallel training, save on one process (usually rank 0) after the optimiser step; if
    the processes draw different random numbers, save one checkpoint per rank.

    Examples
    --------
    >>> import tempfile, os, torch, invops
    >>> net = invops.ActNorm(2)
    >>> _ = net(torch.randn(8, 2))
    >>> path = os.path.join(tempfile.mkdtemp(), "run.pt")
    >>> save_checkpoint(path, net, step=1)
    >>> fresh = invops.ActNorm(2)
    >>> load_checkpoint(path, fresh)["step"]
    1
    >>> bool(fresh.initialized) and torch.equal(fresh.bias, net.bias)
    True
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"save_checkpoint: model must be a torch.nn.Module, got {type(model)}")
    state = {
        "format": _FORMAT,
        "step": int(step),
        "model": _unwrap(model).state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "rng": _rng_states(),
        "extra": {} if extra is None else dict(extra),
    }
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    scheduler: Any = None,
    restore_rng: bool = True,
    map_location: str | torch.device | None = None,
) -> dict[str, Any]:
    r"""Restore a checkpoint written by :func:`save_checkpoint` into freshly built objects.

    Parameters
    ----------
    path : str or os.PathLike
        The checkpoint file.
    model : torch.nn.Module
        A model built as the saved one was (a ``DistributedDataParallel`` wrapper is unwrapped);
        its parameters and buffers are overwritten, strictly.
    optimizer : torch.optim.Optimizer, optional
        An optimiser over ``model``'s parameters, given the saved optimiser state.
    scheduler : optional
        A learning-rate scheduler, given the saved scheduler state.
    restore_rng : bool
        Whether to restore the global random number generators (needed for a bit-identical
        continuation when training draws random numbers: noise, sampling, dropout).
    map_location : str or torch.device, optional
        Passed to :func:`torch.load`, e.g. to resume a GPU run on the CPU.

    Returns
    -------
    dict
        ``{"step": int, "extra": dict}`` as saved.

    Notes
    -----
    The file is read with ``torch.load(weights_only=True)``: it can hold tensors and plain
    Python containers only, so loading a checkpoint cannot execute code.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"load_checkpoint: model must be a torch.nn.Module, got {type(model)}")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise ValueError(f"load_checkpoint: {os.fspath(path)!r} is not an invops checkpoint")
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler)):
        if obj is not None and state[name] is None:
            raise ValueError(f"load_checkpoint: the checkpoint holds no {name} state")
    _unwrap(model).load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        _set_rng_states(state["rng"])
    return {"step": state["step"], "extra": state["extra"]}
