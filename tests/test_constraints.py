"""Convex sets, their projections, Dykstra's algorithm and the point-to-set distance.

The projections are checked for the defining properties of a projection onto a closed convex
set (idempotent, non-expansive, firmly non-expansive, the variational inequality), and against
a brute-force quadratic-program solution on small cases: the projection onto a polyhedron is
the projection onto the affine hull of its active constraints, so enumerating every choice of
active constraints, projecting onto each affine set and keeping the nearest feasible candidate
gives the exact answer (to rounding).
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch

import invops
from invops.constraints import (
    Box,
    ConvexSet,
    FractionBounds,
    Intersection,
    PointAnnotations,
    distance_squared,
    distance_squared_grad,
)
from invops.testing import gradient_test

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


# ---------------------------------------------------------------------------- brute force
def brute_force_projection(y, pairs, equalities=()):
    r"""Exact :math:`\arg\min \tfrac12\|x - y\|^2` s.t. ``lo <= a @ x <= hi`` for every
    ``(a, lo, hi)`` in ``pairs`` and ``a @ x = v`` for every ``(a, v)`` in ``equalities``.

    Every pair is inactive, active at ``lo`` or active at ``hi``; for each of the 3^k choices
    the candidate is the projection of ``y`` onto the affine set of the active rows (through a
    pseudo-inverse), kept if it satisfies every constraint; the nearest kept candidate wins.
    """
    y = np.asarray(y, dtype=np.float64)
    best, best_obj = None, np.inf
    for states in itertools.product((0, 1, 2), repeat=len(pairs)):
        rows = [a for a, _ in equalities]
        rhs = [v for _, v in equalities]
        for (a, lo, hi), state in zip(pairs, states):
            if state:
                rows.append(a)
                rhs.append(lo if state == 1 else hi)
        if rows:
            A, b = np.array(rows, dtype=np.float64), np.array(rhs, dtype=np.float64)
            x = y - np.linalg.pinv(A) @ (A @ y - b)
            if np.abs(A @ x - b).max() > 1e-10:
                continue  # inconsistent choice
        else:
            x = y.copy()
        feasible = all(lo - 1e-10 <= a @ x <= hi + 1e-10 for a, lo, hi in pairs)
        if feasible and all(abs(a @ x - v) <= 1e-10 for a, v in equalities):
            obj = 0.5 * float(np.sum((x - y) ** 2))
            if obj < best_obj:
                best, best_obj = x, obj
    assert best is not None, "brute force: empty set"
    return best


def box_rows(n, lo, hi):
    return [(np.eye(n)[i], lo, hi) for i in range(n)]


def sum_row(n, f_lo, f_hi):
    return (np.ones(n), n * f_lo, n * f_hi)


def annotation_rows(n, idx, value):
    return [(np.eye(n)[i], value) for i in idx]


def test_brute_force_agrees_with_scipy_slsqp():
    """The reference itself, against a general-purpose solver (to the solver's accuracy)."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(3)
    n = 6
    y = rng.normal(0.6, 0.8, n)
    pairs = [*box_rows(n, 0.0, 1.0), sum_row(n, 0.2, 0.35)]
    eqs = annotation_rows(n, [1], 1.0)
    ref = brute_force_projection(y, pairs, eqs)
    cons = [{"type": "ineq", "fun": lambda x, a=a, lo=lo: a @ x - lo} for a, lo, _ in pairs]
    cons += [{"type": "ineq", "fun": lambda x, a=a, hi=hi: hi - a @ x} for a, _, hi in pairs]
    cons += [{"type": "eq", "fun": lambda x, a=a, v=v: a @ x - v} for a, v in eqs]
    sol = minimize(
        lambda x: 0.5 * np.sum((x - y) ** 2),
        np.full(n, 0.3),
        jac=lambda x: x - y,
        constraints=cons,
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 500},
    )
    assert sol.success
    np.testing.assert_allclose(sol.x, ref, atol=1e-6)


