"""Work accounting (issue 16, part 4): under ``count_tiles()`` every softmax-attention kernel logs the
tiles each program visits, and each visits exactly the kernel tiles of the blocks its layout lists:
no tile twice, no listed tile skipped, no unlisted tile touched, partial blocks before full ones.
Sparse time is then proportional to the listed tiles by construction.

Kernels: the block-sparse forward, dK/dV (key-major, over the transposed lists, GQA heads walked by
one program) and dQ, the attention statistics' column walk (per head, and with the head reduction:
every head in one program) and row walk; HiP's forward and backward (the sink range, the window
range and ceil(count * block_size_k / BLOCK_N) gathered tiles per query tile). Patterns: dense
causal (bottom-right, Lq != Lk), SlidingWindow with sinks, BlockSparse of a random block mask
per batch and head (32 x 64 blocks), PowerAttention, PerHead (bitmask tiles), a causal layout with
key padding, and a from_positions layout. The expected visits are computed from the layout's
lists alone (``BlockLayout.lists()``); independently, every kernel tile pair holding an attended
element of ``to_dense_mask()`` must be visited. Counting off, the kernels get ``LOG=None`` (the
compile gate builds them so)."""
import math
from collections import Counter

import pytest
import torch

import sparseattn as sa
from sparseattn.ops.hip.config import PAD_INDEX, HiPMask
from sparseattn.triton_kernels.common import count_tiles

from utils import DEVICE


def _positions(B, L, seed):
    """CCA-like positions: a few runs of tokens sharing one position."""
    g = torch.Generator().manual_seed(seed)
    steps = (torch.rand(B, L, generator=g) < 0.6).int()
    steps[:, 0] = 0
    return steps.cumsum(1).int().to(DEVICE)


def _key_padding(B, Lk):
    keep = torch.ones(B, Lk, dtype=torch.bool)
    keep[0, 100:] = False          # whole blocks of padding dropped, one cut
    keep[1, :20] = False            # left padding
    return keep.to(DEVICE)


# name -> (B, H, Hkv, Lq, Lk, layout builder (B, H, Lq, Lk) -> BlockLayout)
PATTERNS = {
    "dense causal": (1, 2, 1, 136, 192, lambda B, H, Lq, Lk: sa.BlockLayout.from_block_mask(
        torch.ones(1, 1, math.ceil(Lq / 64), math.ceil(Lk / 64), dtype=torch.bool, device=DEVICE), 64, (Lq, Lk),
        causal="bottom_right")),
    "sliding window + sinks": (1, 1, 1, 256, 256, lambda B, H, Lq, Lk: sa.SlidingWindow(70, sinks=5).layout(
        Lq, Lk, DEVICE)),
    "block sparse random": (2, 2, 1, 128, 160, lambda B, H, Lq, Lk: sa.BlockLayout.from_block_mask(
        torch.rand(B, H, math.ceil(Lq / 32), math.ceil(Lk / 64), generator=torch.Generator().manual_seed(1)).lt(0.5)
        .to(DEVICE), (32, 64), (Lq, Lk))),
    "power attention": (1, 1, 1, 192, 192, lambda B, H, Lq, Lk: sa.PowerAttention(32).layout(Lq, Lk, DEVICE)),
    "per head": (1, 2, 2, 192, 192, lambda B, H, Lq, Lk: sa.PerHead(
        [sa.SlidingWindow(40, sinks=3), sa.PowerAttention(32)]).layout(Lq, Lk, DEVICE)),
    "key padding": (2, 1, 1, 160, 170, lambda B, H, Lq, Lk: sa.BlockLayout.from_block_mask(
        torch.ones(1, 1, 3, 3, dtype=torch.bool, device=DEVICE), 64, (Lq, Lk), causal="bottom_right")
        .with_key_padding(_key_padding(B, Lk))),
    "from positions": (2, 1, 1, 128, 128, lambda B, H, Lq, Lk: sa.BlockLayout.from_positions(
        _positions(B, Lq, 2), _positions(B, Lk, 2), 32)),
}


