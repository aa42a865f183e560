"""Input checks shared by the layers.

Every failure names the argument, what was expected and what was given.
"""

from __future__ import annotations

import torch

__all__ = ["check_layout", "channel_view"]

_LAYOUTS = {2: "(B, C)", 3: "(B, C, L)", 4: "(B, C, H, W)", 5: "(B, C, D, H, W)"}


def check_layout(
    x: torch.Tensor,
    n_channels: int | None,
    name: str,
    owner: str,
    ranks: tuple[int, ...] = (2, 3, 4, 5),
) -> None:
    """Check that ``x`` is batch-first with an allowed rank and ``n_channels`` channels."""
    if x.ndim not in ranks:
        allowed = " or ".join(_LAYOUTS[r] for r in ranks)
        raise ValueError(
            f"{owner}: {name} must have layout {allowed}, got a tensor of shape {tuple(x.shape)}"
        )
    if n_channels is not None and x.shape[1] != n_channels:
        raise ValueError(
            f"{owner}: {name} must have {n_channels} channels (dimension 1), "
            f"got {x.shape[1]} (shape {tuple(x.shape)})"
        )


def channel_view(p: torch.Tensor, ndim: int) -> torch.Tensor:
    """View a per-channel vector to broadcast against a batch-first tensor of rank ``ndim``."""
    return p.reshape(1, -1, *([1] * (ndim - 2)))
