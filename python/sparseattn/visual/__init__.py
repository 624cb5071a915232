"""Vision-language helpers (issue 13): visual-token importance scores, selection, key keep masks,
KV-cache compaction, massive-activation sinks, the masks of CCA and AKI as patterns, and the
attention redistribution of VAR and ACT (fused; ``sparseattn/ops/redistribution``).

Example::

    >>> import torch, sparseattn as sa
    >>> q = k = v = torch.randn(1, 4, 120, 16)                    # 10 text + 100 image + 10 text
    >>> a = sa.visual.last_query_importance(q, k, slice(10, 110))  # FastV's score [1, 100]
    >>> mask = sa.visual.keep_mask(sa.visual.select_tokens(a, 25), 120, start=10, span=100)
    >>> out = sa.sparse_attention(q, k, v, sa.BlockLayout.from_block_mask(
    ...     torch.ones(1, 1, 2, 2, dtype=torch.bool), 64, (120, 120), causal="top_left"), key_padding_mask=mask)
"""
from .patterns import ConcentricCausal, ModalityMutual, concentric_rings
from .tokens import (cls_importance, compact_kv, damro_outliers, keep_mask, last_query_importance,
                     massive_activation_sinks, select_tokens)
from ..ops.redistribution.op import act_attention, var_attention
from . import naive

__all__ = ["ConcentricCausal", "ModalityMutual", "concentric_rings", "cls_importance", "compact_kv", "damro_outliers",
           "keep_mask", "last_query_importance", "massive_activation_sinks", "select_tokens", "naive",
           "act_attention", "var_attention"]
