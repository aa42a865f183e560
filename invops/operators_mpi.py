r"""Distributed physics operators: pylops-mpi operators inside i-RIM loops and operator algebra.

When the physics operator outgrows one machine (thousands of shots, 3D wave-equation or
Kirchhoff operators), PyLops users distribute it with `pylops-mpi
<https://pylops.github.io/pylops-mpi/>`_: an ``MPIVStack`` of each rank's shots maps a model
held by every rank (``Partition.BROADCAST``) to data split across the ranks
(``Partition.SCATTER``), and its adjoint sums the ranks' contributions :math:`\sum_r J_r^H r_r`
with an all-reduce. :func:`invops.operators.as_operator` accepts such operators and returns an
:class:`MPIOperator`; nothing else changes in the user's code.

The layout (checked at every call, collectively, so a mistake raises the same ``ValueError`` on
every rank instead of leaving the others waiting in a collective call):

- **model replicated**: every rank of the operator's communicator passes the same batch of
  models (``eta, s`` of a :class:`~invops.NetworkLoop`);
- **data split**: each rank passes its own block ``d`` of every sample's data, shaped as that
  rank's part of the operator's output (``data_shape`` may differ from rank to rank);
- every rank calls the same methods in the same order (the adjoint is a collective call).

Then ``J psi(eta)`` is each rank's local predicted data, ``J^H r`` is summed over the ranks by
pylops-mpi, and everything downstream of the data-fit gradient -- a whole ``NetworkLoop``
(forward, inverse, backward, vjp, jvp, jacobian), ActNorm's data-dependent initialisation, the
parameter gradients -- is identical on every rank and equal to the single-process loop with
the whole operator.

Requires the ``mpi`` extra (``pip install invops[mpi]``: mpi4py and pylops-mpi) and an MPI
implementation (e.g. the ``mpich`` wheel). Importing this module does not import mpi4py (that
starts MPI); the first distributed operator does.

Launch (each rank runs the same script):

.. code-block:: bash

    mpiexec -n 2 python -m mpi4py examples/irim_multishot.py

``python -m mpi4py`` makes an uncaught exception on one rank abort all of them instead of
leaving the others waiting.
"""

from __future__ import annotations

import math
import socket
import weakref
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import pylops
import torch

from ._arrays import from_torch, to_torch
from .operators import Operator, _batched_matmat, _matching_dtype

__all__ = [
    "MPIOperator",
    "mpi_operator",
    "operator_groups",
    "OperatorGroup",
    "init_torch_distributed",
    "dottest",
]

# per pylops-mpi operator and array engine: how its data are laid out (found once by probing)
_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Layout(NamedTuple):
    data_partition: Any  # pylops_mpi.Partition of the operator's output
    local_sizes: tuple[int, ...]  # entries of the data on each rank


