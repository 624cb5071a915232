"""The CPU path of sparse attention (CPU tensors when the Triton interpreter is off).

Same arguments as the Triton launchers. Memory is O(listed blocks of a chunk), never O(Lq * Lk)
for a sparse layout, and no Python loop runs over blocks. How it runs:

* Entries. Each row of the layout's lists (one query block of one (batch, head) plane, or of
  every batch / head the lists broadcast over) is an *entry*. :class:`_Plan` views q (and out,
  do, lse) as ``[X, E, M, D]``: the X (batch, KV head) planes one entry covers (all of them where
  the lists broadcast, which then share one gather index), E entries, M query rows (one query
  block; times the query heads of a KV head where the lists broadcast over heads, so GQA heads
  that share their keys run as one taller block). K and V are viewed as blocks
  ``[X, P * nK, BLOCK_K, D]``; these views copy nothing when no padding or reordering is needed.
* The C++ kernel (:mod:`.cpu_kernel`, ``cpu_kernel.cpp``), where it is built and applies (float32
  compute; softcap in the kernel): each kind below runs as one kernel call of every entry listing such tiles
  (a count per entry), or one call per group where a kind has a float mask (:meth:`_Plan.calls`).
  The kernel reads the listed blocks of ``[X, P * nK, BLOCK_K, D]`` in place, writes the "full"
  rows and merges the other kinds into them by their running max and sum (no :func:`merge`), and
  in the backward adds into dQ, dK and dV itself. What follows is the gather path, which runs
  otherwise.
* Kinds and groups. An entry's listed tiles are of three kinds (:meth:`_Plan.lists`): full tiles,
  partial tiles that are exactly the causal triangle ("diagonal": the fused op's own causal rule,
  no mask), and other partial tiles. Entries listing the same number of tiles of a kind form a
  group; each group (in chunks that bound memory) gathers its key blocks with one ``index_select``
  (or takes a strided view of K and V when the blocks are consecutive and move by the same step
  from entry to entry: sliding windows, causal rows) and makes one call of torch's fused CPU
  attention (flash, which also returns the LSE) for all its entries: full and diagonal tiles
  with no mask, other partial tiles with a float mask ``[X|1, R, M|1, S]`` (-inf where the
  layout's in-block rules drop a pair, plus the additive score options; full tiles get those
  options too). An entry's kinds are merged by their LSE (:func:`merge`).
* Backward: the same groups through torch's fused CPU attention backward, fed the saved output and
  LSE (``P = exp(s - lse)`` with the row's whole LSE, so the kinds' gradients add up); dK and dV
  are added back per key block with ``index_add_``.
* Softcap (not additive), a gradient through the LSE, or a torch without the fused op: the same
  groups through matmuls (the scores of one chunk materialised).

Scores are computed in fp32 (fp64 for fp64 inputs). Score options: softcap ``c * tanh(s / c)``
first, then ALiBi ``-slope * |i + Lk - Lq - j|``, the per-key bias, the element bias and the key
group's bias. Masks: every rule of the layout with its per-token data (key padding mask
``key_mask [B|1, Lk]``, positions ``q_pos``/``k_pos`` as the coordinates of causal and window,
segments ``q_seg``/``k_seg``), through ``BlockLayout.element_mask`` (the rules are written once,
in ``layout/predicates.py``), and the tile bitmasks. Values may have their own head dim Dv.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F

from ..._alloc import empty
from ...layout import BlockLayout, unpack_bits
from ...layout.predicates import alibi_bias, softcap_scores
from . import cpu_kernel

# Elements of the gathered keys / values and the mask or scores of one chunk (~64 MB of fp32).
_CHUNK_ELEMS = 1 << 24
_NEG_INF = float("-inf")
# The kinds of listed tiles, in the order they run (see _Plan.lists).
_KINDS = ("full", "diagonal", "partial")


def _layout(lists, mask, bits, bq, bk, lq, lk, causal_offset, window, sinks, key_mask, q_pos, k_pos, q_seg,
            k_seg) -> BlockLayout:
    return BlockLayout.from_lists(lists, block_size=(bq, bk), seq_lens=(lq, lk), causal_offset=causal_offset,
                                  window=window, sinks=sinks, mask=mask, bits=bits, q_pos=q_pos, k_pos=k_pos,
                                  key_mask=key_mask, q_seg=q_seg, k_seg=k_seg)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _per_bh(t: torch.Tensor, b, h):
    """(batch, head) index into a tensor whose leading dims may be 1 (broadcast)."""
    return (0 if t.shape[0] == 1 else b), (0 if t.shape[1] == 1 else h)


_PROBED = {}


def _fused_ok() -> bool:
    """Whether this torch has the fused CPU flash attention ops taking a float mask (probed once)."""
    if "fused" not in _PROBED:
        try:
            t = torch.zeros(1, 1, 2, 8)
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(t, t, t, attn_mask=t[..., :2], scale=1.0)
            _PROBED["fused"] = True
        except (AttributeError, RuntimeError, TypeError):
            _PROBED["fused"] = False
    return _PROBED["fused"]


def _kernel(plan: "_Plan"):
    """The C++ kernel's ops (:mod:`.cpu_kernel`) where they apply (float32 compute), else None: the
    gather path."""
    return None if plan.ct != torch.float32 else cpu_kernel.ops()


# ----------------------------------------------------------------------------- one chunk of a group
def _scores(Q, K, mask, scale, softcap, causal=False):
    """Scores [X, R, M, S] of the matmul path with the options and masks, and the softcap's
    derivative ``1 - tanh(s / c)^2`` (None without softcap)."""
    s = torch.matmul(Q, K.transpose(-1, -2)) * scale
    dcap = None
    if softcap is not None:
        s = softcap_scores(s, softcap)
        dcap = 1 - (s / softcap) ** 2
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), _NEG_INF)
    return (s if mask is None else s + mask), dcap


def _unit_last_stride(*ts):
    """The tensors with a last-dim stride of 1 and a row stride of at least the row's length (a copy
    where not): torch's fused CPU attention assumes the first (its public SDPA makes sure first; we
    call the op itself) and otherwise reads the wrong elements, and BLAS in the C++ kernel needs
    both. Found by fuzzing the CPU path: inputs sliced along the head dim gave errors of 0.5-3 that
    changed from run to run."""
    return tuple(t if (t.stride(-1) == 1 or t.shape[-1] == 1) and (t.stride(-2) >= t.shape[-1] or t.shape[-2] == 1)
                 else t.contiguous() for t in ts)


def _attend_impl(Q, K, V, mask, scale, softcap, causal=False):
    """Attention of one chunk: Q [X, R, M, D], K and V [X, R, S, D], float mask [X|1, R, M|1, S]
    or None (``causal``: key j visible to row i iff j <= i, the fused op's own rule, only with
    M == S and no mask). Returns (O [X, R, M, D], lse [X, R, M]); a row that sees no key gives 0
    and -inf."""
    if softcap is None and _fused_ok():
        Q, K, V = _unit_last_stride(Q, K, V)
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(Q, K, V, is_causal=causal,
                                                                            attn_mask=mask, scale=scale)
        if mask is not None:  # the fused op gives 0 and lse 0 on a row that sees nothing
            lse = lse.masked_fill(torch.isneginf(mask.amax(-1)).expand(lse.shape), _NEG_INF)
        return o, lse
    s, _ = _scores(Q, K, mask, scale, softcap, causal)
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    unseen = l == 0
    l = torch.where(unseen, torch.ones_like(l), l)
    return torch.matmul(p, V) / l, torch.where(unseen, torch.full_like(l, _NEG_INF), m + torch.log(l)).squeeze(-1)


def _attend_bwd(dO, Q, K, V, O, lse, mask, scale, softcap, dlse, causal=False):
    """(dQ, dK, dV) of one chunk from the whole output O and LSE of its rows (+inf on rows that
    see no key, so their probabilities are 0); ``dlse`` [X, R, M] or None."""
    if softcap is None and dlse is None and _fused_ok():
        dO, Q, K, V, O = _unit_last_stride(dO, Q, K, V, O)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dO, Q, K, V, O, lse, 0.0, causal, attn_mask=mask, scale=scale)
    s, dcap = _scores(Q, K, mask, scale, softcap, causal)
    p = torch.exp(s - lse[..., None])
    delta = (dO * O).sum(-1)
    if dlse is not None:
        delta = delta - dlse
    ds = p * (torch.matmul(dO, V.transpose(-1, -2)) - delta[..., None])
    if dcap is not None:  # through the softcap: d(c tanh(s / c)) / ds = 1 - tanh(s / c)^2
        ds = ds * dcap
    return (torch.matmul(ds, K) * scale, torch.matmul(ds.transpose(-1, -2), Q) * scale,
            torch.matmul(p.transpose(-1, -2), dO))


def attend(Q, K, V, mask=None, scale: float = 1.0, softcap: Optional[float] = None, causal: bool = False):
    """Softmax attention of gathered blocks, the one compute step of the CPU paths (torch's fused
    CPU flash attention where it applies, matmuls for softcap): Q ``[N, X, M, D]``, K and V
    ``[N, X, S, D]`` (any strides), float mask ``[N|1, X|1, M|1, S]`` (additive, -inf = masked) or
    None, ``causal``: key j visible to row i iff ``j <= i`` (M == S, no mask). Returns
    ``(O [N, X, M, D], lse [N, X, M])`` in Q's dtype; a row that sees no key gives 0 and -inf."""
    return _attend_impl(Q, K, V, mask, scale, softcap, causal)


