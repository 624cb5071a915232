"""Page faults of the CPU path's fresh allocations (issue 18): the bench's 10% layout at L=2048
(H=8, D=64, fp32, B=1, 2 threads) and dense torch SDPA, forward and forward+backward, median of 9
calls, with the minor page faults per call. Run it once as is and once with glibc told to keep
freed memory (``MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=2000000000``), alternating:

    for i in 1 2 3; do python malloc_faults.py plain; \\
      MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=2000000000 python malloc_faults.py kept; done
"""
import os
import resource
import sys
import time
import warnings

os.environ["SPARSEATTN_CPU_PATH"] = "1"
import torch  # noqa: E402

import sparseattn as sa  # noqa: E402

warnings.simplefilter("ignore")
L, H, D, bs = 2048, 8, 64, 128
n = L // bs
gen = torch.Generator().manual_seed(L)
table = (torch.rand(n, n, generator=gen) < 0.1) | torch.eye(n, dtype=torch.bool)
layout = sa.BlockLayout.from_block_mask(table[None, None], bs, (L, L))
q, k, v = (torch.randn(1, H, L, D, requires_grad=True) for _ in range(3))
sdpa = torch.nn.functional.scaled_dot_product_attention


def run(attn, bwd):
    if bwd:
        attn().sum().backward()
    else:
        with torch.no_grad():
            attn()


def timed(attn, bwd, n=9):
    run(attn, bwd)
    ts, f0 = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        t0 = time.perf_counter()
        run(attn, bwd)
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[n // 2] * 1e3, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) // n


ours = lambda: sa.sparse_attention(q, k, v, layout)  # noqa: E731
dense = lambda: sdpa(q, k, v)  # noqa: E731
cells = []
for bwd in (False, True):
    (a, fa), (b, fb) = timed(ours, bwd), timed(dense, bwd)
    cells.append(f"{a:.1f} ms / {fa} faults | {b:.1f} ms / {fb} | {a / b / layout.density:.2f} d")
print(f"| {sys.argv[1] if len(sys.argv) > 1 else ''} | " + " | ".join(cells) + " |")
