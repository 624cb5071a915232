"""BlockLayout: lists, full/partial split, transposed lists, broadcast, dense mask, validation."""
import math

import pytest
import torch

import sparseattn as sa


def _definition(block_mask, bq, bk, lq, lk, causal):
    """Element mask written independently of the library: tile (i // bq, j // bk) listed, in
    bounds, and j <= i + offset when causal."""
    bl, hl = block_mask.shape[:2]
    out = torch.zeros(bl, hl, lq, lk, dtype=torch.bool)
    off = {None: None, "top_left": 0, "bottom_right": lk - lq}[causal]
    for i in range(lq):
        for j in range(lk):
            if off is not None and j > i + off:
                continue
            out[:, :, i, j] = block_mask[:, :, i // bq, j // bk]
    return out


def _rows(num, idx):
    return [sorted(idx[..., r, : num[..., r]].tolist()) for r in range(num.shape[-1])]


@pytest.mark.parametrize("shape", [(1, 1), (2, 1), (1, 3), (2, 3)])
@pytest.mark.parametrize("causal", [None, "top_left", "bottom_right"])
@pytest.mark.parametrize("lens,bs", [((200, 200), (64, 64)), ((97, 250), (32, 64)), ((130, 63), (64, 16))])
def test_lists_match_definition(shape, causal, lens, bs):
    lq, lk = lens
    bq, bk = bs
    nq, nk = math.ceil(lq / bq), math.ceil(lk / bk)
    bm = torch.rand(*shape, nq, nk) < 0.6
    bm[..., 0, :] = False  # an empty query-block row
    layout = sa.BlockLayout.from_block_mask(bm, bs, lens, causal=causal)
    dense = _definition(bm, bq, bk, lq, lk, causal)
    assert torch.equal(layout.to_dense_mask(), dense)
    assert layout.density == pytest.approx(dense.float().mean().item())
    for lists in ((layout.kv_num_blocks, layout.kv_indices), (layout.full_kv_num_blocks, layout.full_kv_indices),
                  (layout.q_num_blocks, layout.q_indices), (layout.full_q_num_blocks, layout.full_q_indices)):
        assert lists[0].dtype == torch.int32 and lists[1].dtype == torch.int32
        assert tuple(lists[0].shape[:2]) == shape
    for b in range(shape[0]):
        for h in range(shape[1]):
            for r in range(nq):
                part = layout.kv_indices[b, h, r, : layout.kv_num_blocks[b, h, r]].tolist()
                full = layout.full_kv_indices[b, h, r, : layout.full_kv_num_blocks[b, h, r]].tolist()
                assert part == sorted(part) and full == sorted(full), "lists must be sorted"
                assert not set(part) & set(full)
                for c in range(nk):
                    tile = dense[b, h, r * bq:(r + 1) * bq, c * bk:(c + 1) * bk]
                    whole = tile.shape == (bq, bk) and bool(tile.all())
                    if c in full:
                        assert whole, f"full tile {(r, c)} is not fully attended"
                    elif tile.any():
                        assert c in part, f"tile {(r, c)} with attended pairs is not listed"
                    else:
                        assert c not in part, f"tile {(r, c)} with nothing attended is listed"
            # Transposed lists hold the same tiles.
            for c in range(nk):
                tp = layout.q_indices[b, h, c, : layout.q_num_blocks[b, h, c]].tolist()
                tf = layout.full_q_indices[b, h, c, : layout.full_q_num_blocks[b, h, c]].tolist()
                assert tp == sorted(tp) and tf == sorted(tf)
                assert set(tp) == {r for r in range(nq) if c in layout.kv_indices[b, h, r, : layout.kv_num_blocks[b, h, r]].tolist()}
                assert set(tf) == {r for r in range(nq) if c in layout.full_kv_indices[b, h, r, : layout.full_kv_num_blocks[b, h, r]].tolist()}


@pytest.mark.parametrize("causal", [None, "top_left", "bottom_right"])
@pytest.mark.parametrize("shape", [(1, 1), (2, 3)])
def test_from_indices_matches_from_block_mask(causal, shape):
    lq, lk, bs = 300, 170, (64, 32)
    nq, nk = 5, 6
    bm = torch.rand(*shape, nq, nk) < 0.5
    counts = torch.zeros(*shape, nq, dtype=torch.int32)
    idx = torch.zeros(*shape, nq, nk + 1, dtype=torch.int64)
    for b in range(shape[0]):
        for h in range(shape[1]):
            for r in range(nq):
                cols = torch.nonzero(bm[b, h, r]).flatten().flip(0)  # any order is accepted
                if len(cols):
                    cols = torch.cat([cols, cols[:1]])  # and duplicates
                idx[b, h, r, : len(cols)] = cols
                counts[b, h, r] = len(cols)
    a = sa.BlockLayout.from_indices(counts, idx, bs, (lq, lk), causal=causal)
    b = sa.BlockLayout.from_block_mask(bm, bs, (lq, lk), causal=causal)
    assert torch.equal(a.to_dense_mask(), b.to_dense_mask())
    assert a.causal_offset == b.causal_offset
    for x, y in zip(a.lists(), b.lists()):
        assert torch.equal(x, y)


def test_from_indices_is_linear_in_listed_blocks():
    """4M tokens in 64-blocks, a band of 2 blocks per row: an nQ x nK mask would be 4.3 G
    elements; the lists are built from the listed blocks alone (padded to the widest row)."""
    nq = 1 << 16
    rows = torch.arange(nq)
    idx = torch.stack([(rows - 1).clamp(min=0), rows, rows], -1)[None, None].int()
    counts = torch.full((1, 1, nq), 3, dtype=torch.int32)
    layout = sa.BlockLayout.from_indices(counts, idx, 64, (nq * 64, nq * 64), causal="top_left")
    assert int(layout.kv_num_blocks.sum() + layout.full_kv_num_blocks.sum()) == 2 * nq - 1  # duplicates dropped
    assert torch.all(layout.kv_num_blocks == 1)  # the diagonal block is partial (causal)
    assert layout.full_kv_indices.shape[-1] == 1 and layout.q_indices.shape[-1] == 1
    assert torch.equal(layout.full_kv_indices[0, 0, 1:, 0], rows[:-1].int())


def test_element_mask_and_partial_tiles():
    lq, lk = 100, 90
    mask = torch.rand(1, 2, lq, lk) < 0.5
    mask[:, :, :, :32] = True   # whole tiles attended
    mask[:, :, :, 64:] = False  # whole tiles skipped
    bm = torch.ones(1, 2, 4, 3, dtype=torch.bool)
    layout = sa.BlockLayout.from_block_mask(bm, 32, (lq, lk), mask=mask)
    assert torch.equal(layout.to_dense_mask(), mask)
    assert layout.density == pytest.approx(mask.float().mean().item())


def test_default_seq_lens_and_repr():
    layout = sa.BlockLayout.from_block_mask(torch.ones(1, 1, 2, 3, dtype=torch.bool), (16, 32))
    assert layout.seq_lens == (32, 96)
    assert layout.density == 1.0
    assert "BlockLayout" in repr(layout)


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(block_mask=torch.ones(1, 1, 2, 2, dtype=torch.int32)), TypeError, "torch.bool"),
    (dict(block_mask=torch.ones(2, 2, dtype=torch.bool)), ValueError, "4 dims"),
    (dict(block_size=48), ValueError, "powers of two"),
    (dict(block_size=8), ValueError, "powers of two"),
    (dict(seq_lens=(200, 128)), ValueError, "blocks for seq_lens"),
    (dict(causal="diagonal"), ValueError, "causal"),
    (dict(mask=torch.ones(1, 1, 10, 10, dtype=torch.bool)), ValueError, "mask"),
    (dict(mask=torch.ones(1, 1, 128, 128)), TypeError, "bool"),
])
def test_from_block_mask_rejects(kwargs, exc, words):
    args = dict(block_mask=torch.ones(1, 1, 2, 2, dtype=torch.bool), block_size=64, seq_lens=(128, 128))
    args.update(kwargs)
    with pytest.raises(exc, match=words):
        sa.BlockLayout.from_block_mask(args.pop("block_mask"), **args)


