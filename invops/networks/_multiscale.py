"""The multiscale skeleton shared by Glow and HINT networks."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..module import Chain, Identity, InvertibleModule, Parallel
from ..squeeze import HaarSqueeze, Squeeze

__all__ = ["multiscale", "squeezer", "check_scale_args", "check_multiscale_input", "sample_flow"]

_SQUEEZES = ("checkerboard", "patch", "haar")


def squeezer(kind: str) -> InvertibleModule:
    """A fresh squeeze module: ``"checkerboard"``, ``"patch"`` or ``"haar"``."""
    if kind not in _SQUEEZES:
        raise ValueError(f"squeeze: expected one of {_SQUEEZES}, got {kind!r}")
    return HaarSqueeze() if kind == "haar" else Squeeze(pattern=kind)


def check_scale_args(owner: str, L: int, K: int, ndim: int) -> None:
    """Constructor checks shared by the multiscale networks."""
    if L < 1 or K < 1:
        raise ValueError(f"{owner}: L and K must be >= 1, got L={L}, K={K}")
    if ndim not in (0, 1, 2, 3):
        raise ValueError(f"{owner}: ndim must be 0, 1, 2 or 3, got {ndim}")


def multiscale(
    n_in: int,
    n_levels: int,
    steps: Callable[[int, int], list[InvertibleModule]],
    ndim: int,
    squeeze: str,
    split: bool,
    logdet: bool = True,
    owner: str = "network",
    needs: str = "couplings need",
) -> Chain:
    r"""Build ``n_levels`` scales as one invertible Chain whose output has the input's shape.

    Level :math:`i` on :math:`c` channels is

    .. math::
        \ell_i = U \circ \big(\ell_{i+1} \,\|\, \mathrm{Id}\big) \circ S_i \circ Q,

    with :math:`Q` the squeeze (``ndim > 0``; channels :math:`\times 2^{d}`), :math:`S_i` the
    level's steps (``steps(channels, i)``), :math:`\ell_{i+1}\,\|\,\mathrm{Id}` the next level on
    the first ``ceil(c'/2)`` channels with the rest factored out unchanged (``split=True``), or
    the next level on all channels (``split=False``), and :math:`U = Q^{-1}` the unsqueeze. A
    scale left with fewer than 2 channels raises ``ValueError`` naming ``owner``. The
    latent therefore has the input's shape: each level's factored-out channels sit where the
    unsqueeze puts them, and the inverse needs no shapes stored by an earlier forward.
    """

    def level(c: int, i: int) -> Chain:
        layers: list[InvertibleModule] = []
        if ndim > 0:
            layers.append(squeezer(squeeze))
            c *= 2**ndim
        if c < 2:
            raise ValueError(
                f"{owner}: scale {i} would have {c} channel(s); {needs} 2 "
                "(use fewer scales or split_scales=False)"
            )
        layers += steps(c, i)
        if i + 1 < n_levels:
            if split:
                keep = (c + 1) // 2
                layers.append(Parallel(level(keep, i + 1), Identity(), sizes=(keep, c - keep)))
            else:
                layers.append(level(c, i + 1))
        if ndim > 0:
            layers.append(squeezer(squeeze).reverse())
        return Chain(*layers, logdet=logdet)

    return level(n_in, 0)


def check_multiscale_input(
    x, n_in: int, n_levels: int, ndim: int, owner: str, name: str, label: str = "L"
) -> None:
    """Rank, channels, and spatial sizes divisible by ``2**n_levels``, with clear messages."""
    if x.ndim != ndim + 2:
        layout = "(B, C)" if ndim == 0 else f"(B, C, {', '.join('*' * ndim)})"
        raise ValueError(
            f"{owner}: {name} must have layout {layout} (ndim={ndim}), got shape {tuple(x.shape)}"
        )
    if x.shape[1] != n_in:
        raise ValueError(f"{owner}: {name} must have {n_in} channels, got shape {tuple(x.shape)}")
    factor = 2**n_levels
    if ndim > 0 and any(n % factor for n in x.shape[2:]):
        raise ValueError(
            f"{owner}: with {label}={n_levels} {'scales' if label == 'L' else 'halvings'} "
            f"every spatial size must be a multiple of "
            f"2**{label} = {factor}, got spatial shape {tuple(x.shape[2:])}"
        )


def sample_flow(net: InvertibleModule, n: int, shape: Sequence[int] | None) -> torch.Tensor:
    """``n`` samples ``inverse(z)`` of a flow whose latent ``z ~ N(0, I)`` has shape ``shape``."""
    if shape is None:
        raise ValueError(f"{type(net).__name__}.sample: give shape=(C, *spatial) or sample_shape")
    ref = next(net.parameters())
    z = torch.randn(n, *shape, dtype=ref.dtype, device=ref.device)
    with torch.no_grad():
        out = net.inverse(z)
    return out[0] if net.logdet else out
