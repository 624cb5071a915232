"""sparseattn: fused block-sparse attention kernels (Triton) behind a thin PyTorch layer.

    >>> import sparseattn as sa
    >>> out = sa.scaled_dot_product_attention(q, k, v, is_causal=True)      # drop-in for torch's
    >>> out = sa.sparse_attention(q, k, v, layout)                           # any BlockLayout
"""
from . import reference
from .attention import last_backend, scaled_dot_product_attention, sparse_attention
from .layout import BlockLayout
from ._cuda import cuda_available, cuda_unavailable_reason
from .decode import decode_attention
from .patterns import BlockSparse, PerHead, PowerAttention, SlidingWindow
from .lightning import lightning_attention, lightning_attention_step, lightning_slopes
from . import distributed

__version__ = "0.1.0"

__all__ = ["BlockLayout", "last_backend", "reference", "scaled_dot_product_attention", "sparse_attention"]
__all__ += ["cuda_available", "cuda_unavailable_reason", "decode_attention"]
__all__ += ["BlockSparse", "PerHead", "PowerAttention", "SlidingWindow"]
__all__ += ["distributed", "lightning_attention", "lightning_attention_step", "lightning_slopes"]
