"""Pictures of the visual-token tools (no matplotlib needed): writes OUT/importance_map.png,
OUT/cca_mask.png and OUT/aki_mask.png, OUT = the first argument (default ./sparseattn_plots; the
README's are in docs/img).

* importance_map.png -- FastV-style importance of the 576 image tokens of a LLaVA-like prompt
  (35 system + 24 x 24 image + 40 text tokens): ``sa.visual.last_query_importance`` (head mean of
  the last query's softmax row) on the 24 x 24 grid, white (0) to dark blue (the maximum; square-root
  scale), beside the 144 tokens (25%) ``sa.visual.select_tokens`` keeps (dark blue). The inputs are random with planted
  structure: two objects (Gaussian blobs on the grid) whose keys lean toward the question's query
  direction, and three isolated high-norm "sink" patches, as such maps show.
* cca_mask.png, aki_mask.png -- the token masks of ``sa.visual.ConcentricCausal`` (CCA) and
  ``sa.visual.ModalityMutual`` (AKI) on 8 text + 8 x 8 image + 8 text tokens
  (``.layout(L, L, "cpu").to_dense_mask()``; rows are queries, columns keys): dark blue = attended
  and causal, orange = attended beyond the causal mask, grey = causal but not attended, white =
  neither; thin grey lines mark the image span.

Run: python examples/visual_pictures.py docs/img
"""
import os
import sys

import torch

import sparseattn as sa
from dynamic_pattern_pictures import write_png   # the house PNG writer (examples/ is on sys.path)

OUT = sys.argv[1] if len(sys.argv) > 1 else "sparseattn_plots"
WHITE, DARK, ORANGE, GREY, LINE = (255, 255, 255), (8, 48, 107), (253, 141, 60), (217, 217, 217), (150, 150, 150)


def blues(x):
    """float [n, m] in [0, 1] -> rgb from white to dark blue."""
    w, d = torch.tensor(WHITE, dtype=torch.float32), torch.tensor(DARK, dtype=torch.float32)
    return (w + (d - w) * x[..., None].clamp(0, 1)).round().to(torch.uint8)


def hstack(*imgs, gap=1):
    """rgb images of one height side by side, ``gap`` white columns between them."""
    h = imgs[0].shape[0]
    white = torch.full((h, gap, 3), 255, dtype=torch.uint8)
    parts = [imgs[0]]
    for im in imgs[1:]:
        parts += [white, im]
    return torch.cat(parts, 1)


def importance_inputs(system=35, grid=24, text=40, H=4, D=64, seed=0):
    """q, k ``[1, H, L, D]`` of a LLaVA-like prompt with two planted objects and three sinks."""
    g = torch.Generator().manual_seed(seed)
    n = grid * grid
    L = system + n + text
    q, k = torch.randn(1, H, L, D, generator=g), torch.randn(1, H, L, D, generator=g)
    u = torch.randn(H, D, generator=g)
    u = u / u.norm(dim=-1, keepdim=True)
    r, c = torch.meshgrid(torch.arange(grid).float(), torch.arange(grid).float(), indexing="ij")
    blob = lambda r0, c0, s: torch.exp(-((r - r0) ** 2 + (c - c0) ** 2) / (2 * s * s))  # noqa: E731
    objects = (1.0 * blob(8, 7, 3.0) + 0.8 * blob(16, 17, 2.2)).flatten()            # [n]
    k[0, :, system:system + n] += 8.0 * objects[None, :, None] * u[:, None, :]
    q[0, :, system + n:] += 3.0 * u[:, None, :]                                         # the question looks for them
    for patch in (3 * grid + 20, 20 * grid + 2, 12 * grid + 11):                       # isolated sinks
        k[0, :, system + patch] += 7.0 * u
    return q, k, system, n, grid


def importance_map():
    q, k, system, n, grid = importance_inputs()
    a = sa.visual.last_query_importance(q, k, slice(system, system + n))[0]     # [576], head mean
    keep = sa.visual.select_tokens(a[None], n // 4)[0]
    kept = torch.zeros(n, dtype=torch.bool)
    kept[keep] = True
    heat = blues((a / a.max()).sqrt().view(grid, grid))            # sqrt: the objects next to the sinks
    mask = torch.where(kept.view(grid, grid)[..., None], torch.tensor(DARK, dtype=torch.uint8),
                       torch.tensor(GREY, dtype=torch.uint8))
    write_png(f"{OUT}/importance_map.png", hstack(heat, mask), 12)
    print("importance_map.png", f"{n} image tokens on {grid}x{grid}, max importance {a.max():.3f}, "
          f"kept {int(kept.sum())} (select_tokens)")


def mask_picture(name, pattern, L, image_span):
    allowed = pattern.layout(L, L, "cpu").to_dense_mask()[0, 0]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    img = torch.full((L, L, 3), 255, dtype=torch.uint8)
    img[allowed & causal] = torch.tensor(DARK, dtype=torch.uint8)
    img[allowed & ~causal] = torch.tensor(ORANGE, dtype=torch.uint8)
    img[~allowed & causal] = torch.tensor(GREY, dtype=torch.uint8)
    scale = 6
    big = img.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    for t in image_span:                                   # lines at the image span's edges
        big[t * scale, :] = torch.tensor(LINE, dtype=torch.uint8)
        big[:, t * scale] = torch.tensor(LINE, dtype=torch.uint8)
    write_png(f"{OUT}/{name}", big, 1)
    extra, removed = int((allowed & ~causal).sum()), int((~allowed & causal).sum())
    print(name, pattern, f"L={L}: {int(allowed.sum())} pairs attended, {extra} beyond causal, "
          f"{removed} causal pairs dropped")


def main():
    os.makedirs(OUT, exist_ok=True)
    importance_map()
    text, side = 8, 8
    L = text + side * side + text
    span = (text, text + side * side)
    mask_picture("cca_mask.png", sa.visual.ConcentricCausal(image_start=text, grid=(side, side), block_size=64), L,
                 span)
    mask_picture("aki_mask.png", sa.visual.ModalityMutual(image_start=text, image_len=side * side, question_end=L,
                                                          block_size=64), L, span)


if __name__ == "__main__":
    main()
