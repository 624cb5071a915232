"""The bench's own CPU cases through its harness (run_cases + to_markdown), at H=8 (issue 18's CPU
setting; the bench's CPU attention suite uses H=4): ``--suite attention`` (causal, dense, block 10%),
``--suite patterns`` (the patterns suite's five patterns), ``--suite decode`` (the decode suite as is),
``--suite decode-long`` (its cases at the caches of ``--lengths``).

    python benchmarks/results/cpu-path/drive_bench_h8.py --suite attention --out DIR
    BEFORE=<git rev> python ... : the CPU paths (ops/attention/cpu.py, ops/decode/cpu.py) of that
    revision swapped in, to time the code before a change in the same way.
"""
import argparse
import importlib.util
import json
import math
import os
os.environ["SPARSEATTN_CPU_PATH"] = "1"
import torch
import sparseattn as sa
from sparseattn.bench import harness

ap = argparse.ArgumentParser()
ap.add_argument("--suite", required=True)
ap.add_argument("--lengths", default="2048,4096")
ap.add_argument("--heads", type=int, default=8)
ap.add_argument("--out", required=True)
ap.add_argument("--label", default="")
args = ap.parse_args()

if os.environ.get("BEFORE"):
    import subprocess, tempfile
    import sparseattn.ops.attention.op as aop, sparseattn.ops.decode.op as dop

    def load(name, path):
        text = subprocess.run(["git", "show", f"{os.environ['BEFORE']}:python/sparseattn/{path}"], check=True,
                              capture_output=True, text=True).stdout
        with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
            f.write(text)
        spec = importlib.util.spec_from_file_location(name, f.name)
        m = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(m)
        return m

    aop.cpu = load("sparseattn.ops.attention._cpu_before", "ops/attention/cpu.py")
    dop.decode_attention_cpu = load("sparseattn.ops.decode._cpu_before", "ops/decode/cpu.py").decode_attention_cpu

lengths = [int(x) for x in args.lengths.split(",")]
H, D, B, dtype = args.heads, 64, 1, torch.float32
cases = []
if args.suite == "attention":
    from sparseattn.bench.attention import _attention_case
    bs = 128
    for L in lengths:
        n = math.ceil(L / bs)
        gen = torch.Generator(device="cpu").manual_seed(L)
        table = torch.rand(n, n, generator=gen) < 0.1
        table |= torch.eye(n, dtype=torch.bool)
        for pattern in ("causal", "dense", "block 10%"):
            if pattern == "block 10%":
                layout = sa.BlockLayout.from_block_mask(table[None, None], bs, (L, L))
                pairs = layout.density * L * L
            else:
                layout, pairs = None, (L * (L + 1) / 2 if pattern == "causal" else L * L)
            for direction in ("fwd", "fwd+bwd"):
                cases.append(_attention_case(sa, "cpu", dtype, B, H, L, D, pattern, direction, layout, table, bs,
                                             pairs, None))
elif args.suite == "patterns":
    from sparseattn.bench.patterns import _pattern_defs, _pattern_case
    from sparseattn.bench.harness import lazy
    for name, (make_pattern, make_mod) in _pattern_defs("cpu", H).items():
        for L in lengths:
            pattern = lazy(lambda make_pattern=make_pattern, L=L: make_pattern(L))
            layout = lazy(lambda pattern=pattern, L=L: pattern().layout(L, L, "cpu"))
            for direction in ("fwd", "fwd+bwd"):
                cases.append(_pattern_case(name, pattern, layout, make_mod, make_pattern, "cpu", dtype, H, L, D,
                                           direction, None))
if args.suite == "decode":
    from sparseattn.bench.decode import decode_suite
    cases = list(decode_suite("cpu", False, None))
elif args.suite == "decode-long":  # the decode suite's CPU cases (Hq=4, Hkv=2, D=64) at longer caches
    from sparseattn.bench.decode import _decode_case
    cases = [_decode_case(sa, "cpu", dtype, b, 4, 2, L, D, pattern, None)
             for L in lengths for b in (1, 2) for pattern in ("dense", "block 10%")]
rows = harness.run_cases(cases, "cpu")
env = harness._environment("cpu")
env["driver"] = f"benchmarks/results/cpu-path/drive_bench_h8.py --suite {args.suite} (H={H})"
env["load average"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
os.makedirs(args.out, exist_ok=True)
md = harness.to_markdown(env, rows)
stem = os.path.join(args.out, f"cpu-{args.suite}-H{H}{'-' + args.label if args.label else ''}")
json.dump({"environment": env, "rows": rows}, open(stem + ".json", "w"), indent=1)
open(stem + ".md", "w").write(md)
print(md)