def test_from_indices_rejects_out_of_range():
    counts = torch.tensor([[[1, 2]]], dtype=torch.int32)
    idx = torch.tensor([[[[0, 0], [1, 2]]]], dtype=torch.int32)  # block 2 does not exist (nK = 2)
    with pytest.raises(ValueError, match=r"kv_indices: expected block indices in \[0, 2\)"):
        sa.BlockLayout.from_indices(counts, idx, 64, (128, 128))
    with pytest.raises(ValueError, match="kv_num_blocks"):
        sa.BlockLayout.from_indices(torch.tensor([[[3, 0]]], dtype=torch.int32), idx, 64, (128, 128))
    with pytest.raises(TypeError, match="kv_indices"):
        sa.BlockLayout.from_indices(counts, idx.float(), 64, (128, 128))
    with pytest.raises(ValueError, match="kv_num_blocks: expected shape"):
        sa.BlockLayout.from_indices(counts, idx, 64, (300, 128))


def _window_definition(lq, lk, offset, window, sinks):
    out = torch.zeros(lq, lk, dtype=torch.bool)
    for i in range(lq):
        for j in range(lk):
            out[i, j] = j <= i + offset and (i + offset - j < window or j < sinks)
    return out


@pytest.mark.parametrize("window,sinks", [(1, 0), (7, 0), (40, 3), (100, 70), (1000, 0)])
@pytest.mark.parametrize("lens,causal", [((130, 130), "top_left"), ((50, 170), "bottom_right"), ((170, 90), "bottom_right")])
def test_sliding_window_kinds(window, sinks, lens, causal):
    lq, lk = lens
    bs = (32, 16)
    nq, nk = math.ceil(lq / bs[0]), math.ceil(lk / bs[1])
    layout = sa.BlockLayout.from_block_mask(torch.ones(1, 1, nq, nk, dtype=torch.bool), bs, lens, causal=causal,
                                            window=window, sinks=sinks)
    offset = 0 if causal == "top_left" else lk - lq
    dense = _window_definition(lq, lk, offset, window, sinks)
    assert torch.equal(layout.to_dense_mask()[0, 0], dense)
    assert layout.density == pytest.approx(dense.float().mean().item())
    # Tiles with nothing visible are not listed; full tiles are entirely visible.
    b, h, r, c = torch.ones(1, 1, nq, nk, dtype=torch.bool).nonzero(as_tuple=True)
    ent = sa.BlockLayout.from_entries(b, h, r, c, shape=(1, 1), block_size=bs, seq_lens=lens, causal=causal,
                                      window=window, sinks=sinks)
    for x, y in zip(ent.lists(), layout.lists()):
        assert torch.equal(x, y)
    for row in range(nq):
        for col in layout.full_kv_indices[0, 0, row, : layout.full_kv_num_blocks[0, 0, row]].tolist():
            assert dense[row * bs[0]:(row + 1) * bs[0], col * bs[1]:(col + 1) * bs[1]].all()
        listed = set(layout.kv_indices[0, 0, row, : layout.kv_num_blocks[0, 0, row]].tolist()) | \
            set(layout.full_kv_indices[0, 0, row, : layout.full_kv_num_blocks[0, 0, row]].tolist())
        for col in range(nk):
            assert (col in listed) == bool(dense[row * bs[0]:(row + 1) * bs[0], col * bs[1]:(col + 1) * bs[1]].any())


