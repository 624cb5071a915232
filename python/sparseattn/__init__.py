"""sparseattn: fused block-sparse attention kernels (Triton) behind a thin PyTorch layer.

Example::

    >>> import torch, sparseattn as sa
    >>> q = k = v = torch.randn(1, 2, 256, 64)
    >>> out = sa.scaled_dot_product_attention(q, k, v, is_causal=True)      # drop-in for torch's
    >>> out = sa.sparse_attention(q, k, v, sa.SlidingWindow(128, sinks=4))  # a pattern or a BlockLayout
"""
from . import reference
from ._cuda import cuda_available, cuda_unavailable_reason
from ._dispatch import FallbackWarning, last_backend, last_fallback_reason
from .layout import BlockLayout
from .ops.attention.op import sparse_attention
from .ops.attention.patch import patch_sdpa, unpatch_sdpa
from .ops.attention.sdpa import scaled_dot_product_attention
from .ops.attention.varlen import varlen_attention
from .ops.stats.op import AttentionStats, attention_stats
from .ops.decode.op import decode_attention
from .ops.hip.config import HiP, HiPMask
from .ops.hip.op import HiPDecodeState, hip_attention, hip_decode, hip_mask, hip_recall
from .ops.lightning.op import lightning_attention, lightning_attention_step, lightning_slopes
from .patterns import BlockSparse, PerHead, PowerAttention, SlidingWindow
from .patterns import SparseD, SparseDSchedule, TopKBlocks
from .ops.routing.op import routing_attention, routing_kmeans_update
from . import distributed
from . import visual

__version__ = "0.1.0"

__all__ = ["BlockLayout", "FallbackWarning", "last_backend", "last_fallback_reason", "reference",
           "scaled_dot_product_attention", "sparse_attention", "varlen_attention"]
__all__ += ["AttentionStats", "attention_stats", "patch_sdpa", "unpatch_sdpa"]
__all__ += ["HiP", "HiPDecodeState", "HiPMask", "hip_attention", "hip_decode", "hip_mask", "hip_recall"]
__all__ += ["cuda_available", "cuda_unavailable_reason", "decode_attention"]
__all__ += ["BlockSparse", "PerHead", "PowerAttention", "SlidingWindow"]
__all__ += ["SparseD", "SparseDSchedule", "TopKBlocks", "routing_attention", "routing_kmeans_update"]
__all__ += ["distributed", "lightning_attention", "lightning_attention_step", "lightning_slopes", "visual"]
