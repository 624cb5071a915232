"""Pictures of one estimated layout per content-based method (no matplotlib needed): writes
OUT/{topk_blocks,sparsed,routing}.png, OUT = the first argument (default ./sparseattn_plots; the
README's are in docs/img).

Inputs have planted structure so the estimates have something to find: the sequence is cut into
segments, each with a topic direction shared by its queries and keys (segments of one topic
recur), plus noise. Run: python examples/dynamic_pattern_pictures.py docs/img
"""
import os
import struct
import sys
import zlib

import torch
import torch.nn.functional as F

import sparseattn as sa

OUT = sys.argv[1] if len(sys.argv) > 1 else "sparseattn_plots"
WHITE, LIGHT, DARK = (255, 255, 255), (158, 202, 225), (8, 48, 107)


def write_png(path, rgb, scale):
    """rgb: uint8 [h, w, 3] -> PNG, each pixel a scale x scale square."""
    rgb = rgb.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + bytes(rgb[y].flatten().tolist()) for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xffffffff)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)


def colour(img):
    """uint8 [n, m] of 0 (skipped), 1 (partial), 2 (full) -> rgb."""
    pal = torch.tensor([WHITE, LIGHT, DARK], dtype=torch.uint8)
    return pal[img.long()]


def tiles(layout, h=0):
    partial, full = layout.tile_masks()
    return full[0, h].to(torch.uint8) * 2 + partial[0, h].to(torch.uint8)


def topic_inputs(L, D, seg, n_topics, seed=0):
    g = torch.Generator().manual_seed(seed)
    topics = torch.randn(n_topics, D, generator=g)
    which = torch.randint(0, n_topics, (L // seg,), generator=g).repeat_interleave(seg)
    base = topics[which]
    q = base + 0.8 * torch.randn(L, D, generator=g)
    k = base + 0.8 * torch.randn(L, D, generator=g)
    v = torch.randn(L, D, generator=g)
    return q[None, None], k[None, None], v[None, None]


def main():
    os.makedirs(OUT, exist_ok=True)
    L, D = 2048, 64
    q, k, v = topic_inputs(L, D, seg=128, n_topics=6)

    pat = sa.TopKBlocks(64, topk=3, estimate="mean_pool", window_blocks=1, sink_blocks=1, causal=True)
    lay = pat.layout_for(q, k)
    write_png(f"{OUT}/topk_blocks.png", colour(tiles(lay)), 8)
    print("topk_blocks.png", pat, f"density {lay.density:.3f}")

    sd = sa.SparseD(64, select=0.1)
    lay = sd.estimate(q, k, generation_start=1536)
    write_png(f"{OUT}/sparsed.png", colour(tiles(lay)), 8)
    print("sparsed.png", sd, "generation_start=1536", f"density {lay.density:.3f}")

    Lr = 256
    qr, kr, vr = topic_inputs(Lr, D, seg=16, n_topics=4, seed=1)
    mu = F.layer_norm(torch.randn(1, 4, D, generator=torch.Generator().manual_seed(2)), (D,))
    _, (qc, kc) = sa.routing_attention(qr, kr, vr, mu, 64, return_clusters=True)
    seen = torch.zeros(Lr, Lr, dtype=torch.uint8)   # token-level: which keys each query attends
    for c in range(qc.shape[2]):
        qi, ki = qc[0, 0, c], kc[0, 0, c]
        seen[qi[:, None], ki[None, :]] = torch.where(ki[None, :] <= qi[:, None], 2, seen[qi[:, None], ki[None, :]])
    write_png(f"{OUT}/routing.png", colour(seen), 2)
    print("routing.png", f"L={Lr}, C=4, window=64, density {(seen == 2).float().mean():.3f} of all pairs")


if __name__ == "__main__":
    main()
