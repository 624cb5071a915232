"""Issue 18's CPU targets from bench JSON files (the CLI's ``--out`` files or drive_bench_h8.py's):
for each "block 10%" row, its time against *unmasked* dense torch SDPA measured in the same file
(the "attention dense" row's anchor at the same L and direction), as a multiple of the layout's
density d, and the target: forward <= 1.5 d dense + 1 ms, forward+backward <= 2 d dense. The
block row's own anchor (SDPA with the layout as a dense bool mask, slower than unmasked) is
shown beside it. For decode files: each "decode block 10%" row against unmasked dense SDPA on the
same cache (the "decode dense" row's anchor at the same B and L; target: at least as fast) and
against its own anchor (SDPA computing the same decode, the layout as a bool mask).

    python benchmarks/results/cpu-path/targets.py FILE.json [FILE.json ...]
"""
import json
import sys

import torch

import sparseattn as sa


def density(L: int, bs: int = 128) -> float:
    """The bench's 10% layout (bench/attention.py: seed L, plus the diagonal)."""
    n = -(-L // bs)
    gen = torch.Generator(device="cpu").manual_seed(L)
    table = (torch.rand(n, n, generator=gen) < 0.1) | torch.eye(n, dtype=torch.bool)
    return sa.BlockLayout.from_block_mask(table[None, None], bs, (L, L)).density


def decode(paths):
    print("| file | B | L | block 10% ms [p10-p90] | dense SDPA ms | vs dense SDPA | masked SDPA ms | vs masked SDPA |")
    print("|---|---|---|---|---|---|---|---|")
    for path in paths:
        rows = json.load(open(path))["rows"]
        dense = {(r["B"], r["L"]): r["anchors"]["torch sdpa (cpu)"]["ms"] for r in rows if r["op"] == "decode dense"}
        for r in rows:
            if r["op"] != "decode block 10%":
                continue
            base, masked = dense[(r["B"], r["L"])], r["anchors"]["torch sdpa (cpu)"]["ms"]
            spread = f"{r['ms_p10']:.3f}-{r['ms_p90']:.3f}" if "ms_p10" in r else f"{r['ms_min']:.3f}-{r['ms_max']:.3f}"
            print(f"| {path.split('/')[-1]} | {r['B']} | {r['L']} | {r['ms']:.3f} [{spread}] | {base:.3f} | "
                  f"{base / r['ms']:.2f}x | {masked:.3f} | {masked / r['ms']:.2f}x |")


def main(paths):
    kinds = {r["op"].split()[0] for p in paths for r in json.load(open(p))["rows"]}
    if kinds == {"decode"}:
        return decode(paths)
    print("| file | H | L | direction | d | block 10% ms [min-max] | dense SDPA ms | ratio | ratio / d | target ms "
          "| target | masked-SDPA anchor ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for path in paths:
        rows = json.load(open(path))["rows"]
        dense = {(r["L"], r["direction"]): r["anchors"]["torch sdpa (cpu)"]["ms"]
                 for r in rows if r["op"] == "attention dense"}
        for r in rows:
            if r["op"] != "attention block 10%":
                continue
            d, base = density(r["L"]), dense[(r["L"], r["direction"])]
            target = 1.5 * d * base + 1.0 if r["direction"] == "fwd" else 2.0 * d * base
            ratio = r["ms"] / base
            print(f"| {path.split('/')[-1]} | {r['H']} | {r['L']} | {r['direction']} | {d:.3f} | "
                  f"{r['ms']:.2f} [{r['ms_min']:.2f}-{r['ms_max']:.2f}] | {base:.2f} | {ratio:.3f} | "
                  f"{ratio / d:.2f} d | {target:.2f} | {'met' if r['ms'] <= target else 'NOT met'} | "
                  f"{r['anchors']['torch sdpa (cpu)']['ms']:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