class MPIOperator(Operator):
    r"""A pylops-mpi operator applied to batches of torch tensors: model replicated, data split.

    Build it with :func:`invops.operators.as_operator` (or :func:`mpi_operator`). ``apply(x)``
    maps the replicated batch ``(B, *model_shape)`` to this rank's data block
    ``(B, *data_shape)``; ``adjoint(r)`` maps the ranks' data blocks to the replicated
    :math:`\sum_r J_r^H r_r`. Both are collective: every rank of ``comm`` calls them together.

    Attributes
    ----------
    comm : mpi4py.MPI.Comm
        The operator's communicator (``J.base_comm``).
    rank, size : int
        This process's rank in ``comm`` and the number of ranks.
    local_sizes : tuple of int
        Entries of one sample's data on each rank (known after the first call).

    Notes
    -----
    With :math:`J = [J_0; J_1; \dots]` split by rows over the ranks, rank :math:`r` computes
    :math:`y_r = J_r x` and :math:`J^H y = \sum_r J_r^H y_r` (an all-reduce, so the result is
    the same on every rank: bitwise, as tested with MPICH on 2 ranks). Reverse mode
    through :math:`y_r = J_r x` is therefore the adjoint of the whole operator: a loss that is
    the sum over ranks of local data terms, plus terms of replicated quantities computed on
    every rank, has the same gradient on every rank, the gradient of that global loss. Forward
    mode applies :math:`J_r` to the tangent.

    Each call checks, collectively, that the model batch is the same on every rank (shape,
    dtype and two random projections, to a relative ``1e-8`` in float64 and ``1e-3`` in
    float32), and each rank's data block against that rank's part of the operator; a mistake
    on any rank raises the same ``ValueError`` on every rank, naming the ranks at fault.

    pylops-mpi applies operators to one vector at a time (a batch of ``B`` samples costs ``B``
    products, each adjoint with its collective calls). For a plain ``MPIVStack`` on the CPU,
    invops instead applies the rank's own operators to the whole batch at once (``matmat`` /
    ``rmatmat`` of their ``pylops.VStack``) and sums the adjoint over the ranks with one
    ``Allreduce`` per batch: the same arithmetic as ``MPIVStack.rmatvec``, batched
    (``mpi_operator(J, batched=False)`` takes pylops-mpi's route; both are tested equal).

    Arrays: numpy on the CPU; torch CUDA tensors cross to cupy (DLPack, no copy) for
    operators built on cupy arrays (pylops-mpi's cupy engine; untested here).

    Examples
    --------
    Run on every rank (``mpiexec -n 2 python -m mpi4py script.py``):

    .. code-block:: python

        import numpy as np, pylops, torch, invops
        from mpi4py import MPI
        from pylops_mpi import MPIVStack

        rank = MPI.COMM_WORLD.Get_rank()
        shots = [pylops.MatrixMult(np.random.default_rng(i).standard_normal((5, 64)))
                 for i in range(4)]
        J = MPIVStack(shots[2 * rank : 2 * rank + 2])      # this rank's two shots
        op = invops.operators.as_operator(J, model_shape=(8, 8))
        loop = invops.NetworkLoop(3, 4, maxiter=2).double()
        eta, s = torch.zeros(2, 1, 8, 8, dtype=torch.float64), torch.zeros(2, 2, 8, 8,
                                                                          dtype=torch.float64)
        d = torch.randn(2, 10, dtype=torch.float64)        # this rank's data block
        eta_out, s_out = loop(eta, s, d, op)               # the same on every rank
    """

    def __init__(
        self,
        J: Any,
        model_shape: tuple[int, ...] | None,
        data_shape: tuple[int, ...] | None,
        real_model: bool,
        batched: bool = True,
    ) -> None:
        n_model = int(J.shape[1])
        ms = model_shape or tuple(int(n) for n in J.dims)
        if math.prod(ms) != n_model:
            raise ValueError(
                f"J ({type(J).__name__}): model shape {ms} does not match the operator's "
                f"{n_model} model entries (its shape is {tuple(J.shape)}, global data first)"
            )
        name = type(J).__name__
        is_complex = bool(np.iscomplexobj(np.empty(0, dtype=J.dtype)))
        super().__init__(self._apply_j, self._apply_jh, ms, None, is_complex, name)
        self.J = J
        self.comm = J.base_comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.real_model = real_model
        self._requested_data_shape = data_shape
        self._layout: _Layout | None = None
        self.local_sizes: tuple[int, ...] | None = None
        self._batched = None
        if batched and _is_plain_vstack(J):
            local = pylops.VStack(list(J.ops)) if len(J.ops) > 1 else J.ops[0]
            n_local = int(local.shape[0])
            self._batched = _batched_matmat(
                (local.matmat, local.rmatmat), ms, (n_local,), real_model
            )

    def __repr__(self) -> str:
        return (
            f"MPIOperator({self.name}, model_shape={self.model_shape}, rank {self.rank} of "
            f"{self.size}, data_shape={self.data_shape})"
        )

    # ----------------------------------------------------------------- collective checks
    def _agree(self, local_error: str | None, info: Any = None) -> list:
        """Gather every rank's ``(error, info)``; raise on every rank if any rank has an error."""
        return _agree(self.comm, self.name, local_error, info)

    def _ensure_layout(self, like: torch.Tensor) -> None:
        if self._layout is not None:
            return
        engine = "cupy" if like.device.type == "cuda" else "numpy"
        per_engine = _LAYOUTS.setdefault(self.J, {})
        if engine not in per_engine:
            per_engine[engine] = _probe(self.J, engine)
        layout = per_engine[engine]
        n_local = layout.local_sizes[self.rank]
        ds = self._requested_data_shape or (n_local,)
        error = None
        if math.prod(ds) != n_local:
            error = (
                f"data_shape {tuple(ds)} does not match this rank's {n_local} entries of the "
                "data (its block of the operator's output)"
            )
        self._agree(None if error is None else f"J: {error}")
        self._layout, self.local_sizes, self.data_shape = layout, layout.local_sizes, tuple(ds)

    def check_model(self, x: torch.Tensor, name: str = "model") -> None:
        """Raise ``ValueError`` on every rank unless ``x`` is ``(B, *model_shape)`` and the same
        batch on every rank (collective)."""
        self._ensure_layout(x)
        error = None
        try:
            super().check_model(x, name)
        except ValueError as e:
            error = str(e)
        self._check_replicated(x, name, error)

    def _check_replicated(self, x: torch.Tensor, name: str, error: str | None) -> None:
        infos = self._agree(error, _fingerprint(x))
        shapes = {r: i[0] for r, i in enumerate(infos)}
        if len(set(shapes.values())) > 1:
            self._not_replicated(name, f"got shapes (rank: shape) {shapes}")
        ref = infos[0]
        for r, (_, dtype, proj, norm) in enumerate(infos[1:], start=1):
            rtol = 1e-8 if "64" in dtype else 1e-3
            scale = rtol * max(norm, ref[3], 1e-30)
            if dtype != ref[1] or not np.allclose(proj, ref[2], rtol=0, atol=scale, equal_nan=True):
                self._not_replicated(name, f"rank {r} holds a different batch than rank 0")

    def _not_replicated(self, name: str, detail: str) -> None:
        raise ValueError(
            f"{name}: the model must be replicated on every rank of the distributed operator "
            f"{self.name} (the same batch on each of its {self.size} ranks: pylops-mpi's "
            f"Partition.BROADCAST); {detail}. Data-parallel batches must not be split across "
            "the ranks of one distributed operator: use invops.operators_mpi.operator_groups "
            "for distributed operators and data-parallel batches together"
        )

    def check_data(self, d: torch.Tensor, name: str = "data") -> None:
        """Raise ``ValueError`` on every rank unless each rank's ``d`` is ``(B, *data_shape)``
        with this rank's ``data_shape`` and the same ``B`` everywhere (collective)."""
        self._ensure_layout(d)
        error = None
        try:
            super().check_data(d, name)
        except (ValueError, TypeError) as e:
            error = f"{e} (this rank's block of the distributed data)"
        self._agree_batch(d, error, name)

    def _agree_batch(self, d: torch.Tensor, error: str | None, name: str) -> None:
        batches = self._agree(error, int(d.shape[0]))
        if len(set(batches)) > 1:
            raise ValueError(
                f"{name}: every rank must pass the data of the same batch of models, got batch "
                f"sizes (rank: B) {dict(enumerate(batches))} (distributed operator {self.name})"
            )

    # ----------------------------------------------------------------- products
    def _distributed(self, t: torch.Tensor, global_size: int, partition, local_shapes):
        from pylops_mpi import DistributedArray

        kind = "cupy" if t.device.type == "cuda" else "numpy"
        local = from_torch(t.detach().reshape(-1).contiguous(), kind)
        return DistributedArray(
            global_shape=global_size,
            base_comm=self.comm,
            partition=partition,
            local_shapes=local_shapes,
            local_array=local,
        )

    def _apply_j(self, x: torch.Tensor) -> torch.Tensor:
        from pylops_mpi import Partition

        self._ensure_layout(x)
        assert self.data_shape is not None and self.local_sizes is not None  # set by the layout
        n_model = int(self.J.shape[1])
        # tangents and cotangents reach J here without check_model: they must be replicated too
        got = math.prod(x.shape[1:])
        error = (
            None if got == n_model else f"expected {n_model} model entries per sample, got {got}"
        )
        self._check_replicated(x, "the model given to J", error)
        if self._batched is not None and x.device.type == "cpu":
            return self._batched[0](x).reshape(x.shape[0], *self.data_shape)
        out = []
        for xb in x:
            y = self.J.matvec(self._distributed(xb, n_model, Partition.BROADCAST, None))
            out.append(to_torch(y.local_array, device=x.device))
        res = torch.stack(out) if out else x.new_zeros(0, self.local_sizes[self.rank])
        return res.to(_matching_dtype(res, x)).reshape(x.shape[0], *self.data_shape)

    def _apply_jh(self, y: torch.Tensor) -> torch.Tensor:
        self._ensure_layout(y)
        layout = self._layout
        assert layout is not None and self.model_shape is not None  # set by the layout
        n_local = layout.local_sizes[self.rank]
        got = math.prod(y.shape[1:])
        error = None
        if got != n_local:
            error = f"J^H: expected this rank's {n_local} data entries per sample, got {got}"
        self._agree_batch(y, error, "J^H")
        if self._batched is not None and y.device.type == "cpu":
            return _allreduce_sum(self.comm, self._batched[1](y))
        shapes = [(n,) for n in layout.local_sizes]
        out = []
        for yb in y:
            r = self._distributed(yb, int(self.J.shape[0]), layout.data_partition, shapes)
            out.append(to_torch(self.J.rmatvec(r).local_array, device=y.device))
        res = torch.stack(out) if out else y.new_zeros(0, int(self.J.shape[1]))
        if self.real_model and res.is_complex():
            res = res.real
        return res.to(_matching_dtype(res, y)).reshape(y.shape[0], *self.model_shape)


