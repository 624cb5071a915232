"""Build of sparseattn.

The pure-Python package lives in ``python/sparseattn``; the Triton kernels in ``triton_kernels/``
install as ``sparseattn.triton_kernels`` (a top-level ``triton_kernels`` exists on PyPI and inside
Triton, ours must not shadow it).

The optional CUDA extension ``sparseattn._C`` is built from ``csrc/`` by CMake
(``CMakeLists.txt``). Environment:

* ``SPARSEATTN_BUILD_CUDA=auto|0|1`` (default ``auto``): ``auto`` builds it when nvcc is found
  (``CUDACXX``, ``$CUDA_HOME/bin/nvcc`` or ``nvcc`` on PATH), ``0`` never builds it, ``1`` requires
  it. Without it the package is Triton-only and fully usable. When a build is attempted, a
  compile error fails the install: that is the compile gate of ``csrc/`` in CI.
* ``SPARSEATTN_CUDA_ARCHS`` (default ``80;90a``): CMake CUDA architectures.
* ``SPARSEATTN_CMAKE_BUILD_DIR``: the CMake build directory, default
  ``build/cmake-<python tag>-<platform>-cmake<version>``
  beside this file. It persists, so a second ``pip install -e .`` rebuilds incrementally.
* ``MAX_JOBS``: parallel compile jobs (default: CPU count).
"""
import os
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def find_nvcc():
    for cand in (os.environ.get("CUDACXX"),
                 os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None,
                 shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def want_cuda():
    mode = os.environ.get("SPARSEATTN_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"SPARSEATTN_BUILD_CUDA: expected auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    if find_nvcc() is None:
        if mode == "1":
            raise SystemExit("SPARSEATTN_BUILD_CUDA=1 but nvcc was not found (set CUDACXX or CUDA_HOME)")
        print("sparseattn: nvcc not found, building without the CUDA extension (Triton-only)", file=sys.stderr)
        return False
    return True


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        tag = f"{sys.implementation.cache_tag}-{sysconfig.get_platform()}"
        cmake = shutil.which("cmake")
        if cmake is None:  # e.g. --no-build-isolation on an image without cmake
            print("sparseattn: cmake not found, building sparseattn._C with nvcc directly", file=sys.stderr)
            return self._build_with_nvcc(ext)
        version = subprocess.run([cmake, "--version"], check=True, capture_output=True, text=True).stdout.split()[2]
        # Default: one directory per Python and CMake version (a cache is never read by another CMake).
        build_dir = (os.environ.get("SPARSEATTN_CMAKE_BUILD_DIR")
                     or os.path.join(ROOT, "build", f"cmake-{tag}-cmake{version}"))
        os.makedirs(build_dir, exist_ok=True)
        args = [cmake, "-S", ROOT, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release",
                f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={self._stable_pybind11(build_dir)}",
                f"-DCMAKE_CUDA_COMPILER={find_nvcc()}",
                f"-DSPARSEATTN_CUDA_ARCHS={os.environ.get('SPARSEATTN_CUDA_ARCHS', '80;90a')}"]
        ninja = shutil.which("ninja")
        cache = os.path.join(build_dir, "CMakeCache.txt")
        generator = None
        if os.path.exists(cache):
            with open(cache) as f:
                generator = next((l.split("=", 1)[1].strip() for l in f if l.startswith("CMAKE_GENERATOR:")), None)
        if generator is None and ninja:
            args += ["-G", "Ninja"]
            generator = "Ninja"
        if generator == "Ninja" and ninja:
            # pip's isolated build environments (where ninja may live) are deleted after each
            # build: point the cache at this build's ninja.
            args.append(f"-DCMAKE_MAKE_PROGRAM={ninja}")
        subprocess.run(args, check=True)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run([cmake, "--build", build_dir, "--target", "_C", "--parallel", jobs], check=True)
        built = [f for f in os.listdir(build_dir) if f.startswith("_C.") and f.endswith(sysconfig.get_config_var("EXT_SUFFIX"))]
        if not built:
            raise SystemExit(f"sparseattn: CMake did not produce _C{sysconfig.get_config_var('EXT_SUFFIX')} in {build_dir}")
        dest = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy2(os.path.join(build_dir, built[0]), dest)

    def _build_with_nvcc(self, ext):
        """The same build as CMakeLists.txt without CMake (not incremental): nvcc compiles every
        source for SPARSEATTN_CUDA_ARCHS and links with the static cudart."""
        import pybind11

        nvcc = find_nvcc()
        build_dir = os.path.join(ROOT, "build", "nvcc-" + sys.implementation.cache_tag)
        os.makedirs(build_dir, exist_ok=True)
        archs = [a.strip() for a in os.environ.get("SPARSEATTN_CUDA_ARCHS", "80;90a").split(";") if a.strip()]
        gencode = [f"-gencode=arch=compute_{a},code=[compute_{a},sm_{a}]" for a in archs]
        flags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC,-fvisibility=hidden", "--expt-relaxed-constexpr",
                 "-lineinfo", f"-I{os.path.join(ROOT, 'csrc')}", f"-I{pybind11.get_include()}",
                 f"-I{sysconfig.get_paths()['include']}", f"-DSPARSEATTN_CUDA_ARCHS_STR=\"{','.join(archs)}\""]
        objects = []
        for src in ("bindings.cpp", "decode.cu", "device.cu", "layout_builder.cu"):
            obj = os.path.join(build_dir, src + ".o")
            lang = ["-x", "c++"] if src.endswith(".cpp") else gencode
            subprocess.run([nvcc, *flags, *lang, "-c", os.path.join(ROOT, "csrc", src), "-o", obj], check=True)
            objects.append(obj)
        dest = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        subprocess.run([nvcc, "-shared", "-cudart", "static", *gencode, *objects, "-o", dest], check=True)

    @staticmethod
    def _stable_pybind11(build_dir):
        """pybind11's CMake dir, from a copy inside the build directory: pip's isolated build
        environment has a new path on every build, and a changed include path would recompile
        everything."""
        import pybind11  # a build requirement (pyproject.toml)

        src = os.path.dirname(os.path.abspath(pybind11.__file__))
        dst = os.path.join(build_dir, "_deps", f"pybind11-{pybind11.__version__}")
        if not os.path.isdir(dst):
            shutil.copytree(src, dst + ".tmp", ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
            os.replace(dst + ".tmp", dst)
        return os.path.join(dst, os.path.relpath(pybind11.get_cmake_dir(), src))


setup(
    packages=["sparseattn." + p for p in find_packages("python/sparseattn")] + ["sparseattn", "sparseattn.triton_kernels"],
    package_dir={
        "sparseattn": "python/sparseattn",
        "sparseattn.triton_kernels": "triton_kernels",
    },
    # the CPU kernel's source, compiled on first use (python/sparseattn/ops/attention/cpu_kernel.py)
    package_data={"sparseattn.ops.attention": ["cpu_kernel.cpp"]},
    ext_modules=[CMakeExtension("sparseattn._C")] if want_cuda() else [],
    cmdclass={"build_ext": CMakeBuild},
)
