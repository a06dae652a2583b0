"""What the Hessian tests share: float64, a block model made of any modules, and one intra-op thread.

``from hessian_helpers import F64, Sequential, one_thread`` (pytest puts tests/ on sys.path); importing
``one_thread`` into a test module makes it that module's autouse fixture.
"""
import pytest
import torch

from src.Architectures.feedforward_nn import BlockSequential as Sequential  # noqa: F401 - re-exported

F64 = torch.float64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: on a busy 2-core machine torch's intra-op threads made the suite 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