# ---------------------------------------------------------------------------- the sets
def random_sets(n_batch=2, shape=(3, 4), seed=0):
    """One of each set (and intersections) for a (n_batch, *shape) float64 array."""
    gen = torch.Generator().manual_seed(seed)
    full = (n_batch, *shape)
    mask = torch.rand(full, generator=gen) < 0.2
    values = torch.rand(full, generator=gen, dtype=F64)
    lower = -torch.rand(full, generator=gen, dtype=F64)
    return {
        "box": Box(0.0, 1.0),
        "box-arrays": Box(lower, lower + 1.5),
        "annotations": PointAnnotations(mask, values),
        "fraction": FractionBounds(0.3, 0.45),
        "fraction-slab": FractionBounds(0.3, 0.45, value_range=None),
        "fraction-dim": FractionBounds(torch.tensor([0.2, 0.4, 0.5], dtype=F64), 0.6, dim=(0, 2)),
        "intersection": Intersection(
            PointAnnotations(mask, 1.0), Box(0.0, 1.0), FractionBounds(0.4, 0.6, value_range=None)
        ),
        "intersection-2": Intersection(PointAnnotations(mask, 1.0), FractionBounds(0.4, 0.6)),
    }


SET_NAMES = list(random_sets())


@pytest.mark.parametrize("name", SET_NAMES)
def test_projection_properties(name):
    """Idempotent, non-expansive, firmly non-expansive, variational inequality, in the set."""
    S = random_sets()[name]
    tol = 1e-12 if not isinstance(S, Intersection) else 1e-8  # Dykstra stops at its tolerance
    gen = torch.Generator().manual_seed(1)
    ys = [1.5 * torch.randn(2, 3, 4, generator=gen, dtype=F64) + 0.5 for _ in range(6)]
    ps = [S.project(y) for y in ys]
    for p in ps:
        assert S.contains(p, atol=tol), name
        assert torch.allclose(S.project(p), p, atol=tol, rtol=0), name  # idempotent
    for (y1, p1), (y2, p2) in itertools.combinations(zip(ys, ps), 2):
        dp, dy = p1 - p2, y1 - y2
        assert dp.norm() <= dy.norm() + tol  # non-expansive
        assert float((dp * dy).sum()) >= float((dp * dp).sum()) - tol  # firmly non-expansive
    # <y - P(y), z - P(y)> <= 0 for every z in the set (here: the other projections)
    for y, p in zip(ys, ps):
        for z in ps:
            assert float(((y - p) * (z - p)).sum()) <= 10 * tol, name


@pytest.mark.parametrize("name", SET_NAMES)
def test_projection_keeps_kind_dtype_and_input(name):
    S = random_sets()[name]
    y = np.random.default_rng(0).normal(0.5, 1.0, (2, 3, 4))
    before = y.copy()
    p = S.project(y)
    assert isinstance(p, np.ndarray) and p.dtype == np.float64 and p.shape == y.shape
    np.testing.assert_array_equal(y, before)  # not modified
    t = torch.from_numpy(y).float().requires_grad_()
    pt = S.project(t)
    assert pt.dtype == torch.float32 and not pt.requires_grad
    np.testing.assert_allclose(pt.numpy(), p, atol=1e-5)
    assert S.contains(p, atol=1e-8) and not S.contains(p + 5.0)


def test_box_is_a_clip_with_broadcast_bounds():
    y = torch.tensor([[-2.0, 0.5, 3.0], [0.1, -0.1, 0.7]], dtype=F64)
    lower = torch.tensor([0.0, 0.0, -5.0], dtype=F64)
    p = Box(lower, 1.0).project(y)
    assert torch.equal(p, torch.tensor([[0.0, 0.5, 1.0], [0.1, 0.0, 0.7]], dtype=F64))
    assert torch.equal(Box(-np.inf, 0.5).project(y), y.clamp(max=0.5))


def test_point_annotations_overwrite_only_the_mask():
    y = torch.randn(3, 2, 5, dtype=F64)
    mask = torch.zeros(1, 2, 5, dtype=torch.bool)
    mask[0, 1, 2] = mask[0, 0, 4] = True
    values = torch.full((1, 2, 5), 7.0, dtype=F64)
    p = PointAnnotations(mask, values).project(y)
    m = mask.expand_as(y)
    assert torch.equal(p[m], torch.full((6,), 7.0, dtype=F64)) and torch.equal(p[~m], y[~m])
    assert PointAnnotations(mask, 1.0).n_annotated == 2