@pytest.mark.parametrize("causal", [None, "bottom_right"])
def test_from_entries_bits(causal):
    """Tile bitmasks: all-False tiles dropped, all-True tiles full, mixed tiles partial with bits;
    duplicates OR their bits; the dense mask is the AND of kinds and bits."""
    lq, lk, bs = 100, 80, (32, 32)
    nq, nk = 4, 3
    bl, hl = 2, 3
    n = 40
    b, h = torch.randint(0, bl, (n,)), torch.randint(0, hl, (n,))
    r, c = torch.randint(0, nq, (n,)), torch.randint(0, nk, (n,))
    bits = torch.rand(n, *bs) < 0.5
    bits[:5] = True
    bits[5:10] = False
    layout = sa.BlockLayout.from_entries(b, h, r, c, shape=(bl, hl), block_size=bs, seq_lens=(lq, lk),
                                         causal=causal, bits=bits)
    expected = torch.zeros(bl, hl, nq * bs[0], nk * bs[1], dtype=torch.bool)
    for e in range(n):
        expected[b[e], h[e], r[e] * 32:(r[e] + 1) * 32, c[e] * 32:(c[e] + 1) * 32] |= bits[e]
    expected = expected[..., :lq, :lk]
    if causal:
        expected &= torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
    assert torch.equal(layout.to_dense_mask(), expected)
    assert layout.density == pytest.approx(expected.float().mean().item())
    assert layout.bits is not None and layout.bits.dtype == torch.int32 and layout.bits.shape[1:] == (32, 1)
    ids = layout.kv_bit_ids[torch.arange(layout.kv_indices.shape[-1]) < layout.kv_num_blocks[..., None]]
    assert (ids >= 0).any() and torch.unique(ids[ids >= 0]).numel() == int((ids >= 0).sum())


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(window=0, causal="top_left"), ValueError, "window"),
    (dict(window=4), ValueError, "window: expected causal"),
    (dict(window=4, causal="top_left", sinks=-1), ValueError, "sinks"),
    (dict(sinks=2), ValueError, "sinks: expected 0 without a window"),
])
def test_window_kinds_rejected(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        sa.BlockLayout.from_block_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool), 64, (128, 128), **kwargs)


def test_from_entries_rejects():
    z = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"c: expected block indices in \[0, 2\)"):
        sa.BlockLayout.from_entries(z, z, z, torch.tensor([0, 1, 2]), shape=(1, 1), block_size=64, seq_lens=(128, 128))
    with pytest.raises(ValueError, match="bits: expected bool"):
        sa.BlockLayout.from_entries(z, z, z, z, shape=(1, 1), block_size=64, seq_lens=(128, 128),
                                    bits=torch.ones(3, 64, 32, dtype=torch.bool))