def _expected(launch, layout, B, H):
    """The visits the layout's lists imply for this launch, as a Counter of (program, plane, row,
    start, kind), with every program's (b, heads, own tile) mapped as ``common.program_tile``
    documents."""
    m = launch.meta
    lq, lk = layout.seq_lens
    lists = layout.lists()
    if m["key_major"]:
        num, idx, full_num, full_idx = lists[5], lists[6], lists[8], lists[9]
        own, visited, own_len, layout_own, layout_vis = m["BLOCK_N"], m["BLOCK_M"], lk, m["LAYOUT_BK"], m["LAYOUT_BQ"]
    else:
        num, idx, full_num, full_idx = lists[0], lists[1], lists[3], lists[4]
        own, visited, own_len, layout_own, layout_vis = m["BLOCK_M"], m["BLOCK_N"], lq, m["LAYOUT_BQ"], m["LAYOUT_BK"]
    bl, hl, rows = num.shape
    n_tiles = math.ceil(own_len / own)
    planes_h = launch.grid // (n_tiles * B)                 # heads (or head groups) with their own programs
    per = H // planes_h                                      # query heads one program walks
    assert launch.grid == n_tiles * B * planes_h and per * planes_h == H
    sub = layout_vis // visited
    want = Counter()
    num, idx, full_num, full_idx = (t.cpu() for t in (num, idx, full_num, full_idx))
    for pid in range(launch.grid):
        tile, bh = pid % n_tiles, pid // n_tiles
        b, ph = bh // planes_h, bh % planes_h
        blk = tile * own // layout_own
        for g in range(per):
            h = ph * per + g
            lb, lh = (b if bl > 1 else 0), (h if hl > 1 else 0)
            row = (lb * hl + lh) * rows + blk
            for kind, n, ids in ((1, num, idx), (0, full_num, full_idx)):
                for c in ids[lb, lh, blk, :int(n[lb, lh, blk])].tolist():
                    for s in range(sub):
                        want[(pid, b * H + h, row, c * layout_vis + s * visited, kind)] += 1
    return want


def _check_walk(launch, layout, B, H):
    got = launch.entries
    visits = Counter(map(tuple, got.tolist()))
    assert max(visits.values(), default=1) == 1, f"{launch.kernel}: a tile visited twice"
    want = _expected(launch, layout, B, H)
    missing, extra = want - visits, visits - want
    assert not missing and not extra, (f"{launch.kernel}: {sum(missing.values())} listed tiles skipped (e.g. "
                                       f"{list(missing)[:3]}), {sum(extra.values())} unlisted visited (e.g. "
                                       f"{list(extra)[:3]})")
    # each walk (program, plane) visits its partial tiles, then its full ones (in log order)
    for walk in got[:, :2].unique(dim=0).tolist():
        kinds = got[(got[:, :2] == torch.tensor(walk)).all(1), 4]
        assert bool((kinds[1:] <= kinds[:-1]).all()), f"{launch.kernel}: walk {walk} has a full tile first"


