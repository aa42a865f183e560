"""
Weakly supervised segmentation by projection onto convex sets
=============================================================

The network output is pushed into the intersection of point annotations and a class-fraction
prior (:class:`invops.Intersection` of :class:`invops.PointAnnotations` and
:class:`invops.FractionBounds`), training on the squared distance to the set, once through the
explicit reverse API and once through ``loss.backward()``. The full-size result, as committed to
the repository:

.. image:: /images/weak_supervision.png
   :alt: Weakly supervised aquifer mapping, full size
"""

# %%
# Run ``examples/weak_supervision.py`` at a reduced size, with ``sys.argv`` set as on the
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
out = Path(tempfile.mkdtemp()) / "weak_supervision.png"
args = "--steps 2 --train 2 --test 1 --height 16 --width-px 32 --points 5 --width 0.5".split()
sys.argv = ["weak_supervision.py", *args, "--out", str(out)]
runpy.run_path(str(ROOT / "examples" / "weak_supervision.py"), run_name="__main__")

# %%
# The figure of this reduced run.
image = plt.imread(out)
fig, ax = plt.subplots(figsize=(image.shape[1] / 100, image.shape[0] / 100), dpi=100)
ax.imshow(image)
ax.set_axis_off()
fig.subplots_adjust(0, 0, 1, 1)
plt.show()
