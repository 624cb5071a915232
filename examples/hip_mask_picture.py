"""Picture of one HiP mask (no matplotlib needed): writes OUT/hip_mask.png, OUT = the first
argument (default ./sparseattn_plots), and prints HiP's recall on the same inputs.

Structured inputs (``sparseattn.bench.hip.structured_qk``: 8 planted heavy key blocks over a
background that decays with the distance to them), L = 1024, one head, HiP(mask_k=64,
block_size_q=32, window=64, sinks=4). The picture is the attended set of every query row (row i
down, key j across, one pixel per 4 x 4 tokens): sinks and window grey, keys selected by the tree
search dark blue, the planted heavy blocks' columns marked orange in the top strip. The README's
HiP section shows it (docs/img/hip_mask.png)."""
import os
import sys

import torch

import sparseattn as sa
from sparseattn.bench.hip import structured_qk
from sparseattn.ops.hip.naive import attended
from dynamic_pattern_pictures import write_png   # the house PNG writer (examples/ is on sys.path)

OUT = sys.argv[1] if len(sys.argv) > 1 else "sparseattn_plots"
WHITE, DARK, ORANGE, GREY = (255, 255, 255), (8, 48, 107), (253, 141, 60), (189, 189, 189)


def main():
    L, D = 1024, 64
    hip = sa.HiP(mask_k=64, block_size_q=32, window=64, sinks=4)
    q, k = structured_qk(1, 1, 1, L, D, torch.Generator().manual_seed(0))
    mask = sa.hip_mask(q, k, hip)
    rec = sa.hip_recall(q, k, mask, hip)
    best = sa.reference.hip_best_mass(q, k, hip)
    print(f"HiP recall on this input: mean {rec.mean:.4f}, min {rec.min:.4f}; best K-block mask: mean "
          f"{best.mean:.4f}; keys attended per row at L={L}: <= {hip.sinks + hip.window + hip.mask_k}")
    keep = attended(mask, hip, L, L)[0, 0]                                   # [L, L] bool
    pos = torch.arange(L)
    sel = keep & (pos[None] >= hip.sinks) & (pos[None] <= pos[:, None] - hip.window)
    rgb = torch.tensor(WHITE, dtype=torch.uint8).expand(L, L, 3).clone()
    rgb[keep & ~sel] = torch.tensor(GREY, dtype=torch.uint8)
    rgb[sel] = torch.tensor(DARK, dtype=torch.uint8)
    heavy = k[0, 0, :, 0] > 4.0
    strip = torch.tensor(WHITE, dtype=torch.uint8).expand(16, L, 3).clone()
    strip[:, heavy] = torch.tensor(ORANGE, dtype=torch.uint8)
    img = torch.cat((strip, rgb), 0)[::4, ::4]                               # one pixel per 4 x 4 tokens
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "hip_mask.png")
    write_png(path, img.contiguous(), 2)
    print("wrote", path)


if __name__ == "__main__":
    main()
