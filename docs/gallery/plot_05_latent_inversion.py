"""
Gauss-Newton in the latent space of a Glow prior
================================================

The operator algebra at work: ``F = A @ G.reverse()`` composes the inverse of a trained Glow
prior with a PyLops operator, and :func:`invops.solvers.gauss_newton` inverts held-out data in the
flow's latent space; compared with damped LSQR and the i-RIM on the same problem.
"""

# %%
# Run ``examples/latent_inversion.py`` at a reduced size, with ``sys.argv`` set as on the
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
out = Path(tempfile.mkdtemp()) / "latent_inversion.png"
args = "--size 16 --train 200 --test 3 --batch 8 --glow-steps 15 --glow-hidden 8 --glow-K 1".split()
args += "--irim-steps 3 --lsqr-damps 0.1 --lsqr-iter 10 --gn-iter 2 --inner-iter 3".split()
sys.argv = ["latent_inversion.py", *args, "--out", str(out)]
runpy.run_path(str(ROOT / "examples" / "latent_inversion.py"), run_name="__main__")

# %%
# The figure of this reduced run.
image = plt.imread(out)
fig, ax = plt.subplots(figsize=(image.shape[1] / 100, image.shape[0] / 100), dpi=100)
ax.imshow(image)
ax.set_axis_off()
fig.subplots_adjust(0, 0, 1, 1)
plt.show()
