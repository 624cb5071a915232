"""The tile walk of the softmax attention kernels, its in-block rules, and its extension point.

A program owns a tile of rows: query rows in the forward and dQ kernels (query-major), key rows in
dK/dV (``KEY_MAJOR``). :func:`walk` visits the tiles of the other side that the BlockLayout lists
for the owner's layout block: first the partial blocks, with the in-block rules, then the full
blocks, with no mask arithmetic at all (a layout block may span several kernel tiles). It is the
only such loop. Per visited tile it

1. loads the tile's score operand ``x`` ``[BLOCK_D, BLOCK]`` (K rows query-major, Q rows key-major)
   and, when the kernel asks, a second operand ``y`` the same way (dQ's V: loaded before the
   score rather than in the body, its pass needs fewer registers);
2. scores it, ``s = own @ x`` (``[own, visited]``), and applies the rules (:func:`apply_rules`):
   scale to base 2 and the score modifications, then in partial tiles the in-block masks;
3. calls ``BODY(carry, ctx, s, dcap, x, y, offs, MASKED, RULES, HEAD_DIM, BLOCK_D, HEAD_DV,
   BLOCK_DV, PRECISION) -> (carry, p)``, the kernel's work on the tile (online softmax and P.V, or
   a gradient), which returns the tile's probabilities ``p`` ``[own, visited]``; ``dcap`` is the
   softcap's derivative factor (``1 - tanh^2``, or 1.0 without a softcap) that gradient bodies
   multiply dS by; HEAD_DV / BLOCK_DV are the value head dim and its tile;
4. calls ``TILE_HOOK(extra, p, offs_own, offs) -> extra``, extra work per visited tile for outputs
   accumulated during the walk (:func:`no_hook`: none).

BODY and TILE_HOOK are @triton.jit functions passed as constexprs. ``carry``, ``extra`` and
``ctx`` (what BODY reads: pointers, resident tiles, bounds) are tuples of runtime values, so each
body and hook owns its state; in Triton 3.6 a tuple variable holding a constexpr breaks the
compiler, so constexprs travel as arguments.

How to extend (each behaviour written once, never a copy of the walk):

* an in-block rule or score modification (as softcap, ALiBi, per-key bias, position-id causal and
  key padding are): its runtime data become fields of :data:`Rules` (taken to the (batch, head) plane in
  :func:`rules_at` when they are per plane), its switch a field of :data:`RuleFlags`, its code a
  small jit function that :func:`apply_rules` calls under the switch. Python mirrors each rule in
  ``sparseattn.layout.predicates`` (the builders, the CPU path and the oracles share them).
* an extra output accumulated during the walk (column sums of P, probability mass per key group):
  a TILE_HOOK whose accumulators (and read-only inputs) ride in ``extra``, stored by the kernel
  after the walk. The backward bodies' ``p`` is normalised, ``exp2(s - lse)`` from the saved LSE;
  the forward's is relative to the running row maximum.
* a reweighted P.V (attention redistribution) whose per-row, per-key-group factors are known
  before the output pass: the ``group_bias`` rule (``log`` of the factors added to the scores; the
  online softmax then renormalises), as VAR and ACT do (``sparseattn/ops/redistribution``). When
  the factors depend on the output pass itself: a forward BODY whose carry keeps one accumulator
  per key group, combined per row after the walk.
* a different operand addressing (paged caches): map the visited rows before the load, as the
  ``paged`` rule does with :func:`paged_rows` and ``load_cols_at``.
* a key set that is not a layout's tile list (HiP: a sink range, a window range and gathered
  tokens of a per-query-block index list): its own visiting loop (``hip.py``'s ``hip_walk``) that
  calls the same BODYs and the rules of this module (``_causal``, ``_window``), never a copy of them.

Work accounting (for tests): every kernel that walks takes a last argument ``LOG``, None unless the
launch runs inside ``common.count_tiles()``. Given a :data:`common.TileLog`, :func:`walk` logs each
visited tile before its BODY, as (program id, ``log_plane``: the (batch, head) plane the kernel
says it walks, lists row, first position of the tile, 1 partial / 0 full), into a buffer slot
taken with an atomic counter (``common.log_tile``); HiP's walk logs its sink, window and gathered
tiles the same way. None is a constexpr, so the logging is compiled out: the launches without
counting and the kernels of the compile gate (which passes ``LOG=None``) are the uncounted code. A
LOG argument rather than a counting TILE_HOOK: a hook sees neither the row nor the partial / full
pass, and the statistics kernels already have theirs. The launchers record the log with the tile
sizes they chose (``common.save_tile_log``); ``tests/triton_kernels/test_work_accounting.py``
checks that each kernel visits exactly the kernel tiles of the blocks its layout lists, each once.

Rule flags: causal, window (+ sinks), mask (element mask), bias (float [Lq, Lk]), bits (tile
bitmasks), softcap, alibi, key_bias, key_mask (key padding), positions (q_pos / k_pos as the
coordinates of causal, window and ALiBi), segments (packed sequences), paged (forward only),
group_bias.
"""
from __future__ import annotations

