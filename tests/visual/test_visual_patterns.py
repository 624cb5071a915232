"""The masks of the VLM papers as patterns (issue 13 section 4): ConcentricCausal (CCA) and
ModalityMutual (AKI). Positions and masks against the float64 oracles of sparseattn.visual.naive
(written as the reference code builds them), layouts exact and minimal (a tile is listed iff the
mask keeps a pair in it, full iff it keeps every pair), sparse_attention forward and backward
against float64 on the Triton kernels and the CPU path, decode, build cost at long L, bad input."""
import math
import time

import pytest
import torch

import sparseattn as sa
from sparseattn.visual import naive
from checks import attention_inputs, check_attention
from utils import DEVICE, assert_oracle, randn


def _tiles_of(mask, bq, bk):
    """(any, all) per tile of a bool [Lq, Lk] mask (positions past the ends: all-True for `all`)."""
    Lq, Lk = mask.shape
    nq, nk = math.ceil(Lq / bq), math.ceil(Lk / bk)
    pad = (0, nk * bk - Lk, 0, nq * bq - Lq)
    t0 = torch.nn.functional.pad(mask, pad, value=False).view(nq, bq, nk, bk)
    t1 = torch.nn.functional.pad(mask, pad, value=True).view(nq, bq, nk, bk)
    return t0.any(3).any(1), t1.all(3).all(1)


def _assert_minimal(layout, mask):
    """The layout lists exactly the tiles where the mask keeps something; full tiles are exactly
    the all-kept tiles strictly inside both sequences (edge tiles stay partial: bounds rule)."""
    bq, bk = layout.block_size
    partial, full = layout.tile_masks()
    any_, all_ = _tiles_of(mask.cpu(), bq, bk)
    listed = (partial | full)[0, 0].cpu()
    assert torch.equal(listed, any_)
    Lq, Lk = mask.shape
    inside = ((torch.arange(listed.shape[0]) + 1) * bq <= Lq)[:, None] & \
        ((torch.arange(listed.shape[1]) + 1) * bk <= Lk)[None, :]
    assert torch.equal(full[0, 0].cpu() & inside, all_ & inside)


# ----------------------------------------------------------------------------- CCA
CCA_CASES = [(5, (6, 6), 45), (0, (3, 5), 30), (7, (4, 4), 15), (3, (1, 1), 9), (10, (8, 8), 200),
             (20, (12, 12), 97)]  # the last one ends inside the image


