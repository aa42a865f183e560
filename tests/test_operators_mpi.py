"""Distributed physics operators (pylops-mpi): two ranks under ``mpiexec`` against one process.

``mpi_worker.py`` runs under ``mpiexec -n 2`` (one launch for the whole module, bounded in
time): each rank holds half of the shots of a multi-shot operator (``MPIVStack``) and the same
models, and records an i-RIM loop in every mode, an operator composition, two kinds of
data-parallel training, and what it raised for bad input. Here one process runs the same
functions with the whole operator (``pylops.VStack`` of all shots, no MPI) and the results are
compared: replicated results equal on both ranks and to the single process to 1e-10 (float64),
data-side results equal to the rank's block of the single-process ones.

The module is skipped, with the reason, when mpi4py, pylops-mpi or ``mpiexec`` are missing
(``pip install invops[mpi] mpich``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mpi_worker as W
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("mpi_worker.py")
TOL = 1e-10
SIZE = 2


def mpiexec() -> str | None:
    """The ``mpiexec`` next to this Python (the ``mpich`` wheel puts it there), else on PATH."""
    local = Path(sys.executable).with_name("mpiexec")
    return str(local) if local.exists() else shutil.which("mpiexec")


def mpi_missing() -> str | None:
    for module in ("mpi4py", "pylops_mpi"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install 'invops[mpi]' mpich)"
    if mpiexec() is None:
        return "no mpiexec next to the Python executable or on PATH (pip install mpich)"
    return None


def run_mpi(args: list[str], timeout: float, n: int = SIZE) -> subprocess.CompletedProcess:
    """``mpiexec -n N python -m mpi4py ARGS`` with this repository importable, killed whole
    (every rank) if it runs past ``timeout``: a deadlock fails the test instead of hanging it."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [mpiexec(), "-n", str(n), sys.executable, "-m", "mpi4py", *args]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"mpiexec ran past {timeout} s (a deadlock?)\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    reason = mpi_missing()
    if reason is not None:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("mpi")
    proc = run_mpi([str(WORKER), "--out", str(out)], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(SIZE)]
    results[0]["stdout"], results[0]["figure"] = proc.stdout, out / "irim_multishot.png"
    return results


@pytest.fixture(scope="module")
def single():
    """The same functions in this process, on the whole operator and the whole data."""
    torch.set_num_threads(1)
    whole, rows = W.whole_operator(), slice(None)
    result = {"loop": W.run_loop(whole, rows), "composition": W.run_composition(whole, rows)}
    jac = result["composition"].pop("_jacobian_operator")
    result["composition_dottest"] = bool(__import__("pylops").utils.dottest(jac, rtol=1e-10))
    x = W.loop_inputs()
    result["ddp_same_batch"] = W.train_step(W.make_loop(), whole, x, rows)
    result["ddp_groups"] = W.train_step(W.make_loop(), whole, W.loop_inputs(2 * W.BATCH), rows)
    return result


@pytest.mark.slow
def test_ddp_over_a_grid_of_two_operator_groups_of_two_ranks(tmp_path, single):
    """4 ranks: 2 data-parallel replicas, each with the operator split over its 2 ranks."""
    reason = mpi_missing()
    if reason is not None:
        pytest.skip(reason)
    proc = run_mpi([str(WORKER), "--out", str(tmp_path), "--groups-of", "2"], timeout=600, n=4)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    want = single["ddp_groups"]
    for r in range(4):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)["ddp_groups"]
        assert_close(got["grads"], want["grads"], f"gradients on rank {r}")
        assert_close(got["params"], want["params"], f"step on rank {r}")


def assert_close(got, want, what, tol=TOL):
    got = got if isinstance(got, (list, tuple)) else [got]
    want = want if isinstance(want, (list, tuple)) else [want]
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == w.shape, (what, i, g.shape, w.shape)
        scale = w.abs().max().clamp(min=1e-12)
        err = (g - w).abs().max() / scale
        assert err <= tol, f"{what}[{i}]: relative difference {err:.3g} > {tol}"


LOOP_MODES = [
    "params_after_init",
    "forward",
    "inverse",
    "backward",
    "backward_grads",
    "vjp",
    "jvp",
    "jacobian",
]


@pytest.mark.parametrize("route", ["loop", "loop_per_sample"])
@pytest.mark.parametrize("mode", LOOP_MODES)
def test_loop_on_every_rank_equals_single_process(ranks, single, mode, route):
    want = single["loop"][mode]
    assert any(w.abs().max() > 0 for w in want), f"vacuous: {mode} is zero"
    for r in range(SIZE):
        assert_close(ranks[r][route][mode], want, f"{mode} on rank {r}")
    # identical, not only close: J^H r reaches every rank from one all-reduce
    for g0, g1 in zip(ranks[0][route][mode], ranks[1][route][mode], strict=True):
        assert torch.equal(g0, g1), f"{mode} differs between the ranks"