from collections import namedtuple
from typing import Optional

import torch
import triton
import triton.language as tl

from ..ops.common import ScoreOptions
from .common import View, load_cols, load_cols_at, load_vec, log_tile, plane, view, view_type

# The rules' runtime data (a kernel argument): sequence lengths (the bounds rule), the causal and
# sliding-window parameters, the base-2 score scale and the softcap (natural units, 0 = none), the
# element mask and the float bias as Views of [B|1, H|1, Lq, Lk], the packed tile bitmasks
# [n tiles, LAYOUT_BQ, words], and the per-key / per-row data as Views with stride 0 on the
# other axis: the key keep mask [B, 1, 1, Lk] (uint8), the per-key bias [B|1, H|1, 1, Lk], the
# ALiBi slopes [B|1, H, 1, 1] (fp32), the query and key positions [B|1, 1, Lq, 1] / [B|1, 1, 1, Lk]
# and segment ids (same shapes; packed variable-length batches); the key groups [B|1, H|1, 1, Lk]
# (int32) and the per-row group bias [B, H, Lq, G] (fp32, natural log: attention redistribution);
# for a paged K/V cache (forward only) the block table [B, 1, 1, max_pages] and the page size: the
# key side's logical row t lives at physical row ``table[t // page_size] * page_size + t % page_size``.
Rules = namedtuple("Rules", ["Lq", "Lk", "causal_off", "window", "sinks", "qk_scale", "softcap", "mask", "bias",
                             "bits", "key_mask", "key_bias", "alibi", "q_pos", "k_pos", "q_seg", "k_seg", "pages",
                             "page_size", "key_group", "group_bias"])
# Which rules a kernel compiles in (a constexpr kernel argument).
RuleFlags = namedtuple("RuleFlags", ["causal", "window", "mask", "bias", "bits", "softcap", "alibi", "key_bias",
                                     "key_mask", "positions", "segments", "paged", "group_bias"])
# One direction of a BlockLayout's lists: per (plane, row block) the count and sorted indices of the
# partial blocks (with their bitmask ids) and of the full ones. The plane of (b, h) is
# b * sb + h * sh; ``rows`` row blocks per plane; ``wp`` / ``wf`` the widths of the index lists.
Lists = namedtuple("Lists", ["num", "idx", "bid", "full_num", "full_idx", "sb", "sh", "rows", "wp", "wf"])


def _bcast_view(t: Optional[torch.Tensor], dummy: torch.Tensor, axes: str) -> View:
    """The View of ``t`` read as [B, H, rows, cols]: ``axes`` names which of "bhrc" its dims are
    (size-1 dims and absent axes get stride 0); None -> a View of ``dummy`` (never read)."""
    if t is None:
        return view(dummy, (0, 0, 0, 0))
    strides = dict(zip(axes, (0 if n == 1 else st for n, st in zip(t.shape, t.stride()))))
    return view(t, tuple(strides.get(a, 0) for a in "bhrc"))