@pytest.mark.parametrize("start,grid,L", CCA_CASES)
def test_cca_positions_and_mask(start, grid, L):
    cca = sa.visual.ConcentricCausal(start, grid, block_size=64)
    pos = cca.positions(L)
    assert pos.dtype == torch.int32 and pos.shape == (L,)
    assert torch.equal(pos.long(), naive.cca_positions(start, grid, L))
    ref = naive.cca_mask(start, grid, L)
    assert torch.equal(cca.dense_mask(L, L)[0, 0], ref)
    for Lq in sorted({1, 7, L // 2, L}):
        lay = cca.layout(Lq, L)
        assert torch.equal(lay.to_dense_mask()[0, 0].cpu(), ref[L - Lq:])           # queries: the last Lq tokens
        _assert_minimal(lay, ref[L - Lq:])


def test_cca_rings_24x24():
    rings = sa.visual.concentric_rings((24, 24))
    assert torch.equal(rings.long(), naive.cca_rings((24, 24)))
    assert int(rings.max()) == 11 and int((rings == 11).sum()) == 4 and int((rings == 0).sum()) == 92
    pos = sa.visual.ConcentricCausal(35).positions(35 + 576 + 3)
    assert pos[35 + 576:].tolist() == [35 + 12, 35 + 13, 35 + 14]   # the spec's s+12, s+13, ...


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cca_attention(backend, dtype):
    device, name = backend
    cca = sa.visual.ConcentricCausal(9, (10, 10), block_size=64)
    q, k, v = attention_inputs(2, 4, 2, 200, 200, 32, dtype, device)          # GQA, batch 2
    lay = cca.layout(200, 200, device)
    assert torch.equal(lay.to_dense_mask()[0, 0].cpu(), naive.cca_mask(9, (10, 10), 200))
    check_attention(q, k, v, lay, name)


def test_cca_attention_suffix_queries(backend):
    """Lq < Lk (queries are the last Lq tokens, starting inside the image), awkward lengths."""
    device, name = backend
    cca = sa.visual.ConcentricCausal(4, (9, 9), block_size=64)
    q, k, v = attention_inputs(1, 2, 1, 63, 97, 16, torch.float32, device)
    check_attention(q, k, v, cca.layout(63, 97, device), name)


def _compare_padded(q, k, v, pattern, kpm, name):
    """sparse_attention with a pattern + key_padding_mask against the float64 oracle (out, lse, grads)."""
    out, lse = sa.sparse_attention(q, k, v, pattern, key_padding_mask=kpm, return_lse=True)
    assert sa.last_backend() == name
    dout = torch.randn_like(out)
    grads = torch.autograd.grad((out.float() * dout.float()).sum(), (q, k, v))
    mask = pattern.dense_mask(q.shape[2], k.shape[2]).to(q.device)
    res = {}
    for dt in (torch.float64, q.dtype):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        o, l = sa.reference.attention(*leaves, mask=mask, key_padding_mask=kpm, return_lse=True, dtype=dt)
        res[dt] = (o, l, *torch.autograd.grad((o.double() * dout.double()).sum(), leaves))
    ref, base = res[torch.float64], res[q.dtype]
    assert_oracle("out", out, ref[0], base[0])
    assert torch.equal(torch.isinf(lse).cpu(), torch.isinf(ref[1]).cpu())
    for n, g, r, b in zip(("dq", "dk", "dv"), grads, ref[2:], base[2:]):
        assert_oracle(n, g, r, b)
    return out, lse, grads


def test_cca_rows_seeing_nothing(backend):
    """Key padding composes with the position rule; a row whose visible keys are all padding gives
    0 and LSE -inf, with zero gradients."""
    device, name = backend
    cca = sa.visual.ConcentricCausal(3, (8, 8), block_size=64)
    q, k, v = attention_inputs(2, 2, 2, 100, 100, 16, torch.float32, device)
    kpm = torch.rand(2, 100, device=device) < 0.8
    ring0 = 3 + (sa.visual.concentric_rings((8, 8), device) == 0).nonzero().squeeze(1)
    kpm[0, :3] = False                       # text rows 0..2 of batch 0 see nothing
    kpm[0, ring0] = False                    # ring 0 dropped: ring-0 image rows see nothing either
    out, lse, grads = _compare_padded(q, k, v, cca, kpm, name)
    assert torch.all(out[0, :, :3] == 0) and torch.all(torch.isinf(lse[0, :, :3]))
    assert torch.all(out[0, :, ring0] == 0) and torch.all(grads[0][0, :, ring0] == 0)


def test_cca_decode():
    """Decode of tokens after the image is causal attention; inside the image it is refused."""
    cca = sa.visual.ConcentricCausal(2, (6, 6), block_size=64)
    q = randn(2, 4, 3, 16)
    kc, vc = randn(2, 2, 120, 16), randn(2, 2, 120, 16)
    lens = torch.tensor([120, 50], dtype=torch.int32, device=DEVICE)
    got = sa.decode_attention(q, kc, vc, cca, cache_seqlens=lens)
    want = sa.decode_attention(q, kc, vc, cache_seqlens=lens)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    ref = sa.reference.decode_attention(q, kc, vc, cache_seqlens=lens)
    assert_oracle("decode", got, ref, sa.reference.decode_attention(q, kc, vc, cache_seqlens=lens, dtype=q.dtype))
    with pytest.raises(ValueError, match="Lk"):
        cca.decode_layout(1, 30)


# ----------------------------------------------------------------------------- ModalityMutual
MM_CASES = [(3, 100, 140, 160, 160), (10, 80, 200, 250, 97), (0, 64, 64, 130, 130), (5, 50, 0, 120, 1),
            (100, 30, 300, 200, 63), (0, 128, 256, 256, 256), (64, 64, 192, 256, 256), (7, 0, 50, 60, 60)]


@pytest.mark.parametrize("s,n,qe,Lk,Lq", MM_CASES)
def test_modality_mutual_mask(s, n, qe, Lk, Lq):
    mm = sa.visual.ModalityMutual(s, n, qe, block_size=64)
    ref = naive.modality_mutual_mask(s, n, qe, Lk)[Lk - Lq:]
    assert torch.equal(mm.dense_mask(Lq, Lk)[0, 0], ref)
    lay = mm.layout(Lq, Lk)
    assert torch.equal(lay.to_dense_mask()[0, 0].cpu(), ref)
    _assert_minimal(lay, ref)


def test_modality_mutual_more_queries_than_keys():
    """Lq > Lk: the first rows sit before token 0 and see nothing (as every pattern here)."""
    mm = sa.visual.ModalityMutual(20, 100, 150, block_size=64)
    m = mm.layout(250, 200).to_dense_mask()[0, 0].cpu()
    assert not m[:50].any()
    assert torch.equal(m[50:], naive.modality_mutual_mask(20, 100, 150, 200))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_modality_mutual_attention(backend, dtype):
    device, name = backend
    mm = sa.visual.ModalityMutual(10, 100, 170, block_size=64)
    q, k, v = attention_inputs(2, 4, 2, 200, 200, 32, dtype, device)
    check_attention(q, k, v, mm.layout(200, 200, device), name)


@pytest.mark.parametrize("Lq,Lk", [(63, 97), (130, 100)])
def test_modality_mutual_awkward(backend, Lq, Lk):
    """Suffix queries (Lq < Lk) and rows seeing nothing (Lq > Lk), GQA 4:1, block 128."""
    device, name = backend
    mm = sa.visual.ModalityMutual(5, 40, 80, block_size=128)
    q, k, v = attention_inputs(1, 4, 1, Lq, Lk, 16, torch.float32, device)
    out, lse, _ = check_attention(q, k, v, mm.layout(Lq, Lk, device), name)
    if Lq > Lk:
        assert torch.all(out[:, :, :Lq - Lk] == 0) and torch.all(torch.isinf(lse[:, :, :Lq - Lk]))


def test_modality_mutual_with_padding(backend):
    device, name = backend
    mm = sa.visual.ModalityMutual(4, 60, 90, block_size=64)
    q, k, v = attention_inputs(2, 2, 1, 100, 100, 16, torch.float32, device)
    kpm = torch.rand(2, 100, device=device) < 0.7
    kpm[1, :1] = False                                         # row 0 of batch 1 sees nothing
    out, lse, _ = _compare_padded(q, k, v, mm, kpm, name)
    assert torch.all(out[1, :, 0] == 0)


def test_modality_mutual_decode():
    """Decode of the last rows (some inside the image: they see the question) against the oracle
    with the dense definition, one length and ragged lengths."""
    mm = sa.visual.ModalityMutual(2, 40, 60, block_size=64)
    q = randn(2, 4, 3, 16)
    kc, vc = randn(2, 2, 100, 16), randn(2, 2, 100, 16)
    for lens in (None, torch.tensor([100, 41], dtype=torch.int32, device=DEVICE)):
        got = sa.decode_attention(q, kc, vc, mm, cache_seqlens=lens)
        for b in range(2):
            n = 100 if lens is None else int(lens[b])
            mask = mm.dense_mask(3, n).to(DEVICE)
            ref = sa.reference.attention(q[b:b + 1], kc[b:b + 1, :, :n], vc[b:b + 1, :, :n], mask=mask)
            base = sa.reference.attention(q[b:b + 1], kc[b:b + 1, :, :n], vc[b:b + 1, :, :n], mask=mask, dtype=q.dtype)
            assert_oracle(f"decode b={b}", got[b:b + 1], ref, base)
    # image rows 38..41 of a 45-token cache would see the cached question tokens 42..44: not causal
    with pytest.raises(ValueError, match="Lk"):
        mm.decode_layout(7, 45)
    assert mm.decode_layout(7, 42) is not None and mm.decode_layout(3, 70) is not None


# ----------------------------------------------------------------------------- long L, caching
def test_layouts_at_32k_without_dense_masks():
    """LLaVA-like prompt at 32K tokens: both layouts build in O(listed tiles) (no Lq x Lk tensor)."""
    L = 32768
    t = time.perf_counter()
    mm = sa.visual.ModalityMutual(35, 576, 700).layout(L, L)
    cca = sa.visual.ConcentricCausal(35).layout(L, L)
    assert time.perf_counter() - t < 30
    nq = L // 128
    assert int(mm.kv_num_blocks.sum() + mm.full_kv_num_blocks.sum()) == nq * (nq + 1) // 2 + 9  # + the rectangle's:
    # image rows 35..610 (query tiles 0..4) x question 611..699 (key tiles 4, 5): 4 x 2 + 1 above the diagonal
    # CCA: image tokens 35..610 share positions 35..46, so query tiles 0..3 also see key tiles up to 4
    assert int(cca.kv_num_blocks.sum() + cca.full_kv_num_blocks.sum()) == nq * (nq + 1) // 2 + 4 + 3 + 2 + 1
    assert mm.bits.shape[0] <= nq + 10


def test_layout_is_cached():
    mm = sa.visual.ModalityMutual(3, 40, 60, block_size=64)
    assert mm.layout(100, 100) is mm.layout(100, 100)
    assert 0 < mm.density(100) < 1


# ----------------------------------------------------------------------------- errors
def test_errors():
    with pytest.raises(TypeError, match="image_start"):
        sa.visual.ConcentricCausal(1.5)
    with pytest.raises(ValueError, match="image_start"):
        sa.visual.ConcentricCausal(-1)
    with pytest.raises(TypeError, match="grid"):
        sa.visual.ConcentricCausal(0, grid=24)
    with pytest.raises(ValueError, match=r"grid\[1\]"):
        sa.visual.ConcentricCausal(0, grid=(24, 0))
    with pytest.raises(ValueError, match="block_size"):
        sa.visual.ConcentricCausal(0, block_size=32)
    with pytest.raises(ValueError, match="Lq"):
        sa.visual.ConcentricCausal(0, (4, 4), block_size=64).layout(20, 10)
    with pytest.raises(ValueError, match="L"):
        sa.visual.ConcentricCausal(0).positions(0)
    with pytest.raises(ValueError, match="question_end"):
        sa.visual.ModalityMutual(0, 10, -1)
    with pytest.raises(TypeError, match="image_len"):
        sa.visual.ModalityMutual(0, None, 5)
    with pytest.raises(ValueError, match="Lk"):
        sa.visual.ModalityMutual(0, 10, 20, block_size=64).layout(10, 0)