def test_from_entries_bits_index_matches_full_bits():
    """Bits for a subset of the entries (the rest all True) equal the same bits given for all."""
    lq, lk, bs = 150, 120, (64, 32)
    b, h, r, c = (t.flatten() for t in torch.meshgrid(torch.arange(1), torch.arange(2), torch.arange(3),
                                                     torch.arange(4), indexing="ij"))
    idx = torch.tensor([0, 5, 7, 20, 5])  # 5 twice: ORed
    sub = torch.rand(len(idx), *bs) < 0.4
    full = torch.ones(b.numel(), *bs, dtype=torch.bool)
    full[idx[:4]] = sub[:4]
    full[5] |= sub[4]
    a = sa.BlockLayout.from_entries(b, h, r, c, shape=(1, 2), block_size=bs, seq_lens=(lq, lk), bits=sub,
                                    bits_index=idx)
    e = sa.BlockLayout.from_entries(b, h, r, c, shape=(1, 2), block_size=bs, seq_lens=(lq, lk), bits=full)
    assert torch.equal(a.to_dense_mask(), e.to_dense_mask())
    assert torch.equal(a.bits, e.bits)
    for x, y in zip(a.lists(), e.lists()):
        assert torch.equal(x, y)


def test_sync_free_lists_are_grid_wide_and_equivalent():
    """sync_free: lists as wide as the block grid (no host read of the widest row), the same
    entries, and the same attention."""
    torch.manual_seed(0)
    bm = torch.rand(2, 3, 5, 7) < 0.4
    bm[0, 0, 2] = False
    mask = torch.rand(2, 3, 300, 420) < 0.6
    kw = dict(block_size=64, seq_lens=(300, 420), causal="bottom_right", mask=mask, partial_blocks=bm)
    lay = sa.BlockLayout.from_block_mask(bm, **kw)
    wide = sa.BlockLayout.from_block_mask(bm, sync_free=True, **kw)
    assert wide.kv_indices.shape[-1] == wide.full_kv_indices.shape[-1] == 7
    assert wide.q_indices.shape[-1] == wide.full_q_indices.shape[-1] == 5
    for name in ("kv", "full_kv", "q", "full_q"):
        n, a, b = getattr(lay, f"{name}_num_blocks"), getattr(lay, f"{name}_indices"), getattr(wide, f"{name}_indices")
        assert torch.equal(n, getattr(wide, f"{name}_num_blocks"))
        assert torch.equal(a, b[..., :a.shape[-1]]) and not b[..., a.shape[-1]:].any(), name
    assert torch.equal(lay.to_dense_mask(), wide.to_dense_mask())


@pytest.mark.parametrize("route", ["kernel", "gather"])
def test_cpu_path_gathers_only_up_to_the_longest_row(monkeypatch, route):
    """Grid-wide (sync_free) lists must not turn the CPU path's work dense: the gather path gathers,
    and the C++ kernel is handed, only up to the longest row of each kind."""
    from sparseattn.ops.attention import cpu, cpu_kernel

    monkeypatch.setenv("SPARSEATTN_CPU_PATH", "1")
    monkeypatch.setenv("SPARSEATTN_CPU_KERNEL", "1" if route == "kernel" else "0")
    widths, gather, ops = [], cpu._gather, cpu_kernel.ops()
    if route == "kernel":
        if ops is None:   # test_cpu_path_speedup.py fails where a compiler exists and the build did not
            pytest.skip(f"the CPU kernel did not build here: {cpu_kernel.unavailable_reason()}")

        class Spy:   # fwd(q, k, v, ent, counts, blocks, ...): the blocks' width in keys
            def fwd(self, *args):
                widths.append(args[5].shape[1] * 64)
                return ops.fwd(*args)

        monkeypatch.setattr(cpu_kernel, "ops", lambda: Spy())
    else:
        monkeypatch.setattr(cpu, "_gather", lambda k, v, tok, group: widths.append(tok.shape[-1]) or
                            gather(k, v, tok, group))
    bm = torch.zeros(1, 1, 4, 16, dtype=torch.bool)
    bm[..., 3] = True  # one (full) key block per query block, of 16
    lay = sa.BlockLayout.from_block_mask(bm, 64, (256, 1024), sync_free=True)
    q, k, v = (torch.randn(1, 2, n, 32) for n in (256, 1024, 1024))
    out = sa.sparse_attention(q, k, v, lay)
    assert sa.last_backend() == "cpu"
    assert widths and max(widths) <= 2 * 64, widths  # one partial-list and one full-list slot, 64 keys each
    ref = sa.reference.attention(q, k, v, mask=lay.to_dense_mask())
    assert torch.allclose(out, ref.float(), atol=1e-5)
