"""Import deepinv, the optional peer of ``unrolled_vs_deepinv.py``, or ``None`` without it.

deepinv imports torchvision, whose compiled operators (``torchvision::nms``) are absent when
torchvision is installed without its matching torch build (``pip install --no-deps``, as the
Makefile's ``bench-deps`` does so that torch stays as pinned). deepinv uses none of them, so
registering their two schemas is enough for the import to succeed.
"""

from __future__ import annotations

import importlib.util
from types import ModuleType

DEEPINV_INSTALL = (
    "pip install --no-deps deepinv==0.5.0 torchvision==0.28.0 torchmetrics einops natsort h5py"
)

_LIBRARY = None  # the registered schemas live as long as this reference


def import_deepinv() -> ModuleType | None:
    """The ``deepinv`` module, or ``None`` when deepinv or torchvision is not installed."""
    global _LIBRARY
    if any(importlib.util.find_spec(name) is None for name in ("deepinv", "torchvision")):
        return None
    import torch

    if _LIBRARY is None:
        try:
            lib = torch.library.Library("torchvision", "DEF")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _LIBRARY = lib
        except RuntimeError:  # already defined (torchvision's own build, or another importer)
            pass
    try:
        import deepinv
    except ImportError:
        return None
    return deepinv