def rules_of(lq: int, lk: int, mask, bias, bits, dummy: torch.Tensor, qk_scale: float,
             causal_offset, window, sinks: int, opts: ScoreOptions, block_table=None, page_size: int = 0) -> Rules:
    """The Rules of a launch; absent tensors are replaced by ``dummy`` (never read)."""
    return Rules(lq, lk, causal_offset or 0, window or 0, sinks, qk_scale, opts.softcap or 0.0,
                 _bcast_view(None if mask is None else mask.view(torch.uint8), dummy, "bhrc"),
                 _bcast_view(bias, dummy, "bhrc"), dummy if bits is None else bits,
                 _bcast_view(None if opts.key_mask is None else opts.key_mask.view(torch.uint8), dummy, "bc"),
                 _bcast_view(opts.key_bias, dummy, "bhc"), _bcast_view(opts.alibi, dummy, "bh"),
                 _bcast_view(opts.q_pos, dummy, "br"), _bcast_view(opts.k_pos, dummy, "bc"),
                 _bcast_view(opts.q_seg, dummy, "br"), _bcast_view(opts.k_seg, dummy, "bc"),
                 _bcast_view(block_table, dummy, "bc"), page_size, _bcast_view(opts.key_group, dummy, "bhc"),
                 _bcast_view(opts.group_bias, dummy, "bhrc"))


def rule_flags(mask, bias, bits, causal_offset, window, opts: ScoreOptions, paged: bool = False) -> RuleFlags:
    """The RuleFlags of a launch."""
    return RuleFlags(causal=causal_offset is not None, window=window is not None, mask=mask is not None,
                     bias=bias is not None, bits=bits is not None, softcap=opts.softcap is not None,
                     alibi=opts.alibi is not None, key_bias=opts.key_bias is not None,
                     key_mask=opts.key_mask is not None, positions=opts.q_pos is not None,
                     segments=opts.q_seg is not None, paged=paged, group_bias=opts.group_bias is not None)


def lists_of(num, idx, bid, full_num, full_idx) -> Lists:
    """The Lists of one direction of ``BlockLayout.lists()``."""
    planes_b, planes_h = num.shape[0], num.shape[1]
    return Lists(num, idx, bid, full_num, full_idx, planes_h if planes_b > 1 else 0, 1 if planes_h > 1 else 0,
                 num.shape[-1], idx.shape[-1], full_idx.shape[-1])


def rules_type(ptr: str) -> Rules:
    """The compile gate's signature of Rules (bias and key bias of Triton pointer type ``ptr``)."""
    return Rules("i32", "i32", "i32", "i32", "i32", "fp32", "fp32", view_type("*u8"), view_type(ptr), "*i32",
                 view_type("*u8"), view_type(ptr), view_type("*fp32"), *([view_type("*i32")] * 5), "i32",
                 view_type("*i32"), view_type("*fp32"))


def lists_type() -> Lists:
    """The compile gate's signature of Lists."""
    return Lists(*(["*i32"] * 5), *(["i32"] * 5))


# ----------------------------------------------------------------------------- the rules
# Mask rules take the positions (``qi`` / ``kj``, broadcastable, in the orientation of the scores)
# and the running ``keep``, and narrow it; a rule that reads memory reads only where keep holds.
# Per-key (per-row) data are loaded at ``kj`` (``qi``) alone: a vector, broadcast over the tile.
@triton.jit
def _in_bounds(qi, kj, rules):
    return (qi < rules.Lq) & (kj < rules.Lk)


