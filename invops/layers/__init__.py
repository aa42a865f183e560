"""Invertible layers, one file per family."""

from .actnorm import ActNorm
from .affine import AffineLayer
from .conv1x1 import Conv1x1

__all__ = ["ActNorm", "AffineLayer", "Conv1x1"]
