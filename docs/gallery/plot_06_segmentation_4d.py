"""
4D change detection from sparse labels
======================================

A 3D invertible hyperbolic network (:class:`invops.NetworkHyperbolic`) with a linear
read-out detects land-use change in a time-lapse hyperspectral volume from 35 labelled pixels
per class, compared with per-pixel baselines fitted to the same points. The full-size result
(48x48 pixels, 12 bands, 100 steps), as committed to the repository:

.. image:: /images/segmentation_4d.png
   :alt: 4D change detection, full size
"""

# %%
# Run ``examples/segmentation_4d.py`` at a reduced size, with ``sys.argv`` set as on the
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
out = Path(tempfile.mkdtemp()) / "segmentation_4d.png"
args = "--size 12 --bands 4 --steps 2 --points 5 --hidden 4 --depth 3 --threads 1".split()
sys.argv = ["segmentation_4d.py", *args, "--out", str(out)]
runpy.run_path(str(ROOT / "examples" / "segmentation_4d.py"), run_name="__main__")

# %%
# The figure of this reduced run.
image = plt.imread(out)
fig, ax = plt.subplots(figsize=(image.shape[1] / 100, image.shape[0] / 100), dpi=100)
ax.imshow(image)
ax.set_axis_off()
fig.subplots_adjust(0, 0, 1, 1)
plt.show()
