"""Invertible layers and coupling sub-networks, one file per family."""

from .actnorm import ActNorm
from .affine import AffineLayer
from .blocks import ConditionalResidualBlock, MLPBlock, ResidualBlock, TorchBlock
from .conditional import ConditionalLayerGlow, ConditionalLayerHINT
from .conv1x1 import Conv1x1
from .conv1x1_lu import Conv1x1LU
from .coupling import Coupling, bounded_scale
from .coupling_additive import AdditiveCoupling
from .coupling_basic import CouplingLayerBasic
from .coupling_glow import CouplingLayerGlow
from .coupling_hint import CouplingLayerHINT
from .coupling_irim import CouplingLayerIRIM
from .hyperbolic import HyperbolicLayer

__all__ = [
    "ActNorm",
    "AdditiveCoupling",
    "AffineLayer",
    "ConditionalLayerGlow",
    "ConditionalLayerHINT",
    "ConditionalResidualBlock",
    "Conv1x1",
    "Conv1x1LU",
    "Coupling",
    "CouplingLayerBasic",
    "CouplingLayerGlow",
    "CouplingLayerHINT",
    "CouplingLayerIRIM",
    "HyperbolicLayer",
    "MLPBlock",
    "ResidualBlock",
    "TorchBlock",
    "bounded_scale",
]