@triton.jit
def _coords(qi, kj, rules, POSITIONS: tl.constexpr):
    """Coordinates of the positional rules (causal, window, ALiBi): the query and key positions
    given as data (position-id causal, packed sequences), else the aligned query index
    ``qi + causal_off`` and the key index."""
    if POSITIONS:
        pq = tl.load(rules.q_pos.ptr + qi.to(tl.int64) * rules.q_pos.sr, mask=qi < rules.Lq, other=0)
        pk = tl.load(rules.k_pos.ptr + kj.to(tl.int64) * rules.k_pos.sc, mask=kj < rules.Lk, other=0)
        return pq, pk
    else:
        return qi + rules.causal_off, kj


@triton.jit
def _causal(keep, pq, pk):
    """Keys at or before the query (coordinates from :func:`_coords`)."""
    return keep & (pk <= pq)


@triton.jit
def _window(keep, pq, pk, rules):
    """The last ``window`` keys at or before the query, plus the first ``sinks`` keys."""
    return keep & ((pq - pk < rules.window) | (pk < rules.sinks))


@triton.jit
def _segments(keep, qi, kj, rules):
    """Packed sequences: query and key in the same segment."""
    sq = tl.load(rules.q_seg.ptr + qi.to(tl.int64) * rules.q_seg.sr, mask=qi < rules.Lq, other=-1)
    sk = tl.load(rules.k_seg.ptr + kj.to(tl.int64) * rules.k_seg.sc, mask=kj < rules.Lk, other=-2)
    return keep & (sq == sk)


@triton.jit
def _element_mask(keep, qi, kj, rules):
    m = tl.load(rules.mask.ptr + qi.to(tl.int64) * rules.mask.sr + kj.to(tl.int64) * rules.mask.sc, mask=keep,
                other=0)
    return keep & (m != 0)


