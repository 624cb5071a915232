"""The one sparse format (:class:`BlockLayout`), its builders and the in-block rules.

* :mod:`.block_layout`: the class, its validated constructors and views;
* :mod:`.predicates`: the one Python definition of each in-block rule (what the Triton kernels
  evaluate in partial tiles), shared by the builders, the CPU paths, the patterns and the oracles;
* :mod:`.builders`: tile lists from masks and entries, bit packing, the CUDA list builder;
* :mod:`.dynamic`: layouts built on the device from computed key-block indices (no host read).
"""
from .block_layout import BlockLayout
from .builders import check_block_mask, mask_to_lists
from .predicates import unpack_bits

__all__ = ["BlockLayout", "check_block_mask", "mask_to_lists", "unpack_bits"]
