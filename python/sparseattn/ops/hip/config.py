"""HiP's configuration (``sa.HiP``), its mask (``sa.HiPMask``) and the integer arithmetic of the
tree search that the kernel, the CPU path and the float64 oracle share.

HiP (Hierarchically Pruned Attention, DeepAuto-AI's hip-attention, ICLR 2025 "v1.1"; definitions in
``../shared/specs/methods.md`` section 1). Positions are 0-based here: query row ``i`` sits at
position ``p = q_pos[b, i]`` (``Lk - Lq + i`` without a cache) and sees keys ``j <= p``. HiP's own
code is 1-based (``TSRC = max(pos)``); the quantities below are written in its terms with
``TSRC = p_last + 1``.

Per (batch, head, query block ``b`` of ``block_size_q`` rows):

* ``p_last``: the largest position of the block's rows that exist (``< Lq``);
* ``tsrc = max(0, p_last + 1 - window - sinks)``, ``bsrc = ceil(tsrc / block_size_k)`` candidate key
  blocks ``[n_sink_blocks, n_sink_blocks + bsrc)`` (``n_sink_blocks = ceil(sinks / block_size_k)``):
  the keys strictly between the sinks and the window of the block's last row;
* ``tsrc <= mask_k``: every candidate is selected; otherwise :func:`initial_starts` splits them into
  ``K = mask_k // block_size_k`` nodes and :func:`num_rounds` rounds of the tree search run.

A round halves every node ``(s, g)`` into ``(s, g // 2)`` and ``(s + g // 2, g - g // 2)`` (children
of size 0 are masked, score -inf), scores each child by its representative ("center") key block
``r = s + size // 2``: the max over the block's strided query rows ``i`` and the block's strided keys
``t`` of ``q_i . k_t * scale``, where ``-32000`` replaces a product whose key is inside row ``i``'s
window or in its future (``t > p_i - window``) or that is exactly 0.0 (HiP's padding hack, kept), and
keeps the ``K`` best children. The selected blocks are the final nodes' first blocks.

Decisions where HiP's code is silent, ambiguous or where this package departs on purpose (each
documented in the README's HiP section):

* ties (equal scores, e.g. two children whose representatives are masked for every row, -32000)
  go to the child with the smaller start (HiP's descending argsort leaves them unspecified);
* the strided query rows of a block are counted back from its last existing row:
  ``p_last_row - t * block_stride_q``; on full blocks that is HiP's set
  (``b * BQ + j * stride + stride - 1``), on the partial last block (and a decode refresh) it keeps
  the last row in the set, where HiP's would score rows past the end (zeros, -32000);
* the round count is one per call, from the longest row (HiP passes it from the host likewise):
  extra rounds on shorter blocks leave size-1 nodes unchanged;
* the mask lists only the selected nodes of non-zero size (``counts <= K``): HiP reports ``K``
  entries and can repeat a block when fewer than ``K`` children are alive; a repeat would count a
  key twice in the softmax, so it is dropped;
* the initial split reproduces HiP's float32 arithmetic (``int(float32(bsrc) / K * i)``).

Key padding (``key_padding_mask`` bool ``[B, Lk]``, True = the key exists; HiP's code has none, so
this is ours). Positions are counted per sequence from its first real key: with ``o_b`` leading
padded keys (left padding, :func:`key_offsets`, computed on the device), row ``i`` sits at
``p = q_pos[b, i] - o_b`` and key ``j`` at ``j - o_b``, so the sinks are the sequence's first real
keys, the window and the candidate range are counted from there, and the round count is the one of
that sequence alone (:func:`rounds_per_batch`, from ``p_max - o_b``; ``p_max`` the call's host
bound): a left-padded sequence gets exactly the mask and the output of the same sequence unpadded
(its indices shifted by ``o_b``, as they stay token offsets into ``k``). Padding elsewhere (right
padding, holes, the empty slots of a static cache) only removes keys: a padded key scores as
masked (-32000) in the search, so a real key is never passed over for it, and it is never attended
(sinks, window and selected keys alike) and gets no gradient; positions are not renumbered there
(the window counts positions, padded or not). Rows at a negative position (query rows inside the
left padding) see nothing and give 0. Without a padding mask nothing changes (``o_b = 0``, the
host round count).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

# HiP's score of a masked (window / future / zero) product.
MASKED_SCORE = -32000.0
# Padding of HiPMask.indices past counts (keeps each row ascending; never read).
PAD_INDEX = torch.iinfo(torch.int32).max


def _pow2(x: int) -> bool:
    return x >= 1 and (x & (x - 1)) == 0


def _int(name: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name}: expected an int >= {lo}, got {type(v).__name__} {v!r}")
    if v < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {v}")
    return v


@dataclass(frozen=True)
class HiP:
    """HiP attention's configuration (defaults: hip-attention v1.1's ``HiPAttentionArgs``), checked
    on construction.

    Args:
        mask_k: keys selected per query block (a positive multiple of ``block_size_k``).
        block_size_q: query rows that share one mask (a power of two >= 16: the kernels' query
            tile lies inside one block).
        block_stride_q: every ``block_stride_q``-th row of a block scores the tree's children
            (divides ``block_size_q``).
        block_size_k: tokens per selected key block (a power of two, 1 to 64).
        block_stride_k: every ``block_stride_k``-th key of a block is scored (divides ``block_size_k``).
        window: sliding window: row ``p`` always sees keys ``p - window < j <= p`` (>= 0).
        sinks: attention sinks: keys ``j < sinks`` (with ``j <= p - window``) always seen (>= 0).
        refresh_interval: :func:`sparseattn.hip_decode` re-estimates the mask every this many steps.
    """
    mask_k: int = 512
    block_size_q: int = 64
    block_stride_q: int = 2
    block_size_k: int = 2
    block_stride_k: int = 1
    window: int = 256
    sinks: int = 16
    refresh_interval: int = 8

    def __post_init__(self):
        bk = _int("block_size_k", self.block_size_k, 1)
        if not _pow2(bk) or bk > 64:
            raise ValueError(f"block_size_k: expected a power of two from 1 to 64, got {bk}")
        mk = _int("mask_k", self.mask_k, 1)
        if mk % bk:
            raise ValueError(f"mask_k: expected a positive multiple of block_size_k={bk}, got {mk}")
        bq = _int("block_size_q", self.block_size_q, 1)
        if not _pow2(bq) or bq < 16:
            raise ValueError(f"block_size_q: expected a power of two >= 16, got {bq}")
        sq = _int("block_stride_q", self.block_stride_q, 1)
        if bq % sq:
            raise ValueError(f"block_stride_q: expected a divisor of block_size_q={bq}, got {sq}")
        sk = _int("block_stride_k", self.block_stride_k, 1)
        if bk % sk:
            raise ValueError(f"block_stride_k: expected a divisor of block_size_k={bk}, got {sk}")
        _int("window", self.window, 0)
        _int("sinks", self.sinks, 0)
        _int("refresh_interval", self.refresh_interval, 1)

    @property
    def k_blocks(self) -> int:
        """K: key blocks selected per query block (``mask_k / block_size_k``)."""
        return self.mask_k // self.block_size_k

    @property
    def n_sink_blocks(self) -> int:
        return -(-self.sinks // self.block_size_k)

    def candidates(self, p_last: int) -> int:
        """bsrc: the candidate key blocks of a query block whose last row is at position p_last."""
        tsrc = max(0, p_last + 1 - self.window - self.sinks)
        return -(-tsrc // self.block_size_k)

    def searches(self, p_last: int) -> bool:
        """Whether a block ending at p_last runs the tree search (else every candidate is selected)."""
        return max(0, p_last + 1 - self.window - self.sinks) > self.mask_k


def num_rounds(hip: HiP, p_max: int) -> int:
    """Rounds of the tree search for a call whose longest row is at position ``p_max``: the
    halvings of HiP's ``max_group_size = ceil(bsrc / K)`` (a float) until it is <= 1."""
    g = float(math.ceil(hip.candidates(p_max) / hip.k_blocks))
    n = 0
    while g > 1:
        g /= 2
        n += 1
    return n


