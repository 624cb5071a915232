"""Compile gate: compile kernels for a GPU architecture on a machine without a GPU.

Each kernel module exposes ``compile_specs(cc)`` yielding :class:`Spec` for every kernel, at
every config its prune can select, over the head dims and dtypes it supports. ``run`` compiles
them all with ``triton.compile`` + ``GPUTarget`` and checks shared memory against the device, and
register spills (ptxas's report) for the specs tagged ``max_spill`` (the fast paths' first
configs). ``--resources`` prints that report for every spec: registers, spills, wgmma/mma.sync.
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
MODULES = ["attention", "lightning", "stats", "hip"]


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
    """Triton types of a kernel's runtime arguments: ``types`` by name (a namedtuple argument gets
    a namedtuple of types), "i32" for the rest (sizes, strides); constexpr parameters are left out."""
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


def resources(compiled, cc: int) -> Dict[str, object]:
    """ptxas's report of a compiled kernel (Triton's own ptxas on its PTX): registers per thread,
    spill store/load bytes, and how many wgmma / mma.sync instructions the PTX holds (tensor-core
    path on Hopper vs Ampere-style)."""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        arch = f"sm_{cc}a" if cc == 90 else f"sm_{cc}"
        report = subprocess.run([get_ptxas(cc).path, f"-arch={arch}", "-v", f.name, "-o", "/dev/null"],
                                capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", report)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return {"regs": int(regs.group(1)) if regs else None,
            "spill_stores": int(spill.group(1)) if spill else 0, "spill_loads": int(spill.group(2)) if spill else 0,
            "wgmma": ptx.count("wgmma.mma_async"), "mma_sync": ptx.count("mma.sync"),
            "shared": compiled.metadata.shared}


def run(cc: int, modules=None, shard: int = 0, num_shards: int = 1, report: bool = False) -> dict:
    """Compile this shard's specs; failures: compile errors, shared memory over the device's, and
    register spills over a spec's ``max_spill`` tag (bytes of spill stores). ``report`` adds
    ptxas's resource report of every spec (slower: one ptxas run each)."""
    if INTERPRET:
        raise RuntimeError("gate: TRITON_INTERPRET=1 is set; interpreted kernels cannot be compiled")
    specs = []
    for mod in modules or MODULES:
        specs += list(importlib.import_module(f"{__package__}.{mod}").compile_specs(cc))
    specs = specs[shard::num_shards]
    failures, worst, rows = [], 0, []
    t0 = time.time()
    for spec in specs:
        try:
            compiled = compile_spec(spec, cc)
        except Exception as e:  # noqa: BLE001 - report every compiler error with its spec
            failures.append(f"{spec.name} {spec.tags}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            continue
        shared = compiled.metadata.shared
        worst = max(worst, shared)
        if shared > SMEM_LIMIT[cc]:
            failures.append(f"{spec.name} {spec.tags}: shared memory {shared} > {SMEM_LIMIT[cc]} on sm_{cc}")
        if report or "max_spill" in spec.tags:
            try:
                res = resources(compiled, cc)
            except Exception as e:  # noqa: BLE001 - a ptxas failure is this spec's failure, not the gate's
                failures.append(f"{spec.name} {spec.tags}: ptxas report: {type(e).__name__}: {str(e)[:300]}")
                continue
            rows.append({"kernel": spec.name, **spec.tags, **res})
            if res["spill_stores"] > spec.tags.get("max_spill", float("inf")):
                failures.append(f"{spec.name} {spec.tags}: {res['spill_stores']} bytes of register spill stores "
                                f"(at most {spec.tags['max_spill']}) on sm_{cc}")
    out = {"cc": cc, "compiled": len(specs), "failures": failures, "max_shared": worst,
           "seconds": round(time.time() - t0, 1)}
    if report:
        out["resources"] = rows
    return out


def compile_captured(path: str, cc: int) -> dict:
    """Compile launches captured from real calls (``tests/interpreter_shim.capture_launches``): each
    record holds the signature, constexprs and attributes that Triton's JIT derives from the actual
    arguments (a stride of 1 becomes a constexpr, 16-divisible ints and pointers get attributes),
    which the specs' hand-written signatures do not reproduce. A constexpr that names a jitted
    function is stored as ("__jit__", module, name) and resolved here."""
    import importlib
    import pickle

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def resolve(value):
        if isinstance(value, tuple) and len(value) == 3 and value[0] == "__jit__":
            return getattr(importlib.import_module(value[1]), value[2])
        return value

    with open(path, "rb") as f:
        records = pickle.load(f)
    failures = []
    for rec in records:
        kernel = getattr(importlib.import_module(rec["module"]), rec["kernel"])
        constexprs = {k: resolve(v) for k, v in rec["constexprs"].items()}
        try:
            triton.compile(ASTSource(kernel, rec["signature"], constexprs, rec["attrs"]),
                           target=GPUTarget("cuda", cc, 32), options=rec["options"])
        except Exception as e:  # noqa: BLE001 - every compiler error is a gate failure
            cause = e
            while cause.__cause__ is not None:
                cause = cause.__cause__
            failures.append({"kernel": rec["kernel"], "case": rec["case"], "error": f"{e}"[-1500:],
                             "cause": repr(cause)[:500]})
    return {"compiled": len(records) - len(failures), "failures": failures}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cc", type=int, required=True, choices=sorted(SMEM_LIMIT))
    ap.add_argument("--module", action="append")
    ap.add_argument("--shard", type=int, default=0)
    ap.add_argument("--num-shards", type=int, default=1)
    ap.add_argument("--resources", action="store_true",
                    help="print ptxas's registers / spills / MMA kind of every spec (a table before the JSON)")
    ap.add_argument("--captured", metavar="FILE",
                    help="compile the launches captured in FILE instead of the specs (compile_captured)")
    args = ap.parse_args(argv)
    if args.captured:
        res = compile_captured(args.captured, args.cc)
        print(json.dumps(res))
        return 1 if res["failures"] else 0
    res = run(args.cc, args.module, args.shard, args.num_shards, report=args.resources)
    for r in res.get("resources", []):
        print(" ".join(f"{k}={v}" for k, v in r.items()))
    res.pop("resources", None)
    print(json.dumps(res))
    return 1 if res["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