def _allreduce_sum(comm: Any, t: torch.Tensor) -> torch.Tensor:
    from mpi4py import MPI

    buf = np.ascontiguousarray(t.numpy())
    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    return torch.from_numpy(buf)


def _is_plain_vstack(J: Any) -> bool:
    from pylops_mpi import MPIVStack

    return type(J) is MPIVStack and len(J.ops) > 0


def _agree(comm: Any, name: str, local_error: str | None, info: Any = None) -> list:
    gathered = comm.allgather((local_error, info))
    errors: dict[str, list[int]] = {}
    for r, (e, _) in enumerate(gathered):
        if e is not None:
            errors.setdefault(e, []).append(r)
    if errors:
        size = comm.Get_size()
        where = f"the distributed operator {name} over {size} ranks"
        if len(errors) == 1:
            ((message, ranks),) = errors.items()
            on = "every rank" if len(ranks) == size else f"rank {', '.join(map(str, ranks))}"
            raise ValueError(f"{message} (on {on} of {where})")
        detail = "; ".join(f"rank {', '.join(map(str, r))}: {e}" for e, r in errors.items())
        raise ValueError(f"{where}: {detail}")
    return [i for _, i in gathered]


def _fingerprint(x: torch.Tensor) -> tuple:
    """Shape, dtype, two fixed random projections and the norm of ``x``: equal batches agree."""
    flat = x.detach().reshape(-1).to(torch.complex128 if x.is_complex() else torch.float64)
    gen = torch.Generator().manual_seed(1234)
    w = torch.randn(2, flat.numel(), generator=gen, dtype=torch.float64).to(flat.device)
    proj = (w.to(flat.dtype) @ flat).cpu().numpy()
    return tuple(x.shape), str(x.dtype), proj, float(flat.abs().norm()) if flat.numel() else 0.0


