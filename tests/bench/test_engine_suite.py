"""The engine suite (issue 11 "Speed"): it registers, a quick CPU run writes a table with its three
case families (varlen, padding-mask SDPA, paged decode), every case's oracle check passes, a
broken op gets its cases refused, and the anchors compute what the case computes (the padded
batch, the contiguous cache, the dense mask). No timing is asserted."""
import argparse
import json

import pytest
import torch
import torch.nn.functional as F

import sparseattn as sa
from sparseattn import bench
from sparseattn.bench import engine

FAMILIES = ("varlen causal", "padding mask sdpa", "paged decode")


def _family(op):
    return next(f for f in FAMILIES if op.startswith(f))


def test_suite_is_registered():
    assert bench.SUITE_LIST["engine"] == ("engine", "engine_suite")
    assert bench.SUITES["engine"] is engine.engine_suite


def test_quick_cpu_run_writes_the_three_families(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEATTN_CPU_PATH", "1")  # restored after the test (main sets it for CPU runs)
    assert bench.main(["--suite", "engine", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    rows = json.load(open(next(tmp_path.glob("*engine.json"))))["rows"]
    md = next(tmp_path.glob("*engine.md")).read_text()
    assert {_family(r["op"]) for r in rows} == set(FAMILIES)
    for r in rows:
        assert "refused" not in r and r["ms"] > 0, r
        assert any(a and a.get("ratio", 0) > 0 for a in r["anchors"].values()), r
        assert f"| {r['op']} |" in md
    varlen = [r for r in rows if r["op"].startswith("varlen")]
    assert {r["Hkv"] for r in varlen} == {2, 1}
    for r in varlen:
        assert r["padding ratio"] > 1 and r["padded pairs ratio"] > r["padding ratio"]
        assert r["anchors"]["padded torch sdpa (cpu)"]["ratio"] > 0
        assert r["anchors"]["flex attention (document mask)"] is None        # n/a on a CPU
    pad = next(r for r in rows if r["op"].startswith("padding"))
    assert {"dense [B,1,Lq,Lk] mask (sparseattn)", "unmasked (sparseattn)"} <= set(pad["anchors"])
    assert 0.15 < pad["padding"] < 0.25
    paged = [r for r in rows if r["op"].startswith("paged")]
    assert sorted(r["page_size"] for r in paged) == [16, 64]
    assert all(r["anchors"]["contiguous decode (sparseattn)"]["ratio"] > 0 for r in paged)


def _cases(device="cpu", quick=False):
    return list(engine.engine_suite(device, quick, argparse.Namespace(lengths=None, head_dims=None)))


def test_every_case_has_a_check_that_passes(monkeypatch):
    """The oracle checks on the path a CPU bench run times (the PyTorch CPU path), forward and
    gradients; the full (not quick) CPU case list, each family's check run once."""
    monkeypatch.setenv("SPARSEATTN_CPU_PATH", "1")
    cases = _cases()
    assert {_family(c.op) for c in cases} == set(FAMILIES)
    assert {c.params["direction"] for c in cases if "direction" in c.params} == {"fwd", "fwd+bwd"}
    seen = set()
    for c in cases:
        assert c.check is not None, c.op
        if c.op not in seen:
            seen.add(c.op)
            c.check()


@pytest.mark.parametrize("name", ["varlen_attention", "scaled_dot_product_attention", "decode_attention"])
def test_broken_op_is_refused(monkeypatch, name):
    """An op off by a small constant fails its check: every case of its family is refused (and
    run_cases refuses before timing anything)."""
    monkeypatch.setenv("SPARSEATTN_CPU_PATH", "1")
    real = getattr(sa, name)
    monkeypatch.setattr(sa, name, lambda *a, **k: real(*a, **k) + 0.05)
    family = {"varlen_attention": "varlen causal", "scaled_dot_product_attention": "padding mask sdpa",
              "decode_attention": "paged decode"}[name]
    cases = [c for c in _cases(quick=True) if c.op.startswith(family)]
    for c in cases:
        c.run = c.anchors = None                       # refused cases are never timed
    rows = bench.run_cases(cases, "cpu")
    assert rows and all(r["refused"].startswith("correctness check failed:") for r in rows), rows


def test_length_mix_gpu_sizes():
    lens = engine.length_mix(engine.VARLEN_TOTAL, *engine.VARLEN_RANGE, engine.VARLEN_SEED)
    assert lens == engine.length_mix(engine.VARLEN_TOTAL, *engine.VARLEN_RANGE, engine.VARLEN_SEED)
    assert engine.VARLEN_TOTAL - 128 < sum(lens) <= engine.VARLEN_TOTAL
    assert all(128 <= n <= 8192 for n in lens)
    assert len(lens) * max(lens) / sum(lens) > 2      # a mix worth packing


def test_padded_anchor_computes_the_packed_result():
    """The padded-SDPA anchor (is_causal on right-padded sequences) gives varlen's output on every
    real row; FlexAttention's document mask is the same rule (checked here through a dense mask)."""
    g = torch.Generator().manual_seed(0)
    lens = [5, 17, 1, 30]
    total, H, Hkv, D = sum(lens), 4, 2, 16
    q = torch.randn(total, H, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(total, Hkv, D, generator=g, dtype=torch.float64) for _ in range(2))
    cu = torch.tensor([0, 5, 22, 23, 53], dtype=torch.int32)
    want = sa.reference.varlen_attention(q, k, v, cu, cu, causal=True)
    qp, kp, vp = (engine.pad_packed(t, lens, max(lens)) for t in (q, k, v))
    assert qp.shape == (4, H, 30, D)
    out = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=True)
    got = torch.cat([out[i, :, :n].transpose(0, 1) for i, n in enumerate(lens)])
    torch.testing.assert_close(got, want)
    doc = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    idx = torch.arange(total)
    doc_mask = (doc[:, None] == doc[None, :]) & (idx[None, :] <= idx[:, None])   # the suite's mask_mod
    flat = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                          attn_mask=doc_mask, enable_gqa=True)
    torch.testing.assert_close(flat[0].transpose(0, 1), want)


def test_paged_cache_holds_the_contiguous_cache(monkeypatch):
    """The pages and shuffled table of the paged case hold the contiguous anchor's cache: decode
    gives the same result on both."""
    monkeypatch.setenv("SPARSEATTN_CPU_PATH", "1")
    g = torch.Generator().manual_seed(0)
    kc = torch.randn(3, 2, 128, 16, generator=g)
    pages, table = engine.paged_cache(kc, 16, torch.Generator().manual_seed(1))
    assert pages.shape == (24, 16, 2, 16) and table.dtype == torch.int32
    assert sorted(table.flatten().tolist()) == list(range(24)) and table.flatten().tolist() != list(range(24))
    gathered = pages[table.long()].flatten(1, 2).permute(0, 2, 1, 3)       # [B, Hkv, L, D]
    assert torch.equal(gathered, kc)
    q = torch.randn(3, 4, 1, 16, generator=g)
    lens = torch.tensor([128, 40, 1], dtype=torch.int32)
    torch.testing.assert_close(sa.decode_attention(q, pages, pages, cache_seqlens=lens, block_table=table),
                               sa.decode_attention(q, kc, kc, cache_seqlens=lens))


@pytest.mark.gpu
def test_gpu_case_checks_pass(monkeypatch):
    """The GPU sizes' checks (bf16, D = 128) through the real kernels; nothing is timed (and
    FlexAttention is not set up: its dynamo settings would outlive the test)."""
    monkeypatch.setattr(engine, "flex_attention_fn", lambda device: None)
    seen = set()
    for c in _cases("cuda", quick=True):
        if c.op not in seen:
            seen.add(c.op)
            c.check()
