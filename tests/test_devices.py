"""The device and dtype suite: every layer and network on each requested device, in float32 and
float64, with numpy / cupy arrays in and out and zero-copy conversions checked by data pointers.

Every test here is marked ``gpu``, so the default run (``-m 'not slow and not gpu'``) leaves the
whole module out. Run it with ``pytest -m gpu tests/test_devices.py``; the devices come from
``--devices`` (default ``cuda``, see ``conftest.py``), and a requested device that is not
available makes its tests skip with the reason. ``--devices cpu`` runs the same checks on a
machine without a GPU, which validates the suite itself; the cupy tests need a CUDA device in
``--devices`` and cupy, and skip otherwise.

Each module is built once on the CPU from a fixed seed, copied to the device and dtype under test
and to a CPU float64 reference, and then, on each copy separately, has its parameters moved off
their initial values, runs once (data-dependent ActNorm initialisation happens on the device)
and has its parameters moved again (the default conditioners start at zero, i.e. as identity
couplings, which would make the checks vacuous). Per module, the checks are: every output,
cotangent, tangent and ``p.grad`` is on the device in the dtype, also when torch's defaults
point elsewhere (a tensor made without ``device=`` or ``dtype=`` shows up); the inverse recovers
the input; ``backward``, ``vjp``, ``backward_inverse``, the autograd bridge and ``jvp`` agree
with plain autograd; the Jacobian passes the dot test; and every result agrees with the CPU
float64 reference within the dtype's tolerance.

float32 convolutions on CUDA default to TF32 (10-bit mantissa) in torch; the module switches
them to IEEE float32 for its duration, so that float32 is checked against float32 tolerances.
"""

from __future__ import annotations

import contextlib
import copy
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import invops
from invops._arrays import from_torch, to_torch
from invops.operators import as_operator
from invops.testing import check_against_autograd, check_invertible, dottest

pytestmark = pytest.mark.gpu

F64 = torch.float64
DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float64, id="float64")]

# relative tolerances (max-norm error over the max-norm of the reference) by dtype
TOL = {
    torch.float64: dict(inverse=1e-9, grad=1e-8, agree=1e-9, dottest=1e-10, probe=1e-12),
    torch.float32: dict(inverse=2e-4, grad=1e-3, agree=1e-3, dottest=1e-4, probe=1e-5),
}


# ---------------------------------------------------------------------------------- devices
def _unavailable(name: str) -> str | None:
    """Why the torch device ``name`` cannot be used here, or None if it can."""
    dev = torch.device(name)
    if dev.type == "cpu":
        return None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return f"device {name}: CUDA is not available (torch.cuda.is_available() is False)"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"device {name}: only {torch.cuda.device_count()} CUDA device(s)"
        return None
    try:
        torch.empty(1, device=dev)
    except Exception as exc:  # pragma: no cover - other backends
        return f"device {name}: not usable ({type(exc).__name__}: {exc})"
    return None


def _requested_devices(config) -> list[str]:
    raw = config.getoption("devices", default="cuda") or "cuda"
    names = [n.strip() for n in raw.split(",") if n.strip()]
    for n in names:  # a typo is a usage error, not a skip
        try:
            torch.device(n)
        except RuntimeError as exc:
            raise pytest.UsageError(f"--devices: {n!r} is not a torch device ({exc})") from None
    return names


def pytest_generate_tests(metafunc):
    """Parametrize ``device`` over ``--devices``; unavailable devices skip with their reason."""
    if "device" in metafunc.fixturenames:
        params = []
        for name in _requested_devices(metafunc.config):
            reason = _unavailable(name)
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            params.append(pytest.param(name, id=name, marks=marks))
        metafunc.parametrize("device", params)


@pytest.fixture
def cuda_device(request) -> str:
    """The first CUDA device of ``--devices`` (cupy tests); skips when there is none or no cupy."""
    cuda = [n for n in _requested_devices(request.config) if torch.device(n).type == "cuda"]
    if not cuda:
        pytest.skip("no CUDA device in --devices (the cupy tests need one)")
    reason = _unavailable(cuda[0])
    if reason:
        pytest.skip(reason)
    pytest.importorskip("cupy", reason="cupy is not installed")
    return cuda[0]


@pytest.fixture(autouse=True, scope="module")
def _single_thread_ieee_float32():
    """Tiny tensors: one intra-op thread (the CPU is shared). IEEE float32 convolutions on CUDA
    instead of torch's default TF32. Previous settings are restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        old = conv.fp32_precision
        conv.fp32_precision = "ieee"
        restore = lambda: setattr(conv, "fp32_precision", old)  # noqa: E731
    else:  # pragma: no cover - torch < 2.9
        old = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        restore = lambda: setattr(torch.backends.cudnn, "allow_tf32", old)  # noqa: E731
    yield
    restore()
    torch.set_num_threads(n)


@contextlib.contextmanager
def foreign_defaults():
    """Point torch's defaults away from every module under test: factories called without
    ``device=`` make meta tensors (which cannot mix with real ones, like CPU tensors with CUDA
    ones) and without ``dtype=`` make float16 tensors (a precision no module uses). Meta is a
    little stricter than CUDA: a stray 0-dim CPU tensor, which CUDA ops accept (at the cost of a
    host-device sync), fails here too."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device("meta"):
            yield
    finally:
        torch.set_default_dtype(old)


