"""attention_stats against the float64 oracle: column sums and maxima (weighted, per head and
head-reduced), group masses, block sums; patterns, causal, GQA, awkward lengths, key padding and
positions, rows that see nothing, a given LSE; on the kernels and the CPU path."""
import pytest
import torch

import sparseattn as sa
from utils import randn


def _close(name, got, ref, rows):
    """Sums over ``rows`` probabilities: fp32 rounding grows with the number of terms."""
    assert got is not None, name
    assert got.dtype == torch.float32 and got.shape == ref.shape, (name, got.shape, ref.shape)
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    tol = 1e-6 * max(1, rows) + 1e-6
    err = (got.double().cpu() - ref.cpu()).abs().max().item()
    assert err <= tol, f"{name}: max error {err:.3g} > {tol:.3g}"


def _check(q, k, layout, expected, head_reduce="none", groups=3, weights=True, **kw):
    B, Lq, Lk = q.shape[0], q.shape[2], k.shape[2]
    w = torch.rand(B, Lq, device=q.device) if weights else None
    if w is not None:
        w[:, ::7] = 0  # rows with weight 0 are also left out of the column maxima
    kg = torch.randint(0, groups, (B, Lk), device=q.device)
    st = sa.attention_stats(q, k, layout, query_weights=w, key_groups=kg, num_groups=groups, column_max=True,
                            block_sums=True, head_reduce=head_reduce, **kw)
    assert sa.last_backend() == expected
    lay = layout if isinstance(layout, sa.BlockLayout) else layout.layout(Lq, Lk, q.device)
    ref = sa.reference.attention_stats(q, k, lay, query_weights=w, key_groups=kg, num_groups=groups,
                                       head_reduce=head_reduce, scale=kw.get("scale"))
    _close("column_sum", st.column_sum, ref["column_sum"], Lq)
    _close("column_max", st.column_max, ref["column_max"], q.shape[1])
    _close("group_mass", st.group_mass, ref["group_mass"], Lk)
    _close("block_sums", st.block_sums, ref["block_sums"], lay.block_size[0] * lay.block_size[1])
    fin = torch.isfinite(ref["lse"])
    assert torch.equal(torch.isfinite(st.lse).cpu(), fin.cpu())
    return st, ref


@pytest.mark.parametrize("Lq,Lk", [(1, 63), (97, 200), (200, 97)])
def test_random_layout_gqa(backend, Lq, Lk):
    device, name = backend
    q, k = randn(2, 4, Lq, 32, device=device), randn(2, 2, Lk, 32, device=device)
    bm = torch.rand(2, 4, -(-Lq // 64), -(-Lk // 64), device=device) < 0.6
    bm[:, :, 0, 0] = True
    _check(q, k, sa.BlockLayout.from_block_mask(bm, 64, (Lq, Lk)), name)


@pytest.mark.parametrize("head_reduce", ["mean", "sum"])
def test_head_reduction_window_sinks(backend, head_reduce):
    device, name = backend
    q, k = randn(1, 4, 150, 16, device=device), randn(1, 2, 150, 16, device=device)
    _check(q, k, sa.SlidingWindow(70, sinks=3), name, head_reduce=head_reduce)


def test_dense_causal_default_and_given_lse(backend):
    device, name = backend
    q, k = randn(2, 2, 130, 32, device=device), randn(2, 2, 130, 32, device=device)
    v = randn(2, 2, 130, 32, device=device)
    st = sa.attention_stats(q, k, is_causal=True)
    lay = sa.BlockLayout.from_block_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool, device=device), 128, (130, 130),
                                         causal="top_left")
    ref = sa.reference.attention_stats(q, k, lay)
    _close("column_sum", st.column_sum, ref["column_sum"], 130)
    # the LSE of an attention call with the same layout skips the LSE pass and gives the same sums
    _, lse = sa.sparse_attention(q, k, v, lay, return_lse=True)
    again = sa.attention_stats(q, k, lay, lse=lse)
    assert sa.last_backend() == name
    _close("column_sum (given lse)", again.column_sum, ref["column_sum"], 130)
    # a causal column j is seen by Lq - j rows: the unweighted column sums add up to Lq
    torch.testing.assert_close(st.column_sum.sum(-1), torch.full((2, 2), 130.0, device=device), atol=1e-3,
                               rtol=1e-5)


def test_key_padding_positions_and_empty_rows(backend):
    """Key padding (one batch element sees no key at all) and position-id causal: the statistics
    follow the same rules as the attention call; rows that see nothing contribute nothing."""
    device, name = backend
    Lq = Lk = 120
    q, k = randn(2, 2, Lq, 16, device=device), randn(2, 2, Lk, 16, device=device)
    pos = torch.sort(torch.randint(0, 60, (2, Lk), device=device), -1).values.to(torch.int32)
    pad = torch.rand(2, Lk, device=device) < 0.8
    pad[1] = False
    lay = sa.BlockLayout.from_positions(pos, pos, 64).with_key_padding(pad)
    st, ref = _check(q, k, lay, name)
    assert (st.column_sum[1] == 0).all() and (st.group_mass[1] == 0).all() and torch.isneginf(st.lse[1]).all()


def test_determinism(backend):
    device, _ = backend
    q, k = randn(1, 2, 200, 32, device=device), randn(1, 2, 200, 32, device=device)
    a = sa.attention_stats(q, k, is_causal=True, column_max=True, block_sums=True)
    b = sa.attention_stats(q, k, is_causal=True, column_max=True, block_sums=True)
    for x, y in zip(a, b):
        assert x is None or torch.equal(x, y)


def test_bad_input():
    q, k = randn(1, 2, 70, 16), randn(1, 2, 90, 16)
    with pytest.raises(ValueError, match="head_reduce"):
        sa.attention_stats(q, k, head_reduce="max")
    with pytest.raises(ValueError, match="lse"):
        sa.attention_stats(q, k, lse=torch.zeros(1, 2, 71, device=q.device))
    with pytest.raises(TypeError, match="lse"):
        sa.attention_stats(q, k, lse=torch.zeros(1, 2, 70, dtype=torch.float64, device=q.device))
    with pytest.raises(ValueError, match="query_weights"):
        sa.attention_stats(q, k, query_weights=torch.ones(1, 69, device=q.device))
    with pytest.raises(TypeError, match="key_groups"):
        sa.attention_stats(q, k, key_groups=torch.zeros(1, 90, device=q.device))
    with pytest.raises(ValueError, match="num_groups"):
        sa.attention_stats(q, k, key_groups=torch.zeros(1, 90, dtype=torch.int64, device=q.device), num_groups=0)
    with pytest.raises(ValueError, match="is_causal"):
        sa.attention_stats(q, k, sa.SlidingWindow(16), is_causal=True)
