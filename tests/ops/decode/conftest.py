"""Decode's CPU tests run on both routes of its CPU path (conftest's ``cpu_route``): the C++
kernel's decode op and the PyTorch path (SPARSEATTN_CPU_KERNEL=0, or no C++ compiler)."""
import pytest


@pytest.fixture(autouse=True)
def _route(cpu_route):
    return cpu_route