# ---------------------------------------------------------------------------------- helpers
def rel(a, b, floor: float = 0.0) -> float:
    """Max-norm error of ``a`` relative to ``b`` (both moved to CPU float64)."""
    a = torch.as_tensor(a).detach().to("cpu", F64)
    b = torch.as_tensor(b).detach().to("cpu", F64)
    assert a.shape == b.shape, (a.shape, b.shape)
    if not b.numel():
        return 0.0
    scale = max(float(b.abs().max()), floor, 1e-300)
    return float((a - b).abs().max()) / scale


def perturb(module: torch.nn.Module, scale: float, seed: int) -> None:
    """Move every parameter by ``scale`` times a float64 CPU normal draw cast to its device and
    dtype: the same perturbation on every copy of a module (``conftest.randomize_parameters``
    draws in the parameter's dtype on the CPU, which neither follows the device nor agrees
    between float32 and float64 copies)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=F64)
            p.add_(scale * noise.to(device=p.device, dtype=p.dtype))


def assert_on(t, device: str, dtype: torch.dtype, what: str) -> None:
    """``t`` is a tensor on ``device`` (any index if none is given) with dtype ``dtype``."""
    assert isinstance(t, torch.Tensor), f"{what}: {type(t).__name__}"
    want = torch.device(device)
    on = t.device == want if want.index is not None else t.device.type == want.type
    assert on, f"{what}: on {t.device}, expected {device}"
    assert t.dtype == dtype, f"{what}: dtype {t.dtype}, expected {dtype}"


# ---------------------------------------------------------------------------------- catalogue
HIDDEN = 4


def _loop_matrix(n_data: int, n_model: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(12)
    return torch.randn(n_data, n_model, generator=gen, dtype=F64) / n_model**0.5


def _blur_pair():
    """A 2D blur as batched torch callables on the tensors' device and dtype."""
    k = torch.randn(3, 3, generator=torch.Generator().manual_seed(11), dtype=F64) / 3

    def forward(x):
        return F.conv2d(x[:, None], k.to(x)[None, None], padding=1)[:, 0]

    def adjoint(y):
        return F.conv_transpose2d(y[:, None], k.to(y)[None, None], padding=1)[:, 0]

    return forward, adjoint


def _bound_loop(type_: str, link, J) -> invops.InvertibleModule:
    """The i-RIM on the packed state cat(eta, s), with the data as its condition."""
    loop = invops.NetworkLoop(3, HIDDEN, maxiter=2, link=link, type=type_, ndim=2)
    return loop.bind(J)


def _summarized() -> invops.InvertibleModule:
    flow = invops.NetworkConditionalGlow(
        2, 2, 3, L=2, K=1, ndim=2, split_scales=True, squeeze="haar"
    )
    summary = torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(3, 2, 3, padding=1)
    )
    return invops.SummarizedNet(flow, summary)


def _additive_torch() -> invops.InvertibleModule:
    def fn(n_in, n_out):
        return torch.nn.Sequential(
            torch.nn.Conv2d(n_in, HIDDEN, 3, padding=1),
            torch.nn.Tanh(),
            torch.nn.Conv2d(HIDDEN, n_out, 3, padding=1),
        )

    return invops.AdditiveCoupling(4, fn(2, 2), fn(2, 2), ndim=2)


def _additive_blocks() -> invops.InvertibleModule:
    F_ = invops.MLPBlock(2, HIDDEN, 3, activation=torch.tanh)
    G_ = invops.MLPBlock(3, HIDDEN, 2, activation=torch.tanh)
    return invops.AdditiveCoupling(5, F_, G_, ndim=0)


@dataclass(frozen=True)
class Case:
    """A module (built on the CPU in the default dtype), its input shape and condition shapes."""

    name: str
    build: Callable[[], invops.InvertibleModule]
    x_shape: tuple[int, ...]
    cond_shapes: tuple[tuple[int, ...], ...] = ()
    scale: float = 0.3  # parameter perturbation (deep networks: 0.1, see test_networks.py)
    jvp_oracle: str = "torch.func"
    lane: bool = False  # has a condition lane (forward_y / inverse_y)

    def inputs(self) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        gen = torch.Generator().manual_seed(zlib.crc32(self.name.encode()))
        x = torch.randn(self.x_shape, generator=gen, dtype=F64)
        cond = tuple(torch.randn(s, generator=gen, dtype=F64) for s in self.cond_shapes)
        return x, cond


def _case(*args, **kwargs):
    case = Case(*args, **kwargs)
    return pytest.param(case, id=case.name)