def _probe(J: Any, engine: str) -> _Layout:
    """Apply ``J`` and its adjoint once to zeros: find the data layout, check the model's."""
    from pylops_mpi import DistributedArray, Partition, StackedDistributedArray

    xp = np if engine == "numpy" else __import__("cupy")
    n_data, n_model = int(J.shape[0]), int(J.shape[1])
    name = type(J).__name__
    comm = J.base_comm

    def agree(error, info=None):
        return _agree(comm, name, None if error is None else f"J ({name}): {error}", info)

    replicated = (Partition.BROADCAST, Partition.UNSAFE_BROADCAST)
    error, info = None, None
    try:
        x = DistributedArray(
            global_shape=n_model,
            base_comm=comm,
            partition=Partition.BROADCAST,
            local_array=xp.zeros(n_model, dtype=J.dtype),
        )
        y = J.matvec(x)
        if isinstance(y, StackedDistributedArray) or y.global_shape != (n_data,):
            error = f"its forward returned {type(y).__name__} of global shape {y.global_shape}"
        else:
            info = (y.partition, int(y.local_shape[0]))
    except Exception as e:  # noqa: BLE001 - the operator's own error, reported on every rank
        error = (
            "the model must be replicated on every rank (Partition.BROADCAST) and the data "
            "split, but this operator does not accept a replicated model (its model is split "
            "across the ranks, as in MPIBlockDiag or MPIHStack; MPIVStack of each rank's "
            f"operators has the layout invops needs); pylops-mpi said: {e}"
        )
    found = agree(error, info)
    partitions = {p for p, _ in found}
    sizes = tuple(n for _, n in found)
    error = None
    if len(partitions) > 1:
        error = f"its output has different partitions on different ranks: {partitions}"
    elif sizes.count(sizes[0]) != len(sizes) and found[0][0] in replicated:
        error = f"replicated output of different sizes per rank: {sizes}"
    agree(error)
    partition = found[0][0]
    error = None
    try:
        r = DistributedArray(
            global_shape=n_data,
            base_comm=comm,
            partition=partition,
            local_shapes=[(n,) for n in sizes],
            local_array=xp.zeros(sizes[comm.Get_rank()], dtype=J.dtype),
        )
        z = J.rmatvec(r)
        if z.partition not in replicated or tuple(z.local_shape) != (n_model,):
            error = (
                f"its adjoint returns the model with partition {z.partition} and local shape "
                f"{tuple(z.local_shape)} instead of replicated ({n_model},): the model is "
                "split across ranks (e.g. MPIBlockDiag, MPIHStack); invops needs operators "
                "whose model is replicated and data split, such as MPIVStack"
            )
    except Exception as e:  # noqa: BLE001
        error = f"its adjoint failed on the data layout of its forward: {e!r}"
    agree(error)
    return _Layout(partition, sizes)


