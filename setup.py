"""Build of sparseattn.

The pure-Python package lives in ``python/sparseattn``; the Triton kernels in ``triton_kernels/``
install as ``sparseattn.triton_kernels`` (a top-level ``triton_kernels`` exists on PyPI and inside
Triton, ours must not shadow it). The optional CUDA extension (``csrc/`` via CMake) is added by
its own issue; nothing here needs a GPU or nvcc.
"""
from setuptools import setup

setup(
    packages=["sparseattn", "sparseattn.triton_kernels"],
    package_dir={
        "sparseattn": "python/sparseattn",
        "sparseattn.triton_kernels": "triton_kernels",
    },
)
