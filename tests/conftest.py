import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-tensor tests, the previous setting restored after.

    With tensors this small, extra threads only add synchronisation, and on a loaded two-core
    machine they made each small operation 10-100 times slower.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)  # noqa: NPY002 - pylops.utils.dottest draws from the global state


def randomize_parameters(module: torch.nn.Module, scale: float = 0.3, seed: int = 1) -> None:
    """Move every parameter away from its (often trivial) initial value, reproducibly."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device))


# spatial shapes per rank, kept tiny so the dense Jacobians stay small
SPATIAL = {0: (), 1: (5,), 2: (3, 4), 3: (2, 3, 2)}


def pytest_addoption(parser):
    parser.addoption(
        "--devices",
        default="cuda",
        help=(
            "comma-separated torch devices for the device/dtype suite tests/test_devices.py "
            "(marked gpu: run it with -m gpu). Default 'cuda'; 'cpu' validates the suite on a "
            "machine without a GPU; 'cpu,cuda' runs both. A device that is not available is "
            "skipped with its reason."
        ),
    )
