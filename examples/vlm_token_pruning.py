"""FasterVLM-style visual-token pruning with ``sa.visual``, on random tensors shaped like LLaVA-1.5.

LLaVA-1.5 encodes an image with CLIP ViT-L/14-336: 24 x 24 = 576 patch tokens plus [CLS], 16
heads of 64 in the penultimate layer whose features go to the language model (Vicuna-7B: 32
heads of 128, no GQA). FasterVLM ranks the 576 image tokens by the [CLS] query's attention in
that ViT layer and keeps the best few (here 58: its 90% reduction), in raster order.

1. ``sa.visual.cls_importance(q_vit, k_vit)``: the head-mean [CLS] attention over the patches,
   ``[B, 576]`` fp32; ``sa.visual.select_tokens(scores, 58)``: the kept patches, raster order.
2. A decoder layer's KV cache after the prompt (35 system + 576 image + 40 question tokens):
   ``sa.visual.keep_mask`` marks the text and the kept image tokens; ``sa.visual.compact_kv``
   gathers them into a dense prefix of a smaller cache, with their original positions (for
   RoPE) and the new lengths. The cache before and after is printed.
3. Decode over the compacted cache equals decode over the full cache with the dropped keys
   masked (``key_padding_mask=``): checked.

Writes OUT/vlm_token_pruning.json (shapes, sizes, kept indices) and OUT/vlm_kept_tokens.png (the
importance on the 24 x 24 grid, white to dark blue, beside the kept tokens). The inputs are random
with two planted objects whose keys lean toward the [CLS] query, so the kept tokens cluster there.

Run: python examples/vlm_token_pruning.py OUT
"""
import json
import os
import sys

import torch

import sparseattn as sa
from dynamic_pattern_pictures import write_png   # the house PNG writer (examples/ is on sys.path)

OUT = sys.argv[1] if len(sys.argv) > 1 else "sparseattn_vlm"
B = 2
GRID, VIT_HEADS, VIT_D = 24, 16, 64           # CLIP ViT-L/14-336, penultimate layer
N_IMG = GRID * GRID                            # 576 image tokens
LLM_HEADS, LLM_D = 32, 128                     # Vicuna-7B attention
SYSTEM, TEXT = 35, 40                          # tokens before and after the image in the prompt
KEEP = 58                                      # FasterVLM: 576 -> 58 (90% fewer image tokens)


def vit_qk(seed=0):
    """q, k ``[B, 16, 1 + 576, 64]`` of the ViT layer: random, plus two objects per image whose keys
    lean toward the [CLS] query's direction (Gaussian blobs on the grid)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, VIT_HEADS, 1 + N_IMG, VIT_D, generator=g)
    k = torch.randn(B, VIT_HEADS, 1 + N_IMG, VIT_D, generator=g)
    r, c = torch.meshgrid(torch.arange(GRID).float(), torch.arange(GRID).float(), indexing="ij")
    for b in range(B):
        centres = torch.randint(3, GRID - 3, (2, 2), generator=g).float()
        blob = sum(torch.exp(-((r - y) ** 2 + (c - x) ** 2) / 8.0) for y, x in centres).flatten()   # [576]
        u = q[b, :, 0] / q[b, :, 0].norm(dim=-1, keepdim=True)                                       # [16, 64]
        k[b, :, 1:] += 6.0 * blob[None, :, None] * u[:, None, :]
    return q, k


def mb(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors) / 2 ** 20


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)

    # 1. FasterVLM's [CLS] attention score and the kept image tokens
    q_vit, k_vit = vit_qk()
    scores = sa.visual.cls_importance(q_vit, k_vit)                 # [B, 576], each row sums to <= 1
    kept = sa.visual.select_tokens(scores, KEEP)                    # [B, 58], raster order
    print(f"[CLS] importance {tuple(scores.shape)}; kept {KEEP} of {N_IMG} image tokens per image, "
          f"holding {scores.gather(1, kept).sum(1).mean():.1%} of the [CLS] attention to the patches")

    # 2. one decoder layer's KV cache after the prompt, then compacted
    L = SYSTEM + N_IMG + TEXT
    k_cache = torch.randn(B, LLM_HEADS, L, LLM_D)
    v_cache = torch.randn(B, LLM_HEADS, L, LLM_D)
    keep = sa.visual.keep_mask(kept, L, start=SYSTEM, span=N_IMG)   # bool [B, L]: text + kept image tokens
    n_keep = int(keep.sum(-1).max())
    k_new, v_new, lens, pos = sa.visual.compact_kv(k_cache, v_cache, keep, max_len=n_keep)
    print(f"KV cache before: k, v {tuple(k_cache.shape)} each, {mb(k_cache, v_cache):.1f} MiB per layer "
          f"({SYSTEM} system + {N_IMG} image + {TEXT} question tokens)")
    print(f"KV cache after:  k, v {tuple(k_new.shape)} each, {mb(k_new, v_new):.1f} MiB per layer, "
          f"cache_seqlens {lens.tolist()}")
    print(f"positions kept for RoPE (batch 0): {pos[0, SYSTEM - 2:SYSTEM + 4].tolist()} ... "
          f"{pos[0, -3:].tolist()} (the image tokens keep their original indices)")

    # 3. decode the last prompt token's query over both caches
    q_last = torch.randn(B, LLM_HEADS, 1, LLM_D)
    out_compact = sa.decode_attention(q_last, k_new, v_new, cache_seqlens=lens)
    out_masked = sa.decode_attention(q_last, k_cache, v_cache, key_padding_mask=keep)
    err = (out_compact - out_masked).abs().max().item()
    print(f"decode over the compacted cache vs the full cache with key_padding_mask: max |diff| {err:.2e}")
    assert err < 1e-4, err

    # the picture and the summary
    white, dark = torch.tensor([255, 255, 255.]), torch.tensor([8, 48, 107.])
    heat = (scores[0] / scores[0].max()).sqrt().view(GRID, GRID, 1)
    heat_rgb = (white + (dark - white) * heat).round().to(torch.uint8)
    mask = torch.zeros(N_IMG, dtype=torch.bool)
    mask[kept[0]] = True
    grey = torch.tensor([217, 217, 217], dtype=torch.uint8)
    kept_rgb = torch.where(mask.view(GRID, GRID, 1), dark.to(torch.uint8), grey)
    gap = torch.full((GRID, 1, 3), 255, dtype=torch.uint8)
    write_png(os.path.join(OUT, "vlm_kept_tokens.png"), torch.cat([heat_rgb, gap, kept_rgb], 1), 12)
    with open(os.path.join(OUT, "vlm_token_pruning.json"), "w") as f:
        json.dump({"image_tokens": N_IMG, "kept": KEEP, "kv_before": list(k_cache.shape), "kv_after": list(k_new.shape),
                   "mib_before": mb(k_cache, v_cache), "mib_after": mb(k_new, v_new), "cache_seqlens": lens.tolist(),
                   "kept_indices": kept.tolist(), "decode_max_abs_diff": err}, f, indent=1)
    print(f"wrote {OUT}/vlm_token_pruning.json and {OUT}/vlm_kept_tokens.png")


if __name__ == "__main__":
    main()
