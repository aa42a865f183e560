"""Invertible networks, one file per network."""

from .conditional_glow import NetworkConditionalGlow
from .conditional_hint import NetworkConditionalHINT
from .conditional_hint_multiscale import NetworkMultiScaleConditionalHINT
from .glow import NetworkGlow
from .hint import NetworkMultiScaleHINT
from .hyperbolic import NetworkHyperbolic
from .irim import NetworkLoop
from .revnet import NetworkRevNet
from .summarized import SummarizedNet
from .unet import NetworkUNet

__all__ = [
    "NetworkConditionalGlow",
    "NetworkConditionalHINT",
    "NetworkGlow",
    "NetworkHyperbolic",
    "NetworkLoop",
    "NetworkMultiScaleConditionalHINT",
    "NetworkMultiScaleHINT",
    "NetworkRevNet",
    "NetworkUNet",
    "SummarizedNet",
]
