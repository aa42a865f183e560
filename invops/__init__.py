"""invops: memory-efficient invertible networks as nonlinear operators for inverse problems.

invops is a library of invertible neural networks and normalizing flows (Glow, HINT, RealNVP,
neural spline flows, hyperbolic and RevNet networks, the invertible U-Net, the invertible
recurrent inference machine i-RIM) written in torch as *nonlinear operators* in the PyLops
sense. Every layer and network can be applied, inverted, differentiated in reverse mode without
stored activations (a layer's input is recomputed from its output by inversion, so the memory of
a training step does not grow with depth), differentiated in forward mode, and linearized into a
``pylops.LinearOperator`` (its Jacobian) that passes dot-product tests and works in PyLops
solvers. i-RIM networks call physics operators (PyLops, scipy, matrices, torch callables) inside
every unrolled iteration. Inputs and outputs may be torch tensors, numpy arrays or cupy arrays;
the layout is batch first, ``(B, C)``, ``(B, C, L)``, ``(B, C, H, W)`` or ``(B, C, D, H, W)``.

The operator contract
---------------------
Every layer and network is an :class:`InvertibleModule` (a ``torch.nn.Module``):

=============================================  ==============================================
method                                         returns
=============================================  ==============================================
``forward(x, *cond)`` / ``module(x)``          ``y, logdet`` (``logdet`` per sample, ``(B,)``)
``inverse(y, *cond)``                          ``x, logdet_inv`` with ``logdet_inv = -logdet``
``backward(dy, y, *cond, dlogdet=None)``       ``dx, x``: reverse mode from the output,
                                               accumulating ``p.grad``
``backward_inverse(dx, x, *cond)``             ``dy, y``: reverse mode through the inverse
``vjp(dy, y, *cond, dlogdet=None)``            ``dx, dtheta, x``: parameter cotangents returned
``jvp(x, *cond, dx=None, dtheta=None)``        ``y, dy, logdet, dlogdet``: forward mode
``jacobian(x, *cond, wrt="input")``            a ``pylops.LinearOperator`` (``"params"``,
                                               ``"both"`` for the parameters)
``reverse()``                                  the inverse map, sharing the parameters
=============================================  ==============================================

Under grad mode ``module(x)`` goes through a memory-free ``torch.autograd.Function``, so
``loss.backward()`` and every ``torch.optim`` optimizer work unchanged;
:func:`plain_autograd` runs the same math through ordinary autograd (the reference).

Where to start
--------------
- Layers: :class:`ActNorm`, :class:`Conv1x1`, :class:`CouplingLayerGlow`,
  :class:`CouplingLayerHINT`, :class:`CouplingLayerSpline`, ... composed with :class:`Chain`.
- Networks: :class:`NetworkGlow`, :class:`NetworkMultiScaleHINT`,
  :class:`NetworkConditionalGlow`, :class:`NetworkConditionalHINT`, :class:`NetworkLoop`
  (i-RIM), :class:`NetworkUNet`, :class:`NetworkHyperbolic`, :class:`NetworkRevNet`.
- Physics operators and their algebra: :func:`invops.operators.as_operator`,
  :class:`NonlinearOperator`, :mod:`invops.solvers` (Gauss-Newton, L-BFGS).
- Objectives and constraints: :func:`flow_nll`, :func:`gaussian_nll`, :class:`Intersection`.
- Checking your own layers: :mod:`invops.testing` (``check_against_autograd``, ``dottest``,
  ``gradient_test``, ``check_invertible``, ``check_logdet``).
- Training at scale: :mod:`invops.distributed`, :mod:`invops.checkpoint`.

The user guide, the API reference and the gallery of examples are in the repository's ``docs/``
folder (``make docs`` builds them to ``docs/_build/html``).

Examples
--------
>>> import torch, invops
>>> flow = invops.Chain(invops.HaarSqueeze(), invops.ActNorm(4), invops.CouplingLayerGlow(4, 16))
>>> x = torch.randn(8, 1, 16, 16)
>>> y, logdet = flow(x)
>>> y.shape, logdet.shape
(torch.Size([8, 4, 8, 8]), torch.Size([8]))
>>> x_rec, _ = flow.inverse(y)
>>> bool(torch.allclose(x_rec, x, atol=1e-5))
True
>>> flow.jacobian(x[:1]).shape      # a pylops.LinearOperator on the flattened sample
(256, 256)
"""

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