LAYER_CASES = [
    _case("actnorm-2d", lambda: invops.ActNorm(3), (2, 3, 4, 4)),
    _case("actnorm-dense", lambda: invops.ActNorm(3), (3, 3)),
    _case("conv1x1-3d", lambda: invops.Conv1x1(3, n_reflections=3), (2, 3, 2, 3, 2)),
    _case("affine-1d", lambda: invops.AffineLayer((3, 5)), (2, 3, 5)),
    _case(
        "chain-with-reversed-2d",
        lambda: invops.Chain(
            invops.ActNorm(3),
            invops.Conv1x1(3),
            invops.AffineLayer((3, 4, 4)),
            invops.Conv1x1(3).reverse(),
        ),
        (2, 3, 4, 4),
    ),
    _case("leaky-relu-1d", lambda: invops.LeakyReLU(0.2), (2, 3, 5)),
    _case("sigmoid-2d", lambda: invops.Sigmoid(-1.0, 2.0), (2, 2, 3, 4)),
    _case("sigmoid2-dense", lambda: invops.Sigmoid2(), (3, 4)),
    _case("expclamp-1d", lambda: invops.ExpClamp(), (2, 3, 5)),
    _case("squeeze-checkerboard-2d", lambda: invops.Squeeze("checkerboard"), (2, 2, 4, 4)),
    _case("squeeze-patch-3d", lambda: invops.Squeeze("patch"), (2, 1, 2, 2, 4)),
    _case("haar-squeeze-2d", lambda: invops.HaarSqueeze(), (2, 2, 4, 4)),
    _case("coupling-basic-1d", lambda: invops.CouplingLayerBasic(3, HIDDEN, ndim=1), (2, 3, 5)),
    _case("coupling-glow-2d", lambda: invops.CouplingLayerGlow(3, HIDDEN, ndim=2), (2, 3, 3, 4)),
    _case("coupling-glow-dense", lambda: invops.CouplingLayerGlow(5, HIDDEN, ndim=0), (3, 5)),
    _case("coupling-glow-3d", lambda: invops.CouplingLayerGlow(3, HIDDEN, ndim=3), (2, 3, 2, 3, 2)),
    _case(
        "coupling-hint-both-2d",
        lambda: invops.CouplingLayerHINT(5, HIDDEN, permute="both", ndim=2),
        (2, 5, 3, 4),
    ),
    _case(
        "coupling-hint-full-dense",
        lambda: invops.CouplingLayerHINT(7, HIDDEN, permute="full", ndim=0),
        (3, 7),
    ),
    _case("coupling-irim-2d", lambda: invops.CouplingLayerIRIM(3, HIDDEN, ndim=2), (2, 3, 4, 8)),
    _case("additive-torch-2d", _additive_torch, (2, 4, 3, 4)),
    _case("additive-blocks-dense", _additive_blocks, (3, 5)),
    _case(
        "hyperbolic-squeeze-2d",
        lambda: invops.HyperbolicLayer(2, HIDDEN, action="squeeze", alpha=0.7, ndim=2),
        (2, 4, 2, 4),
    ),
    _case(
        "hyperbolic-none-1d",
        lambda: invops.HyperbolicLayer(3, HIDDEN, action="none", alpha=0.7, ndim=1),
        (2, 6, 5),
    ),
    _case(
        "cond-glow-image-2d",
        lambda: invops.ConditionalLayerGlow(3, 2, HIDDEN, ndim=2),
        (2, 3, 3, 4),
        ((2, 2, 3, 4),),
    ),
    _case(
        "cond-glow-vector-1d",
        lambda: invops.ConditionalLayerGlow(3, 2, HIDDEN, ndim=1),
        (2, 3, 5),
        ((2, 2),),
    ),
    _case(
        "cond-hint-1d",
        lambda: invops.ConditionalLayerHINT(3, 3, HIDDEN, permute=True, ndim=1),
        (2, 3, 5),
        ((2, 3, 5),),
        lane=True,
    ),
]

NETWORK_CASES = [
    _case(
        "glow-2d",
        lambda: invops.NetworkGlow(3, HIDDEN, L=2, K=2, split_scales=True, ndim=2),
        (2, 3, 4, 4),
        scale=0.1,
    ),
    _case(
        "glow-dense",
        lambda: invops.NetworkGlow(5, HIDDEN, L=2, K=1, split_scales=True, ndim=0),
        (3, 5),
        scale=0.1,
    ),
    _case(
        "hint-multiscale-1d",
        lambda: invops.NetworkMultiScaleHINT(
            3, HIDDEN, L=2, K=1, split_scales=True, ndim=1, squeeze="haar"
        ),
        (2, 3, 4),
        scale=0.1,
    ),
    _case(
        "hint-multiscale-3d",
        lambda: invops.NetworkMultiScaleHINT(2, HIDDEN, L=1, K=1, ndim=3, squeeze="patch"),
        (2, 2, 2, 2, 4),
        scale=0.1,
    ),
    _case(
        "cond-glow-net-2d",
        lambda: invops.NetworkConditionalGlow(
            2, 2, 3, L=2, K=1, split_scales=True, ndim=2, squeeze="haar"
        ),
        (2, 2, 4, 4),
        ((2, 2, 4, 4),),
        scale=0.1,
    ),
    _case(
        "cond-glow-net-vector-1d",
        lambda: invops.NetworkConditionalGlow(2, 3, 3, L=1, K=2, ndim=1, dense_condition=True),
        (2, 2, 6),
        ((2, 3),),
        scale=0.1,
    ),
    _case(
        "cond-hint-net-2d",
        lambda: invops.NetworkConditionalHINT(3, 3, 3, depth=2, permute=True, ndim=2),
        (2, 3, 3, 4),
        ((2, 3, 3, 4),),
        scale=0.1,
        lane=True,
    ),
    _case(
        "cond-hint-multiscale-2d",
        lambda: invops.NetworkMultiScaleConditionalHINT(1, 1, 3, L=2, K=1, split_scales=True),
        (2, 1, 4, 4),
        ((2, 1, 4, 4),),
        scale=0.1,
        lane=True,
    ),
    _case("summarized-2d", _summarized, (2, 2, 4, 4), ((2, 1, 4, 4),), scale=0.1),
    _case(
        "hyperbolic-net-2d",
        lambda: invops.NetworkHyperbolic(
            2, [("squeeze", 4), ("none", 4), ("unsqueeze", 4)], ndim=2, alpha=0.7
        ),
        (2, 4, 4, 4),
        scale=0.1,
    ),
    _case(
        "revnet-2d",
        lambda: invops.NetworkRevNet(3, HIDDEN, [1, 2], ndim=2),
        (2, 3, 4, 4),
        scale=0.1,
    ),
    _case(
        "unet-2d", lambda: invops.NetworkUNet(3, HIDDEN, [1, 1, 1], ndim=2), (2, 3, 4, 4), scale=0.1
    ),
    _case(
        "loop-matrix-additive-2d",
        lambda: _bound_loop("additive", "exp", as_operator(_loop_matrix(48, 64), (8, 8))),
        (2, 3, 8, 8),
        ((2, 48),),
        scale=0.1,
        jvp_oracle="forward_ad",
    ),
    _case(
        "loop-callables-hint-2d",
        lambda: _bound_loop("hint", "softplus", as_operator(_blur_pair(), (8, 8), (8, 8))),
        (2, 3, 8, 8),
        ((2, 8, 8),),
        scale=0.1,
        jvp_oracle="forward_ad",
    ),
]

