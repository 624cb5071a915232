"""HiP's float64 oracles (sparseattn/ops/hip/naive.py) checked on their own: a tree search worked out
by hand, a literal pure-Python transcription of the search (integer inputs: exact ties and zero
products), planted key blocks found at lengths with several rounds, every candidate selected on
short sequences, the attended set against a loop, the sparse attention against a direct masked
softmax, recall and the best-mass bound. CPU only, no Triton."""
import math

import pytest
import torch

from sparseattn.ops.hip.config import MASKED_SCORE, PAD_INDEX, HiP, HiPMask, initial_starts, num_rounds, \
    query_positions
from sparseattn.ops.hip.naive import attended, best_mass, hip_attention, hip_mask, hip_mask_scores, hip_recall


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _selection(mask, b, h, qb):
    return mask.indices[b, h, qb, :mask.counts[b, h, qb]].tolist()


# ----------------------------------------------------------------------------- the tree search
def test_hand_checked_tiny_case():
    """One block of 16 rows at positions 0..15, D = 1, q = 1, scale 1: a child's score is k at its
    representative key (row 15 sees every candidate). window 2, sinks 1, bk 1, K = 2.

    bsrc = 16 - 2 - 1 = 13 candidates (keys 1..13); HiP's split: ALIGN = ceil(8 / 2) = 4,
    float32 13 / 2 * i = 0, 6.5, 13 -> aligned 0, 4, 12 -> nodes (1, 4), (5, 8) (key 13 is left out,
    as in HiP); rounds: ceil(13 / 2) = 7 -> 3.5 -> 1.75 -> 0.875: 3.
    round 1: (1,2) rep 2: k=0, zero product -> -32000; (3,2) rep 4: 5; (5,4) rep 7: -2; (9,4) rep 11: -1
             -> keep (3,2), (9,4) (without the zero hack (1,2) would score 0 and win); gap -1 - -2 = 1
    round 2: (3,1) rep 3: 6; (4,1) rep 4: 5; (9,2) rep 10: 7; (11,2) rep 12: 3 -> keep (3,1), (9,2); gap 1
    round 3: (3,0) -inf; (3,1): 6; (9,1) rep 9: 6; (10,1): 7 -> 7, then the tie 6 = 6 goes to the smaller
             start (3,1); gap 0. Selected keys 3 and 10."""
    hip = HiP(mask_k=2, block_size_q=16, block_stride_q=1, block_size_k=1, block_stride_k=1, window=2, sinks=1)
    assert initial_starts(hip, 13).tolist() == [1, 5, 13] and num_rounds(hip, 15) == 3
    kv = {2: 0.0, 3: 6.0, 4: 5.0, 7: -2.0, 9: 6.0, 10: 7.0, 11: -1.0, 12: 3.0}
    k = torch.tensor([kv.get(t, 0.25) for t in range(16)], dtype=torch.float64).reshape(1, 1, 16, 1)
    q = torch.ones(1, 1, 16, 1, dtype=torch.float64)
    sc = hip_mask_scores(q, k, hip)
    m = sc.mask
    assert m.indices.dtype == torch.int32 and m.counts.dtype == torch.int32
    assert m.indices.tolist() == [[[[3, 10]]]] and m.counts.tolist() == [[[2]]]
    assert sc.selected.tolist() == [[[[6.0, 7.0]]]]
    assert sc.best_rejected.tolist() == [[[6.0]]]
    assert sc.margin.tolist() == [[[0.0]]]        # round 3's real tie
    assert torch.equal(hip_mask(q, k, hip).indices, m.indices)
    att = attended(m, hip, 16, 16)[0, 0]
    assert torch.nonzero(att[15]).flatten().tolist() == [0, 3, 10, 14, 15]   # sink, selected, window
    assert torch.nonzero(att[5]).flatten().tolist() == [0, 3, 4, 5]          # 10 is in row 5's future
    assert torch.nonzero(att[1]).flatten().tolist() == [0, 1]                # sink 0 is in row 1's window