def initial_starts(hip: HiP, bsrc: int) -> torch.Tensor:
    """HiP's initial split of ``bsrc`` candidate blocks into K nodes: int64 ``[K + 1]`` start blocks
    (absolute, sinks included; entry K is the end), node sizes ``max(0, min(bsrc, s[i+1] - s[i]))``.
    Float32 arithmetic as HiP's kernel: ``int(float32(bsrc) / float32(K) * i)``, aligned down to
    ``ALIGN = ceil(2^floor(log2 bsrc) / K)``, capped at bsrc."""
    K = hip.k_blocks
    align = -(-(1 << (bsrc.bit_length() - 1)) // K)
    i = torch.arange(K + 1, dtype=torch.float32)
    raw = (torch.tensor(float(bsrc), dtype=torch.float32) / torch.tensor(float(K), dtype=torch.float32) * i)
    raw = raw.to(torch.int64)                      # truncation, as .to(tl.int32)
    return torch.clamp((raw // align) * align, max=bsrc) + hip.n_sink_blocks


@dataclass
class HiPMask:
    """A HiP mask: per (batch, query head, query block) the selected ``block_size_k``-token key
    blocks, as ascending token offsets.

    Attributes:
        indices: int32 ``[B, Hq, nQ, K]``; entries past ``counts`` are :data:`PAD_INDEX`.
        counts: int32 ``[B, Hq, nQ]`` (``<= K``).
        hip: the :class:`HiP` it was estimated with.
        seq_lens: ``(Lq, Lk)`` of the call it was estimated for.
    """
    indices: torch.Tensor
    counts: torch.Tensor
    hip: HiP
    seq_lens: Tuple[int, int]

    def check_for(self, B: int, Hq: int, Lq: int, Lk: int, hip: HiP, device, name: str = "mask") -> None:
        """A mask for these lengths, shapes, config and device, else ValueError naming ``name``."""
        if not isinstance(self, HiPMask):
            raise TypeError(f"{name}: expected a sparseattn.HiPMask, got {type(self).__name__}")
        if tuple(self.seq_lens) != (Lq, Lk):
            raise ValueError(f"{name}: expected a mask for seq_lens {(Lq, Lk)}, got one for {tuple(self.seq_lens)}")
        if self.hip != hip:
            raise ValueError(f"{name}: expected a mask estimated with {hip}, got one for {self.hip}")
        nq = -(-Lq // hip.block_size_q)
        want = (B, Hq, nq, hip.k_blocks)
        if tuple(self.indices.shape) != want or tuple(self.counts.shape) != want[:3]:
            raise ValueError(f"{name}: expected indices {list(want)} and counts {list(want[:3])}, got "
                             f"{list(self.indices.shape)} and {list(self.counts.shape)}")
        if self.indices.dtype != torch.int32 or self.counts.dtype != torch.int32:
            raise TypeError(f"{name}: expected int32 indices and counts, got {self.indices.dtype} and "
                            f"{self.counts.dtype}")
        if self.indices.device != device or self.counts.device != device:
            raise ValueError(f"{name}: expected device {device} (as q), got {self.indices.device}")

    def block_mask(self) -> torch.Tensor:
        """bool ``[B, Hq, nQ, Lk]``: the selected keys of each query block (before the per-row rule
        ``sinks <= j <= p - window``)."""
        B, H, nq, K = self.indices.shape
        Lk = self.seq_lens[1]
        bk = self.hip.block_size_k
        valid = torch.arange(K, device=self.indices.device) < self.counts[..., None].long()
        tok = self.indices.long()[..., None] + torch.arange(bk, device=self.indices.device)   # [B, H, nQ, K, bk]
        ok = valid[..., None] & (tok < Lk)
        out = torch.zeros(B, H, nq, Lk + 1, dtype=torch.bool, device=self.indices.device)
        out.scatter_(3, torch.where(ok, tok, Lk).flatten(3), True)
        return out[..., :Lk]


def key_offsets(key_padding_mask: Optional[torch.Tensor], B: int, device) -> Optional[torch.Tensor]:
    """int32 ``[B]``: the leading padded keys of each sequence (the index of its first real key; 0
    when it has none), on the device (no host read); None without a padding mask."""
    if key_padding_mask is None:
        return None
    return key_padding_mask.to(torch.int32).argmax(1).to(torch.int32)


def rounds_per_batch(hip: HiP, p_max: int, k_off: torch.Tensor) -> torch.Tensor:
    """int32 ``[B]``: :func:`num_rounds` of each sequence, whose longest row sits at
    ``p_max - k_off[b]`` (positions counted from its first real key), on the device."""
    p = p_max - k_off.long()
    tsrc = (p + 1 - hip.window - hip.sinks).clamp(min=0)
    bsrc = -(-tsrc // hip.block_size_k)
    g = -(-bsrc // hip.k_blocks)                  # ceil(bsrc / K); rounds = ceil(log2(g)), 0 for g <= 1
    powers = torch.ones(48, dtype=torch.int64, device=k_off.device).cumsum(0) - 1
    return (g[:, None] > (1 << powers)).sum(-1).to(torch.int32)


def query_positions(B: int, Lq: int, Lk: int, cache_seqlens: Optional[torch.Tensor], device) -> torch.Tensor:
    """int32 ``[B, Lq]`` positions of the query rows: the last Lq positions of each sequence
    (``Lk`` keys, or ``cache_seqlens[b]``)."""
    ar = torch.arange(Lq, device=device, dtype=torch.int32)
    if cache_seqlens is None:
        return (ar + (Lk - Lq)).expand(B, Lq)
    return (cache_seqlens.to(torch.int32)[:, None] - Lq + ar).contiguous()
