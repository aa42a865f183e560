"""
A first flow: a Chain of layers trained by maximum likelihood
=============================================================

``examples/demo_chain.py`` trains a :class:`invops.Chain` of Haar squeezes, ActNorm, orthogonal
1x1 convolutions, LeakyReLU and an element-wise affine layer as a normalizing flow on smooth
random fields, through the memory-free ``loss.backward()``. It prints the negative
log-likelihood before and after training, the inversion error, a dot test of the network's
Jacobian as a PyLops operator, and the agreement of memory-free and plain-autograd gradients. It
writes no figure; at full size (400 steps) it takes about ten seconds.
"""

import runpy
import sys
from pathlib import Path

try:
    ROOT = Path(__file__).resolve().parents[2]
except NameError:  # run interactively from docs/gallery
    ROOT = Path.cwd().resolve().parents[1]
sys.argv = ["demo_chain.py", "--steps", "20", "--batch", "16"]
runpy.run_path(str(ROOT / "examples" / "demo_chain.py"), run_name="__main__")
