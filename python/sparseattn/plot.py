"""``python -m sparseattn.plot``: a PNG per pattern of docs/patterns.md showing its layout at
L = 4K, and a table of density against L (printed as Markdown and written beside the pictures,
``docs/img/pattern_density.md``).

Each picture shows the layout the kernels run (one pixel per layout tile, one panel per head):
full tiles dark, partial tiles (masked inside by the causal, window, sink or sequence bounds, or a
bitmask) light, skipped tiles white. docs/patterns.md explains the patterns, the pictures and the
table. Needs matplotlib (``pip install matplotlib``).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List

import torch

from .patterns import BlockSparse, PerHead, PowerAttention, SlidingWindow

L_PICTURE = 4096
DENSITY_LENGTHS = [1024, 4096, 16384, 65536, 131072]


def _require_matplotlib():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("sparseattn.plot needs matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _document_mask_mod(L: int, n_docs: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(L - 1, generator=g)[: n_docs - 1].sort().values + 1
    doc = torch.zeros(L, dtype=torch.long)
    doc[cuts] = 1
    doc = doc.cumsum(0)

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)
    return mask_mod


def structured_patterns() -> Dict[str, object]:
    """The length-independent patterns of docs/patterns.md (name -> pattern): pictured, and in the
    density table."""
    return {
        "sliding_window": SlidingWindow(512, sinks=64),
        "power_attention": PowerAttention(block_size=64, window_blocks=1, sink_blocks=1),
        "power_attention_paper": PowerAttention(block_size=256, window_blocks=4, sink_blocks=1),
        "per_head": PerHead([SlidingWindow(10 ** 9), SlidingWindow(256, sinks=64),
                             PowerAttention(128), SlidingWindow(1024, sinks=4)]),
    }


def example_patterns(L: int = L_PICTURE) -> Dict[str, object]:
    """The patterns pictured in docs/patterns.md (name -> pattern): the structured ones and a
    document mask through ``BlockSparse.from_mask_mod`` (built for ``L x L`` only, so it has a
    picture but no row in the density table: its density is the mask's own)."""
    pats = structured_patterns()
    pats["block_sparse_documents"] = BlockSparse.from_mask_mod(_document_mask_mod(L), None, None, L, L)
    return pats


def tile_image(layout) -> torch.Tensor:
    """uint8 [Hl, nQ, nK] of batch 0: 2 full tile, 1 partial tile, 0 skipped.

    Example (128-tiles; the sinks' tile, the window's far edge and the diagonal are partial)::

        >>> import sparseattn as sa
        >>> tile_image(sa.SlidingWindow(256, sinks=4).layout(640, 640))
        tensor([[[1, 0, 0, 0, 0],
                 [2, 1, 0, 0, 0],
                 [1, 2, 1, 0, 0],
                 [1, 1, 2, 1, 0],
                 [1, 0, 1, 2, 1]]], dtype=torch.uint8)
    """
    partial, full = layout.tile_masks()
    return (full[0].to(torch.uint8) * 2 + partial[0].to(torch.uint8))


def save_picture(name: str, pattern, path: str, L: int = L_PICTURE) -> str:
    plt = _require_matplotlib()
    from matplotlib.colors import ListedColormap

    layout = pattern.layout(L, L, "cpu")
    img = tile_image(layout)
    heads = img.shape[0]
    fig, axes = plt.subplots(1, heads, figsize=(max(4.2, 2.6 * heads), 3.4 if heads == 1 else 2.8), squeeze=False)
    cmap = ListedColormap(["#ffffff", "#9ecae1", "#08306b"])
    for h in range(heads):
        ax = axes[0, h]
        ax.imshow(img[h].numpy(), cmap=cmap, vmin=0, vmax=2, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        if heads > 1:
            ax.set_title(f"head {h}", fontsize=8)
    tq, tk = layout.block_size
    fig.suptitle(f"{name}: L={L}, {tq}x{tk} tiles, density {layout.density:.3f}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _density(p, L: int) -> float:
    if isinstance(p, PerHead):   # the mean over heads; each head's layout on its own stays small
        return sum(_density(s, L) for s in p.patterns) / len(p.patterns)
    return p.layout(L, L, "cpu").density


def density_table(lengths: List[int] = DENSITY_LENGTHS) -> str:
    """Markdown: density (fraction of the ``L x L`` score square attended; dense causal is about
    0.5) of the structured patterns against L. A PerHead row is the mean over its heads.

    Example (the first columns of docs/patterns.md's table)::

        >>> print(density_table([1024, 4096]))
        | pattern | L=1K | L=4K |
        |---|---|---|
        | sliding_window `SlidingWindow(window=512, sinks=64)` | 0.4046 | 0.1308 |
        | power_attention `PowerAttention(block_size=64, window_blocks=1, sink_blocks=1)` | 0.2661 | 0.1002 |
        | power_attention_paper `PowerAttention(block_size=256, window_blocks=4, sink_blocks=1)` | 0.5005 | 0.3126 |
        | per_head `PerHead([...])` | 0.4140 | 0.2405 |
        | dense causal (for scale) | 0.5005 | 0.5001 |
        <BLANKLINE>
    """
    pats = structured_patterns()
    lines = ["| pattern | " + " | ".join(f"L={L // 1024}K" for L in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for name, p in pats.items():
        cells = [f"{_density(p, L):.4f}" for L in lengths]
        lines.append(f"| {name} `{p!r}` | " + " | ".join(cells) + " |")
    lines.append("| dense causal (for scale) | " + " | ".join(f"{(L + 1) / (2 * L):.4f}" for L in lengths) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sparseattn.plot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="sparseattn_plots",
                    help="folder for the PNGs (default ./sparseattn_plots; the repository's are in docs/img)")
    ap.add_argument("--no-table", action="store_true", help="skip the density table")
    args = ap.parse_args(argv)
    try:
        _require_matplotlib()
    except ImportError as e:
        print(f"python -m sparseattn.plot: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    print(f"writing to {os.path.abspath(args.out)}")
    for name, p in example_patterns().items():
        print(save_picture(name, p, os.path.join(args.out, f"pattern_{name}.png")))
    if not args.no_table:
        table = density_table()
        with open(os.path.join(args.out, "pattern_density.md"), "w") as f:
            f.write(table)
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
