"""Decode's CPU tests run on both routes of its CPU path (conftest's ``cpu_route``): the C++
kernel's decode op (float32 caches read in place) and the PyTorch path (every other case, and
all of them with SPARSEATTN_CPU_KERNEL=0)."""
import pytest


@pytest.fixture(autouse=True)
def _route(cpu_route):
    return cpu_route