CASES = LAYER_CASES + NETWORK_CASES


@dataclass
class Prepared:
    mod: invops.InvertibleModule  # on the device, in the dtype
    x: torch.Tensor
    cond: tuple[torch.Tensor, ...]
    ref: invops.InvertibleModule  # CPU float64, same parameters
    x_ref: torch.Tensor
    cond_ref: tuple[torch.Tensor, ...]


def _initialise(case: Case, module, x, cond) -> None:
    perturb(module, case.scale, seed=1)
    with torch.no_grad():
        module(x, *cond)  # data-dependent initialisation, on the module's device and dtype
        if case.lane:
            module.forward_y(cond[0])
    perturb(module, case.scale, seed=2)


def prepare(case: Case, device: str, dtype: torch.dtype) -> Prepared:
    torch.manual_seed(0)
    fresh = case.build()
    x64, cond64 = case.inputs()
    mod = copy.deepcopy(fresh).to(device=device, dtype=dtype)
    ref = copy.deepcopy(fresh).to(dtype=F64)
    x = x64.to(device=device, dtype=dtype)
    cond = tuple(c.to(device=device, dtype=dtype) for c in cond64)
    assert all(p.device.type == torch.device(device).type for p in mod.parameters())
    _initialise(case, mod, x, cond)
    _initialise(case, ref, x64, cond64)
    return Prepared(mod, x, cond, ref, x64, cond64)


# ---------------------------------------------------------------------------------- API runs
@dataclass
class Probes:
    """Cotangents and tangents (CPU float64), cast to each module's device and dtype."""

    dy: torch.Tensor
    dld: torch.Tensor | None
    dx: torch.Tensor
    dld_inv: torch.Tensor | None
    dtheta: list[torch.Tensor]
    dcond: list[torch.Tensor]
    dzy: torch.Tensor | None

    @classmethod
    def draw(cls, p: Prepared) -> Probes:
        gen = torch.Generator().manual_seed(5)

        def rnd(shape):
            return torch.randn(tuple(shape), generator=gen, dtype=F64)

        with torch.no_grad():
            out = p.ref(p.x_ref, *p.cond_ref)
        y = out[0] if p.ref.logdet else out
        batch = p.x_ref.shape[0]
        return cls(
            dy=rnd(y.shape),
            dld=rnd((batch,)) if p.ref.logdet else None,
            dx=rnd(p.x_ref.shape),
            dld_inv=rnd((batch,)) if p.ref.logdet else None,
            dtheta=[rnd(q.shape) for q in p.ref.parameters()],
            dcond=[rnd(c.shape) for c in p.cond_ref],
            dzy=rnd(p.cond_ref[0].shape) if hasattr(p.ref, "y_lane") else None,
        )

    def on(self, like: torch.Tensor) -> Probes:
        def mv(t):
            return None if t is None else t.to(device=like.device, dtype=like.dtype)

        return Probes(
            mv(self.dy),
            mv(self.dld),
            mv(self.dx),
            mv(self.dld_inv),
            [mv(t) for t in self.dtheta],
            [mv(t) for t in self.dcond],
            mv(self.dzy),
        )


def _split(module, out):
    return out if module.logdet else (out, None)


def run_api(module, x, cond, probes: Probes) -> dict[str, torch.Tensor]:
    """Every public method of ``module`` at ``x`` (tensors only, made before this call)."""
    res: dict[str, torch.Tensor] = {}
    params = list(module.parameters())
    with torch.no_grad():
        y, ld = _split(module, module(x, *cond))
        x_inv, ld_inv = _split(module, module.inverse(y, *cond))
    res["forward:y"] = y
    if ld is not None:
        res["forward:logdet"] = ld
    res["inverse:x"] = x_inv
    if ld_inv is not None:
        res["inverse:logdet"] = ld_inv

    module.zero_grad(set_to_none=True)
    out = module.backward(probes.dy, y, *cond, dlogdet=probes.dld)
    res["backward:dx"], res["backward:x"] = out[0], out[1]
    if cond:
        dcond = out[2] if len(cond) > 1 else (out[2],)
        res.update({f"backward:dcond{i}": d for i, d in enumerate(dcond)})
    res.update({f"backward:p{i}.grad": q.grad for i, q in enumerate(params) if q.grad is not None})

    dx, dtheta, x_v, *_ = module.vjp(probes.dy, y, *cond, dlogdet=probes.dld)
    res["vjp:dx"], res["vjp:x"] = dx, x_v
    res.update({f"vjp:dtheta{i}": d for i, d in enumerate(dtheta)})

    module.zero_grad(set_to_none=True)
    out = module.backward_inverse(probes.dx, x, *cond, dlogdet=probes.dld_inv)
    res["backward_inverse:dy"], res["backward_inverse:y"] = out[0], out[1]

    # the autograd bridge
    module.zero_grad(set_to_none=True)
    xr = x.clone().requires_grad_()
    cr = [c.clone().requires_grad_() for c in cond]
    yb, ldb = _split(module, module(xr, *cr))
    loss = (yb * probes.dy).sum() + ((ldb * probes.dld).sum() if ldb is not None else 0.0)
    loss.backward()
    res["bridge:x.grad"] = xr.grad
    res.update({f"bridge:cond{i}.grad": c.grad for i, c in enumerate(cr)})
    res.update({f"bridge:p{i}.grad": q.grad for i, q in enumerate(params) if q.grad is not None})
    module.zero_grad(set_to_none=True)

    out = module.jvp(
        x, *cond, dx=probes.dx, dtheta=probes.dtheta, dcond=probes.dcond if cond else None
    )
    res["jvp:y"], res["jvp:dy"] = out[0], out[1]
    if module.logdet:
        res["jvp:logdet"], res["jvp:dlogdet"] = out[2], out[3]

    if probes.dzy is not None:  # the condition lane of conditional HINTs
        with torch.no_grad():
            zy, ldy = _split(module, module.forward_y(cond[0]))
            y_back, _ = _split(module, module.inverse_y(zy))
        res["forward_y:zy"], res["inverse_y:y"] = zy, y_back
        if ldy is not None:
            res["forward_y:logdet"] = ldy
    return res


