r"""The multiscale skeleton every multiscale network is built on.

A multiscale network is a recursion over scales. Scale :math:`i` squeezes its lanes (channels
:math:`\times 2^d`, spatial sizes halved), applies its steps, hands the first ``ceil(c/2)``
channels of each lane to scale :math:`i+1` (``split_scales``; all of them otherwise) and
unsqueezes, so every latent keeps its input's shape and the inverse needs nothing stored by an
earlier forward. :func:`build_scales` is that recursion for any number of lanes; the networks
differ only in their steps and in how a scale assembles its steps and the deeper scale
(:func:`lane_level` for one lane; :class:`~invops.networks.conditional_hint.TwoLane` for the
conditional HINT networks' two lanes). :class:`ScaleSkeleton` is the shared tail: attributes,
input checks and ``extra_repr``; :class:`MultiscaleFlow` the one-lane networks' base.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch

from ..layers.subnets import Subnet, subnet_factory
from ..module import Chain, Identity, InvertibleModule, Parallel
from ..squeeze import HaarSqueeze, Squeeze

__all__ = [
    "MultiscaleFlow",
    "ScaleSkeleton",
    "build_scales",
    "check_multiscale_input",
    "check_scale_args",
    "lane_level",
    "sample_flow",
    "sample_conditional",
    "squeezer",
]

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


def build_scales(
    channels: Sequence[int],
    n_levels: int,
    ndim: int,
    squeeze: str | None,
    split: bool,
    steps: Callable[[tuple[int, ...], int], Any],
    assemble: Callable[[Any, Any, tuple[int, ...]], InvertibleModule],
    owner: str,
    needs: str = "couplings need",
) -> InvertibleModule:
    """The scale recursion for lanes of ``channels`` (one entry per lane).

    Scale ``i`` gets its lanes' channels after its squeeze (``squeeze`` None: no squeeze),
    builds its steps with ``steps(channels, i)``, then the deeper scale on the first
    ``ceil(c/2)`` channels of each lane (``split``) or all of them, and returns
    ``assemble(its_steps, deeper_or_None, channels)``. Steps are built before the deeper scale,
    so parameters are created from the outside in. A scale left with fewer than 2 channels in
    a lane raises ``ValueError`` naming ``owner``.
    """
    factor = 2**ndim if squeeze is not None else 1

    def level(chs: tuple[int, ...], i: int) -> InvertibleModule:
        chs = tuple(c * factor for c in chs)
        if min(chs) < 2:
            raise ValueError(
                f"{owner}: scale {i} would have {' and '.join(map(str, chs))} channel(s); "
                f"{needs} 2 (use fewer scales or split_scales=False)"
            )
        made = steps(chs, i)
        deeper = None
        if i + 1 < n_levels:
            deeper = level(tuple((c + 1) // 2 for c in chs) if split else chs, i + 1)
        return assemble(made, deeper, chs)

    return level(tuple(channels), 0)


def lane_level(
    steps: Sequence[InvertibleModule],
    deeper: InvertibleModule | None,
    channels: int,
    squeeze: str | None,
    split: bool,
    logdet: bool = True,
) -> Chain:
    r"""One scale of one lane: :math:`U \circ (\ell_{i+1} \,\|\, \mathrm{Id}) \circ S_i \circ Q`.

    :math:`Q` is the squeeze (none when ``squeeze`` is None), :math:`S_i` the steps,
    :math:`\ell_{i+1} \| \mathrm{Id}` the deeper scale on the first ``ceil(c/2)`` channels with
    the rest factored out unchanged (``split``; the deeper scale on every channel otherwise),
    and :math:`U = Q^{-1}`.
    """
    layers: list[InvertibleModule] = [] if squeeze is None else [squeezer(squeeze)]
    layers += list(steps)
    if deeper is not None:
        if split:
            keep = (channels + 1) // 2
            layers.append(Parallel(deeper, Identity(), sizes=(keep, channels - keep)))
        else:
            layers.append(deeper)
    if squeeze is not None:
        layers.append(squeezer(squeeze).reverse())
    return Chain(*layers, logdet=logdet)


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


def _reference(net: torch.nn.Module) -> torch.Tensor:
    return next(net.parameters())


def sample_flow(net: InvertibleModule, n: int, shape: Sequence[int] | None) -> torch.Tensor:
    """``n`` samples ``inverse(z)`` of a flow whose latent ``z ~ N(0, I)`` has shape ``shape``."""
    if shape is None:
        raise ValueError(f"{type(net).__name__}.sample: give shape=(C, *spatial) or sample_shape")
    ref = _reference(net)
    z = torch.randn(n, *shape, dtype=ref.dtype, device=ref.device)
    with torch.no_grad():
        out = net.inverse(z)
    return out[0] if net.logdet else out


def sample_conditional(
    net: InvertibleModule, c: torch.Tensor, n: int, shape: Sequence[int]
) -> torch.Tensor:
    """``n`` draws ``inverse(z, c)`` per condition of the batch ``c``: ``(n, B, *shape)``."""
    ref = _reference(net)
    with torch.no_grad():
        draws = [
            net.inverse(torch.randn(c.shape[0], *shape, dtype=ref.dtype, device=ref.device), c)
            for _ in range(n)
        ]
    return torch.stack([d[0] if net.logdet else d for d in draws])


class ScaleSkeleton:
    """The tail shared by the multiscale networks: attributes, input checks, ``extra_repr``.

    Subclasses call :meth:`_record` after building, and may override :meth:`_check_condition`.
    Error messages name ``type(self).__name__``.
    """

    n_in: int
    L: int
    K: int
    ndim: int
    split_scales: bool
    squeeze: str | None

    def _record(
        self,
        n_in: int,
        L: int,
        K: int,
        ndim: int,
        squeeze: str | None,
        split_scales: bool,
        sample_shape: Sequence[int] | None = None,
    ) -> None:
        self.n_in, self.L, self.K, self.ndim = n_in, L, K, ndim
        self.split_scales, self.squeeze = split_scales, squeeze
        self.sample_shape = None if sample_shape is None else tuple(sample_shape)

    def extra_repr(self) -> str:
        return (
            f"n_in={self.n_in}, L={self.L}, K={self.K}, split_scales={self.split_scales}, "
            f"ndim={self.ndim}, squeeze={self.squeeze!r}"
        )

    _names = {False: "x", True: "z"}  # what the input is called in each direction

    def _validate(self, x, cond, inverse):
        n_squeezes = self.L if self.squeeze is not None and self.ndim > 0 else 0
        check_multiscale_input(
            x, self.n_in, n_squeezes, self.ndim, type(self).__name__, self._names[inverse]
        )
        self._check_condition(x, cond)

    def _check_condition(self, x: torch.Tensor, cond: tuple) -> None:
        """Raise ``ValueError`` if a condition does not fit ``x`` (none by default)."""


class MultiscaleFlow(ScaleSkeleton, Chain):
    r"""A one-lane multiscale flow: ``L`` scales of ``K`` steps from a step factory.

    Subclasses pass ``step(channels, level, subnet) -> list of modules``, one step of a scale on
    ``channels`` channels built with the conditioner factory ``subnet`` (the user's, or the
    :class:`~invops.SubnetFactory` made from ``n_hidden``, ``conv_defaults`` and
    ``subnet_options``); each scale has ``K`` of them. See the module docstring for the
    structure. The latent has the input's shape.
    """

    def __init__(
        self,
        n_in: int,
        L: int,
        K: int,
        step: Callable[[int, int, Subnet], list[InvertibleModule]],
        *,
        split_scales: bool,
        ndim: int,
        squeeze: str,
        logdet: bool,
        n_hidden: int,
        subnet: Subnet | None,
        conv_defaults: dict[str, int],
        subnet_options: dict[str, Any],
        sample_shape: Sequence[int] | None = None,
        needs: str = "couplings need",
    ) -> None:
        owner = type(self).__name__
        check_scale_args(owner, L, K, ndim)
        factory = subnet_factory(subnet, owner, n_hidden, ndim, conv_defaults, subnet_options)
        squeeze_or_none = squeeze if ndim > 0 else None
        if squeeze_or_none is not None:
            squeezer(squeeze)  # an unknown name fails before any parameter is made
        top = build_scales(
            (n_in,),
            L,
            ndim,
            squeeze_or_none,
            split_scales,
            steps=lambda chs, i: [m for _ in range(K) for m in step(chs[0], i, factory)],
            assemble=lambda made, deeper, chs: lane_level(
                made, deeper, chs[0], squeeze_or_none, split_scales, logdet
            ),
            owner=owner,
            needs=needs,
        )
        super().__init__(*cast(Chain, top).layers, logdet=logdet)
        self._record(n_in, L, K, ndim, squeeze, split_scales, sample_shape)

    def sample(self, n: int, shape: Sequence[int] | None = None) -> torch.Tensor:
        """Draw ``n`` samples: ``inverse(z)`` with ``z ~ N(0, I)`` of shape ``(n, *shape)``."""
        return sample_flow(self, n, shape or self.sample_shape)
