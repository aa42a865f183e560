"""A conditional network with a learned summary of the observation in front of its condition."""

from __future__ import annotations

import torch

from .._autodiff import Grads, add_grads, differentiable_copy, local_grads
from ..module import InvertibleModule

__all__ = ["SummarizedNet"]


class SummarizedNet(InvertibleModule):
    r"""``cond_net(x, summary(obs))``: amortised inference with a learned summary statistic.

    Parameters
    ----------
    cond_net : InvertibleModule
        A conditional invertible network with one condition (e.g.
        :class:`~invops.NetworkConditionalGlow`).
    summary : torch.nn.Module
        Maps the observation to ``cond_net``'s condition (any torch architecture).

    Notes
    -----
    :math:`z = f(x;\, s_\phi(y))`. The reverse pass pulls back through ``cond_net`` from the
    output (memory-free, recomputing its layers' inputs by inversion), takes the cotangent of
    the summary :math:`\bar s`, and backpropagates it through one evaluation of the summary
    network, so :math:`\phi` is trained with the flow and the observation's cotangent is
    returned. ``inverse(z, obs)`` takes the raw observation too.

    Examples
    --------
    >>> import torch, invops
    >>> flow = invops.NetworkConditionalGlow(2, 3, 8, L=1, K=2, ndim=0)
    >>> summary = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(),
    ...                               torch.nn.Linear(16, 3))
    >>> net = invops.SummarizedNet(flow, summary)
    >>> z, logdet = net(torch.randn(4, 2), torch.randn(4, 10))
    """

    n_conditions = 1

    def __init__(self, cond_net: InvertibleModule, summary: torch.nn.Module) -> None:
        if not isinstance(cond_net, InvertibleModule) or cond_net.n_conditions != 1:
            raise TypeError(
                "SummarizedNet: cond_net must be an InvertibleModule with one condition, got "
                f"{type(cond_net).__name__}"
            )
        if not isinstance(summary, torch.nn.Module):
            raise TypeError(
                f"SummarizedNet: summary must be a torch.nn.Module, got {type(summary).__name__}"
            )
        super().__init__(logdet=cond_net.logdet)
        self.cond_net = cond_net
        self.summary = summary

    def _validate(self, x, cond, inverse):
        self.cond_net._validate(x, (self.summary(cond[0]),), inverse)

    def _forward(self, x, obs):
        return self.cond_net._forward(x, self.summary(obs))

    def _inverse(self, y, obs):
        return self.cond_net._inverse(y, self.summary(obs))

    def _through_summary(self, out, cond, dout, dlogdet, inverse: bool):
        obs = differentiable_copy(cond[0])
        params = [p for p in self.summary.parameters() if p.requires_grad]
        with torch.enable_grad():
            s = self.summary(obs)
        pull = self.cond_net._pullback_inverse if inverse else self.cond_net._pullback
        inp, dinp, (ds,), grads = pull(out, (s.detach(),), dout, dlogdet)
        summary_grads: Grads = {}
        dobs = None
        if ds is not None:
            with torch.enable_grad():
                (dobs,), summary_grads = local_grads((s,), (ds,), (obs,), params)
        return inp, dinp, (dobs,), add_grads(grads, summary_grads)

    def _pullback(self, y, cond, dy, dlogdet):
        return self._through_summary(y, cond, dy, dlogdet, inverse=False)

    def _pullback_inverse(self, x, cond, dx, dlogdet):
        return self._through_summary(x, cond, dx, dlogdet, inverse=True)
