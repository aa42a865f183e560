"""
Density estimation: Glow, HINT and a spline flow on the banana
==============================================================

Maximum-likelihood density estimation of the 2D banana distribution with dense
:class:`invops.NetworkGlow`, :class:`invops.NetworkMultiScaleHINT` and a neural spline flow
(``coupling="spline"``). The script prints the held-out negative log-likelihood of each flow next
to a fitted Gaussian and the true density, and plots data against samples of the flows.
"""

# %%
# Run ``examples/density_banana.py`` at a reduced size, with ``sys.argv`` set as on the
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
out = Path(tempfile.mkdtemp()) / "density_banana.png"
args = "--steps 30 --train 1000 --test 500 --hidden 16 --glow-k 2 --hint-k 2 --spline-k 2".split()
sys.argv = ["density_banana.py", *args, "--out", str(out)]
runpy.run_path(str(ROOT / "examples" / "density_banana.py"), run_name="__main__")

# %%
# The figure of this reduced run.
image = plt.imread(out)
fig, ax = plt.subplots(figsize=(image.shape[1] / 100, image.shape[0] / 100), dpi=100)
ax.imshow(image)
ax.set_axis_off()
fig.subplots_adjust(0, 0, 1, 1)
plt.show()
