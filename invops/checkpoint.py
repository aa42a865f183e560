r"""Save and resume training runs so that the continuation is bit-identical.

A checkpoint holds everything a training step reads: the model's ``state_dict`` (which includes
ActNorm's ``initialized`` flags, so a resumed model is not re-initialised from a new batch), the
optimiser's and learning-rate scheduler's states, the step counter, and the states of the global
random number generators (torch on the CPU and every CUDA device, numpy's global generator,
Python's ``random``). With the same code, threads and data order, training ``n`` steps, saving,
loading into freshly built objects and training ``m`` more gives the same bits as ``n + m``
steps in one go (on the CPU; CUDA kernels are bit-reproducible only in deterministic mode).

Checkpoints are safe to exchange and robust to damage: they load with
``torch.load(weights_only=True)`` (no code runs), whatever saves also loads (numpy scalars and
arrays and paths are converted; anything else that could not be read back is refused before a
file is written), a SHA-256 digest of the stored tensors and values is verified at load (a
corrupted file raises instead of loading different weights), and loading is all-or-nothing (a
checkpoint that does not fit the model, optimiser or scheduler leaves them untouched).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import os
import random
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

__all__ = ["load_checkpoint", "save_checkpoint"]

_FORMAT = "invops-checkpoint-2"
_FORMAT_WITHOUT_DIGEST = "invops-checkpoint-1"  # written before the integrity digest existed

# Types that torch.load(weights_only=True) reads back (checked against torch 2.13); containers
# are walked. Anything else is refused at save time rather than written and then unreadable.
_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)
_CONTAINERS = (dict, OrderedDict, list, tuple, set, torch.Size)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a (Distributed)DataParallel wrapper, so checkpoints load either way."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _rng_states() -> dict[str, Any]:
    state = np.random.get_state(legacy=True)  # noqa: NPY002 - global state
    kind, keys, pos, has_gauss, cached = cast(tuple[str, np.ndarray, int, int, float], state)
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


def _safe(obj: Any, where: str) -> Any:
    """``obj`` with numpy scalars and arrays and paths converted to types that load back.

    Numpy scalars become Python numbers, numpy arrays become tensors, paths become strings.
    Containers are rebuilt only when something inside them changed, so a ``state_dict``'s
    metadata survives. Anything that ``torch.load(weights_only=True)`` could not read back
    raises ``TypeError`` naming where it is.
    """
    if isinstance(obj, torch.Tensor) or type(obj) in _LEAVES:
        return obj
    if isinstance(obj, np.generic):
        value = obj.item()
        if type(value) not in _LEAVES:
            raise TypeError(f"save_checkpoint: {where} is a {type(obj).__name__}, {_HOW}")
        return value
    if isinstance(obj, np.ndarray):
        try:
            return torch.from_numpy(np.array(obj, copy=True))
        except TypeError:
            raise TypeError(
                f"save_checkpoint: {where} is a numpy array of dtype {obj.dtype}, {_HOW}"
            ) from None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if type(obj) in (dict, OrderedDict):
        items = [
            (_safe(k, f"a key of {where}"), _safe(v, f"{where}[{k!r}]")) for k, v in obj.items()
        ]
        if all(a is k and b is v for (a, b), (k, v) in zip(items, obj.items())):
            return obj
        return type(obj)(items)
    if type(obj) in _CONTAINERS:
        items = [_safe(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        if all(a is b for a, b in zip(items, obj)):
            return obj
        return type(obj)(items)
    raise TypeError(f"save_checkpoint: {where} is a {type(obj).__name__}, {_HOW}")


_HOW = (
    "which a checkpoint cannot hold (it loads with torch.load(weights_only=True)): store "
    "tensors, numbers, strings, bytes, None, and lists, tuples, sets and dicts of them"
)


def _digest(state: Any) -> str:
    """SHA-256 of every tensor's bytes (with dtype and shape) and every other value, in order."""
    h = hashlib.sha256()

    def feed(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach()
            h.update(f"tensor {t.dtype} {tuple(t.shape)} {t.layout};".encode())
            if t.is_quantized:
                t = t.int_repr()
            elif t.layout != torch.strided:
                t = t.to_dense()
            t = t.cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(obj, dict):
            h.update(f"{type(obj).__name__} {len(obj)};".encode())
            for key, value in obj.items():
                feed(key)
                feed(value)
        elif isinstance(obj, (list, tuple)):
            h.update(f"{type(obj).__name__} {len(obj)};".encode())
            for value in obj:
                feed(value)
        elif isinstance(obj, set):  # iteration order of strings varies between processes
            h.update(f"set {len(obj)};".encode())
            for value in sorted(obj, key=repr):
                feed(value)
        else:
            h.update(f"{type(obj).__name__} {obj!r};".encode())

    feed(state)
    return h.hexdigest()


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
        Destination file. It is written to a temporary file next to it (``path`` with
        ``.partial`` appended) and then renamed, so an interrupted save never leaves a truncated
        checkpoint behind; a save that fails removes the temporary file.
    model : torch.nn.Module
        The model; a ``DistributedDataParallel`` wrapper is unwrapped.
    optimizer : torch.optim.Optimizer, optional
        The optimiser, whose state (e.g. Adam's moments and step counts) is saved.
    scheduler : optional
        A learning-rate scheduler (anything with ``state_dict``/``load_state_dict``).
    step : int
        The number of training steps done, returned by :func:`load_checkpoint`.
    extra : dict, optional
        Anything else to keep: tensors, numbers, strings, bytes, None, and lists, tuples, sets
        and dicts of them, for example the state of your own ``torch.Generator``
        (``gen.get_state()``). Numpy scalars are stored as Python numbers, numpy arrays as
        tensors and paths as strings; anything else raises ``TypeError`` and no file is written.

    Raises
    ------
    TypeError
        If something in the checkpoint could not be loaded back (named in the message).
    OSError
        If the file cannot be written (the message names ``path``).

    Notes
    -----
    The random number generator states saved are those of the calling process. In
    data-parallel training, save on one process (usually rank 0) after the optimiser step; if
    the processes draw different random numbers, save one checkpoint per rank.

    The checkpoint holds a SHA-256 digest of everything it stores (tensor bytes, dtypes,
    shapes and every other value), which :func:`load_checkpoint` verifies.

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
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"save_checkpoint: extra must be a dict, got {type(extra).__name__}")
    state = {
        "format": _FORMAT,
        "step": int(step),
        "model": _unwrap(model).state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "rng": _rng_states(),
        "extra": {} if extra is None else dict(extra),
    }
    state = {key: _safe(value, key) for key, value in state.items()}
    state["digest"] = _digest(state)

    target = os.fspath(path)
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    if not path.parent.is_dir():
        raise FileNotFoundError(
            errno.ENOENT,
            f"save_checkpoint: cannot write the checkpoint, {os.fspath(path.parent)!r} is not "
            "an existing directory",
            target,
        )
    try:
        torch.save(state, partial)
        # what saves must load: read the file back as load_checkpoint will (tensor data is
        # memory-mapped, not read)
        try:
            torch.load(partial, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:
            raise TypeError(
                f"save_checkpoint: the checkpoint for {target!r} could not be loaded back "
                f"with torch.load(weights_only=True), so it was not written: {err}"
            ) from err
        os.replace(partial, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            partial.unlink()
        if isinstance(err, (OSError, RuntimeError)) and not isinstance(err, TypeError):
            # torch.save reports a failed write (disk full, no permission) as RuntimeError
            reason = getattr(err, "strerror", None) or str(err)
            raise OSError(
                getattr(err, "errno", None) or errno.EIO,
                f"save_checkpoint: cannot write the checkpoint ({reason})",
                target,
            ) from err
        raise


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
        ``{"step": int, "extra": dict}`` as saved (numpy values as converted at save time).

    Raises
    ------
    ValueError
        If the file is empty, truncated, corrupted (its digest does not match), not an invops
        checkpoint, or does not fit the model, optimiser or scheduler (missing or unexpected
        keys, shape mismatches, different parameter groups). The message names the file.

    Notes
    -----
    The file is read with ``torch.load(weights_only=True)``: it can hold tensors and plain
    Python containers only, so loading a checkpoint cannot execute code. Everything is checked
    before anything is changed, and a failure while restoring rolls the model, optimiser and
    scheduler back, so on any error they are as they were.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"load_checkpoint: model must be a torch.nn.Module, got {type(model)}")
    name = os.fspath(path)
    if os.path.isfile(name) and os.path.getsize(name) == 0:
        raise ValueError(f"load_checkpoint: {name!r} is empty (0 bytes), not a checkpoint")
    try:
        state = torch.load(name, map_location=map_location, weights_only=True)
    except OSError as err:
        if err.filename is not None:
            raise  # missing file, no permission: the message names the file
        raise ValueError(
            f"load_checkpoint: {name!r} cannot be read as a checkpoint (truncated, corrupted "
            f"or not a checkpoint file): {err}"
        ) from err
    except Exception as err:
        raise ValueError(
            f"load_checkpoint: {name!r} cannot be read as a checkpoint (truncated, corrupted "
            f"or not a checkpoint file): {type(err).__name__}: {err}"
        ) from err
    if not isinstance(state, dict) or state.get("format") not in (_FORMAT, _FORMAT_WITHOUT_DIGEST):
        raise ValueError(f"load_checkpoint: {name!r} is not an invops checkpoint")
    if state["format"] == _FORMAT:
        digest = state.pop("digest", None)
        if not isinstance(digest, str) or digest != _digest(state):
            raise ValueError(
                f"load_checkpoint: {name!r} failed its integrity check: the data it holds "
                "differ from what was saved (the file is corrupted)"
            )
    else:
        warnings.warn(
            f"load_checkpoint: {name!r} was written without an integrity digest, so "
            "corruption cannot be detected; save it again to add one",
            stacklevel=2,
        )
    missing = [
        key
        for key in ("step", "model", "optimizer", "scheduler", "rng", "extra")
        if key not in state
    ]
    if missing:
        raise ValueError(f"load_checkpoint: {name!r} lacks the entries {missing}")
    for label, obj in (("optimizer", optimizer), ("scheduler", scheduler)):
        if obj is not None and state[label] is None:
            raise ValueError(f"load_checkpoint: the checkpoint {name!r} holds no {label} state")

    target = _unwrap(model)
    _check_model_state(state["model"], target, name)
    if optimizer is not None:
        _check_optimizer_state(state["optimizer"], optimizer, name)

    backups: list[tuple[Any, dict[str, Any]]] = [
        (target, {k: v.detach().clone() for k, v in target.state_dict().items()})
    ]
    for obj in (optimizer, scheduler):
        if obj is not None:
            backups.append((obj, copy.deepcopy(obj.state_dict())))
    try:
        target.load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
    except BaseException as err:
        for obj, backup in backups:
            obj.load_state_dict(backup)
        if isinstance(err, Exception):
            raise ValueError(
                f"load_checkpoint: {name!r} does not fit the model, optimiser or scheduler "
                f"(nothing was changed): {err}"
            ) from err
        raise
    if restore_rng:
        _set_rng_states(state["rng"])
    return {"step": state["step"], "extra": state["extra"]}


def _listing(items: list, limit: int = 5) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _check_model_state(saved: Any, model: torch.nn.Module, name: str) -> None:
    """Raise ``ValueError`` unless ``saved`` loads strictly into ``model`` (keys and shapes)."""
    if not isinstance(saved, dict):
        raise ValueError(f"load_checkpoint: {name!r} holds no model state_dict")
    own = model.state_dict()
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    mismatched = [
        f"{k}: saved {tuple(saved[k].shape)}, model {tuple(v.shape)}"
        for k, v in own.items()
        if k in saved
        and isinstance(saved[k], torch.Tensor)
        and not torch.nn.parameter.is_lazy(v)
        and saved[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_listing(unexpected)}")
    if mismatched:
        problems.append(f"size mismatch for {_listing(mismatched)}")
    if problems:
        raise ValueError(
            f"load_checkpoint: {name!r} does not fit the model ({type(model).__name__}): "
            f"{'; '.join(problems)}. Nothing was changed"
        )


def _check_optimizer_state(saved: Any, optimizer: torch.optim.Optimizer, name: str) -> None:
    """Raise ``ValueError`` unless the saved optimiser state fits ``optimizer``'s groups."""
    if not isinstance(saved, dict) or "param_groups" not in saved or "state" not in saved:
        raise ValueError(f"load_checkpoint: {name!r} holds no optimiser state_dict")
    groups, saved_groups = optimizer.param_groups, saved["param_groups"]
    if len(groups) != len(saved_groups):
        raise ValueError(
            f"load_checkpoint: {name!r} has {len(saved_groups)} optimiser parameter group(s), "
            f"the optimiser {len(groups)}. Nothing was changed"
        )
    params: dict[Any, torch.Tensor] = {}
    for i, (group, saved_group) in enumerate(zip(groups, saved_groups)):
        if len(group["params"]) != len(saved_group["params"]):
            raise ValueError(
                f"load_checkpoint: {name!r}: optimiser parameter group {i} has "
                f"{len(saved_group['params'])} parameter(s) saved and {len(group['params'])} "
                "in the optimiser. Nothing was changed"
            )
        params.update(zip(saved_group["params"], group["params"]))
    for index, entries in saved["state"].items():
        p = params.get(index)
        if p is None or not isinstance(entries, dict):
            continue
        for key, value in entries.items():
            # per-parameter state (moments, momentum) has the parameter's shape or broadcasts
            # to it (factored states); scalars (step counts) are exempt
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                try:
                    fits = torch.broadcast_shapes(value.shape, p.shape) == p.shape
                except RuntimeError:
                    fits = False
                if not fits:
                    raise ValueError(
                        f"load_checkpoint: {name!r}: optimiser state {key!r} of parameter "
                        f"{index} has shape {tuple(value.shape)}, which does not fit the "
                        f"parameter's shape {tuple(p.shape)}. Nothing was changed"
                    )
