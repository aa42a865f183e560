"""Physics operators for medical imaging: multi-coil MRI and sparse-view CT.

Each operator comes as PyLops parts (the reference, usable in PyLops solvers) and as a fast
torch equivalent (device-agnostic, batched, proven equal by the tests), with helpers to
synthesise coil sensitivities and sampling masks. Importing this package also teaches
:func:`invops.operators.per_sample` to stack per-sample MRI operators into one batched call.
"""

from .ct import TorchCT, ct_angles, ct_matrix, ct_operator
from .mri import (
    MultiCoilMRI2D,
    TorchMRI,
    cartesian_mask,
    coil_sensitivities,
    image,
    kspace,
    radial_mask,
)

__all__ = [
    "MultiCoilMRI2D",
    "TorchCT",
    "TorchMRI",
    "cartesian_mask",
    "coil_sensitivities",
    "ct_angles",
    "ct_matrix",
    "ct_operator",
    "image",
    "kspace",
    "radial_mask",
]
