"""Shared setup of the Lightning tests."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Small CPU ops run fastest on one thread (and do not spin against other processes)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