@triton.jit
def _tile_bits(keep, qi, kj, rules, bid, LAYOUT_BQ: tl.constexpr, LAYOUT_BK: tl.constexpr):
    """Bit (qi, kj) of the tile's packed bitmask ``bid`` (-1: the tile has none)."""
    NW: tl.constexpr = (LAYOUT_BK + 31) // 32
    col_in = kj % LAYOUT_BK
    tile = rules.bits + tl.maximum(bid, 0).to(tl.int64) * (LAYOUT_BQ * NW)
    w = tl.load(tile + (qi % LAYOUT_BQ) * NW + col_in // 32, mask=keep & (bid >= 0), other=-1)
    return keep & (((w >> (col_in % 32)) & 1) != 0)


@triton.jit
def _key_mask(keep, qi, kj, rules):
    """Key padding: key ``kj`` exists (one byte per key of the tile)."""
    m = tl.load(rules.key_mask.ptr + kj.to(tl.int64) * rules.key_mask.sc, mask=kj < rules.Lk, other=0)
    return keep & (m != 0)


@triton.jit
def _add_bias(s, qi, kj, rules, MASKED: tl.constexpr):
    """Add the float bias (natural-log units, hence the log2(e))."""
    b_ptrs = rules.bias.ptr + qi.to(tl.int64) * rules.bias.sr + kj.to(tl.int64) * rules.bias.sc
    if MASKED:
        b = tl.load(b_ptrs, mask=_in_bounds(qi, kj, rules), other=0.0)
    else:
        b = tl.load(b_ptrs)
    return s + b.to(tl.float32) * 1.4426950408889634


@triton.jit
def _add_key_bias(s, kj, rules, MASKED: tl.constexpr):
    """Add the per-key bias (natural-log units; -inf knocks a key out)."""
    b_ptrs = rules.key_bias.ptr + kj.to(tl.int64) * rules.key_bias.sc
    if MASKED:
        b = tl.load(b_ptrs, mask=kj < rules.Lk, other=0.0)
    else:
        b = tl.load(b_ptrs)
    return s + b.to(tl.float32) * 1.4426950408889634


@triton.jit
def _add_group_bias(s, qi, kj, rules, MASKED: tl.constexpr):
    """Add the row's bias of the key's group, ``group_bias[qi, key_group[kj]]`` (natural-log units:
    the log of a per-row, per-group probability factor; -inf removes the group)."""
    if MASKED:
        g = tl.load(rules.key_group.ptr + kj.to(tl.int64) * rules.key_group.sc, mask=kj < rules.Lk, other=0)
        b = tl.load(rules.group_bias.ptr + qi.to(tl.int64) * rules.group_bias.sr + g, mask=_in_bounds(qi, kj, rules),
                    other=0.0)
    else:
        g = tl.load(rules.key_group.ptr + kj.to(tl.int64) * rules.key_group.sc)
        b = tl.load(rules.group_bias.ptr + qi.to(tl.int64) * rules.group_bias.sr + g)
    return s + b * 1.4426950408889634


@triton.jit
def _add_alibi(s, dist, rules):
    """ALiBi: ``-slope * |dist|`` (natural-log units)."""
    slope = tl.load(rules.alibi.ptr) * 1.4426950408889634
    return s - slope * tl.abs(dist.to(tl.float32))


@triton.jit
def _softcap(s, rules):
    """``softcap * tanh(s / softcap)`` of the natural-unit scores, returned in base 2, with the
    derivative factor ``1 - tanh^2`` (tanh through exp2: Triton 3.6 has no portable tanh)."""
    x = s * (rules.qk_scale / (rules.softcap * 1.4426950408889634))             # s * scale / softcap
    e = tl.math.exp2(x * (-2.0 * 1.4426950408889634))                         # exp(-2x)
    t = 2.0 / (1.0 + e) - 1.0                                                  # tanh(x); e = inf gives -1
    return t * (rules.softcap * 1.4426950408889634), 1.0 - t * t


@triton.jit
def apply_rules(s, qi, kj, rules, bid, MASKED: tl.constexpr, RULES: tl.constexpr, LAYOUT_BQ: tl.constexpr,
                LAYOUT_BK: tl.constexpr):
    """Raw scores -> (base-2 scores, softcap derivative factor or 1.0): scale, softcap, then the
    additive modifications (ALiBi, per-key bias, bias), then (partial tiles only) the in-block
    masks selected by RULES, masked scores set to -inf."""
    if RULES.softcap:
        s, dcap = _softcap(s, rules)
    else:
        s = s * rules.qk_scale
        dcap = 1.0
    if RULES.positions and (MASKED or RULES.alibi):
        pq, pk = _coords(qi, kj, rules, True)
    else:
        pq, pk = _coords(qi, kj, rules, False)
    if RULES.alibi:
        if RULES.positions:  # position distance (per-sequence in packed batches)
            s = _add_alibi(s, pq - pk, rules)
        else:  # FlashAttention's definition: |i + Lk - Lq - j|, whatever the causal alignment
            s = _add_alibi(s, qi + (rules.Lk - rules.Lq) - kj, rules)
    if RULES.key_bias:
        s = _add_key_bias(s, kj, rules, MASKED)
    if RULES.bias:
        s = _add_bias(s, qi, kj, rules, MASKED)
    if RULES.group_bias:
        s = _add_group_bias(s, qi, kj, rules, MASKED)
    if MASKED:
        keep = _in_bounds(qi, kj, rules)
        if RULES.causal:
            keep = _causal(keep, pq, pk)
        if RULES.window:
            keep = _window(keep, pq, pk, rules)
        if RULES.segments:
            keep = _segments(keep, qi, kj, rules)
        if RULES.key_mask:
            keep = _key_mask(keep, qi, kj, rules)
        if RULES.mask:
            keep = _element_mask(keep, qi, kj, rules)
        if RULES.bits:
            keep = _tile_bits(keep, qi, kj, rules, bid, LAYOUT_BQ, LAYOUT_BK)
        s = tl.where(keep, s, float("-inf"))
    return s, dcap


@triton.jit
def paged_rows(rules, offs, ok):
    """Physical rows of the logical key rows ``offs`` of a paged cache (``ok``: inside the sequence;
    rows outside read page 0, never loaded)."""
    page = tl.load(rules.pages.ptr + (offs // rules.page_size).to(tl.int64) * rules.pages.sc, mask=ok, other=0)
    return page.to(tl.int64) * rules.page_size + offs % rules.page_size


@triton.jit
def _runtime_view(t, zero):
    return View(t.ptr, t.sb + zero, t.sh + zero, t.sr + zero, t.sc + zero)


@triton.jit
def runtime_rules(rules):
    """``rules`` with every View's strides as run-time values. A kernel that calls
    :func:`rules_at` inside a loop must call this before the loop: Triton 3.6's compiler reads a
    constexpr two tuples deep (a stride of 1, which the JIT specializes, e.g. the key mask's
    column stride) as None inside a loop body ("cannot convert None ... to tensor"). Found by
    the first GPU run; the interpreter never compiles, and the compile gate's signatures hold no
    constexpr strides (tests/triton_kernels/test_gpu_specializations.py compiles the JIT's own)."""
    z = tl.program_id(0) * 0
    return Rules(rules.Lq, rules.Lk, rules.causal_off, rules.window, rules.sinks, rules.qk_scale, rules.softcap,
                 _runtime_view(rules.mask, z), _runtime_view(rules.bias, z), rules.bits,
                 _runtime_view(rules.key_mask, z), _runtime_view(rules.key_bias, z), _runtime_view(rules.alibi, z),
                 _runtime_view(rules.q_pos, z),
                 _runtime_view(rules.k_pos, z), _runtime_view(rules.q_seg, z), _runtime_view(rules.k_seg, z),
                 _runtime_view(rules.pages, z), rules.page_size, _runtime_view(rules.key_group, z),
                 _runtime_view(rules.group_bias, z))


@triton.jit
def rules_at(rules, b, h):
    """The Rules of the (b, h) plane (masks, biases, slopes and positions as Planes)."""
    return Rules(rules.Lq, rules.Lk, rules.causal_off, rules.window, rules.sinks, rules.qk_scale, rules.softcap,
                 plane(rules.mask, b, h), plane(rules.bias, b, h), rules.bits, plane(rules.key_mask, b, h),
                 plane(rules.key_bias, b, h), plane(rules.alibi, b, h), plane(rules.q_pos, b, h),
                 plane(rules.k_pos, b, h), plane(rules.q_seg, b, h), plane(rules.k_seg, b, h), plane(rules.pages, b, h),
                 rules.page_size, plane(rules.key_group, b, h), plane(rules.group_bias, b, h))


# ----------------------------------------------------------------------------- the walk
@triton.jit
def layout_row(lists, b, h, blk):
    """Row of the lists of layout block ``blk`` of the (b, h) plane."""
    return (b * lists.sb + h * lists.sh) * lists.rows + blk


@triton.jit
def _listed(lists, row, MASKED: tl.constexpr):
    """(block indices, bitmask ids, count) of a row's partial blocks (MASKED) or full blocks (no ids)."""
    if MASKED:
        return lists.idx + row * lists.wp, lists.bid + row * lists.wp, tl.load(lists.num + row)
    else:
        return lists.full_idx + row * lists.wf, lists.full_idx + row * lists.wf, tl.load(lists.full_num + row)


@triton.jit
def lse2(LSE, offs, Lq, MASKED: tl.constexpr):
    """Saved LSE rows in base 2, -inf (the row sees nothing) turned into +inf so that
    exp2(s - lse) = 0."""
    lse = load_vec(LSE, offs, Lq, MASKED)
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit
def lse2_split(LSE, offs, Lq, MASKED: tl.constexpr):
    """The forward's saved float64 natural-log LSE rows as two float32 base-2 parts ``(hi, lo)``,
    ``hi + lo = lse * log2(e)`` to float64 precision, for the backward's
    ``P = exp2((s - hi) - lo)``: ``s - hi`` is exact where P is not negligible (Sterbenz), so P
    carries no LSE rounding (a float32 LSE costs P a relative error of ~3u|lse|, 0.05 at
    |lse| ~ 1e5). -inf (the row sees nothing) gives hi = +inf, lo = 0, so P = 0."""
    lse = load_vec(LSE, offs, Lq, MASKED)
    empty = lse == float("-inf")
    lse = tl.where(empty, 0.0, lse) * tl.full([], 1.4426950408889634, tl.float64)
    hi = lse.to(tl.float32)
    return tl.where(empty, float("inf"), hi), (lse - hi.to(tl.float64)).to(tl.float32)


@triton.jit
def no_hook(extra, p, offs_own, offs):
    """The TILE_HOOK of a walk without extra outputs."""
    return extra


@triton.jit
def walk(carry, extra, ctx, own, offs_own, X, Y, rules, lists, row, KEY_MAJOR: tl.constexpr, RULES: tl.constexpr,
         BLOCK: tl.constexpr, LAYOUT_BQ: tl.constexpr, LAYOUT_BK: tl.constexpr, HEAD_DIM: tl.constexpr,
         BLOCK_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
         BODY: tl.constexpr, TILE_HOOK: tl.constexpr, LOG=None, log_plane=0):
    """Walk the tiles listed in ``row`` of ``lists`` for the owned tile ``own`` ``[own rows, BLOCK_D]``
    at positions ``offs_own`` (module docstring). ``X`` is the Plane of the visited side's score
    operand, ``Y`` that of the second operand (or None; its head dim is HEAD_DV, the value head
    dim), ``rules`` the plane's Rules (:func:`rules_at`), BLOCK the visited tile's size, ``LOG``
    the launch's tile log (work accounting; None: compiled out) and ``log_plane`` the (batch, head)
    plane it logs this walk under. Returns (carry, extra)."""
    if KEY_MAJOR:
        LAYOUT_B: tl.constexpr = LAYOUT_BQ
        bound = rules.Lq
    else:
        LAYOUT_B: tl.constexpr = LAYOUT_BK
        bound = rules.Lk
    SUB: tl.constexpr = LAYOUT_B // BLOCK
    for MASKED in tl.static_range(1, -1, -1):  # partial blocks, then full blocks
        idx, bids, count = _listed(lists, row, MASKED)
        for t in range(count * SUB):
            blk = tl.load(idx + t // SUB)
            if MASKED and RULES.bits:
                bid = tl.load(bids + t // SUB)
            else:
                bid = -1
            offs = blk * LAYOUT_B + (t % SUB) * BLOCK + tl.arange(0, BLOCK)
            if LOG is not None:
                log_tile(LOG, log_plane, row, blk * LAYOUT_B + (t % SUB) * BLOCK, MASKED)
            if RULES.paged:  # (query-major forward only) key rows through the block table
                ok = offs < bound
                rows = paged_rows(rules, offs, ok)
                x = load_cols_at(X, rows, ok, MASKED, HEAD_DIM, BLOCK_D)
            else:
                x = load_cols(X, offs, bound, MASKED, HEAD_DIM, BLOCK_D)                      # [D, BLOCK]
            if Y is not None:
                y = load_cols(Y, offs, bound, MASKED, HEAD_DV, BLOCK_DV)
            else:
                y = None
            s = tl.dot(own, x, input_precision=PRECISION)
            if KEY_MAJOR:
                s, dcap = apply_rules(s, offs[None, :], offs_own[:, None], rules, bid, MASKED, RULES, LAYOUT_BQ,
                                      LAYOUT_BK)
            else:
                s, dcap = apply_rules(s, offs_own[:, None], offs[None, :], rules, bid, MASKED, RULES, LAYOUT_BQ,
                                      LAYOUT_BK)
            carry, p = BODY(carry, ctx, s, dcap, x, y, offs, MASKED, RULES, HEAD_DIM, BLOCK_D, HEAD_DV, BLOCK_DV,
                            PRECISION)
            extra = TILE_HOOK(extra, p, offs_own, offs)
    return carry, extra
