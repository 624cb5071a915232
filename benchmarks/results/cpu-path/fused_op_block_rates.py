"""torch 2.13 fused CPU flash attention (aten._scaled_dot_product_flash_attention_for_cpu), fp32, D=64:
ns per (query, key) pair of one dense 8 x 2048 x 2048 call against calls on M-row query blocks x S keys
(batch 8, R blocks), the shapes the CPU path gives it. Median of 9 calls."""
import torch, time
op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
def t(f, n=9):
    f(); ts = []
    for _ in range(n):
        t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    ts.sort(); return ts[len(ts)//2] * 1e3
# dense reference rate
q = torch.randn(1, 8, 2048, 64)
d = t(lambda: op(q, q, q, scale=0.125)); print(f"dense 2048: {d:.1f} ms, ns/pair {d*1e6/(8*2048*2048):.3f}")
for M in (128, 256, 512):
  for S in (128, 256, 384, 512, 1024):
    R = 16 * 128 // M
    Q = torch.randn(8, R, M, 64); K = torch.randn(8, R, S, 64)
    ms = t(lambda: op(Q, K, K, scale=0.125))
    print(f"M {M} S {S} R {R}: {ms:.2f} ms, ns/pair {ms*1e6/(8*R*M*S):.3f}")
