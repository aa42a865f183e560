"""Conversions between torch tensors, numpy arrays and cupy arrays.

Every public method of invops accepts any of the three array kinds and returns the kind it was
given. Compute always happens in torch; the conversions go through DLPack so that no copy is made
where the memory can be shared (numpy <-> CPU tensor, cupy <-> CUDA tensor on the same device).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["array_kind", "to_torch", "from_torch", "torch_to_numpy_dtype"]

_KINDS = ("torch", "numpy", "cupy")


def array_kind(a: Any, name: str = "input") -> str:
    """Return ``"torch"``, ``"numpy"`` or ``"cupy"`` for an array, else raise ``TypeError``."""
    if isinstance(a, torch.Tensor):
        return "torch"
    if isinstance(a, np.ndarray):
        return "numpy"
    if type(a).__module__.split(".")[0] == "cupy" and hasattr(a, "__dlpack__"):
        return "cupy"
    raise TypeError(
        f"{name}: expected a torch.Tensor, numpy.ndarray or cupy.ndarray, got {type(a).__name__}"
    )


def _safe_numpy(a: np.ndarray) -> np.ndarray:
    # torch.from_dlpack aborts the process on negative strides (torch 2.13) and happily writes
    # into read-only memory, so both cases get a private copy. Non-native byte order and object
    # arrays cannot cross DLPack at all.
    needs_copy = (
        any(s < 0 for s in a.strides)
        or not a.flags.writeable
        or not a.flags.aligned
        or not a.dtype.isnative
    )
    return np.array(a, copy=True, order="C") if needs_copy else a


def to_torch(a: Any, device: torch.device | str | None = None, name: str = "input") -> torch.Tensor:
    """Convert an array to a torch tensor, sharing memory where possible.

    Parameters
    ----------
    a : torch.Tensor, numpy.ndarray or cupy.ndarray
        Array to convert. torch tensors are returned unchanged (no device move).
    device : torch.device or str, optional
        Target device for numpy and cupy arrays. A copy is made only when the array lives
        elsewhere.
    name : str
        Argument name used in error messages.
    """
    kind = array_kind(a, name)
    if kind == "torch":
        return a
    if kind == "numpy":
        if a.dtype == object:
            raise TypeError(f"{name}: object arrays are not supported")
        t = torch.from_dlpack(_safe_numpy(a))
    else:
        t = torch.from_dlpack(a)
    if device is not None and t.device != torch.device(device):
        t = t.to(device)
    return t


def from_torch(t: torch.Tensor, kind: str) -> Any:
    """Convert a torch tensor to ``kind`` (``"torch"``, ``"numpy"`` or ``"cupy"``)."""
    if kind == "torch":
        return t
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if kind == "numpy":
        return np.from_dlpack(t.cpu())
    if kind == "cupy":
        import cupy

        if t.device.type != "cuda":
            t = t.cuda()
        return cupy.from_dlpack(t)
    raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")


def torch_to_numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype with the same meaning as a torch dtype."""
    return np.dtype(torch.empty((), dtype=dtype).numpy().dtype)