def _literal_mask(q, k, hip, q_pos, scale):
    """The search transcribed from its definition, one scalar at a time (lists, no tensors)."""
    B, Hq, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    bq, sq, bk, sk, K = hip.block_size_q, hip.block_stride_q, hip.block_size_k, hip.block_stride_k, hip.k_blocks
    qq, kk, pos = q.tolist(), k.tolist(), q_pos.tolist()
    rounds = num_rounds(hip, max(max(r) for r in pos))
    out = {}
    for b in range(B):
        for h in range(Hq):
            for qb in range(-(-Lq // bq)):
                rows = list(range(qb * bq, min((qb + 1) * bq, Lq)))
                p_last = max(pos[b][i] for i in rows)
                bsrc = hip.candidates(p_last)
                if not hip.searches(p_last):
                    out[b, h, qb] = [(hip.n_sink_blocks + x) * bk for x in range(bsrc)]
                    continue
                qs = [rows[-1] - t * sq for t in range(bq // sq) if rows[-1] - t * sq >= qb * bq]

                def value(i, t):
                    if t > pos[b][i] - hip.window or t >= Lk:
                        return MASKED_SCORE
                    d = sum(x * y for x, y in zip(qq[b][h][i], kk[b][h // (Hq // Hkv)][t]))
                    return MASKED_SCORE if d == 0.0 else d * scale

                def score(s, g):
                    if g == 0:
                        return -math.inf
                    r = s + g // 2
                    return max(value(i, r * bk + j * sk + sk - 1) for i in qs for j in range(bk // sk))

                st = initial_starts(hip, bsrc).tolist()
                nodes = [(st[i], max(0, min(bsrc, st[i + 1] - st[i]))) for i in range(K)]
                for _ in range(rounds):
                    ch = [c for s, g in nodes for c in ((s, g // 2), (s + g // 2, g - g // 2))]
                    scores = [score(s, g) for s, g in ch]
                    best = sorted(range(len(ch)), key=lambda i: (-scores[i], i))[:K]
                    nodes = sorted((ch[i] for i in best), key=lambda n: (n[0], n[1] > 0))
                out[b, h, qb] = [s * bk for s, g in nodes if g > 0]
    return out


@pytest.mark.parametrize("integer", [True, False], ids=["integers", "normal"])
@pytest.mark.parametrize("Lq,Lk", [(37, 150), (1, 150), (64, 64)])
def test_search_matches_literal_transcription(integer, Lq, Lk):
    """Integer q, k in -3..3: many exact ties (tie rule) and zero products (HiP's hack); GQA, a
    partial last query block, strided rows and keys, sinks not a multiple of bk, and in batch 1
    cached positions (rows at 53.. of 90 keys)."""
    hip = HiP(mask_k=16, block_size_q=16, block_stride_q=2, block_size_k=4, block_stride_k=2, window=5, sinks=3)
    g = _gen(Lq * 7 + Lk + integer)
    B, Hq, Hkv, D = 2, 4, 2, 4
    if integer:
        q = torch.randint(-3, 4, (B, Hq, Lq, D), generator=g).double()
        k = torch.randint(-3, 4, (B, Hkv, Lk, D), generator=g).double()
    else:
        q, k = torch.randn(B, Hq, Lq, D, generator=g), torch.randn(B, Hkv, Lk, D, generator=g)
    q_pos = query_positions(B, Lq, Lk, torch.tensor([Lk, Lk - Lk // 3]), "cpu")
    m = hip_mask(q, k, hip, q_pos=q_pos)
    ref = _literal_mask(q.double(), k.double(), hip, q_pos, 0.5)
    nq = m.counts.shape[2]
    assert m.indices.shape == (B, Hq, nq, hip.k_blocks)
    for (b, h, qb), sel in ref.items():
        assert _selection(m, b, h, qb) == sel, (b, h, qb)
        assert (m.indices[b, h, qb, len(sel):] == PAD_INDEX).all()
    assert any(len(sel) == hip.k_blocks for sel in ref.values()) or Lk == 64


def _planted(B, Hq, Hkv, Lq, Lk, D, blocks, bk, g, peak=30.0):
    """q rows share direction e0 (plus 1% noise); k's e0 component is ``peak`` on the planted key
    blocks and falls off with the distance to the nearest one elsewhere (the locality HiP's
    representatives rely on), so the planted blocks score far above the rest."""
    q = torch.randn(B, Hq, Lq, D, generator=g, dtype=torch.float64) * 0.01
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64) * 0.01
    q[..., 0] = 1.0
    t = torch.arange(Lk)
    for b in range(B):
        for h in range(Hkv):
            tok = torch.tensor([x * bk + j for x in blocks[b][h] for j in range(bk)])
            dist = (t[:, None] - tok[None]).abs().min(1).values
            k[b, h, :, 0] = torch.where(dist == 0, peak, 4.0 - 0.05 * dist)
    return q, k


def test_planted_blocks_are_found():
    """Three planted 2-token blocks per (batch, kv head) among 118 candidates, K = 8, 4 rounds: every
    query block selects all three (recall of the planted blocks 1.0); then the rows keep almost all
    their mass, and best_mass bounds hip_recall."""
    hip = HiP(mask_k=16, block_size_q=32, block_stride_q=2, block_size_k=2, block_stride_k=1, window=16, sinks=4)
    B, Hq, Hkv, Lq, Lk = 2, 4, 2, 96, 256
    assert num_rounds(hip, Lk - 1) == 4
    g = _gen(1)
    for _ in range(3):
        blocks = [[sorted((torch.randperm(40, generator=g)[:3] + 5).tolist()) for _ in range(Hkv)] for _ in range(B)]
        q, k = _planted(B, Hq, Hkv, Lq, Lk, 8, blocks, hip.block_size_k, g)
        sc = hip_mask_scores(q, k, hip)
        m = sc.mask
        assert (m.counts == hip.k_blocks).all()
        found = [x * 2 in _selection(m, b, h, qb) for b in range(B) for h in range(Hq) for qb in range(3)
                 for x in blocks[b][h // 2]]
        assert sum(found) / len(found) == 1.0
        assert (sc.selected >= sc.best_rejected[..., None]).all()   # kept children beat the rejected ones
    rec, best = hip_recall(q, k, m, hip), best_mass(q, k, hip)
    assert rec.min > 0.99 and rec.per_row.shape == (B, Hq, Lq)
    # per row up to the tiny mass outside the planted blocks (best_mass maximises the block's sum)
    assert (best.per_row - rec.per_row).min() >= -1e-6


def test_short_sequences_select_every_candidate():
    """Lk <= window + sinks + mask_k: no search, the candidates are all selected (counts == bsrc),
    decode (Lq = 1) and cached positions included, and then no mass is lost."""
    hip = HiP(mask_k=32, block_size_q=16, block_stride_q=2, block_size_k=2, window=16, sinks=4)
    g = _gen(2)
    for Lq, cache in ((1, None), (37, None), (37, torch.tensor([52, 40]))):
        Lk = hip.window + hip.sinks + hip.mask_k
        q, k = torch.randn(2, 2, Lq, 8, generator=g), torch.randn(2, 1, Lk, 8, generator=g)
        q_pos = query_positions(2, Lq, Lk, cache, "cpu")
        m = hip_mask(q, k, hip, q_pos=q_pos)
        for b in range(2):
            for qb in range(m.counts.shape[2]):
                bsrc = hip.candidates(int(q_pos[b, qb * 16:(qb + 1) * 16].max()))
                for h in range(2):
                    assert m.counts[b, h, qb] == bsrc
                    assert _selection(m, b, h, qb) == [2 * (2 + x) for x in range(bsrc)]
        rec = hip_recall(q, k, m, hip, q_pos=q_pos)
        assert torch.allclose(rec.per_row, torch.ones_like(rec.per_row), rtol=0, atol=1e-14) and rec.min > 1 - 1e-14
    q, k = torch.randn(1, 1, 16, 8, generator=g), torch.randn(1, 1, 16, 8, generator=g)
    assert hip_mask(q, k, hip).counts.tolist() == [[[0]]]              # shorter than window + sinks


# ----------------------------------------------------------------------------- attention on a mask
def _random_mask(hip, B, Hq, Lq, Lk, g):
    nq, K, bk = -(-Lq // hip.block_size_q), hip.k_blocks, hip.block_size_k
    idx = torch.full((B, Hq, nq, K), PAD_INDEX, dtype=torch.int32)
    cnt = torch.randint(0, K + 1, (B, Hq, nq), generator=g, dtype=torch.int32)
    for b in range(B):
        for h in range(Hq):
            for qb in range(nq):
                n = int(cnt[b, h, qb])
                sel = torch.randperm(-(-Lk // bk), generator=g)[:n].sort().values * bk
                idx[b, h, qb, :n] = sel.to(torch.int32)
    return HiPMask(idx, cnt, hip, (Lq, Lk))


def _literal_attended(mask, hip, Lq, Lk, q_pos):
    B, Hq = mask.counts.shape[:2]
    out = torch.zeros(B, Hq, Lq, Lk, dtype=torch.bool)
    for b in range(B):
        for h in range(Hq):
            for i in range(Lq):
                p, qb = int(q_pos[b, i]), i // hip.block_size_q
                starts = mask.indices[b, h, qb, :mask.counts[b, h, qb]].tolist()
                for j in range(Lk):
                    sink = j < hip.sinks and j <= p - hip.window
                    window = p - hip.window < j <= p
                    sel = any(s <= j < s + hip.block_size_k for s in starts) and hip.sinks <= j <= p - hip.window
                    out[b, h, i, j] = sink or window or sel
    return out


def test_attended_matches_loop():
    hip = HiP(mask_k=12, block_size_q=16, block_size_k=4, window=5, sinks=3)
    g = _gen(3)
    Lq, Lk = 20, 45
    m = _random_mask(hip, 2, 4, Lq, Lk, g)
    for q_pos in (None, query_positions(2, Lq, Lk, torch.tensor([45, 31]), "cpu")):
        got = attended(m, hip, Lq, Lk, q_pos)
        ref_pos = query_positions(2, Lq, Lk, None, "cpu") if q_pos is None else q_pos
        assert got.shape == (2, 4, Lq, Lk) and torch.equal(got, _literal_attended(m, hip, Lq, Lk, ref_pos))
    with pytest.raises(ValueError, match="seq_lens"):
        attended(m, hip, Lq, Lk + 1)


def test_hip_attention_matches_masked_softmax():
    """GQA, Dv != D, Lq != Lk, a given scale; against softmax over the attended keys written out."""
    hip = HiP(mask_k=12, block_size_q=16, block_size_k=4, window=5, sinks=3)
    g = _gen(4)
    B, Hq, Hkv, Lq, Lk = 2, 4, 2, 20, 45
    q, k = torch.randn(B, Hq, Lq, 8, generator=g), torch.randn(B, Hkv, Lk, 8, generator=g)
    v = torch.randn(B, Hkv, Lk, 6, generator=g)
    m = _random_mask(hip, B, Hq, Lq, Lk, g)
    out, lse = hip_attention(q, k, v, hip, m, scale=0.3, return_lse=True)
    assert out.dtype == torch.float64 and out.shape == (B, Hq, Lq, 6) and lse.shape == (B, Hq, Lq)
    keep = _literal_attended(m, hip, Lq, Lk, query_positions(B, Lq, Lk, None, "cpu"))
    s = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2) * 0.3).masked_fill(~keep, -math.inf)
    ref = torch.softmax(s, -1) @ v.double().repeat_interleave(2, 1)
    assert (out - ref).abs().max() < 1e-13
    assert (lse - torch.logsumexp(s, -1)).abs().max() < 1e-13
    assert torch.equal(hip_attention(q, k, v, hip, m, scale=0.3), out)


def test_row_seeing_nothing_gives_zero():
    """No window, no sinks, nothing selected for query block 0: its rows give 0 and LSE -inf."""
    hip = HiP(mask_k=8, block_size_q=16, block_size_k=2, window=0, sinks=0)
    g = _gen(5)
    q, k, v = (torch.randn(1, 2, 32, 8, generator=g) for _ in range(3))
    m = _random_mask(hip, 1, 2, 32, 32, g)
    m.counts[:, :, 0] = 0
    m.counts[:, :, 1] = 4
    out, lse = hip_attention(q, k, v, hip, m, return_lse=True)
    assert not out.isnan().any()
    assert (out[:, :, :16] == 0).all() and torch.isneginf(lse[:, :, :16]).all()
    assert torch.isfinite(lse[:, :, 16:]).any()


# ----------------------------------------------------------------------------- recall
def test_recall_below_one_and_best_mass_bound():
    """Random q, k, 8 blocks out of up to 114: mass is lost (recall < 1); best_mass keeps at least
    as much as HiP's mask summed over each query block (its definition), and per row where a block
    is one row (decode)."""
    hip = HiP(mask_k=16, block_size_q=16, block_stride_q=2, block_size_k=2, window=16, sinks=4)
    g = _gen(6)
    B, Hq, Hkv, Lk = 1, 2, 1, 200
    for Lq in (48, 1):
        q, k = torch.randn(B, Hq, Lq, 8, generator=g) * 2, torch.randn(B, Hkv, Lk, 8, generator=g)
        m = hip_mask(q, k, hip)
        rec, best = hip_recall(q, k, m, hip), best_mass(q, k, hip)
        assert rec.min < 0.99 and 0 < rec.min <= rec.mean < 1
        assert rec.mean == pytest.approx(rec.per_row.mean().item()) and best.per_row.shape == (B, Hq, Lq)
        pad = -Lq % 16
        blk = lambda r: torch.nn.functional.pad(r.per_row, (0, pad)).reshape(B, Hq, -1, 16).sum(-1)  # noqa: E731
        assert (blk(best) - blk(rec)).min() >= -1e-12
        if Lq == 1:
            assert (best.per_row - rec.per_row).min() >= -1e-12
