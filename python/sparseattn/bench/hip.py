"""HiP attention (``python -m sparseattn.bench --suite hip``, issue 12 "Speed"): prefill (mask
estimation + attention) and decode against dense attention, measured in the same run, with HiP's
recall next to each time.

GPU (B = 1, H = 32, Hkv = 8, D = 128, bf16, ``sa.HiP()`` defaults: mask_k 512, block_size_q 64,
block_size_k 2, window 256, sinks 16, refresh_interval 8), Lk = 32K, 128K, 512K:

* **hip prefill (mask + attention)**: ``sa.hip_attention(q, k, v, hip)`` (the mask estimated in the
  call), Lq = Lk. Anchors: dense causal ``torch.nn.functional.scaled_dot_product_attention`` per
  backend (flash, efficient, cudnn) and FlexAttention (causal block mask), on the same GQA inputs
  (``enable_gqa=True``). **Target: >= 8x faster than the fastest dense SDPA at 128K.**
* **hip mask estimation**: ``sa.hip_mask(q, k, hip)`` alone; anchor: the prefill row's call, so
  its ratio column is the reciprocal of the mask's share. **Target: mask < 30% of the prefill.**
* **hip decode (8 steps, amortised)**: ``refresh_interval`` calls of ``sa.hip_decode`` with one
  query row each (the first refreshes the mask, the other 7 reuse it); anchors: as many dense
  ``sa.decode_attention`` calls and torch SDPA calls. **Target: >= 10x faster at 128K.**

Recall (the quality next to the times): ``sa.hip_recall`` on structured inputs (keys with planted
heavy hitters over a background that decays with the distance to them, rows sharing a direction),
float64 dense, hence computed at ``min(L, 4096)`` with 2 heads (params ``recall mean / min @L``),
and the best any K-block mask could do there (``best mean @L``, ``sa.reference.hip_best_mass``).

CPU (``--device cpu``): float32, H = 2, Hkv = 1, D = 64, a smaller HiP (mask_k 64, block_size_q 32,
window 64, sinks 4), L = 1024 (and 2048 without ``--quick``), through the PyTorch CPU path, in
seconds; no GPU number is implied. Targets are stated, never asserted.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional

import torch

from .harness import INPUTS, Case, flex_attention_fn, sdpa_backends

GPU_LENGTHS = [32768, 131072, 524288]
RECALL_MAX_L = 4096


def _configs(device: str):
    import sparseattn as sa

    if device == "cuda":
        return sa.HiP(), torch.bfloat16, 32, 8, 128
    return sa.HiP(mask_k=64, block_size_q=32, window=64, sinks=4, refresh_interval=8), torch.float32, 2, 1, 64


def structured_qk(B, H, Hkv, L, D, g: torch.Generator, n_heavy: int = 8):
    """q rows sharing a direction, keys with ``n_heavy`` planted heavy blocks per kv head and a
    background that decays with the distance to them (the locality HiP relies on)."""
    q = torch.randn(B, H, L, D, generator=g) * 0.3
    q[..., 0] += 1.0
    k = torch.randn(B, Hkv, L, D, generator=g) * 0.3
    t = torch.arange(L)
    for h in range(Hkv):
        heavy = torch.randperm(max(1, L - 64), generator=g)[:n_heavy]
        dist = (t[:, None] - heavy[None]).abs().min(1).values.float()
        k[:, h, :, 0] += 6.0 * torch.exp(-dist / 16.0)
    return q, k


_QUALITY: Dict[tuple, dict] = {}


def quality(hip, L: int, D: int) -> dict:
    """Recall of HiP's mask and the best K-block mass at ``min(L, RECALL_MAX_L)`` (float64, CPU)."""
    import sparseattn as sa

    Lr = min(L, RECALL_MAX_L)
    key = (hip, Lr, D)
    if key not in _QUALITY:
        q, k = structured_qk(1, 2, 1, Lr, D, torch.Generator().manual_seed(0))
        mask = sa.hip_mask(q, k, hip)
        rec, best = sa.hip_recall(q, k, mask, hip), sa.reference.hip_best_mass(q, k, hip)
        _QUALITY[key] = {f"recall mean @{Lr}": round(rec.mean, 4), f"recall min @{Lr}": round(rec.min, 4),
                         f"best mean @{Lr}": round(best.mean, 4)}
    return _QUALITY[key]


def hip_suite(device: str, quick: bool, args=None) -> Iterable[Case]:
    """Prefill, mask-only and decode cases (module docstring)."""
    hip, dtype, H, Hkv, D = _configs(device)
    lengths = list(GPU_LENGTHS) if device == "cuda" else ([1024] if quick else [1024, 2048])
    if getattr(args, "lengths", None):
        lengths = list(args.lengths)
    with_quality = getattr(args, "quality", True)
    for L in lengths:
        extra = quality(hip, L, D) if with_quality else {}
        yield from _cases(device, hip, dtype, H, Hkv, L, D, extra)


