"""PowerAttention: key blocks at power-of-two distances, a local window and sink blocks."""
from __future__ import annotations


import torch

from ._base import _Pattern, _blocks_to_tiles, _check_block, _check_int, _check_lens, _grid, _tile_of


class PowerAttention(_Pattern):
    """PowerAttention (Chen et al., 2025): causal and blockwise. With ``b = block_size``, the query
    at position ``i`` (block ``I = i // b``) sees key ``j <= i`` (block ``J = j // b``) iff
    ``I - J`` is 0 or a power of two, or ``I - J < window_blocks``, or ``J < sink_blocks``.
    Each query block sees O(log(L / b)) key blocks.

    Args:
        block_size: b, a power of two >= 16 (the paper used 256; default 64).
        window_blocks: local window in blocks (>= 1; 1 = only the diagonal block, already included).
        sink_blocks: the first blocks every query sees (>= 0; the paper used 1).

    Example::

        >>> import torch, sparseattn as sa
        >>> q = k = v = torch.randn(1, 2, 500, 64)
        >>> out = sa.sparse_attention(q, k, v, sa.PowerAttention(block_size=64))
    """

    _kinds = ("bottom_right", None, 0)

    def __init__(self, block_size: int = 64, window_blocks: int = 1, sink_blocks: int = 1):
        self.block_size = _check_block("block_size", block_size)
        self.window_blocks = _check_int("window_blocks", window_blocks, 1)
        self.sink_blocks = _check_int("sink_blocks", sink_blocks, 0)

    def __repr__(self):
        return (f"PowerAttention(block_size={self.block_size}, window_blocks={self.window_blocks}, "
                f"sink_blocks={self.sink_blocks})")

    def _tile(self):
        t = _tile_of(self.block_size)
        return t, t

    def _shape(self, Lq, Lk):
        return 1, 1

    def _block_visible(self, I, J):
        d = I - J
        return (d >= 0) & (((d & (d - 1)) == 0) | (d < self.window_blocks) | (J < self.sink_blocks))

    def dense_mask(self, Lq: int, Lk: int) -> torch.Tensor:
        Lq, Lk = _check_lens(Lq, Lk)
        i, j = _grid(Lq, Lk, Lk - Lq, "cpu")
        bs = self.block_size
        return ((j <= i) & self._block_visible(torch.div(i, bs, rounding_mode="floor"), j // bs))[None, None]

    def _tiles(self, Lq, Lk, device, tq, tk, decode):
        bs, off = self.block_size, Lk - Lq
        i_lo, i_hi = max(off, 0) // bs, (Lk - 1) // bs
        I = torch.arange(i_lo, i_hi + 1, device=device)
        d = sorted(set(range(min(self.window_blocks, i_hi + 1))) |
                   {1 << k for k in range(max(1, i_hi + 1).bit_length())})
        d = torch.tensor(d, dtype=torch.long, device=device)
        J = (I[:, None] - d[None, :]).flatten()
        II = I[:, None].expand(-1, d.numel()).flatten()
        s = torch.arange(min(self.sink_blocks, i_hi + 1), device=device)
        Js, Is = s[None, :].expand(I.numel(), -1).flatten(), I[:, None].expand(-1, s.numel()).flatten()
        keep = Js <= Is
        I, J = torch.cat([II, Is[keep]]), torch.cat([J, Js[keep]])
        ok = J >= 0
        I, J = I[ok], J[ok]
        z = torch.zeros_like(I)

        def visible(b, h, I, J, qpos, kpos):
            return self._block_visible(I, J)
        return _blocks_to_tiles(z, z, I, J, bs, bs, off, Lq, Lk, tq, tk, 1, visible)


# ----------------------------------------------------------------------------- BlockSparse