def mpi_operator(
    J: Any,
    model_shape: Sequence[int] | None = None,
    data_shape: Sequence[int] | None = None,
    real_model: bool = True,
    batched: bool = True,
) -> MPIOperator:
    """Adapt a ``pylops_mpi.MPILinearOperator`` (what :func:`~invops.operators.as_operator`
    calls for pylops-mpi operators).

    ``model_shape`` is the shape of one (replicated) model, ``data_shape`` the shape of this
    rank's block of one datum (default: flat). ``batched=False`` applies a plain ``MPIVStack``
    sample by sample through pylops-mpi (see :class:`MPIOperator`). Raises ``TypeError`` for
    other pylops-mpi objects (stacked operators of ``StackedDistributedArray``, distributed
    arrays).
    """
    from pylops_mpi import MPILinearOperator

    if not isinstance(J, MPILinearOperator):
        raise TypeError(
            "J: from pylops-mpi, invops accepts an MPILinearOperator whose model is a "
            "DistributedArray replicated on every rank and whose data are split across the "
            f"ranks (e.g. MPIVStack); got {type(J).__name__}"
        )
    ms = None if model_shape is None else tuple(int(n) for n in model_shape)
    ds = None if data_shape is None else tuple(int(n) for n in data_shape)
    return MPIOperator(J, ms, ds, real_model, batched)


# -------------------------------------------------------------------- with data parallelism
class OperatorGroup(NamedTuple):
    """The ranks sharing one distributed operator, and this group's place among the replicas."""

    comm: Any  #: communicator of the group (give it to the pylops-mpi operator as base_comm)
    replica: int  #: index of this group among the data-parallel replicas
    n_replicas: int  #: number of groups (data-parallel replicas)


