"""Invertible layers and coupling sub-networks, one file per family."""

from .actnorm import ActNorm
from .affine import AffineLayer
from .blocks import ConditionalResidualBlock, MLPBlock, ResidualBlock, TorchBlock
from .conditional import ConditionalLayerGlow, ConditionalLayerHINT
from .conv1x1 import Conv1x1
from .conv1x1_lu import Conv1x1LU
from .coupling import Coupling
from .coupling_additive import AdditiveCoupling
from .coupling_basic import CouplingLayerBasic
from .coupling_glow import CouplingLayerGlow
from .coupling_hint import CouplingLayerHINT
from .coupling_irim import CouplingLayerIRIM
from .hyperbolic import HyperbolicLayer
from .laws import Additive, Affine, CouplingLaw, Negate, bounded_scale
from .spline import CouplingLayerSpline, Spline
from .subnets import SubnetFactory

__all__ = [
    "ActNorm",
    "Additive",
    "AdditiveCoupling",
    "Affine",
    "AffineLayer",
    "ConditionalLayerGlow",
    "ConditionalLayerHINT",
    "ConditionalResidualBlock",
    "Conv1x1",
    "Conv1x1LU",
    "Coupling",
    "CouplingLaw",
    "CouplingLayerBasic",
    "CouplingLayerGlow",
    "CouplingLayerHINT",
    "CouplingLayerIRIM",
    "CouplingLayerSpline",
    "HyperbolicLayer",
    "MLPBlock",
    "Negate",
    "ResidualBlock",
    "Spline",
    "SubnetFactory",
    "TorchBlock",
    "bounded_scale",
]
