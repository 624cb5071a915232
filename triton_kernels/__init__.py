"""sparseattn's Triton kernels and their launchers (installed as ``sparseattn.triton_kernels``)."""
from .attention import sparse_attention_bwd, sparse_attention_fwd
from .common import INTERPRET
from .stats import attention_stats_columns, attention_stats_rows

__all__ = ["INTERPRET", "sparse_attention_fwd", "sparse_attention_bwd", "attention_stats_columns",
           "attention_stats_rows"]