def operator_groups(ranks_per_operator: int, comm: Any = None) -> OperatorGroup:
    """Split ``comm`` (default ``MPI.COMM_WORLD``) into groups of consecutive ranks.

    Each group holds one copy of the distributed operator (its ranks share the data of every
    sample) and one data-parallel batch (the same on each of its ranks); the groups are the
    replicas of data-parallel training. With DDP over all the ranks (its gradient average over
    all ranks is the average over groups, since the ranks of a group have identical
    gradients), the result equals one process on the union of the groups' batches with the
    whole operator.

    Raises ``ValueError`` (on every rank) unless ``ranks_per_operator`` divides the size.
    """
    from mpi4py import MPI

    comm = MPI.COMM_WORLD if comm is None else comm
    size = comm.Get_size()
    if ranks_per_operator < 1 or size % ranks_per_operator:
        raise ValueError(
            f"ranks_per_operator: expected a divisor of the number of ranks {size}, "
            f"got {ranks_per_operator}"
        )
    replica = comm.Get_rank() // ranks_per_operator
    return OperatorGroup(
        comm.Split(color=replica, key=comm.Get_rank()), replica, size // ranks_per_operator
    )


def init_torch_distributed(backend: str = "gloo", comm: Any = None, **kwargs: Any) -> None:
    """Start ``torch.distributed`` over the ranks of ``comm`` (default ``MPI.COMM_WORLD``).

    For DDP in a job launched by ``mpiexec`` (not ``torchrun``): rank 0 picks a free TCP port
    on its host and tells the others; ``kwargs`` go to ``torch.distributed.init_process_group``.
    """
    from mpi4py import MPI

    comm = MPI.COMM_WORLD if comm is None else comm
    address = None
    if comm.Get_rank() == 0:
        same_host = len(set(comm.allgather(MPI.Get_processor_name()))) == 1
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        address = ("127.0.0.1" if same_host else socket.gethostname(), port)
    else:
        comm.allgather(MPI.Get_processor_name())
    host, port = comm.bcast(address, root=0)
    torch.distributed.init_process_group(
        backend,
        init_method=f"tcp://{host}:{port}",
        rank=comm.Get_rank(),
        world_size=comm.Get_size(),
        **kwargs,
    )


def dottest(Op: Any, comm: Any, rtol: float = 1e-6, seed: int = 0) -> bool:
    r"""Dot test of a linear operator whose data are split across the ranks of ``comm``.

    ``Op`` is a ``pylops.LinearOperator`` on every rank that maps a replicated model to this
    rank's data block, with an adjoint summed over the ranks (for instance
    ``(as_operator(J_mpi) @ net).jacobian(z)``). Checks
    :math:`\sum_r \langle J_r u, v_r\rangle = \langle u, J^H v\rangle` with ``u`` the same on
    every rank and ``v_r`` different; returns True, raises ``AssertionError`` otherwise (on
    every rank). Collective.
    """
    rank = comm.Get_rank()
    u = np.random.default_rng(seed).standard_normal(Op.shape[1])
    v = np.random.default_rng([seed, rank + 1]).standard_normal(Op.shape[0])
    if np.iscomplexobj(np.empty(0, dtype=Op.dtype)):
        u = u + 1j * np.random.default_rng(seed + 1).standard_normal(Op.shape[1])
        v = v + 1j * np.random.default_rng([seed + 1, rank + 1]).standard_normal(Op.shape[0])
    local = np.vdot(v, Op.matvec(u))
    data_side = comm.allreduce(complex(local))
    model_side = complex(np.vdot(Op.rmatvec(v), u))
    scale = max(abs(data_side), abs(model_side), 1e-300)
    if abs(data_side - model_side) > rtol * scale:
        raise AssertionError(
            f"distributed dot test failed: sum_r <J_r u, v_r> = {data_side:.16g}, "
            f"<u, J^H v> = {model_side:.16g} (relative difference "
            f"{abs(data_side - model_side) / scale:.3g} > rtol {rtol})"
        )
    return True
