"""Test setup: without a GPU, run the real Triton kernels through the interpreter.

Triton reads TRITON_INTERPRET when a kernel is decorated, so it is set here, before any test
module imports sparseattn (and with it the kernels)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    import interpreter_shim  # bf16 and TF32 dots as on the GPU (see its docstring)

    interpreter_shim.install()

# Fresh outputs of every launcher are NaN-filled: an unwritten element fails loudly.
os.environ["SPARSEATTN_NAN_FILL"] = "1"
# One config per problem, no timing (results must not depend on timings); tests/test_configs.py
# runs every config.
os.environ.setdefault("SPARSEATTN_AUTOTUNE", "0")


@pytest.fixture(params=["kernel", "gather"])
def cpu_route(monkeypatch, request):
    """The CPU paths' two routes, one test each: the C++ kernel (ops/attention/cpu_kernel.cpp, the
    default where it builds) and the gather path (SPARSEATTN_CPU_KERNEL=0: gathered blocks through
    torch's fused CPU attention). Where a C++ compiler exists, a failed build fails the kernel
    route's tests (else they would quietly test the gather path twice); without one they skip."""
    import shutil

    from sparseattn.ops.attention import cpu_kernel

    monkeypatch.setenv("SPARSEATTN_CPU_KERNEL", "1" if request.param == "kernel" else "0")
    if request.param == "kernel" and cpu_kernel.ops() is None:
        cxx = os.environ.get("CXX", "c++")
        if shutil.which(cxx) is None:
            pytest.skip(f"no C++ compiler ({cxx}) to build the CPU kernel: {cpu_kernel.unavailable_reason()}")
        pytest.fail(f"the CPU kernel did not build although {cxx} exists: {cpu_kernel.unavailable_reason()}")
    return request.param


CAPTURE_ENV = "SPARSEATTN_CAPTURE_LAUNCHES"   # tests/triton_kernels/test_gpu_specializations.py
_CAPTURE = []


def pytest_sessionstart(session):
    """With SPARSEATTN_CAPTURE_LAUNCHES=FILE (interpreter only): record what the GPU's JIT would
    compile for every kernel launch of the session (interpreter_shim.capture_launches)."""
    if os.environ.get(CAPTURE_ENV) and os.environ.get("TRITON_INTERPRET") == "1":
        _CAPTURE.append(interpreter_shim.capture_launches().__enter__())


def pytest_runtest_setup(item):
    if _CAPTURE:
        _CAPTURE[0].case = item.nodeid


def pytest_sessionfinish(session, exitstatus):
    if _CAPTURE:
        import pickle

        capture = _CAPTURE.pop()
        capture.__exit__(None, None, None)
        with open(os.environ[CAPTURE_ENV], "wb") as f:
            pickle.dump(capture.records, f)


def pytest_collection_modifyitems(config, items):
    """The compile gate (the longest tests) runs first, so that it overlaps the rest under
    pytest-xdist instead of trailing it; tests marked ``gpu`` skip, visibly, where torch sees no
    CUDA device."""
    items.sort(key=lambda item: "gate" not in item.keywords)   # stable: the rest keeps its order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marked gpu: torch sees no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["kernel", "cpu_path"])
def backend(request, monkeypatch):
    """(device, expected sa.last_backend()) of the two paths an op test runs on: 'kernel' = the
    Triton kernels (CUDA, or the interpreter on CPU), 'cpu_path' = the PyTorch CPU path."""
    if request.param == "cpu_path":
        monkeypatch.setenv("SPARSEATTN_CPU_PATH", "1")
        return "cpu", "cpu"
    monkeypatch.delenv("SPARSEATTN_CPU_PATH", raising=False)   # the kernels, even where a run forces the CPU path
    from utils import DEVICE
    return DEVICE, "triton"