# ---------------------------------------------------------------------------------- the checks
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_outputs_stay_on_device_and_dtype(case, device, dtype):
    """Every result is on the device in the dtype, also with torch's defaults pointing away
    (meta device, float16), and those results equal the ones made under the usual defaults."""
    p = prepare(case, device, dtype)
    probes = Probes.draw(p).on(p.x)
    plain = run_api(p.mod, p.x, p.cond, probes)
    with foreign_defaults():
        foreign = run_api(p.mod, p.x, p.cond, probes)
    assert plain.keys() == foreign.keys()
    assert any(k.startswith("backward:p") for k in plain) == bool(list(p.mod.parameters()))
    for key, value in plain.items():
        assert_on(value, device, dtype, key)
        assert_on(foreign[key], device, dtype, f"{key} (foreign defaults)")
    floor = 1e-6 * max(float(v.abs().max()) for v in plain.values() if v.numel())
    errs = {k: rel(foreign[k], v, floor) for k, v in plain.items()}
    bad = {k: e for k, e in errs.items() if not e <= TOL[dtype]["probe"]}
    assert not bad, f"results change with torch's default device/dtype: {bad}"
    # numpy vectors through the Jacobian (pylops' own backend) come back as numpy
    J = p.mod.jacobian(p.x, *p.cond, wrt="both")
    v = np.ones(J.shape[1], dtype=J.dtype)
    Jv = J @ v
    assert isinstance(Jv, np.ndarray) and Jv.dtype == J.dtype == np.dtype(str(dtype)[6:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_inverse_recovers_input(case, device, dtype):
    p = prepare(case, device, dtype)
    tol = TOL[dtype]["inverse"]
    assert check_invertible(p.mod, p.x, *p.cond, rtol=tol) <= tol
    with torch.no_grad():
        y, _ = _split(p.mod, p.mod(p.x, *p.cond))
    if y.shape == p.x.shape:  # the round trip is not the one of an identity map
        assert rel(y, p.x) > 1e-3
    if case.lane:
        assert check_invertible(p.mod.y_lane, p.cond[0], rtol=tol) <= tol


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_reverse_mode_and_jvp_match_autograd(case, device, dtype):
    """``backward``, ``vjp``, ``backward_inverse`` and the bridge against plain autograd (input,
    condition and parameter cotangents, non-zero logdet cotangent), ``jvp`` against
    ``torch.func.jvp`` (forward AD for the i-RIM), and ``loss.backward()`` through the bridge
    against ``invops.plain_autograd()`` into ``p.grad``."""
    p = prepare(case, device, dtype)
    tol = TOL[dtype]["grad"]
    errors = check_against_autograd(p.mod, p.x, *p.cond, rtol=tol, jvp_oracle=case.jvp_oracle)
    assert all(f"backward:cond{i}" in errors for i in range(len(p.cond)))

    params = list(p.mod.parameters())
    probes = Probes.draw(p).on(p.x)
    grads = []
    for plain in (False, True):
        p.mod.zero_grad(set_to_none=True)
        xr = p.x.clone().requires_grad_()
        cr = [c.clone().requires_grad_() for c in p.cond]
        with invops.plain_autograd(plain):
            y, ld = _split(p.mod, p.mod(xr, *cr))
            assert ("MemoryFree" in type(y.grad_fn).__name__) != plain
            loss = (y * probes.dy).sum() + ((ld * probes.dld).sum() if ld is not None else 0.0)
            loss.backward()
        got = [xr.grad, *(c.grad for c in cr), *(q.grad for q in params)]
        for i, g in enumerate(got):
            assert g is not None, f"gradient {i} missing (plain={plain})"
            assert_on(g, device, dtype, f"gradient {i} (plain={plain})")
        grads.append(got)
    floor = 1e-6 * max(float(g.abs().max()) for g in grads[1])
    errs = [rel(a, b, floor) for a, b in zip(*grads)]
    assert max(errs) <= tol, errs
    assert float(grads[1][0].abs().max()) > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_jacobian_dottest(case, device, dtype):
    p = prepare(case, device, dtype)
    J = p.mod.jacobian(p.x, *p.cond, wrt="both")
    n_params = sum(q.numel() for q in p.mod.parameters() if q.requires_grad)
    assert J.shape[1] == p.x.numel() + n_params
    assert dottest(J, rtol=TOL[dtype]["dottest"], n_trials=2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_matches_cpu_float64(case, device, dtype):
    """The same parameters on the device in the dtype give the results of the CPU float64 copy:
    outputs, logdets, inverses, every cotangent, tangent and parameter gradient."""
    p = prepare(case, device, dtype)
    probes = Probes.draw(p)
    got = run_api(p.mod, p.x, p.cond, probes.on(p.x))
    ref = run_api(p.ref, p.x_ref, p.cond_ref, probes)
    assert got.keys() == ref.keys()
    floor = 1e-6 * max(float(v.abs().max()) for v in ref.values() if v.numel())
    errs = {k: rel(got[k], ref[k], floor) for k in ref}
    bad = {k: e for k, e in errs.items() if not e <= TOL[dtype]["agree"]}
    assert not bad, bad
    if p.x.shape == ref["forward:y"].shape:
        assert rel(ref["forward:y"], p.x_ref) > 1e-3  # not an identity map


def _scalar_dlogdet_cases():
    """The cases with a log-determinant (the parameterless ones with an input-dependent logdet,
    Sigmoid, Sigmoid2 and ExpClamp, once built their scalar cotangent on torch's defaults)."""
    return [param for param in CASES if param.values[0].build().logdet]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", _scalar_dlogdet_cases())
def test_scalar_dlogdet_follows_the_module(case, device, dtype):
    """A Python-number ``dlogdet`` means the same as a ``(B,)`` tensor of it on the device in the
    dtype, whatever torch's defaults are."""
    p = prepare(case, device, dtype)
    probes = Probes.draw(p).on(p.x)
    with torch.no_grad():
        y, _ = p.mod(p.x, *p.cond)
    full = torch.full((p.x.shape[0],), 0.7, dtype=dtype, device=p.x.device)
    want = [
        p.mod.vjp(probes.dy, y, *p.cond, dlogdet=full)[0],
        p.mod.backward_inverse(probes.dx, p.x, *p.cond, dlogdet=full)[0],
    ]
    with foreign_defaults():
        got = [
            p.mod.vjp(probes.dy, y, *p.cond, dlogdet=0.7)[0],
            p.mod.backward_inverse(probes.dx, p.x, *p.cond, dlogdet=0.7)[0],
        ]
    for name, a, b in zip(("vjp", "backward_inverse"), got, want):
        assert_on(a, device, dtype, name)
        assert rel(a, b) <= TOL[dtype]["probe"], name


# ---------------------------------------------------------------------------------- extras
@pytest.mark.parametrize("dtype", DTYPES)
def test_samples_on_device(device, dtype):
    """``sample`` draws its latents on the module's device in its dtype."""
    torch.manual_seed(0)
    glow = invops.NetworkGlow(2, HIDDEN, L=2, K=1, ndim=2).to(device=device, dtype=dtype)
    hint = invops.NetworkMultiScaleHINT(2, HIDDEN, L=1, K=1, ndim=1).to(device=device, dtype=dtype)
    cglow = invops.NetworkConditionalGlow(2, 2, 3, L=1, K=1, ndim=2).to(device=device, dtype=dtype)
    c = torch.randn(3, 2, 4, 4, dtype=F64).to(device=device, dtype=dtype)
    draws = {
        "NetworkGlow": (glow.sample(3, (2, 4, 4)), (3, 2, 4, 4)),
        "NetworkMultiScaleHINT": (hint.sample(2, (2, 6)), (2, 2, 6)),
        "NetworkConditionalGlow": (cglow.sample(c, 2), (2, 3, 2, 4, 4)),
    }
    for name, (s, shape) in draws.items():
        assert_on(s, device, dtype, name)
        assert s.shape == shape and bool(torch.isfinite(s).all()), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_loop_public_api_on_device(device, dtype):
    """NetworkLoop's own methods (eta, s, d, J separately) with a torch-callable operator."""
    torch.manual_seed(0)
    J = _blur_pair()
    loop = invops.NetworkLoop(3, HIDDEN, maxiter=2, link="softplus", type="hint", ndim=2)
    loop = loop.to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(3)
    eta, s, d, w = (
        torch.randn(shape, generator=gen, dtype=F64).to(device=device, dtype=dtype)
        for shape in ((2, 1, 8, 8), (2, 2, 8, 8), (2, 8, 8), (2, 1, 8, 8))
    )
    with torch.no_grad():
        loop(eta, s, d, J)
    perturb(loop, 0.1, seed=2)
    eta_out, s_out = loop(eta, s, d, J)
    eta_in, s_in = loop.inverse(eta_out, s_out, d, J)
    tol = TOL[dtype]["inverse"]
    assert rel(eta_out, eta) > 1e-3
    assert rel(eta_in, eta) <= tol and rel(s_in, s) <= tol
    deta, ds, eta_r, s_r, dd = loop.backward(w, torch.zeros_like(s_out), eta_out, s_out, d, J)
    out = dict(eta_out=eta_out, s_out=s_out, deta=deta, ds=ds, eta_r=eta_r, s_r=s_r, dd=dd)
    *_, dtheta, _, _, dd_v = loop.vjp(w, torch.zeros_like(s_out), eta_out, s_out, d, J)
    out.update(dd_v=dd_v, **{f"dtheta{i}": t for i, t in enumerate(dtheta)})
    res = loop.jvp(eta, s, d, J, deta=w, ds=torch.zeros_like(s), dd=torch.ones_like(d))
    out.update({f"jvp{i}": t for i, t in enumerate(res)})
    for name, t in out.items():
        assert_on(t, device, dtype, name)
    assert rel(dd, dd_v) <= TOL[dtype]["probe"] and float(dd.abs().max()) > 0
    J_lin = loop.jacobian(eta, s, d, J, wrt="input")
    assert dottest(J_lin, rtol=TOL[dtype]["dottest"])


def _block_cases():
    return {
        "residual-strided-2d": (
            lambda: invops.ResidualBlock(3, HIDDEN, n_out=4, k1=4, p1=0, s1=2, fan=True),
            (2, 3, 4, 4),
            (),
        ),
        "residual-galu-3d": (
            lambda: invops.ResidualBlock(2, HIDDEN, ndim=3, activation=torch.tanh),
            (2, 2, 2, 3, 2),
            (),
        ),
        "conditional-residual-1d": (
            lambda: invops.ConditionalResidualBlock(2, 3, HIDDEN, n_out=4, fan=True, ndim=1),
            (2, 2, 5),
            ((2, 3),),
        ),
        "mlp-dense": (lambda: invops.MLPBlock(3, HIDDEN, 4, activation=torch.tanh), (3, 3), ()),
        "torch-block-2d": (
            lambda: invops.TorchBlock(
                torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.Tanh())
            ),
            (2, 2, 3, 4),
            (),
        ),
        "relu": (invops.ReLU, (2, 3, 5), ()),
        "galu": (invops.GaLU, (2, 4, 5), ()),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(_block_cases()))
def test_blocks_on_device(name, device, dtype):
    """Non-invertible blocks: ``backward``, ``vjp`` and ``jvp`` on the device in the dtype, equal
    to plain autograd there and to the CPU float64 copy."""
    build, x_shape, cond_shapes = _block_cases()[name]
    torch.manual_seed(0)
    fresh = build()
    gen = torch.Generator().manual_seed(4)
    x64 = torch.randn(x_shape, generator=gen, dtype=F64)
    cond64 = tuple(torch.randn(s, generator=gen, dtype=F64) for s in cond_shapes)
    results = []
    for dev, dt in ((device, dtype), ("cpu", F64)):
        block = copy.deepcopy(fresh).to(device=dev, dtype=dt)
        perturb(block, 0.3, seed=1)
        x = x64.to(device=dev, dtype=dt)
        cond = tuple(c.to(device=dev, dtype=dt) for c in cond64)
        y = block(x, *cond)
        g2 = torch.Generator().manual_seed(6)
        dy = torch.randn(y.shape, generator=g2, dtype=F64).to(device=dev, dtype=dt)
        dx = torch.randn(x.shape, generator=g2, dtype=F64).to(device=dev, dtype=dt)
        params = list(block.parameters())
        dth = [
            torch.randn(q.shape, generator=g2, dtype=F64).to(device=dev, dtype=dt) for q in params
        ]
        block.zero_grad(set_to_none=True)
        out = block.backward(dy, x, *cond)
        dx_b = out[0] if cond else out
        grads = [q.grad for q in params]
        dx_v, dtheta, *dcond = block.vjp(dy, x, *cond)
        y_j, dy_j = block.jvp(x, *cond, dx=dx, dtheta=dth)
        # oracles on the same device: plain autograd and forward AD of the plain forward
        xr = x.clone().requires_grad_()
        cr = [c.clone().requires_grad_() for c in cond]
        with torch.enable_grad():
            ref = torch.autograd.grad(
                (block(xr, *cr) * dy).sum(), [xr, *cr, *params], allow_unused=True
            )
        names = [n for n, _ in block.named_parameters()]

        def f(x_, *ps, cond=cond, names=names, block=block):
            return torch.func.functional_call(block, dict(zip(names, ps)), (x_, *cond))

        _, dy_ref = torch.func.jvp(f, (x, *(q.detach() for q in params)), (dx, *dth))
        got = [dx_b, *(dcond or []), *grads]
        tol = TOL[dtype]["grad"]
        assert rel(dx_v, ref[0]) <= tol and rel(dx_b, ref[0]) <= tol
        for a, b in zip(got[1:], ref[1:]):
            assert b is not None and rel(a, b) <= tol
        assert all(rel(a, b) <= tol for a, b in zip(dtheta, ref[1 + len(cond) :]))
        assert rel(dy_j, dy_ref) <= tol and rel(y_j, y) == 0.0
        for i, t in enumerate([y, dx_b, dx_v, y_j, dy_j, *dtheta, *grads]):
            assert_on(t, dev, dt, f"result {i}")
        results.append([y, dx_b, dy_j, *dtheta])
    for a, b in zip(*results):
        assert rel(a, b) <= TOL[dtype]["agree"]


# ---------------------------------------------------------------------------------- arrays
def _array_modules(device, dtype):
    """A layer and a network (conditional), prepared on the device in the dtype."""
    layer = prepare(LAYER_CASES[13].values[0], device, dtype)  # coupling-glow-2d
    net = prepare(NETWORK_CASES[4].values[0], device, dtype)  # cond-glow-net-2d
    assert layer.mod.__class__ is invops.CouplingLayerGlow
    assert net.mod.__class__ is invops.NetworkConditionalGlow
    return {"layer": layer, "network": net}


def _array_api(module, x, cond, dy, dx, to_array):
    """forward, inverse, backward, vjp, jvp with ``to_array`` inputs; flat list of outputs."""
    xa, ca, dya, dxa = to_array(x), [to_array(c) for c in cond], to_array(dy), to_array(dx)
    y, ld = module(xa, *ca)
    x_inv, ld_inv = module.inverse(y, *ca)
    dx_b, x_b, *dc = module.backward(dya, y, *ca, dlogdet=1.5)
    dx_v, dtheta, x_v, *dc_v = module.vjp(dya, y, *ca, dlogdet=1.5)
    jvp = module.jvp(xa, *ca, dx=dxa)
    return [y, ld, x_inv, ld_inv, dx_b, x_b, *dc, dx_v, *dtheta, x_v, *dc_v, *jvp]


@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_in_numpy_out(device, dtype):
    """numpy arrays in give numpy arrays out, equal to the torch path on the device (the
    module's device; a numpy input is copied there)."""
    for what, p in _array_modules(device, dtype).items():
        gen = torch.Generator().manual_seed(8)
        dy = torch.randn(p.x.shape, generator=gen, dtype=F64).to(p.x)
        dx = torch.randn(p.x.shape, generator=gen, dtype=F64).to(p.x)
        x_np = p.x.cpu().numpy().copy()
        snapshot = x_np.copy()
        got = _array_api(p.mod, p.x, p.cond, dy, dx, lambda t: t.cpu().numpy().copy())
        ref = _array_api(p.mod, p.x, p.cond, dy, dx, lambda t: t)
        assert len(got) == len(ref)
        for i, (a, b) in enumerate(zip(got, ref)):
            assert isinstance(a, np.ndarray), f"{what} output {i}: {type(a).__name__}"
            assert a.dtype == np.dtype(str(dtype)[6:]), f"{what} output {i}: {a.dtype}"
            assert rel(torch.from_numpy(a), b) <= TOL[dtype]["probe"], f"{what} output {i}"
        assert np.array_equal(x_np, snapshot)


def test_numpy_zero_copy():
    """numpy <-> CPU tensors share memory (data pointers), both ways; arrays torch must not
    share (read-only, negative strides) are copied."""
    a = np.random.default_rng(0).standard_normal((3, 4, 5))
    t = to_torch(a)
    assert t.data_ptr() == a.ctypes.data and t.device.type == "cpu"
    back = from_torch(t, "numpy")
    assert back.ctypes.data == t.data_ptr()
    u = torch.randn(2, 3, dtype=F64)
    assert from_torch(u, "numpy").ctypes.data == u.data_ptr()
    flipped = a[:, ::-1]
    assert to_torch(flipped).data_ptr() != flipped.ctypes.data
    assert torch.equal(to_torch(flipped), torch.from_numpy(flipped.copy()))


def test_numpy_to_device_copies(device):
    """A numpy array given for a module on the device is moved there (a copy off the CPU)."""
    a = np.arange(6.0).reshape(2, 3)
    t = to_torch(a, device=device)
    assert t.device.type == torch.device(device).type
    assert torch.equal(t.cpu(), torch.from_numpy(a))
    if torch.device(device).type == "cpu":
        assert t.data_ptr() == a.ctypes.data
    else:
        assert from_torch(t, "numpy").ctypes.data != a.ctypes.data


def test_cupy_zero_copy(cuda_device):
    """cupy <-> CUDA tensors share memory (data pointers), both ways."""
    import cupy

    with cupy.cuda.Device(torch.device(cuda_device).index or 0):
        a = cupy.random.standard_normal((3, 4, 5))
    t = to_torch(a)
    assert t.device.type == "cuda" and t.data_ptr() == a.data.ptr
    assert from_torch(t, "cupy").data.ptr == t.data_ptr()
    u = torch.randn(2, 3, dtype=F64, device=cuda_device)
    c = from_torch(u, "cupy")
    assert isinstance(c, cupy.ndarray) and c.data.ptr == u.data_ptr()
    # a CPU tensor asked for as cupy lands on the GPU (a copy)
    v = torch.randn(4)
    assert isinstance(from_torch(v, "cupy"), cupy.ndarray)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cupy_in_cupy_out(cuda_device, dtype):
    """cupy arrays in give cupy arrays out, equal to the torch path; the Jacobian takes cupy
    vectors (pylops' cupy backend) and passes the dot test there."""
    import cupy
    import pylops

    for what, p in _array_modules(cuda_device, dtype).items():
        gen = torch.Generator().manual_seed(8)
        dy = torch.randn(p.x.shape, generator=gen, dtype=F64).to(p.x)
        dx = torch.randn(p.x.shape, generator=gen, dtype=F64).to(p.x)
        x_cp = cupy.from_dlpack(p.x.clone())
        # already on the module's device: no copy
        assert to_torch(x_cp, device=p.x.device).data_ptr() == x_cp.data.ptr
        got = _array_api(p.mod, p.x, p.cond, dy, dx, lambda t: cupy.from_dlpack(t.clone()))
        ref = _array_api(p.mod, p.x, p.cond, dy, dx, lambda t: t)
        for i, (a, b) in enumerate(zip(got, ref)):
            assert isinstance(a, cupy.ndarray), f"{what} output {i}: {type(a).__name__}"
            assert a.dtype == np.dtype(str(dtype)[6:])
            assert rel(torch.from_dlpack(a), b) <= TOL[dtype]["probe"], f"{what} output {i}"
        J = p.mod.jacobian(x_cp, *(cupy.from_dlpack(c.clone()) for c in p.cond), wrt="both")
        w = J @ cupy.ones(J.shape[1], dtype=J.dtype)
        assert isinstance(w, cupy.ndarray)
        cupy.random.seed(0)  # pylops' cupy backend draws from cupy's global state
        assert pylops.utils.dottest(
            J, rtol=TOL[dtype]["dottest"], atol=0.0, backend="cupy", raiseerror=True
        )
