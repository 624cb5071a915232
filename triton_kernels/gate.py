"""Compile gate: compile kernels for a GPU architecture on a machine without a GPU.

Each kernel module exposes ``compile_specs(cc)`` yielding :class:`Spec` for every kernel, at
every config its prune can select, over the head dims and dtypes it supports. ``run`` compiles
them all with ``triton.compile`` + ``GPUTarget`` and checks shared memory against the device.
Must run in a process where TRITON_INTERPRET is off (interpreted kernels cannot be compiled):
``python -m sparseattn.triton_kernels.gate --cc 90``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Dict

from .common import INTERPRET, SMEM_LIMIT

# Kernel modules that take part in the gate (each defines compile_specs(cc)).
MODULES = ["attention", "lightning"]


@dataclass
class Spec:
    name: str
    kernel: object
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    num_warps: int
    num_stages: int
    tags: Dict[str, object] = field(default_factory=dict)


def signature(kernel, types: Dict[str, str]) -> Dict[str, str]:
    """Triton types of a kernel's runtime arguments: ``types`` by name, "i32" for the rest
    (sizes and strides); constexpr parameters are left out."""
    import inspect

    fn = getattr(kernel, "fn", kernel)
    return {n: types.get(n, "i32") for n, p in inspect.signature(fn).parameters.items()
            if "constexpr" not in str(p.annotation)}


def compile_spec(spec: Spec, cc: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(spec.signature)
    sig.update({k: "constexpr" for k in spec.constexprs})
    src = ASTSource(fn=spec.kernel, signature=sig, constexprs=dict(spec.constexprs))
    return triton.compile(src, target=GPUTarget("cuda", cc, 32),
                          options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})


def run(cc: int, modules=None, shard: int = 0, num_shards: int = 1) -> dict:
    if INTERPRET:
        raise RuntimeError("gate: TRITON_INTERPRET=1 is set; interpreted kernels cannot be compiled")
    specs = []
    for mod in modules or MODULES:
        specs += list(importlib.import_module(f"{__package__}.{mod}").compile_specs(cc))
    specs = specs[shard::num_shards]
    failures, worst = [], 0
    t0 = time.time()
    for spec in specs:
        try:
            shared = compile_spec(spec, cc).metadata.shared
        except Exception as e:  # noqa: BLE001 - report every compiler error with its spec
            failures.append(f"{spec.name} {spec.tags}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            continue
        worst = max(worst, shared)
        if shared > SMEM_LIMIT[cc]:
            failures.append(f"{spec.name} {spec.tags}: shared memory {shared} > {SMEM_LIMIT[cc]} on sm_{cc}")
    return {"cc": cc, "compiled": len(specs), "failures": failures, "max_shared": worst,
            "seconds": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cc", type=int, required=True, choices=sorted(SMEM_LIMIT))
    ap.add_argument("--module", action="append")
    ap.add_argument("--shard", type=int, default=0)
    ap.add_argument("--num-shards", type=int, default=1)
    args = ap.parse_args(argv)
    res = run(args.cc, args.module, args.shard, args.num_shards)
    print(json.dumps(res))
    return 1 if res["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
