"""Sparse patterns: objects that compile to a :class:`~sparseattn.BlockLayout`, one module each.

Static patterns have ``layout(Lq, Lk, device)`` and ``decode_layout(Lq, Lk, device)``, plus
``dense_mask(Lq, Lk)`` as their definition (see :mod:`._base` for the shared conventions:
positions, tiles, bits). Content-based patterns have ``layout_for(q, k)``, built on the device.
"""
from ._base import MAX_TILE, MIN_TILE
from .block_sparse import BlockSparse, FlexPattern, MaskModPattern
from .per_head import PerHead
from .power_attention import PowerAttention
from .sliding_window import SlidingWindow
from .topk_blocks import TopKBlocks
from .sparsed import SparseD, SparseDSchedule

__all__ = ["BlockSparse", "FlexPattern", "MaskModPattern", "PerHead", "PowerAttention", "SlidingWindow", "TopKBlocks", "SparseD", "SparseDSchedule", "MIN_TILE", "MAX_TILE"]