def merge(o0, l0, o1, l1):
    """The whole of rows attended in two parts, each normalised by its own LSE: (out, lse)."""
    d = torch.nan_to_num(l1 - l0, nan=0.0, posinf=float("inf"), neginf=_NEG_INF)  # both -inf: both outputs 0
    return torch.lerp(o0, o1, torch.sigmoid(d)[..., None]), torch.logaddexp(l0, l1)


def _step(t: torch.Tensor) -> Optional[int]:
    """s when the 1-D integer tensor ``t`` is ``t[0] + s * i`` (s >= 0), else None."""
    if t.numel() < 2:
        return 0
    d = t[1:] - t[:-1]
    s = int(d[0])
    return s if s >= 0 and bool((d == s).all()) else None


def take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t.index_select(1, idx)`` for ``t [X, N, ...]``, run as one row gather of the view
    ``[X * N, -1]`` where there is one: on torch 2.13's CPU that is ~2x faster than index_select
    along dim 1 (0.25 vs 0.5 ms for 21 blocks of 128 x 64 over 8 planes, quiet machine)."""
    X, N = t.shape[:2]
    try:
        flat = t.view(X * N, -1)
    except RuntimeError:
        return t.index_select(1, idx)
    rows = (torch.arange(X)[:, None] * N + idx).reshape(-1)
    return flat.index_select(0, rows).view(X, idx.numel(), *t.shape[2:])


def _select(t: torch.Tensor, ent: torch.Tensor) -> torch.Tensor:
    """Entries ``ent`` (sorted) of ``t [X, E, ...]``: a view when they are evenly spaced, else a copy."""
    step = _step(ent)
    if step is None:
        return take(t, ent)
    e0 = int(ent[0])
    return t[:, e0:e0 + step * (ent.numel() - 1) + 1:max(step, 1)]


def _gather(kx, vx, blocks, base):
    """Keys and values of listed key blocks: ``blocks [R, c]`` block ids of R entries, ``base [R]``
    the first block of each entry's planes in ``kx`` / ``vx`` (``[X, P * nK, BLOCK_K, D]``).
    Returns K, V ``[X, R, c * BLOCK_K, D]`` and the block rows read ``[R * c]``. Runs of
    consecutive blocks that move by the same step from entry to entry (sliding windows, causal
    rows, dense rows) are strided views of kx / vx, not copies."""
    R, c = blocks.shape
    rows = base[:, None] + blocks
    step = _step(rows[:, 0])
    if step is not None and (c == 1 or bool((rows[:, 1:] - rows[:, :-1] == 1).all())) and \
            all(t.stride(1) == t.shape[2] * t.stride(2) for t in (kx, vx)):
        r0 = int(rows[0, 0])
        kk, vv = (t.as_strided((t.shape[0], R, c * t.shape[2], t.shape[3]),
                               (t.stride(0), step * t.stride(1), t.stride(2), t.stride(3)),
                               t.storage_offset() + r0 * t.stride(1)) for t in (kx, vx))
        return kk, vv, rows.reshape(-1)
    rows = rows.reshape(-1)
    kk, vv = take(kx, rows), take(vx, rows)
    return kk.view(kx.shape[0], R, -1, kx.shape[3]), vv.view(vx.shape[0], R, -1, vx.shape[3]), rows


# ----------------------------------------------------------------------------- the plan of one call
class _Plan:
    """How the entries of a layout's lists map onto q, k, v (see the module docstring): q as
    ``[X, E, M, D]``, k and v as ``[X, P * nK, BLOCK_K, D]`` (P: the planes an entry picks from)."""

    def __init__(self, q, k, v, layout: BlockLayout, bias, options):
        B, H, lq, D = q.shape
        self.B, self.H, self.Hkv, self.lq, self.lk = B, H, k.shape[1], lq, k.shape[2]
        G = self.G = H // self.Hkv
        bq, bk = self.bq, self.bk = layout.block_size
        self.nq, self.nk = math.ceil(lq / bq), math.ceil(self.lk / bk)
        self.layout, self.bias, self.ct = layout, bias, _compute_dtype(q)
        self.key_bias, self.alibi, self.softcap, self.key_group, self.group_bias = options
        self.dp = max(D, v.shape[3])  # the fused op wants one head dim: the narrower side is zero-padded
        bl, hl = layout.shape
        self.per_b, self.per_h = bl > 1, hl > 1
        self.xb, self.xh = (1 if self.per_b else B), (1 if self.per_h else self.Hkv)
        self.X, self.M, self.E = self.xb * self.xh, bq * (1 if self.per_h else G), bl * hl * self.nq
        # q as [B, Hkv, G, nQ, bq, C] (dims 0..5) -> [X, E, M, C]; k as [B, Hkv, nK, bk, C] -> [X, P * nK, bk, C]
        x_dims = ([] if self.per_b else [0]) + ([] if self.per_h else [1])
        self.perm = x_dims + ([0] if self.per_b else []) + ([1, 2] if self.per_h else []) + [3] + \
            ([] if self.per_h else [2]) + [4, 5]
        self.kperm = x_dims + [d for d in (0, 1) if d not in x_dims] + [2, 3, 4]
        e = torch.arange(self.E)
        self.r_e, h_e, b_e = e % self.nq, (e // self.nq) % hl, e // (self.nq * hl)
        plane = torch.zeros_like(e)
        if self.per_b:
            plane = b_e * (self.Hkv if self.per_h else 1)
        if self.per_h:
            plane = plane + h_e // G
        self.base = plane * self.nk                                     # first block of each entry's planes
        # batch and query head of each (plane, entry, row) of a chunk, as [Xb|1, Xh|1, R|1, M|1, 1]
        i = torch.arange(self.M)
        self.row_in = (i % bq).view(1, 1, 1, -1, 1)
        self.b_of = (lambda ent: b_e[ent].view(1, 1, -1, 1, 1)) if self.per_b else \
            (lambda ent: torch.arange(B).view(-1, 1, 1, 1, 1))
        self.h_of = (lambda ent: h_e[ent].view(1, 1, -1, 1, 1)) if self.per_h else \
            (lambda ent: torch.arange(self.Hkv).view(1, -1, 1, 1, 1) * G + (i // bq).view(1, 1, 1, -1, 1))

    def _sizes(self, c: int):
        return [self.B, self.Hkv, self.G, self.nq, self.bq, c]

    def to_x(self, t: torch.Tensor) -> torch.Tensor:
        """[B, H, Lq, C] -> [X, E, M, dp] in the compute dtype (rows padded to whole blocks, C to dp;
        a view where nothing needs a copy)."""
        t = t.to(self.ct)
        pads = (0, self.dp - t.shape[3], 0, self.nq * self.bq - self.lq)
        if any(pads):
            t = F.pad(t, pads)
        return t.reshape(self._sizes(self.dp)).permute(self.perm).reshape(self.X, self.E, self.M, self.dp)

    def from_x(self, t: torch.Tensor, c: int) -> torch.Tensor:
        """Inverse of :meth:`to_x`: [X, E, M, C] -> [B, H, Lq, c]."""
        t = t.reshape([self._sizes(t.shape[3])[d] for d in self.perm]).permute([self.perm.index(d) for d in range(6)])
        return t.reshape(self.B, self.H, self.nq * self.bq, -1)[:, :, :self.lq, :c]

    def x_view(self, t: torch.Tensor) -> Optional[torch.Tensor]:
        """A [X, E, M, C] view writing into the output ``t`` [B, H, Lq, C], or None (rows to pad,
        another dtype, or an order a view cannot give)."""
        if t.dtype != self.ct or self.lq != self.nq * self.bq:
            return None
        try:
            return t.view(self._sizes(t.shape[3])).permute(self.perm).view(self.X, self.E, self.M, t.shape[3])
        except RuntimeError:
            return None

    def keys(self, t: torch.Tensor) -> torch.Tensor:
        """K or V [B, Hkv, Lk, C] -> [X, P * nK, bk, dp] in the compute dtype (zero-padded)."""
        t = t.to(self.ct)
        pads = (0, self.dp - t.shape[3], 0, self.nk * self.bk - self.lk)
        if any(pads):
            t = F.pad(t, pads)
        t = t.reshape(self.B, self.Hkv, self.nk, self.bk, self.dp).permute(self.kperm)
        return t.reshape(self.X, -1, self.bk, self.dp)

    def from_keys(self, t: torch.Tensor, c: int) -> torch.Tensor:
        """Inverse of :meth:`keys`: -> [B, Hkv, Lk, c]."""
        sizes = [self.B, self.Hkv, self.nk, self.bk, self.dp]
        t = t.reshape([sizes[d] for d in self.kperm]).permute([self.kperm.index(d) for d in range(5)])
        return t.reshape(self.B, self.Hkv, self.nk * self.bk, self.dp)[:, :, :self.lk, :c]

    def _diagonal_ok(self) -> bool:
        """Whether partial tiles on the causal diagonal can run as the fused op's own causal rule:
        square tiles, plain causal (window >= BLOCK_Q, no positions, segments, key or element
        masks), no additive score option, no softcap."""
        lay = self.layout
        return (_fused_ok() and self.softcap is None and self.bq == self.bk and self.M == self.bq and
                lay.causal_offset is not None and (lay.window is None or lay.window >= self.bq) and
                all(t is None for t in (lay.q_pos, lay.q_seg, lay.key_mask, lay.mask, self.alibi, self.key_bias,
                                        self.bias, self.group_bias)))

    def lists(self, kind: str):
        """(count [E], block ids [E, W], bit ids [E, W] or None) of one kind of key blocks:
        ``"full"``; ``"diagonal"`` (partial tiles that are exactly the causal triangle, at most one per
        entry); ``"partial"`` (the other partial tiles)."""
        lay, E = self.layout, self.E
        if kind == "full":
            return lay.full_kv_num_blocks.reshape(-1).long(), lay.full_kv_indices.reshape(E, -1).long(), None
        num, idx = lay.kv_num_blocks.reshape(-1).long(), lay.kv_indices.reshape(E, -1).long()
        ids = None if lay.bits is None else lay.kv_bit_ids.reshape(E, -1)
        diag = None
        if self._diagonal_ok():
            r = self.r_e[:, None]
            diag = ((torch.arange(idx.shape[1]) < num[:, None]) & (r * self.bq + lay.causal_offset == idx * self.bk) &
                    ((r + 1) * self.bq <= self.lq) & ((idx + 1) * self.bk <= self.lk))
            if ids is not None:
                diag = diag & (ids < 0)
            if not bool(diag.any()):
                diag = None
        if kind == "diagonal":
            if diag is None:
                return torch.zeros(E, dtype=torch.long), idx[:, :1], None
            return diag.sum(1), idx.gather(1, diag.to(torch.uint8).argmax(1, keepdim=True)), None
        if diag is not None:  # the other partial tiles first, in their order
            order = torch.argsort(diag.to(torch.uint8), dim=1, stable=True)
            num, idx = num - diag.sum(1), idx.gather(1, order)
            ids = None if ids is None else ids.gather(1, order)
        return num, idx, ids

    def groups(self, kind: str):
        """Chunks (entries [R], block ids [R, c], bit ids [R, c] or None) of the entries listing the
        same number c > 0 of key blocks of one kind (:meth:`lists`); each count in a few chunks."""
        num, idx, ids = self.lists(kind)
        order = torch.argsort(num, stable=True)
        start = 0
        for c, n in enumerate(torch.bincount(num).tolist()):
            ent, start = order[start:start + n], start + n
            if c == 0 or n == 0:
                continue
            rows = max(1, _CHUNK_ELEMS // (self.X * c * self.bk * (2 * self.dp + self.M)))
            for r0 in range(0, n, rows):
                e = ent[r0:r0 + rows]
                yield e, idx[e, :c], None if ids is None else ids[e, :c]

    def masked(self, kind: str) -> bool:
        """Whether tiles of this kind get a float mask (:meth:`mask` is not None)."""
        return kind == "partial" or (kind == "full" and any(
            t is not None for t in (self.alibi, self.key_bias, self.bias, self.group_bias)))

    def calls(self, kind: str):
        """What the C++ kernel runs per call for one kind: (entries [R], counts [R], block ids
        [R, W], bit ids or None). Kinds without a mask in one call of every entry that lists such
        tiles (the kernel takes a count per entry); masked kinds per group (:meth:`groups`: the
        mask of a group is one tensor, its memory bounded by the chunks)."""
        if self.masked(kind):
            for ent, blocks, ids in self.groups(kind):
                yield ent, torch.full_like(ent, blocks.shape[1]), blocks, ids
            return
        num, idx, _ = self.lists(kind)
        ent = (num > 0).nonzero()[:, 0]
        if ent.numel():
            w = int(num.max())
            yield ent, num[ent], idx[ent, :w], None

    def mask(self, ent, blocks, bit_ids, kind: str) -> Optional[torch.Tensor]:
        """Float mask [X|1, R, M|1, S] of a chunk: the additive score options, and -inf where the
        in-block rules drop a pair (partial tiles); None for full tiles without options and for
        diagonal tiles (the fused op's causal rule)."""
        lay, ct, bk = self.layout, self.ct, self.bk
        if not self.masked(kind):
            return None
        partial = kind == "partial"
        R, c = blocks.shape
        cols = (blocks[:, :, None] * bk + torch.arange(bk)).view(1, 1, R, 1, c * bk)
        rows = (self.r_e[ent] * self.bq).view(1, 1, R, 1, 1) + self.row_in
        b, h = self.b_of(ent), self.h_of(ent)
        rc, cc = rows.clamp(max=self.lq - 1), cols.clamp(max=self.lk - 1)
        m = torch.zeros((), dtype=ct)
        if self.alibi is not None:
            m = m + alibi_bias(self.alibi[_per_bh(self.alibi, b, h)].to(ct), lay.alibi_distance(rows, cols, b))
        if self.key_bias is not None:
            m = m + self.key_bias[(*_per_bh(self.key_bias, b, h), cc)].to(ct)
        if self.bias is not None:
            m = m + self.bias[(*_per_bh(self.bias, b, h), rc, cc)].to(ct)
        if self.group_bias is not None:  # the row's bias of the key's group
            g = self.key_group[(*_per_bh(self.key_group, b, h), cc)].long()
            m = m + self.group_bias[(*_per_bh(self.group_bias, b, h), rc, g)].to(ct)
        if partial:
            keep = lay.element_mask(rows, cols, b, h)
            if lay.bits is not None:
                ids = bit_ids[:, :, None].expand(R, c, bk).reshape(1, 1, R, 1, c * bk)
                keep = keep & unpack_bits(lay.bits, ids, self.row_in, cols % bk)
            m = torch.where(keep, m, torch.full((), _NEG_INF, dtype=ct))
        if m.shape[0] == 1 and m.shape[1] == 1:      # the same for every plane: the fused op broadcasts it
            return m[0]
        return m.expand(self.xb, self.xh, *m.shape[2:]).reshape(self.X, *m.shape[2:])


# ----------------------------------------------------------------------------- forward and backward
def sparse_attention_fwd_cpu(q, k, v, lists: List[torch.Tensor], mask: Optional[torch.Tensor],
                             bias: Optional[torch.Tensor], bits: Optional[torch.Tensor], scale: float,
                             layout_bq: int, layout_bk: int, causal_offset: Optional[int], window: Optional[int],
                             sinks: int, key_mask: Optional[torch.Tensor] = None,
                             key_bias: Optional[torch.Tensor] = None, alibi: Optional[torch.Tensor] = None,
                             q_pos: Optional[torch.Tensor] = None, k_pos: Optional[torch.Tensor] = None,
                             softcap: Optional[float] = None, q_seg: Optional[torch.Tensor] = None,
                             k_seg: Optional[torch.Tensor] = None, key_group: Optional[torch.Tensor] = None,
                             group_bias: Optional[torch.Tensor] = None):
    return _fwd(q, k, v, lists, mask, bias, bits, scale, layout_bq, layout_bk, causal_offset, window, sinks,
                key_mask, key_bias, alibi, q_pos, k_pos, softcap, q_seg, k_seg, key_group, group_bias)


def _fwd(q, k, v, lists, mask, bias, bits, scale, layout_bq, layout_bk, causal_offset, window, sinks, key_mask,
         key_bias, alibi, q_pos, k_pos, softcap, q_seg, k_seg, key_group, group_bias):
    B, H, lq, _ = q.shape
    Dv = v.shape[3]
    if q.numel() == 0 or k.shape[2] == 0:   # no rows (a varlen batch of empty queries), or no keys
        return (torch.zeros(B, H, lq, Dv, dtype=q.dtype, device=q.device),
                torch.full((B, H, lq), _NEG_INF, dtype=torch.float32, device=q.device))
    layout = _layout(lists, mask, bits, layout_bq, layout_bk, lq, k.shape[2], causal_offset, window, sinks, key_mask,
                     q_pos, k_pos, q_seg, k_seg)
    plan = _Plan(q, k, v, layout, bias, (key_bias, alibi, softcap, key_group, group_bias))
    qx, kx, vx = plan.to_x(q), plan.keys(k), plan.keys(v)
    out = empty(B, H, lq, Dv, dtype=q.dtype, device=q.device)
    lse = empty(B, H, lq, dtype=torch.float32, device=q.device)
    # write into out and lse where they can be viewed as [X, E, M, C], else into buffers copied at the end
    ox, lx = plan.x_view(out), plan.x_view(lse[..., None])
    o_buf, l_buf = ox is None, lx is None
    if o_buf:
        ox = torch.empty(plan.X, plan.E, plan.M, Dv, dtype=plan.ct)
    if l_buf:
        lx = torch.empty(plan.X, plan.E, plan.M, 1, dtype=plan.ct)
    lx = lx[..., 0]
    # entries without full blocks start from 0 / -inf (their partial blocks, if any, merge in)
    none = (plan.lists("full")[0] == 0).nonzero()[:, 0]
    if none.numel():
        ox.index_fill_(1, none, 0.0)
        lx.index_fill_(1, none, _NEG_INF)
    kern = _kernel(plan)
    if kern is not None:   # reads the blocks in place, merges into ox / lx itself
        qx, kx, vx = _unit_last_stride(qx, kx, vx)
        for kind in _KINDS:
            for ent, counts, blocks, ids in plan.calls(kind):
                kern.fwd(qx, kx, vx, ent, counts, plan.base[ent, None] + blocks, plan.mask(ent, blocks, ids, kind),
                         kind == "diagonal", scale, softcap or 0.0, kind != "full", ox, lx)   # "full" first: writes
    for kind in _KINDS if kern is None else ():
        for ent, blocks, ids in plan.groups(kind):
            kk, vv, _ = _gather(kx, vx, blocks, plan.base[ent])
            o, l = attend(_select(qx, ent), kk, vv, plan.mask(ent, blocks, ids, kind), scale, softcap,
                           kind == "diagonal")
            o, l = o[..., :Dv].to(ox.dtype), l.to(lx.dtype)
            if kind != "full":
                o, l = merge(_select(ox, ent), _select(lx, ent), o, l)
            ox.index_copy_(1, ent, o)
            lx.index_copy_(1, ent, l)
    if o_buf:
        out.copy_(plan.from_x(ox, Dv))
    if l_buf:
        lse.copy_(plan.from_x(lx[..., None], 1)[..., 0])
    return out, lse


def sparse_attention_bwd_cpu(do, dlse, q, k, v, out, lse, lists: List[torch.Tensor],
                             mask: Optional[torch.Tensor], bias: Optional[torch.Tensor], bits: Optional[torch.Tensor],
                             scale: float, layout_bq: int, layout_bk: int, causal_offset: Optional[int],
                             window: Optional[int], sinks: int, key_mask: Optional[torch.Tensor] = None,
                             key_bias: Optional[torch.Tensor] = None, alibi: Optional[torch.Tensor] = None,
                             q_pos: Optional[torch.Tensor] = None, k_pos: Optional[torch.Tensor] = None,
                             softcap: Optional[float] = None, q_seg: Optional[torch.Tensor] = None,
                             k_seg: Optional[torch.Tensor] = None, key_group: Optional[torch.Tensor] = None,
                             group_bias: Optional[torch.Tensor] = None):
    return _bwd(do, dlse, q, k, v, out, lse, lists, mask, bias, bits, scale, layout_bq, layout_bk, causal_offset,
                window, sinks, key_mask, key_bias, alibi, q_pos, k_pos, softcap, q_seg, k_seg, key_group,
                group_bias)


def _bwd(do, dlse, q, k, v, out, lse, lists, mask, bias, bits, scale, layout_bq, layout_bk, causal_offset, window,
         sinks, key_mask, key_bias, alibi, q_pos, k_pos, softcap, q_seg, k_seg, key_group, group_bias):
    B, H, lq, D = q.shape
    lk, Dv = k.shape[2], v.shape[3]
    if q.numel() == 0 or lk == 0:           # as the forward: nothing attended, zero gradients
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    layout = _layout(lists, mask, bits, layout_bq, layout_bk, lq, lk, causal_offset, window, sinks, key_mask, q_pos,
                     k_pos, q_seg, k_seg)
    plan = _Plan(q, k, v, layout, bias, (key_bias, alibi, softcap, key_group, group_bias))
    qx, dox, outx = plan.to_x(q), plan.to_x(do), plan.to_x(out)
    # rows that see no key: +inf, so that exp(s - lse) is 0 there
    lse2 = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
    lx = plan.to_x(lse2[..., None])[..., 0]
    dlx = None
    if dlse is not None and bool(dlse.any()):
        dlx = plan.to_x(dlse[..., None])[..., 0]
    kx, vx = plan.keys(k), plan.keys(v)
    kern = _kernel(plan)
    if kern is not None:
        qx, kx, vx, dox, outx = _unit_last_stride(qx, kx, vx, dox, outx)
    dqx, dkx, dvx = (torch.zeros(t.shape, dtype=t.dtype) for t in (qx, kx, vx))
    if kern is not None:   # reads the blocks in place, adds into dqx / dkx / dvx itself
        for kind in _KINDS:
            for ent, counts, blocks, ids in plan.calls(kind):
                base = plan.base[ent]
                kern.bwd(dox, qx, kx, vx, outx, lx, dlx, ent, counts, base[:, None] + blocks, base // plan.nk,
                         plan.mask(ent, blocks, ids, kind), kind == "diagonal", scale, softcap or 0.0, dqx, dkx, dvx)
    for kind in _KINDS if kern is None else ():
        for ent, blocks, ids in plan.groups(kind):
            kk, vv, rows = _gather(kx, vx, blocks, plan.base[ent])
            sel = (lambda t: None if t is None else _select(t, ent))  # noqa: E731
            dq, dk, dv = _attend_bwd(sel(dox), sel(qx), kk, vv, sel(outx), sel(lx), plan.mask(ent, blocks, ids, kind),
                                     scale, softcap, sel(dlx), kind == "diagonal")
            dqx.index_add_(1, ent, dq.to(plan.ct))
            dkx.index_add_(1, rows, dk.to(plan.ct).reshape(plan.X, -1, plan.bk, plan.dp))
            dvx.index_add_(1, rows, dv.to(plan.ct).reshape(plan.X, -1, plan.bk, plan.dp))
    # contiguous, as the op's fake registration says
    return (plan.from_x(dqx, D).to(q.dtype).contiguous(), plan.from_keys(dkx, D).to(k.dtype).contiguous(),
            plan.from_keys(dvx, Dv).to(v.dtype).contiguous())


# ----------------------------------------------------------------------------- probabilities (statistics)
def _chunks(q, layout: BlockLayout):
    """Yield (r0, r1, key-token index [B, H, R, S], token valid [B, H, R, S], tile bitmask id of
    each token [B, H, R, S]) per chunk of query blocks."""
    B, H, lq, d = q.shape
    bq, bk = layout.block_size
    # Lists may be padded past their longest row (sync_free layouts are as wide as the block grid):
    # gather only up to the longest row (a host read costs nothing here).
    wp, wf = (max(1, int(n.max())) if n.numel() else 1 for n in (layout.kv_num_blocks, layout.full_kv_num_blocks))
    kvi, fkvi, kvb = layout.kv_indices[..., :wp], layout.full_kv_indices[..., :wf], layout.kv_bit_ids[..., :wp]
    idx = torch.cat([kvi, fkvi], -1).long()
    valid = torch.cat([torch.arange(kvi.shape[-1]) < layout.kv_num_blocks[..., None],
                       torch.arange(fkvi.shape[-1]) < layout.full_kv_num_blocks[..., None]], -1)
    ids = torch.cat([kvb, torch.full_like(fkvi, -1)], -1)
    nq, w = idx.shape[-2], idx.shape[-1]
    idx, valid, ids = (t.expand(B, H, nq, w) for t in (idx, valid, ids))
    rows = max(1, _CHUNK_ELEMS // max(1, B * H * w * bk * (bq + d)))
    ar = torch.arange(bk)

    def tokens(t, r0, r1):
        return t[:, :, r0:r1, :, None].expand(B, H, r1 - r0, w, bk).flatten(-2)

    for r0 in range(0, nq, rows):
        r1 = min(nq, r0 + rows)
        yield r0, r1, (idx[:, :, r0:r1, :, None] * bk + ar).flatten(-2), tokens(valid, r0, r1), tokens(ids, r0, r1)


def _rows(t: torch.Tensor, r0: int, r1: int, bq: int) -> torch.Tensor:
    """Rows of query blocks [r0, r1) of a [B, H, Lq, ...] tensor, zero-padded to whole blocks."""
    part = t[:, :, r0 * bq:r1 * bq]
    pad = (r1 - r0) * bq - part.shape[2]
    if pad:
        part = torch.cat([part, part.new_zeros(*part.shape[:2], pad, *part.shape[3:])], 2)
    return part.reshape(*part.shape[:2], r1 - r0, bq, *part.shape[3:])


def probabilities(q, k, lse, lists: List[torch.Tensor], mask: Optional[torch.Tensor], bits: Optional[torch.Tensor],
                  scale: float, layout_bq: int, layout_bk: int, causal_offset: Optional[int], window: Optional[int],
                  sinks: int, key_mask=None, q_pos=None, k_pos=None, q_seg=None, k_seg=None):
    """Yield ``(r0, r1, tok, p)`` per chunk of query blocks ``[r0, r1)``: the key index of each
    gathered slot ``tok [B, H, R, S]`` and the normalised probabilities ``p [B, H, R, BLOCK_Q, S]``
    recomputed from the saved LSE (0 on slots that are padding or masked), as the backward does:
    what the statistics op's CPU path reduces. Memory O(listed blocks of a chunk)."""
    B, H, lq, d = q.shape
    lk = k.shape[2]
    ct = _compute_dtype(q)
    layout = _layout(lists, mask, bits, layout_bq, layout_bk, lq, lk, causal_offset, window, sinks, key_mask, q_pos,
                     k_pos, q_seg, k_seg)
    kf = k.to(ct)
    lse2 = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse).to(ct)
    b5 = torch.arange(B)[:, None, None, None, None]
    h5 = torch.arange(H)[None, :, None, None, None]
    for r0, r1, tok, ok, ids in _chunks(q, layout):
        kk = kf[b5[..., 0], h5[..., 0] // (H // k.shape[1]), tok.clamp(max=lk - 1)]       # [B, H, R, S, D]
        s = torch.einsum("bhrqd,bhrsd->bhrqs", _rows(q, r0, r1, layout_bq).to(ct), kk) * scale
        rows = ((r0 + torch.arange(r1 - r0))[:, None] * layout_bq + torch.arange(layout_bq))[None, None, :, :, None]
        cols = tok[:, :, :, None, :]
        keep = ok[:, :, :, None, :] & layout.element_mask(rows, cols, b5, h5)
        if layout.bits is not None:
            keep = keep & unpack_bits(layout.bits, ids[:, :, :, None, :], torch.arange(layout_bq)[:, None],
                                      cols % layout_bk)
        s = s.masked_fill(~keep, _NEG_INF)
        yield r0, r1, tok, torch.exp(s - _rows(lse2, r0, r1, layout_bq)[..., None])
