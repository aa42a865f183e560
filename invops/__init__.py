"""invops: memory-efficient invertible networks as nonlinear operators for inverse problems."""

from . import testing
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
from .jacobian import JacobianOperator
from .layers import ActNorm, AffineLayer, Conv1x1
from .module import Block, Chain, InvertibleModule, Reversed, is_plain_autograd, plain_autograd
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

__version__ = "0.1.0"

__all__ = [
    "ActNorm",
    "AffineLayer",
    "Block",
    "Chain",
    "Conv1x1",
    "ExpClamp",
    "GaLU",
    "HaarSqueeze",
    "InvertibleModule",
    "JacobianOperator",
    "LeakyReLU",
    "ReLU",
    "Reversed",
    "Sigmoid",
    "Sigmoid2",
    "Squeeze",
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
    "plain_autograd",
    "relu",
    "relu_derivative",
    "sigmoid",
    "sigmoid_derivative",
    "sigmoid_inv",
    "split",
    "testing",
]
