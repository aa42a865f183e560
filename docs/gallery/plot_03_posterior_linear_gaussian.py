"""
Amortised posterior sampling with a conditional HINT network
============================================================

:class:`invops.NetworkConditionalHINT` learns the posterior of ``y = Ax + noise`` for a
correlated Gaussian prior, where the posterior is known in closed form; the script reports the
error of the posterior mean and covariance and the KL divergence to the exact posterior, next to
the prior and the Monte Carlo floor.
"""

# %%
# Run ``examples/posterior_linear_gaussian.py`` at a reduced size, with ``sys.argv`` set as on the
# command line; the script writes its figure to a temporary folder, shown below.
import runpy
import sys
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt

try:
    ROOT = Path(__file__).resolve().parents[2]
except NameError:  # run interactively from docs/gallery
    ROOT = Path.cwd().resolve().parents[1]
out = Path(tempfile.mkdtemp()) / "posterior_linear_gaussian.png"
args = "--steps 40 --lr 1e-2 --hidden 16 --depth 2 --obs 2 --samples 2000 --test 500".split()
sys.argv = ["posterior_linear_gaussian.py", *args, "--out", str(out)]
runpy.run_path(str(ROOT / "examples" / "posterior_linear_gaussian.py"), run_name="__main__")

# %%
# The figure of this reduced run.
image = plt.imread(out)
fig, ax = plt.subplots(figsize=(image.shape[1] / 100, image.shape[0] / 100), dpi=100)
ax.imshow(image)
ax.set_axis_off()
fig.subplots_adjust(0, 0, 1, 1)
plt.show()
