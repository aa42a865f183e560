r"""Convex sets on network outputs, their projections, and point-to-set distances.

Weakly supervised segmentation in the style of Peters et al. (the InvertibleNetworks.jl
scenario "map aquifers from partial point labels and a prior on class fractions") does not fit
labels; it asks the network output :math:`y = g(K, d)` to lie in a convex set :math:`D` built
from what is known: the annotated points, the range of a class probability, the fraction of the
domain a class occupies. Training minimises the squared point-to-set distance

.. math::
    d_D^2(y) = \tfrac12 \|P_D(y) - y\|_2^2, \qquad \nabla_y d_D^2(y) = y - P_D(y),

over the network weights, where :math:`P_D` is the Euclidean projection onto :math:`D`. The
gradient needs only the *value* of the projection (no derivative of :math:`P_D`), so it can be
fed to an invertible network's explicit reverse pass, ``net.backward(y - P_D(y), y)``, or to
torch autograd through :func:`distance_squared`.

The sets here are closed and convex, each with an exact projection:

- :class:`Box`: :math:`l \le y \le u` elementwise (projection: clip);
- :class:`PointAnnotations`: :math:`y_i = v_i` on the annotated entries (an affine set;
  projection: overwrite them);
- :class:`FractionBounds`: :math:`a \le y \le b` elementwise and
  :math:`f_{lo} \le \operatorname{mean}(y) \le f_{hi}` over a domain (a slab intersected with a
  box; projection: a clipped shift found by an exact 1-D root search);
- :class:`Intersection`: the intersection of any of them, projected by Dykstra's algorithm.

Every ``project`` accepts a torch tensor, numpy array or cupy array and returns the same kind,
never modifying its input. Projections are values, not differentiable maps: they carry no
autograd graph.

Examples
--------
>>> import torch, invops
>>> y = torch.tensor([[-0.5, 0.2, 0.9, 1.7]], dtype=torch.float64)
>>> D = invops.Intersection(
...     invops.PointAnnotations(torch.tensor([[True, False, False, False]]), 1.0),
...     invops.FractionBounds(0.25, 0.5),       # 25-50% of the domain, 0 <= y <= 1
... )
>>> p = D.project(y)
>>> [round(v, 6) for v in p[0].tolist()]
[1.0, 0.0, 0.1, 0.9]
>>> D.contains(p)
True
>>> invops.distance_squared(y, D)               # per sample: 0.5 * ||P_D(y) - y||^2
tensor([1.7850], dtype=torch.float64)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ._arrays import array_kind, from_torch, to_torch

__all__ = [
    "ConvexSet",
    "Box",
    "PointAnnotations",
    "FractionBounds",
    "Intersection",
    "DykstraInfo",
    "distance_squared",
    "distance_squared_grad",
]


# ---------------------------------------------------------------------------- helpers
def _real_tensor(y: Any, owner: str, name: str = "y") -> tuple[str, torch.Tensor]:
    kind = array_kind(y, f"{owner}: {name}")
    t = to_torch(y, name=name)
    if not t.is_floating_point():
        raise TypeError(f"{owner}: {name} must be a real floating-point array, got dtype {t.dtype}")
    return kind, t


def _as_tensor(value: Any, like: torch.Tensor, name: str, owner: str) -> torch.Tensor:
    """A scalar or array as a tensor on ``like``'s device and dtype."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=like.dtype, device=like.device)
    array_kind(value, f"{owner}: {name}")
    return to_torch(value, name=name).to(device=like.device, dtype=like.dtype)


def _broadcast_to(t: torch.Tensor, shape: torch.Size, name: str, owner: str) -> torch.Tensor:
    try:
        if torch.broadcast_shapes(t.shape, shape) == shape:
            return t.expand(shape)
    except RuntimeError:
        pass
    raise ValueError(
        f"{owner}: {name} of shape {tuple(t.shape)} does not broadcast to the shape of y "
        f"{tuple(shape)}"
    )


