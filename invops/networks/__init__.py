"""Invertible networks, one file per network."""

from .glow import NetworkGlow
from .hint import NetworkMultiScaleHINT
from .hyperbolic import NetworkHyperbolic
from .irim import NetworkLoop
from .revnet import NetworkRevNet
from .unet import NetworkUNet

__all__ = [
    "NetworkGlow",
    "NetworkHyperbolic",
    "NetworkLoop",
    "NetworkMultiScaleHINT",
    "NetworkRevNet",
    "NetworkUNet",
]