@pytest.mark.parametrize("route", ["loop", "loop_per_sample"])
@pytest.mark.parametrize("mode", ["backward_dd", "vjp_dd"])
def test_data_cotangent_is_the_ranks_block(ranks, single, mode, route):
    want = single["loop"][mode]
    assert want.abs().max() > 0
    blocks = [ranks[r][route][mode] for r in range(SIZE)]
    for r in range(SIZE):
        assert_close(blocks[r], want[:, W.data_rows(r, SIZE)], f"{mode} on rank {r}")
    assert_close(torch.cat(blocks, dim=1), want, mode)


@pytest.mark.parametrize("route", ["loop", "loop_per_sample"])
def test_loop_jacobian_dot_tests_pass_on_every_rank(ranks, single, route):
    assert single["loop"]["jacobian_dottest"] and single["loop"]["jacobian_params_dottest"]
    for r in range(SIZE):
        assert ranks[r][route]["jacobian_dottest"], f"input Jacobian dot test on rank {r}"
        assert ranks[r][route]["jacobian_params_dottest"], f"params Jacobian on rank {r}"


def test_actnorm_initialisation_is_identical_on_every_rank(ranks, single):
    loop = W.make_loop()
    names = [n for n, _ in loop.named_parameters()]
    actnorm = [i for i, n in enumerate(names) if ".normalize." in n]
    assert actnorm, names
    for r in range(SIZE):
        got = ranks[r]["loop"]["params_after_init"]
        want = single["loop"]["params_after_init"]
        for i in actnorm:
            assert torch.equal(got[i], ranks[0]["loop"]["params_after_init"][i]), names[i]
            assert_close(got[i], want[i], f"{names[i]} on rank {r}")
            # the initialisation changed them (the test would be vacuous otherwise)
            assert not torch.equal(got[i], dict(loop.named_parameters())[names[i]].detach())


def test_composition_with_a_distributed_operator(ranks, single):
    want = single["composition"]
    for r in range(SIZE):
        got = ranks[r]["composition"]
        rows = W.data_rows(r, SIZE)
        assert_close(got["output"], want["output"][:, rows], f"A @ G^-1 output on rank {r}")
        # each rank's local misfit, backpropagated, gives the gradient of the global misfit
        assert_close(got["grads"], want["grads"], f"gradients on rank {r}")
        assert_close(
            got["jacobian"][0],
            want["jacobian"][0].reshape(W.BATCH, -1)[:, rows].reshape(-1),
            f"J v on rank {r}",
        )
        assert_close(got["jacobian"][1], want["jacobian"][1], f"J^H w on rank {r}")
        assert got["distributed_dottest"]
    assert single["composition_dottest"]


@pytest.mark.parametrize("case", ["ddp_same_batch", "ddp_groups"])
def test_training_with_ddp_equals_single_process(ranks, single, case):
    want = single[case]
    for r in range(SIZE):
        assert_close(ranks[r][case]["grads"], want["grads"], f"{case} gradients on rank {r}")
        assert_close(ranks[r][case]["params"], want["params"], f"{case} step on rank {r}")


BAD_INPUT = {
    "model_split": "the model must be replicated on every rank",
    "data_size_one_rank": "(on rank 1 of the distributed operator MPIVStack over 2 ranks)",
    "model_differs": "rank 1 holds a different batch than rank 0",
    "data_batch_one_rank": "got batch sizes (rank: B) {0: 2, 1: 3}",
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_raises_the_same_error_on_every_rank(ranks, case):
    messages = [ranks[r]["errors"][case] for r in range(SIZE)]
    for r, message in enumerate(messages):
        assert message is not None, f"{case}: rank {r} raised nothing"
        assert BAD_INPUT[case] in message, message
    assert messages[0] == messages[1]


def test_multishot_example_under_mpiexec_equals_the_single_process_run(ranks):
    """``examples/irim_multishot.py`` at a reduced size: 2 ranks, the rerun in one process."""
    got = ranks[0]["example"]
    assert got["ranks"] == SIZE
    assert got["max_param_difference_between_ranks"] == 0
    # Adam magnifies rounding differences of near-zero gradient entries; far below 1e-6 still
    assert got["single_process_param_difference"] < 1e-6, got
    assert got["single_process_estimate_difference"] < 1e-6, got
    assert all(np.isfinite(got[k]) for k in ("irim_psnr", "cgls_psnr")), got
    assert "equal to rounding" in ranks[0]["stdout"], ranks[0]["stdout"]
    assert ranks[0]["figure"].stat().st_size > 10_000
    assert ranks[1]["example"]["ranks"] == SIZE


def test_as_operator_names_pylops_mpi_in_its_type_error():
    with pytest.raises(TypeError, match="pylops-mpi MPILinearOperator"):
        W.as_operator(object())


def test_importing_the_module_does_not_start_mpi():
    import invops.operators_mpi  # noqa: F401

    assert "mpi4py.MPI" not in sys.modules