# ---------------------------------------------------------------------------- fraction bounds
@pytest.mark.parametrize("seed", range(6))
def test_fraction_bounds_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 6
    y = rng.normal(0.5, 1.0, n)
    y[rng.integers(n)] = y[rng.integers(n)]  # a tie among the breakpoints
    f_lo, f_hi = sorted(rng.uniform(0.0, 1.0, 2))
    a, b = (0.0, 1.0) if seed % 2 else (-0.5, 2.0)
    got = FractionBounds(f_lo, f_hi, value_range=(a, b)).project(y[None])[0]
    want = brute_force_projection(y, [*box_rows(n, a, b), sum_row(n, f_lo, f_hi)])
    np.testing.assert_allclose(got, want, atol=1e-12, rtol=0)
    slab = FractionBounds(f_lo, f_hi, value_range=None).project(y[None])[0]
    np.testing.assert_allclose(
        slab, brute_force_projection(y, [sum_row(n, f_lo, f_hi)]), atol=1e-12
    )


def test_fraction_bounds_exact_on_large_domains():
    """Per domain: the mean lands on the violated bound to rounding, and the projection is
    clip(y - tau) with one shift per domain; unviolated domains are only clipped."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(4, 3, 50, 60, generator=gen, dtype=F64) + torch.tensor(
        [-1.0, 0.2, 0.575, 2.0], dtype=F64
    ).view(4, 1, 1, 1)
    p = FractionBounds(0.5, 0.65, dim=(2, 3)).project(y)
    mean = p.mean(dim=(2, 3))
    clipped_mean = y.clamp(0, 1).mean(dim=(2, 3))
    want = clipped_mean.clamp(0.5, 0.65)
    assert torch.allclose(mean, want, atol=1e-14, rtol=0)
    for i in range(4):
        for c in range(3):
            free = (p[i, c] > 0) & (p[i, c] < 1)
            shift = (y[i, c] - p[i, c])[free]
            assert float(shift.max() - shift.min()) < 1e-13
    inside = (clipped_mean >= 0.5) & (clipped_mean <= 0.65)
    assert inside.any() and not inside.all()
    assert torch.equal(p[inside], y.clamp(0, 1)[inside])


def test_fraction_bounds_per_domain_bounds_and_dims():
    y = torch.rand(2, 3, 8, dtype=F64)
    lower = torch.tensor([[0.7, 0.0, 0.9], [0.0, 0.8, 0.0]], dtype=F64)
    p = FractionBounds(lower, 1.0, dim=-1).project(y)
    assert torch.all(p.mean(-1) >= lower - 1e-14)
    # dim=(0, 2): one domain per channel, across the batch
    q = FractionBounds(0.9, 1.0, dim=(0, 2)).project(y)
    assert torch.allclose(q.mean(dim=(0, 2)), torch.full((3,), 0.9, dtype=F64), atol=1e-14)


def test_fraction_bounds_errors():
    with pytest.raises(ValueError, match="lower must be <= upper"):
        FractionBounds(0.6, 0.5)
    with pytest.raises(ValueError, match="value_range must be finite"):
        FractionBounds(0.1, 0.5, value_range=(0.0, np.inf))
    with pytest.raises(ValueError, match="dim must be"):
        FractionBounds(0.1, 0.5, dim=(1, 1))
    with pytest.raises(ValueError, match="the set is empty"):
        FractionBounds(1.5, 2.0).project(torch.rand(2, 5))
    with pytest.raises(ValueError, match="out of range"):
        FractionBounds(0.1, 0.5, dim=3).project(torch.rand(2, 5))
    with pytest.raises(ValueError, match="batch-first"):
        FractionBounds(0.1, 0.5).project(torch.rand(5))
    with pytest.raises(ValueError, match="does not broadcast to the domains"):
        FractionBounds(torch.rand(3), 1.0).project(torch.rand(2, 5))
    with pytest.raises(TypeError, match="real floating-point"):
        FractionBounds(0.1, 0.5).project(torch.ones(2, 5, dtype=torch.int64))


def test_set_construction_errors():
    with pytest.raises(ValueError, match="lower must be <= upper"):
        Box(1.0, 0.0)
    with pytest.raises(TypeError, match="lower"):
        Box("0", 1.0)
    with pytest.raises(ValueError, match="does not broadcast to the shape of y"):
        Box(torch.zeros(3), 1.0).project(torch.rand(2, 4))
    with pytest.raises(TypeError, match="boolean"):
        PointAnnotations(torch.zeros(2, 3), 1.0)
    with pytest.raises(ValueError, match="mask of shape"):
        PointAnnotations(torch.zeros(2, 3, dtype=torch.bool)).project(torch.rand(2, 4))
    with pytest.raises(ValueError, match="at least two sets"):
        Intersection(Box())
    with pytest.raises(TypeError, match="ConvexSet"):
        Intersection(Box(), "box")
    with pytest.raises(ValueError, match="tol"):
        Intersection(Box(), Box(), tol=0.0)
    with pytest.raises(TypeError, match="torch.Tensor, numpy.ndarray or cupy.ndarray"):
        Box().project([0.5, 2.0])


# ---------------------------------------------------------------------------- intersection
@pytest.mark.parametrize("seed", range(4))
def test_dykstra_equals_brute_force_qp(seed):
    """Annotations (2 entries) and box and fraction slab, on 6 entries: Dykstra to 1e-8."""
    rng = np.random.default_rng(10 + seed)
    n = 6
    y = rng.normal(0.5, 1.0, n)
    idx = rng.choice(n, 2, replace=False)
    f_lo, f_hi = (0.45, 0.6) if seed % 2 else (0.35, 0.45)
    mask = np.zeros(n, dtype=bool)
    mask[idx] = True
    want = brute_force_projection(
        y, [*box_rows(n, 0.0, 1.0), sum_row(n, f_lo, f_hi)], annotation_rows(n, idx, 1.0)
    )
    three = Intersection(
        PointAnnotations(mask[None], 1.0),
        Box(0.0, 1.0),
        FractionBounds(f_lo, f_hi, value_range=None),
        tol=1e-13,
        max_iter=100_000,
    )
    two = Intersection(
        PointAnnotations(mask[None], 1.0), FractionBounds(f_lo, f_hi), tol=1e-13, max_iter=100_000
    )
    for D in (three, two):
        got, info = D.project_with_info(y[None])
        assert info.converged and 1 <= info.iterations < 100_000, info
        np.testing.assert_allclose(got[0], want, atol=1e-8, rtol=0)


def test_dykstra_on_a_large_case_matches_the_closed_form():
    """Annotations then FractionBounds on the free entries (with bounds shifted by the annotated
    sum) is the exact projection; Dykstra must reach it, and report its sweeps."""
    gen = torch.Generator().manual_seed(2)
    y = torch.randn(3, 40, 50, generator=gen, dtype=F64) * 0.6 + 0.3
    mask = torch.rand(3, 40, 50, generator=gen) < 0.01
    D = Intersection(PointAnnotations(mask, 1.0), FractionBounds(0.5, 0.65), tol=1e-12)
    got, info = D.project_with_info(y)
    assert info.converged and info.iterations > 1
    n = 40 * 50
    for i in range(3):
        free = ~mask[i]
        k = int(mask[i].sum())
        lo, hi = (0.5 * n - k) / (n - k), (0.65 * n - k) / (n - k)
        rest = FractionBounds(lo, hi).project(y[i][free][None])[0]
        assert torch.allclose(got[i][free], rest, atol=1e-9, rtol=0)
        assert torch.all(got[i][mask[i]] == 1.0)


def test_dykstra_is_not_alternating_projections():
    """Alternating projections land in the set but not at the nearest point; Dykstra does."""
    y = torch.tensor([[2.0, 0.5, -1.0]], dtype=F64)
    A, B = Box(0.0, 1.0), FractionBounds(1 / 3, 1 / 3, value_range=None)  # box, sum = 1
    x = y
    for _ in range(200):
        x = B.project(A.project(x))
    want = torch.tensor([[1.0, 0.0, 0.0]], dtype=F64)  # the nearest point of the simplex
    assert torch.allclose(FractionBounds(1 / 3, 1 / 3).project(y), want, atol=1e-15)
    assert torch.allclose(Intersection(A, B, tol=1e-14).project(y), want, atol=1e-10)
    assert torch.allclose(x, torch.tensor([[0.75, 0.25, 0.0]], dtype=F64))  # not the nearest


def test_dykstra_warns_on_an_empty_intersection():
    mask = torch.ones(1, 4, dtype=torch.bool)
    D = Intersection(PointAnnotations(mask, 2.0), Box(0.0, 1.0), max_iter=50)
    with pytest.warns(RuntimeWarning, match="did not reach tol"):
        D.project(torch.zeros(1, 4))
    _, info = D.project_with_info(torch.zeros(1, 4))
    assert not info.converged and info.iterations == 50
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Intersection(Box(), Box(0.2, 0.8)).project(torch.rand(2, 3))  # converges: no warning


# ---------------------------------------------------------------------------- distance
def test_distance_squared_value_and_gradient():
    D = random_sets(shape=(5,))["intersection-2"]
    D.tol = 1e-13
    y = (torch.randn(2, 5, dtype=F64) + 0.5).requires_grad_()
    d = distance_squared(y, D)
    p = D.project(y)
    assert d.shape == (2,)
    assert torch.allclose(d, 0.5 * (y - p).pow(2).sum(1), atol=1e-14)
    d.sum().backward()
    assert torch.allclose(y.grad, y.detach() - p, atol=1e-14)
    assert torch.equal(distance_squared_grad(y.detach(), D), y.detach() - p)
    # Taylor test: 0.5 d^2 is C^1 with a Lipschitz gradient, so the remainder is O(h^2)
    x0 = y.detach()
    gradient_test(lambda v: distance_squared(v, D).sum(), x0, x0 - p, h0=1e-2)
    # zero inside the set, numpy in numpy out
    inside = D.project(x0.numpy())
    assert isinstance(distance_squared(inside, D), np.ndarray)
    assert np.allclose(distance_squared(inside, D), 0, atol=1e-20)
    with pytest.raises(TypeError, match="ConvexSet"):
        distance_squared(x0, "box")


def test_explicit_reverse_api_equals_loss_backward():
    """The seed's training step: ``net.backward(y - P_D(y), y)`` gives the gradients that
    ``distance_squared(y, D).sum().backward()`` gives, on a small hyperbolic network."""
    torch.manual_seed(0)
    net = invops.NetworkHyperbolic(
        2, [("none", 4), ("squeeze", 6), ("unsqueeze", 4)], logdet=False
    ).double()
    x = torch.randn(2, 2, 8, 6, dtype=F64)
    x = torch.cat([x, x], dim=1)
    mask = torch.rand(2, 8, 6) < 0.1
    D = Intersection(PointAnnotations(mask, 1.0), FractionBounds(0.35, 0.5), tol=1e-12)

    y = net(x)
    distance_squared(y[:, 2], D).sum().backward()  # the score: channel 0 of the last state
    via_autograd = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()

    with torch.no_grad():
        y = net(x)
    dy = torch.zeros_like(y)
    dy[:, 2] = distance_squared_grad(y[:, 2], D)
    _, x_rec = net.backward(dy, y)
    assert torch.allclose(x_rec, x, atol=1e-10)
    for g, p in zip(via_autograd, net.parameters()):
        assert torch.allclose(p.grad, g, rtol=1e-9, atol=1e-12)


def test_custom_convex_set_plugs_in():
    class Halfspace(ConvexSet):  # {y : sum(y) <= 0} per sample
        def _project(self, y):
            s = y.flatten(1).sum(1).clamp_min(0) / y[0].numel()
            return y - s.view(-1, *([1] * (y.ndim - 1)))

        def _violation(self, y):
            return float(y.flatten(1).sum(1).clamp_min(0).max())

    D = Intersection(Halfspace(), Box(-1.0, 1.0), tol=1e-13)
    y = torch.tensor([[0.9, 0.8, -0.1]], dtype=F64)
    n = 3
    want = brute_force_projection(y[0].numpy(), [*box_rows(n, -1.0, 1.0), (np.ones(n), -9, 0)])
    np.testing.assert_allclose(D.project(y)[0].numpy(), want, atol=1e-9)