def _check_covers_mask(launch, layout, B, H):
    """Independently of the lists: every (own tile, visited tile) pair of kernel tiles holding an
    attended element of the dense mask was visited for its (b, h)."""
    m = launch.meta
    lq, lk = layout.seq_lens
    dense = layout.to_dense_mask().expand(B, H, lq, lk).cpu()
    key_major = m["key_major"]
    own, visited = (m["BLOCK_N"], m["BLOCK_M"]) if key_major else (m["BLOCK_M"], m["BLOCK_N"])
    if key_major:
        dense = dense.transpose(-1, -2)
    own_len, vis_len = dense.shape[-2:]
    n_own, n_vis = math.ceil(own_len / own), math.ceil(vis_len / visited)
    pad = torch.zeros(B, H, n_own * own, n_vis * visited, dtype=torch.bool)
    pad[..., :own_len, :vis_len] = dense
    needed = pad.view(B, H, n_own, own, n_vis, visited).any(5).any(3)
    seen = torch.zeros(B, H, n_own, n_vis + m["LAYOUT_BQ" if key_major else "LAYOUT_BK"] // visited, dtype=torch.bool)
    for pid, bh, _, start, _ in launch.entries.tolist():     # (sub-tiles of a listed block past the end too)
        seen[bh // H, bh % H, pid % n_own, start // visited] = True
    seen = seen[..., :n_vis]
    assert not (needed & ~seen).any(), f"{launch.kernel}: an attended tile pair was not visited"


@pytest.mark.parametrize("name", list(PATTERNS))
def test_kernels_visit_exactly_the_listed_tiles(name):
    B, H, Hkv, Lq, Lk, build = PATTERNS[name]
    layout = build(B, H, Lq, Lk)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, Lq, 32, generator=g).to(DEVICE).requires_grad_()
    k, v = (torch.randn(B, Hkv, Lk, 32, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
    reduce = "sum" if name == "dense causal" else "none"    # the column walk over every head in one program
    with count_tiles() as log:
        out, lse = sa.sparse_attention(q, k, v, layout, return_lse=True)
        out.backward(torch.randn_like(out))
        sa.attention_stats(q.detach(), k.detach(), layout, lse=lse.detach(), block_sums=True, head_reduce=reduce)
    assert sa.last_backend() == "triton"
    kernels = ["sparse_attention_fwd", "sparse_attention_bwd_dkdv", "sparse_attention_bwd_dq",
               "attention_stats_columns", "attention_stats_rows"]
    assert [launch.kernel for launch in log.launches] == kernels
    for launch in log.launches:
        _check_walk(launch, layout, B, H)
        _check_covers_mask(launch, layout, B, H)
    if reduce == "sum":
        assert log.of("attention_stats_columns")[0].meta["heads_per_program"] == H


def test_counting_off_records_nothing_and_changes_nothing():
    """Outside count_tiles nothing is logged; inside, the results are the same bits."""
    B, H, Hkv, Lq, Lk, build = PATTERNS["sliding window + sinks"]
    layout = build(B, H, Lq, Lk)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, Lq, 32, generator=g).to(DEVICE) for _ in range(3))
    plain = sa.sparse_attention(q, k, v, layout)
    with count_tiles() as log:
        counted = sa.sparse_attention(q, k, v, layout)
    assert torch.equal(plain, counted) and len(log.launches) == 1
    with count_tiles(capacity=3):
        with pytest.raises(RuntimeError, match="capacity=3"):
            sa.sparse_attention(q, k, v, layout)


def _hip_mask(B, H, Lq, Lk, hip, seed):
    """A hand-made HiP mask: per query block a random count of distinct ascending key blocks
    (0, partial and full K included), so that the gathered tile count ceil(count * bk / BLOCK_N)
    takes several values."""
    g = torch.Generator().manual_seed(seed)
    nq, K, bk = math.ceil(Lq / hip.block_size_q), hip.k_blocks, hip.block_size_k
    idx = torch.full((B, H, nq, K), PAD_INDEX, dtype=torch.int32)
    counts = torch.randint(0, K + 1, (B, H, nq), generator=g, dtype=torch.int32)
    counts[0, 0, 0], counts[-1, -1, -1] = 0, K
    for b in range(B):
        for h in range(H):
            for r in range(nq):
                n = int(counts[b, h, r])
                blocks = torch.randperm(Lk // bk, generator=g)[:n].sort().values
                idx[b, h, r, :n] = (blocks * bk).int()
    return HiPMask(idx.to(DEVICE), counts.to(DEVICE), hip, (Lq, Lk))


def test_hip_visits_sinks_window_and_gathered_tiles():
    hip = sa.HiP(mask_k=128, block_size_q=16, block_stride_q=2, block_size_k=4, window=40, sinks=70)
    B, H, Hkv, Lq, Lk = 1, 2, 1, 40, 300
    g = torch.Generator().manual_seed(4)
    q = torch.randn(B, H, Lq, 16, generator=g).to(DEVICE).requires_grad_()
    k, v = (torch.randn(B, Hkv, Lk, 16, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
    mask = _hip_mask(B, H, Lq, Lk, hip, seed=5)
    with count_tiles() as log:
        out = sa.hip_attention(q, k, v, hip, mask)
        out.backward(torch.randn_like(out))
    assert [launch.kernel for launch in log.launches] == ["hip_attention_fwd", "hip_attention_bwd"]
    counts = mask.counts.cpu()
    for launch in log.launches:
        m = launch.meta
        bm, bn = m["BLOCK_M"], m["BLOCK_N"]
        n_tiles = math.ceil(Lq / bm)
        assert launch.grid == n_tiles * B * H
        want = Counter()
        for pid in range(launch.grid):
            tile, bh = pid % n_tiles, pid // n_tiles
            b, h = bh // H, bh % H
            rows = range(tile * bm, min(tile * bm + bm, Lq))
            pos = [Lk - Lq + i for i in rows]               # the queries are the last Lq positions
            lo, hi = min(pos), max(pos)
            w_lo = max(lo - hip.window + 1, 0) // bn * bn
            sink_tiles = list(range(0, min(hip.sinks, w_lo), bn))
            window_tiles = list(range(w_lo, hi + 1, bn))
            n_sel = math.ceil(int(counts[b, h, tile * bm // hip.block_size_q]) * hip.block_size_k / bn)
            # the sink and window tiles cover every key a row sees through sinks or window, disjointly
            covered = {j for t in sink_tiles + window_tiles for j in range(t, t + bn)}
            assert len(covered) == bn * (len(sink_tiles) + len(window_tiles))
            assert all(j in covered for p in pos for j in range(p + 1) if p - j < hip.window or j < hip.sinks)
            assert all(t < hip.sinks for t in sink_tiles)
            for set_id, starts in ((0, sink_tiles), (1, window_tiles), (2, range(0, n_sel * bn, bn))):
                for s in starts:
                    want[(pid, b * H + h, set_id, s, 1)] += 1
        got = Counter(map(tuple, launch.entries.tolist()))
        assert got == want, f"{launch.kernel}: {want - got} skipped, {got - want} extra"
        assert {s for (_, _, set_id, s, _) in got if set_id == 2} >= {0, bn}   # several gathered tiles somewhere