def _check_array_or_scalar(value: Any, name: str, owner: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        array_kind(value, f"{owner}: {name}")  # TypeError for anything else
    if isinstance(value, (int, float)) and not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be finite, got {value}")
    return value


class ConvexSet:
    """A closed convex set with an exact Euclidean projection.

    Subclasses implement ``_project(y)`` (a torch tensor in, a new tensor out, no autograd
    graph) and ``_violation(y)`` (how far ``y`` is from satisfying the set's conditions, in the
    max norm). :meth:`project` and :meth:`contains` handle array kinds and validation.
    """

    def project(self, y: Any) -> Any:
        """The Euclidean projection of ``y`` onto the set, as the same array kind."""
        kind, t = _real_tensor(y, type(self).__name__)
        with torch.no_grad():
            return from_torch(self._project(t.detach()), kind)

    def contains(self, y: Any, atol: float = 1e-8) -> bool:
        """Whether ``y`` satisfies the set's conditions within ``atol`` (max norm)."""
        _, t = _real_tensor(y, type(self).__name__)
        with torch.no_grad():
            return bool(self._violation(t.detach()) <= atol)

    def _project(self, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _violation(self, y: torch.Tensor) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


# ---------------------------------------------------------------------------- the sets
class Box(ConvexSet):
    r"""Elementwise bounds :math:`\{y : l \le y \le u\}`.

    Parameters
    ----------
    lower, upper : float or array
        Bounds, scalars or arrays that broadcast to the shape of ``y`` (``-inf`` / ``inf``
        allowed for one-sided bounds); ``lower <= upper`` everywhere.

    Notes
    -----
    The projection is the clip :math:`P(y) = \min(\max(y, l), u)`, entry by entry (the set is a
    product of intervals, so the projection separates).

    Examples
    --------
    >>> import numpy as np, invops
    >>> invops.Box(0.0, 1.0).project(np.array([[-0.3, 0.4, 1.2]]))
    array([[0. , 0.4, 1. ]])
    """

    def __init__(self, lower: Any = 0.0, upper: Any = 1.0) -> None:
        for value, name in ((lower, "lower"), (upper, "upper")):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                array_kind(value, f"Box: {name}")
            elif math.isnan(value):
                raise ValueError(f"Box: {name} must not be NaN")
        lo = to_torch(lower) if not isinstance(lower, (int, float)) else torch.tensor(lower)
        hi = to_torch(upper) if not isinstance(upper, (int, float)) else torch.tensor(upper)
        try:
            bad = bool((lo.double() > hi.double()).any())
        except RuntimeError as err:
            raise ValueError(
                f"Box: lower {tuple(lo.shape)} and upper {tuple(hi.shape)} must broadcast together"
            ) from err
        if bad:
            raise ValueError("Box: lower must be <= upper everywhere")
        self.lower, self.upper = lower, upper

    def _bounds(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo = _broadcast_to(_as_tensor(self.lower, y, "lower", "Box"), y.shape, "lower", "Box")
        hi = _broadcast_to(_as_tensor(self.upper, y, "upper", "Box"), y.shape, "upper", "Box")
        return lo, hi

    def _project(self, y: torch.Tensor) -> torch.Tensor:
        lo, hi = self._bounds(y)
        return torch.minimum(torch.maximum(y, lo), hi)

    def _violation(self, y: torch.Tensor) -> float:
        lo, hi = self._bounds(y)
        return float(torch.maximum(lo - y, y - hi).clamp_min(0).max()) if y.numel() else 0.0

    def __repr__(self) -> str:
        return f"Box(lower={_short(self.lower)}, upper={_short(self.upper)})"


class PointAnnotations(ConvexSet):
    r"""Prescribed values on annotated entries: :math:`\{y : y_i = v_i,\ i \in A\}`.

    Parameters
    ----------
    mask : bool array
        ``True`` on the annotated entries :math:`A`; broadcasts to the shape of ``y`` (e.g. one
        mask ``(1, H, W)`` for a batch).
    values : float or array
        The annotated values :math:`v`, a scalar (every annotated entry gets it) or an array
        that broadcasts to the shape of ``y``; entries outside the mask are ignored.

    Notes
    -----
    The set is an affine subspace (convex, closed). Its projection keeps :math:`y` off the mask
    and overwrites the annotated entries: :math:`P(y)_i = v_i` for :math:`i \in A`, else
    :math:`y_i`. It is the nearest point because the two groups of coordinates are independent.

    Examples
    --------
    >>> import torch, invops
    >>> S = invops.PointAnnotations(torch.tensor([[False, True, False]]), 1.0)
    >>> S.project(torch.tensor([[0.2, 0.3, 0.4]]))
    tensor([[0.2000, 1.0000, 0.4000]])
    """

    def __init__(self, mask: Any, values: Any = 1.0) -> None:
        array_kind(mask, "PointAnnotations: mask")
        m = to_torch(mask, name="mask")
        if m.dtype != torch.bool:
            raise TypeError(f"PointAnnotations: mask must be a boolean array, got dtype {m.dtype}")
        _check_array_or_scalar(values, "values", "PointAnnotations")
        if not isinstance(values, (int, float)):
            v = to_torch(values, name="values")
            if not (v.is_floating_point() or v.dtype in (torch.int32, torch.int64)):
                raise TypeError(
                    f"PointAnnotations: values must be real numbers, got dtype {v.dtype}"
                )
        self.mask, self.values = mask, values

    def _mask_values(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        owner = "PointAnnotations"
        m = to_torch(self.mask, name="mask").to(y.device)
        m = _broadcast_to(m, y.shape, "mask", owner)
        v = _broadcast_to(_as_tensor(self.values, y, "values", owner), y.shape, "values", owner)
        return m, v

    def _project(self, y: torch.Tensor) -> torch.Tensor:
        m, v = self._mask_values(y)
        return torch.where(m, v, y)

    def _violation(self, y: torch.Tensor) -> float:
        m, v = self._mask_values(y)
        return float(((y - v).abs() * m).max()) if y.numel() else 0.0

    @property
    def n_annotated(self) -> int:
        """Number of annotated entries in the mask as given."""
        return int(to_torch(self.mask).sum())

    def __repr__(self) -> str:
        return f"PointAnnotations({self.n_annotated} annotated, values={_short(self.values)})"


class FractionBounds(ConvexSet):
    r"""Bounds on the fraction of a domain a class occupies, on class probabilities.

    The set :math:`\{y : a \le y \le b,\ f_{lo} \le \tfrac1n \sum_{i \in \Omega} y_i \le
    f_{hi}\}` for every domain :math:`\Omega` (by default every sample of a batch). With
    :math:`y` a class probability in :math:`[0, 1]`, the mean is the expected fraction of the
    domain in that class, e.g. ``FractionBounds(0.5, 0.65)`` for a class that covers 50-65% of
    each domain.

    Parameters
    ----------
    lower, upper : float or array
        Bounds :math:`f_{lo} \le f_{hi}` on the mean; scalars or arrays that broadcast to the
        shape of ``y`` reduced over ``dim`` (one pair per domain).
    dim : int or tuple of int, optional
        The dimensions that make one domain. Default: every dimension but the first (one domain
        per sample of a batch-first array).
    value_range : (float, float) or None
        The elementwise box :math:`(a, b)`, finite, default ``(0, 1)``; ``None`` leaves the
        values free (the set is then a slab).

    Notes
    -----
    **Convexity.** The set is the intersection of a box with a slab (two half-spaces on the
    sum), both convex and closed. A bound on the *number* of entries assigned to a class (a
    cardinality) would not be convex; bounding the mean of the probabilities is its convex
    relaxation, and it is what a projection-based training loss can use.

    **Projection.** Minimising :math:`\tfrac12\|x - y\|^2` over the set, with one multiplier
    :math:`\tau` for the sum constraint (:math:`\tau > 0` when the upper bound is active,
    :math:`\tau < 0` for the lower one, 0 when neither is), the KKT conditions give, entry by
    entry, :math:`x_i = \operatorname{clip}(y_i - \tau, a, b)`. So:

    1. if the clipped point :math:`\operatorname{clip}(y, a, b)` satisfies the mean bounds, it
       is the projection (:math:`\tau = 0`);
    2. otherwise :math:`\tau` is the root of
       :math:`\varphi(\tau) = \sum_i \operatorname{clip}(y_i - \tau, a, b) - n f`, with
       :math:`f` the violated bound. :math:`\varphi` is continuous, non-increasing and
       piecewise linear, with breakpoints :math:`y_i - b` and :math:`y_i - a`. The root is
       found exactly: the breakpoints are sorted, :math:`\varphi` is accumulated over them
       (its slope on each piece is minus the number of free entries), the piece that brackets
       the target is interpolated, and :math:`\tau` is then recomputed in closed form from the
       free set :math:`F` of that piece,
       :math:`\tau = (\sum_{i \in F} y_i + \sum_{i \notin F} x_i - n f) / |F|`, which removes
       the rounding of the accumulation. Cost :math:`O(n \log n)` per domain.

    Without the box (``value_range=None``) the projection onto the slab is the uniform shift
    :math:`x = y - \tau` with :math:`\tau = (\sum_i y_i - n f)/n`. The set is empty when
    :math:`f_{lo} > f_{hi}`, :math:`f_{hi} < a` or :math:`f_{lo} > b`; :meth:`project` then
    raises ``ValueError``.

    Examples
    --------
    >>> import torch, invops
    >>> S = invops.FractionBounds(0.5, 0.65)
    >>> y = torch.tensor([[0.9, 0.8, 0.1, 0.0]], dtype=torch.float64)   # mean 0.45
    >>> p = S.project(y)
    >>> p, round(float(p.mean()), 12)
    (tensor([[0.9500, 0.8500, 0.1500, 0.0500]], dtype=torch.float64), 0.5)
    """

    def __init__(
        self,
        lower: Any,
        upper: Any,
        dim: int | Sequence[int] | None = None,
        value_range: tuple[float, float] | None = (0.0, 1.0),
    ) -> None:
        _check_array_or_scalar(lower, "lower", "FractionBounds")
        _check_array_or_scalar(upper, "upper", "FractionBounds")
        if isinstance(lower, (int, float)) and isinstance(upper, (int, float)) and lower > upper:
            raise ValueError(f"FractionBounds: lower must be <= upper, got {lower} > {upper}")
        if value_range is not None:
            if len(value_range) != 2:
                raise ValueError(
                    f"FractionBounds: value_range must be (low, high) or None, got {value_range}"
                )
            a, b = (float(v) for v in value_range)
            if not (math.isfinite(a) and math.isfinite(b) and a <= b):
                raise ValueError(
                    f"FractionBounds: value_range must be finite with low <= high, got "
                    f"{value_range} (use Box for one-sided bounds)"
                )
            value_range = (a, b)
        if dim is not None:
            dims = (dim,) if isinstance(dim, int) else tuple(dim)
            if not dims or not all(isinstance(d, int) for d in dims) or len(set(dims)) < len(dims):
                raise ValueError(
                    f"FractionBounds: dim must be an int or a tuple of distinct ints, got {dim}"
                )
            dim = dims
        self.lower, self.upper, self.dim, self.value_range = lower, upper, dim, value_range

    # -- layout: (groups, n) rows, one per domain
    def _dims(self, y: torch.Tensor) -> tuple[int, ...]:
        if self.dim is None:
            if y.ndim < 2:
                raise ValueError(
                    "FractionBounds: y must be batch-first with at least one domain dimension "
                    f"(B, ...), got shape {tuple(y.shape)} (or pass dim=)"
                )
            return tuple(range(1, y.ndim))
        dims = []
        for d in self.dim:
            if not -y.ndim <= d < y.ndim:
                raise ValueError(
                    f"FractionBounds: dim {d} is out of range for y of shape {tuple(y.shape)}"
                )
            dims.append(d % y.ndim)
        if len(set(dims)) < len(dims):
            raise ValueError(f"FractionBounds: dim {self.dim} repeats a dimension of y")
        return tuple(sorted(dims))

    def _rows(self, y: torch.Tensor):
        dims = self._dims(y)
        keep = [d for d in range(y.ndim) if d not in dims]
        perm = keep + list(dims)
        moved = y.permute(perm)
        reduced = moved.shape[: len(keep)]
        rows = moved.reshape(math.prod(reduced), -1)

        def back(r: torch.Tensor) -> torch.Tensor:
            return r.reshape(moved.shape).permute(_inverse_permutation(perm)).contiguous()

        owner = "FractionBounds"
        bounds = []
        for value, name in ((self.lower, "lower"), (self.upper, "upper")):
            t = _as_tensor(value, y, name, owner)
            try:
                ok = torch.broadcast_shapes(t.shape, reduced) == reduced
            except RuntimeError:
                ok = False
            if not ok:
                raise ValueError(
                    f"{owner}: {name} of shape {tuple(t.shape)} does not broadcast to the "
                    f"domains' shape {tuple(reduced)} (y {tuple(y.shape)} reduced over dims "
                    f"{dims})"
                )
            bounds.append(t.expand(reduced).reshape(-1))
        return rows, bounds[0], bounds[1], back

    def _project(self, y: torch.Tensor) -> torch.Tensor:
        rows, f_lo, f_hi, back = self._rows(y)
        n = rows.shape[1]
        if n == 0:
            return y.clone()
        if bool((f_lo > f_hi).any()):
            raise ValueError("FractionBounds: lower must be <= upper for every domain")
        if self.value_range is None:
            s = rows.sum(1)
            target = torch.minimum(torch.maximum(s, n * f_lo), n * f_hi)
            return back(rows - ((s - target) / n)[:, None])
        a, b = self.value_range
        if bool((f_hi < a).any() or (f_lo > b).any()):
            raise ValueError(
                f"FractionBounds: the set is empty: mean bounds [{_short(self.lower)}, "
                f"{_short(self.upper)}] do not meet the value range [{a}, {b}]"
            )
        x = rows.clamp(a, b)
        s = x.sum(1)
        target = torch.minimum(torch.maximum(s, n * f_lo), n * f_hi)
        active = target != s
        if bool(active.any()):
            x = x.clone()
            x[active] = _clipped_shift(rows[active], a, b, target[active])
        return back(x)

    def _violation(self, y: torch.Tensor) -> float:
        rows, f_lo, f_hi, _ = self._rows(y)
        if rows.numel() == 0:
            return 0.0
        mean = rows.mean(1)
        worst = torch.maximum(f_lo - mean, mean - f_hi).clamp_min(0).max()
        if self.value_range is not None:
            a, b = self.value_range
            worst = torch.maximum(worst, torch.maximum(a - rows, rows - b).clamp_min(0).max())
        return float(worst)

    def __repr__(self) -> str:
        return (
            f"FractionBounds(lower={_short(self.lower)}, upper={_short(self.upper)}, "
            f"dim={self.dim}, value_range={self.value_range})"
        )


def _clipped_shift(v: torch.Tensor, a: float, b: float, target: torch.Tensor) -> torch.Tensor:
    r"""``clip(v - tau, a, b)`` per row, with ``tau`` such that each row sums to ``target``.

    ``target`` must lie in ``[n a, n b]``. The row sum :math:`\varphi(\tau)` is non-increasing
    and piecewise linear in :math:`\tau`: every entry sits at ``b`` for
    :math:`\tau \le v_i - b`, at ``a`` for :math:`\tau \ge v_i - a`, and is free between.
    """
    g, n = v.shape
    breaks = torch.cat((v - b, v - a), dim=1)  # an entry becomes free, then fixed at a
    turns = torch.cat((v.new_full((g, n), -1.0), v.new_full((g, n), 1.0)), dim=1)
    breaks, order = breaks.sort(dim=1)
    slope = turns.gather(1, order).cumsum(1)  # slope of phi to the right of each breakpoint
    phi = n * b + torch.cat(
        (v.new_zeros(g, 1), (slope[:, :-1] * breaks.diff(dim=1)).cumsum(1)), dim=1
    )
    # last breakpoint with phi >= target; phi is non-increasing along the sorted breakpoints
    k = ((phi >= target[:, None]).sum(1) - 1).clamp(0, 2 * n - 2)[:, None]
    phi_k, t_k, slope_k = (
        phi.gather(1, k)[:, 0],
        breaks.gather(1, k)[:, 0],
        slope.gather(1, k)[:, 0],
    )
    tau = torch.where(slope_k < 0, t_k + (target - phi_k) / slope_k.clamp(max=-1.0), t_k)
    # the exact root from the free set of that piece (removes the accumulated rounding)
    shifted = v - tau[:, None]
    free = (shifted > a) & (shifted < b)
    n_free = free.sum(1)
    fixed = torch.where(free, torch.zeros_like(v), shifted.clamp(a, b)).sum(1)
    exact = ((v * free).sum(1) + fixed - target) / n_free.clamp_min(1)
    tau = torch.where(n_free > 0, exact, tau)
    return (v - tau[:, None]).clamp(a, b)


def _inverse_permutation(perm: Sequence[int]) -> list[int]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


def _short(value: Any) -> str:
    if isinstance(value, (int, float)):
        return f"{value:g}"
    return f"array{tuple(value.shape)}"


# ---------------------------------------------------------------------------- intersection
@dataclass(frozen=True)
class DykstraInfo:
    """How a projection onto an :class:`Intersection` went.

    Attributes
    ----------
    iterations : int
        Sweeps over all the sets.
    converged : bool
        Whether the stopping test passed within ``max_iter`` sweeps.
    change : float
        The last sweep's largest change of a correction term, relative to
        ``max(1, max |y|)`` (the quantity compared with ``tol``).
    """

    iterations: int
    converged: bool
    change: float


class Intersection(ConvexSet):
    r"""The intersection of convex sets, projected by Dykstra's algorithm.

    Parameters
    ----------
    *sets : ConvexSet
        Two or more sets (e.g. :class:`PointAnnotations`, :class:`Box`,
        :class:`FractionBounds`); their intersection must not be empty.
    tol : float
        Stopping tolerance on the correction terms (see Notes), relative to
        ``max(1, max |y|)``.
    max_iter : int
        Most sweeps over the sets.

    Notes
    -----
    Alternating projections converge to *a* point of the intersection, not to the nearest one.
    Dykstra's algorithm (Boyle and Dykstra, 1986) adds one correction term :math:`p_i` per set
    and converges to the projection :math:`P_{\cap_i C_i}(y)` for closed convex sets with a
    nonempty intersection: starting from :math:`x = y`, :math:`p_i = 0`, each sweep does, for
    :math:`i = 1, \dots, m`,

    .. math::
        z = P_{C_i}(x + p_i), \qquad p_i \leftarrow x + p_i - z, \qquad x \leftarrow z.

    For polyhedral sets (all of the sets here) the convergence is linear. The sweep stops when
    :math:`\max_i \|p_i^{new} - p_i^{old}\|_\infty \le \text{tol} \cdot \max(1,
    \|y\|_\infty)`, the robust criterion of Birgin and Raydan (2005): a change of
    :math:`p_i` is the gap between consecutive sets' iterates, so it vanishes only where the
    iterate lies in every set, whereas a small change of :math:`x` alone can stop too early.
    :meth:`project` warns (``RuntimeWarning``) when ``max_iter`` sweeps do not meet ``tol``,
    which also happens when the intersection is empty; :meth:`project_with_info` returns the
    iteration count instead.

    Examples
    --------
    >>> import torch, invops
    >>> slab = invops.FractionBounds(0.5, 0.5, value_range=None)   # mean exactly 0.5
    >>> D = invops.Intersection(invops.Box(0.0, 1.0), slab)
    >>> x, info = D.project_with_info(torch.tensor([[0.0, 0.0, 0.0, 3.0]], dtype=torch.float64))
    >>> [round(v, 8) for v in x[0].tolist()], info.converged
    ([0.33333333, 0.33333333, 0.33333333, 1.0], True)
    """

    def __init__(self, *sets: ConvexSet, tol: float = 1e-10, max_iter: int = 10_000) -> None:
        if len(sets) == 1 and isinstance(sets[0], (list, tuple)):
            sets = tuple(sets[0])
        if len(sets) < 2:
            raise ValueError(f"Intersection: needs at least two sets, got {len(sets)}")
        for i, s in enumerate(sets):
            if not isinstance(s, ConvexSet):
                raise TypeError(
                    f"Intersection: sets[{i}] must be a ConvexSet, got {type(s).__name__}"
                )
        if not (tol > 0 and math.isfinite(tol)):
            raise ValueError(f"Intersection: tol must be positive and finite, got {tol}")
        if not (isinstance(max_iter, int) and max_iter >= 1):
            raise ValueError(f"Intersection: max_iter must be an int >= 1, got {max_iter}")
        self.sets, self.tol, self.max_iter = tuple(sets), float(tol), max_iter

    def project(self, y: Any) -> Any:
        x, info = self.project_with_info(y)
        if not info.converged:
            warnings.warn(
                f"Intersection.project: Dykstra's algorithm did not reach tol={self.tol:g} in "
                f"{info.iterations} sweeps (last change {info.change:.2e}); the result is "
                "approximate. Is the intersection empty? Raise max_iter or tol.",
                RuntimeWarning,
                stacklevel=2,
            )
        return x

    def project_with_info(self, y: Any) -> tuple[Any, DykstraInfo]:
        """The projection and a :class:`DykstraInfo` (no warning on non-convergence)."""
        kind, t = _real_tensor(y, "Intersection")
        with torch.no_grad():
            x, info = self._dykstra(t.detach())
        return from_torch(x, kind), info

    def _project(self, y: torch.Tensor) -> torch.Tensor:
        return self._dykstra(y)[0]

    def _dykstra(self, y: torch.Tensor) -> tuple[torch.Tensor, DykstraInfo]:
        x = y
        if y.numel() == 0:
            return y.clone(), DykstraInfo(0, True, 0.0)
        scale = max(1.0, float(y.abs().max()))
        corrections = [torch.zeros_like(y) for _ in self.sets]
        change = math.inf
        for sweep in range(1, self.max_iter + 1):
            change = 0.0
            for i, s in enumerate(self.sets):
                shifted = x + corrections[i]
                z = s._project(shifted)
                new = shifted - z
                change = max(change, float((new - corrections[i]).abs().max()))
                corrections[i], x = new, z
            change /= scale
            if change <= self.tol:
                return x, DykstraInfo(sweep, True, change)
        return x, DykstraInfo(self.max_iter, False, change)

    def _violation(self, y: torch.Tensor) -> float:
        return max(s._violation(y) for s in self.sets)

    def __repr__(self) -> str:
        inner = ", ".join(repr(s) for s in self.sets)
        return f"Intersection({inner}, tol={self.tol:g}, max_iter={self.max_iter})"


# ---------------------------------------------------------------------------- distances
def _project_for_distance(y: Any, D: ConvexSet, owner: str) -> tuple[str, torch.Tensor, Any]:
    if not isinstance(D, ConvexSet):
        raise TypeError(f"{owner}: D must be a ConvexSet, got {type(D).__name__}")
    kind, t = _real_tensor(y, owner)
    if t.ndim < 1:
        raise ValueError(f"{owner}: y must be batch-first (B, ...), got a 0-d array")
    with torch.no_grad():
        p = D._project(t.detach())
    return kind, t, p


def distance_squared(y: Any, D: ConvexSet) -> Any:
    r"""Squared point-to-set distance per sample, :math:`\tfrac12\|P_D(y) - y\|_2^2`.

    Parameters
    ----------
    y : array, batch first ``(B, ...)``
        Network output (torch tensor, numpy or cupy array).
    D : ConvexSet
        The set.

    Returns
    -------
    array of shape ``(B,)``
        One distance per sample, the kind of ``y``. With a torch ``y`` that requires grad the
        result is differentiable, and its gradient is :math:`y - P_D(y)`.

    Notes
    -----
    For a closed convex set the function :math:`\tfrac12 d_D^2` is differentiable with gradient
    :math:`y - P_D(y)` (it is the Moreau envelope of the set's indicator), although
    :math:`P_D` itself is only piecewise differentiable. The result is computed as
    :math:`\tfrac12\|y - \bar p\|^2` with :math:`\bar p = P_D(y)` held constant, whose autograd
    gradient is exactly that. ``loss.backward()`` on it and ``net.backward(y - P_D(y), y)``
    therefore give the same parameter gradients.

    Examples
    --------
    >>> import torch, invops
    >>> y = torch.tensor([[2.0, -1.0, 0.5]], requires_grad=True)
    >>> d = invops.distance_squared(y, invops.Box(0.0, 1.0))
    >>> d
    tensor([1.], grad_fn=<MulBackward0>)
    >>> d.sum().backward()
    >>> y.grad
    tensor([[ 1., -1.,  0.]])
    """
    kind, t, p = _project_for_distance(y, D, "distance_squared")
    r = t - p
    out = 0.5 * (r * r).reshape(r.shape[0], -1).sum(1)
    return out if kind == "torch" else from_torch(out, kind)


def distance_squared_grad(y: Any, D: ConvexSet) -> Any:
    r"""Gradient of :func:`distance_squared` (of the sum over samples): :math:`y - P_D(y)`.

    This is the cotangent to hand to an invertible network's reverse pass:
    ``net.backward(distance_squared_grad(y, D), y)``.

    Examples
    --------
    >>> import torch, invops
    >>> invops.distance_squared_grad(torch.tensor([[2.0, -1.0, 0.5]]), invops.Box(0.0, 1.0))
    tensor([[ 1., -1.,  0.]])
    """
    kind, t, p = _project_for_distance(y, D, "distance_squared_grad")
    return from_torch(t.detach() - p, kind)
