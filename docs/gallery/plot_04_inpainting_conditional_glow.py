"""
Conditional Glow inpainting with uncertainty
============================================

:class:`invops.NetworkConditionalGlow` fills random holes in smooth random fields, conditioned
on the masked image and the mask, and draws posterior samples; the exact Gaussian posterior is
the reference for the RMSE inside the hole and for the coverage of the 95% intervals.
"""

# %%
# Run ``examples/inpainting_conditional_glow.py`` at a reduced size, with ``sys.argv`` set as on the
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
out = Path(tempfile.mkdtemp()) / "inpainting_conditional_glow.png"
args = "--steps 25 --batch 16 --K 2 --hidden 8 --test 4 --samples 8".split()
sys.argv = ["inpainting_conditional_glow.py", *args, "--out", str(out)]
runpy.run_path(str(ROOT / "examples" / "inpainting_conditional_glow.py"), run_name="__main__")

# %%
# The figure of this reduced run.
image = plt.imread(out)
fig, ax = plt.subplots(figsize=(image.shape[1] / 100, image.shape[0] / 100), dpi=100)
ax.imshow(image)
ax.set_axis_off()
fig.subplots_adjust(0, 0, 1, 1)
plt.show()