from . import (
    checkpoint,
    distributed,
    nonlinear,
    operators,
    operators_mpi,
    physics,
    solvers,
    testing,
)
from ._reconstruction import set_reconstruction_check
from .activations import (
    ExpClamp,
    GaLU,
    LeakyReLU,
    ReLU,
    Sigmoid,
    Sigmoid2,
    exp_clamp,
    exp_clamp_derivative,
    exp_clamp_inv,
    galu,
    leaky_relu,
    leaky_relu_derivative,
    leaky_relu_inv,
    relu,
    relu_derivative,
    sigmoid,
    sigmoid_derivative,
    sigmoid_inv,
)
from .constraints import (
    Box,
    ConvexSet,
    DykstraInfo,
    FractionBounds,
    Intersection,
    PointAnnotations,
    distance_squared,
    distance_squared_grad,
)
from .jacobian import JacobianOperator
from .layers import (
    ActNorm,
    Additive,
    AdditiveCoupling,
    Affine,
    AffineLayer,
    ConditionalLayerGlow,
    ConditionalLayerHINT,
    ConditionalResidualBlock,
    Conv1x1,
    Conv1x1LU,
    Coupling,
    CouplingLaw,
    CouplingLayerBasic,
    CouplingLayerGlow,
    CouplingLayerHINT,
    CouplingLayerIRIM,
    CouplingLayerSpline,
    HyperbolicLayer,
    MLPBlock,
    Negate,
    ResidualBlock,
    Spline,
    SubnetFactory,
    TorchBlock,
)
from .module import (
    Block,
    Chain,
    Identity,
    InvertibleModule,
    Parallel,
    Reversed,
    is_plain_autograd,
    plain_autograd,
)
from .networks import (
    NetworkConditionalGlow,
    NetworkConditionalHINT,
    NetworkGlow,
    NetworkHyperbolic,
    NetworkLoop,
    NetworkMultiScaleConditionalHINT,
    NetworkMultiScaleHINT,
    NetworkRevNet,
    NetworkUNet,
    SummarizedNet,
)
from .nonlinear import NonlinearOperator
from .objectives import (
    flow_nll,
    flow_nll_grad,
    gaussian_nll,
    gaussian_nll_grad,
    huber,
    huber_grad,
    mse,
    mse_grad,
)
from .squeeze import HaarSqueeze, Squeeze, cat, split

try:
    __version__ = _version("invops")
except _PackageNotFoundError:  # a source checkout on PYTHONPATH, not installed
    __version__ = "0+unknown"

__all__ = [
    "Box",
    "ConvexSet",
    "DykstraInfo",
    "FractionBounds",
    "Intersection",
    "PointAnnotations",
    "distance_squared",
    "distance_squared_grad",
    "ActNorm",
    "Additive",
    "AdditiveCoupling",
    "Affine",
    "AffineLayer",
    "Block",
    "Chain",
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
    "ExpClamp",
    "GaLU",
    "HaarSqueeze",
    "HyperbolicLayer",
    "Identity",
    "InvertibleModule",
    "JacobianOperator",
    "LeakyReLU",
    "MLPBlock",
    "Negate",
    "NetworkConditionalGlow",
    "NetworkConditionalHINT",
    "NetworkGlow",
    "NetworkHyperbolic",
    "NetworkLoop",
    "NetworkMultiScaleConditionalHINT",
    "NetworkMultiScaleHINT",
    "NetworkRevNet",
    "NetworkUNet",
    "NonlinearOperator",
    "Parallel",
    "ReLU",
    "ResidualBlock",
    "Reversed",
    "Sigmoid",
    "Sigmoid2",
    "Spline",
    "Squeeze",
    "SubnetFactory",
    "SummarizedNet",
    "TorchBlock",
    "cat",
    "exp_clamp",
    "exp_clamp_derivative",
    "exp_clamp_inv",
    "flow_nll",
    "flow_nll_grad",
    "galu",
    "gaussian_nll",
    "gaussian_nll_grad",
    "huber",
    "huber_grad",
    "is_plain_autograd",
    "leaky_relu",
    "leaky_relu_derivative",
    "leaky_relu_inv",
    "mse",
    "mse_grad",
    "checkpoint",
    "distributed",
    "nonlinear",
    "operators",
    "operators_mpi",
    "physics",
    "plain_autograd",
    "relu",
    "relu_derivative",
    "set_reconstruction_check",
    "sigmoid",
    "sigmoid_derivative",
    "sigmoid_inv",
    "solvers",
    "split",
    "testing",
]
