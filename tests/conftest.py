import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)  # noqa: NPY002 - pylops.utils.dottest draws from the global state


def randomize_parameters(module: torch.nn.Module, scale: float = 0.3, seed: int = 1) -> None:
    """Move every parameter away from its (often trivial) initial value, reproducibly."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


# spatial shapes per rank, kept tiny so the dense Jacobians stay small
SPATIAL = {0: (), 1: (5,), 2: (3, 4), 3: (2, 3, 2)}