def _cases(device, hip, dtype, H, Hkv, L, D, extra) -> Iterable[Case]:
    import sparseattn as sa

    B = 1
    size = ("hip", B, H, Hkv, L, D, dtype, device)
    params = dict(B=B, H=H, Hkv=Hkv, L=L, D=D, dtype=str(dtype).replace("torch.", ""), mask_k=hip.mask_k,
                  window=hip.window, sinks=hip.sinks, **extra)

    def qkv():
        def make():
            return (torch.randn(B, H, L, D, device=device, dtype=dtype),
                    torch.randn(B, Hkv, L, D, device=device, dtype=dtype),
                    torch.randn(B, Hkv, L, D, device=device, dtype=dtype))
        return INPUTS.get(size, "qkv", make, device)

    def prefill():
        q, k, v = qkv()
        return sa.hip_attention(q, k, v, hip)

    def mask_only():
        q, k, _ = qkv()
        return sa.hip_mask(q, k, hip)

    def sdpa(ctx):
        def run():
            q, k, v = qkv()
            with ctx():
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return run

    anchors: Dict[str, Optional[Callable[[], object]]] = {}
    for name, ctx in sdpa_backends(device, include_math=False).items():
        anchors[f"dense causal {name}"] = sdpa(ctx) if ctx is not None else (
            lambda: torch.nn.functional.scaled_dot_product_attention(*qkv(), is_causal=True, enable_gqa=True))
    flex = flex_attention_fn(device)
    if flex is not None:
        flex_fn, create_block_mask = flex

        def flex_run():
            q, k, v = qkv()
            bm = INPUTS.get(size, "flex causal", lambda: create_block_mask(
                lambda b, h, i, j: j <= i, None, None, L, L, device=device), device)
            return flex_fn(q, k, v, block_mask=bm, enable_gqa=True)
        anchors["dense causal flex_attention"] = flex_run

    def check():
        Lc = 300
        g = torch.Generator().manual_seed(1)
        small = sa.HiP(mask_k=16, block_size_q=16, window=16, sinks=4)
        q, k, v = (torch.randn(1, 2, Lc, D, generator=g).to(device=device, dtype=dtype) for _ in range(3))
        k, v = k[:, :1], v[:, :1]
        mask = sa.hip_mask(q, k, small)
        ref_mask = sa.reference.hip_mask(q.cpu().double(), k.cpu().double(), small)
        assert torch.equal(mask.counts.cpu(), ref_mask.counts), "hip_mask: counts differ from the oracle"
        out = sa.hip_attention(q, k, v, small, mask)
        cpu_mask = sa.HiPMask(mask.indices.cpu(), mask.counts.cpu(), small, mask.seq_lens)
        ref = sa.reference.hip_attention(q.cpu(), k.cpu(), v.cpu(), small, cpu_mask)
        from sparseattn.ops.hip.naive import attended
        base = sa.reference.attention(q.cpu(), k.cpu(), v.cpu(), mask=attended(cpu_mask, small, Lc, Lc),
                                      dtype=dtype)
        sa.reference.assert_close("hip_attention", out.cpu(), ref, base)

    pairs = L * (L + 1) / 2
    yield Case(op="hip prefill (mask + attention)", params=params, run=prefill, anchors=anchors,
               flops=4.0 * B * H * D * pairs, check=check)
    yield Case(op="hip mask estimation", params=params, run=mask_only,
               anchors={"hip prefill (mask + attention)": prefill}, check=check)

    steps = hip.refresh_interval

    def q1():
        return INPUTS.get(size, "decode q", lambda: torch.randn(steps, B, H, 1, D, device=device, dtype=dtype),
                          device)

    def lens():
        return INPUTS.get(size, "decode lens", lambda: torch.full((B,), L, dtype=torch.int32, device=device), device)

    def decode():
        _, k, v = qkv()
        state = None
        for s in range(steps):
            out, state = sa.hip_decode(q1()[s], k, v, hip, lens(), state=state)
        return out

    def dense_decode():
        _, k, v = qkv()
        for s in range(steps):
            out = sa.decode_attention(q1()[s], k, v, cache_seqlens=lens())
        return out

    def sdpa_decode():
        _, k, v = qkv()
        for s in range(steps):
            out = torch.nn.functional.scaled_dot_product_attention(q1()[s], k, v, enable_gqa=True)
        return out

    yield Case(op=f"hip decode ({steps} steps, amortised)", params={**params, "steps": steps}, run=decode,
               anchors={"dense sa.decode_attention": dense_decode, "dense torch sdpa": sdpa_decode},
               bytes=steps * 2.0 * B * Hkv * L * D * torch.tensor([], dtype=dtype).element_size(), check=check)


__all__ = ["hip_suite", "structured_qk", "quality", "GPU_LENGTHS"]
