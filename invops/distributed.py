r"""Data-parallel training with the explicit reverse-mode API.

Wrapping an invops network in :class:`torch.nn.parallel.DistributedDataParallel` needs nothing
from this module: the autograd bridge passes the parameters to autograd as inputs, so their
gradients arrive through autograd's accumulation and DDP's all-reduce hooks fire as for any torch
model. The explicit API (``net.backward(dy, y)``, ``NetworkLoop.backward``) instead *adds* the
gradients of the local batch to ``p.grad`` itself, with no communication; after it, each process
calls :func:`all_reduce_gradients` before its optimiser step.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import distributed

__all__ = ["all_reduce_gradients"]


def all_reduce_gradients(
    parameters: torch.nn.Module | Iterable[torch.nn.Parameter],
    *,
    average: bool = True,
    group: distributed.ProcessGroup | None = None,
) -> None:
    r"""Sum (or average) ``p.grad`` over the processes of ``group``, in place.

    Parameters
    ----------
    parameters : torch.nn.Module or iterable of torch.nn.Parameter
        A module (its parameters are used) or the parameters themselves. Only parameters with
        ``requires_grad`` take part; every process must pass the same parameters in the same
        order.
    average : bool
        Divide the sum by the group's size, which is what DDP does: with the mean loss of an
        equal share of the batch per process, the result is the gradient of the global batch's
        mean loss.
    group : torch.distributed.ProcessGroup, optional
        The process group (default: the default group).

    Notes
    -----
    A parameter whose ``grad`` is ``None`` on this process takes part with zeros (and gets a
    zero-filled ``grad``), so processes whose batches did not reach a parameter still agree on
    the collective calls. The gradients are reduced in one flat buffer per device and dtype,
    one ``all_reduce`` each. Without an initialised process group, or with a single process,
    only the zero-filling happens.

    Examples
    --------
    >>> import torch, invops
    >>> from invops.distributed import all_reduce_gradients
    >>> net = invops.ActNorm(2)
    >>> y, logdet = net(torch.randn(4, 2, 3))
    >>> _ = net.backward(torch.ones_like(y), y.detach(), dlogdet=torch.zeros(4))
    >>> all_reduce_gradients(net)  # no process group here: the gradients are left as they are
    >>> net.bias.grad
    tensor([12., 12.])
    """
    if isinstance(parameters, torch.nn.Module):
        parameters = parameters.parameters()
    params = [p for p in parameters if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not (distributed.is_available() and distributed.is_initialized()):
        return
    size = distributed.get_world_size(group)
    if size == 1:
        return
    buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    grads_of = [p.grad for p in params if p.grad is not None]  # every one was filled above
    for g in grads_of:
        buckets.setdefault((g.device, g.dtype), []).append(g)
    for grads in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        distributed.all_reduce(flat, group=group)
        if average:
            flat /= size
        for g, reduced in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(reduced.view_as(g))
