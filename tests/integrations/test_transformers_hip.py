"""``sa.HiP`` as a per-layer pattern of the Hugging Face integration (sparseattn.integrations.
transformers), on a tiny Llama built from a config (random weights, no downloads): prefill logits
against transformers' eager attention with the HiP masks the layer actually used added (right- and
left-padded batches; fails if the padding is dropped), greedy generate() whose every decode step
equals the float64 oracle on that step's mask with the refresh schedule carried across steps (the
state kept on the module, reset by a new prefill), static and dynamic caches alike, and the
refusals."""
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")   # the [hf] extra (CI installs it)

import sparseattn as sa                                                    # noqa: E402
from sparseattn.integrations import transformers as sat                    # noqa: E402
from sparseattn.ops.hip import naive                                       # noqa: E402
from sparseattn.ops.hip.config import query_positions                      # noqa: E402
from transformers import AttentionInterface                                # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, eager_mask  # noqa: E402
from utils import DEVICE, assert_oracle                                    # noqa: E402

import test_transformers                                                   # noqa: E402  (its batch())

# window 4, sinks 2, 4 selected keys: a real search from position 10 on (3 rounds at L = 24)
HIP = sa.HiP(mask_k=4, block_size_q=16, block_stride_q=2, block_size_k=2, block_stride_k=1, window=4, sinks=2,
             refresh_interval=2)
NAME = sat.register("sparseattn_test_hip", pattern=lambda i, module: None if i < 1 else HIP)
L, PAD, NEW = 24, 5, 4
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64, initializer_range=0.1)


def build(impl, dtype=torch.float32):
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).to(device=DEVICE, dtype=dtype).eval()
    m.set_attn_implementation(impl)
    return m


def batch(side):
    return test_transformers.batch(side, L, PAD)


def hip_log(model):
    return model.model.layers[1].self_attn.__dict__.get("sparseattn_hip_log", [])


def eager_with(keep, layer=1):
    """transformers' eager attention (softmax in the inputs' dtype) with ``keep`` [B, H, Lq, Lk]
    ANDed into the mask of ``layer``."""
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if module.layer_idx == layer:
            attention_mask = attention_mask.masked_fill(~keep.to(attention_mask.device), torch.finfo(query.dtype).min)
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        p = torch.softmax(query @ key.transpose(2, 3) * scaling + attention_mask, dim=-1)
        return (p @ value).transpose(1, 2).contiguous(), p
    return attention


def _prefill_check(model, ids, mask):
    """The logits of ``model`` against eager with the attended set of the HiP mask its layer 1
    recorded (float64 oracle, float32 baseline); returns that attended set."""
    valid = mask.bool()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits[valid]
    rec = hip_log(model)[-1]
    assert rec["kind"] == "prefill" and torch.equal(rec["key_padding_mask"], valid)
    keep = naive.attended(rec["mask"], HIP, L, L, key_padding_mask=valid)
    for impl, fn in (("test_hip_eager", eager_with(keep)),):
        AttentionInterface.register(impl, fn)
        AttentionMaskInterface.register(impl, eager_mask)
    with torch.no_grad():
        ref = build("test_hip_eager", torch.float64)(input_ids=ids, attention_mask=mask).logits[valid]
        base = build("test_hip_eager")(input_ids=ids, attention_mask=mask).logits[valid]
    assert_oracle("HiP layer logits", out, ref, base)
    return rec, keep


@pytest.mark.parametrize("side", ["right", "left"])
def test_prefill_matches_eager_with_the_layers_hip_mask(side, monkeypatch):
    monkeypatch.setattr(sat, "RECORD_HIP", True)
    ids, mask = batch(side)
    rec, keep = _prefill_check(build(NAME), ids, mask)
    valid = mask.bool()
    # the search ran, and it matters: real rows lose real keys to HiP
    causal = torch.ones(L, L, dtype=torch.bool, device=DEVICE).tril() & valid[:, None, None, :]
    assert (causal & ~keep.to(DEVICE))[valid[:, None, :].expand(2, 4, L)].any()
    assert int(rec["mask"].counts.max()) == HIP.k_blocks
    # the layer's mask is the oracle's search on the layer's own q, k (where no near-tie decides)
    ref = naive.hip_mask_scores(rec["q"].cpu(), rec["k"].cpu(), HIP, key_padding_mask=valid.cpu())
    clear = ref.margin > 1e-4
    same = (rec["mask"].indices.cpu() == ref.mask.indices).all(-1) & (rec["mask"].counts.cpu() == ref.mask.counts)
    assert clear.float().mean() > 0.5 and not (clear & ~same).any()
    if side == "left":
        # dropping the padding in the HiP layer (sinks at the padding, padded keys attended) fails
        def drop(fn):
            return lambda *a, key_padding_mask=None, **kw: fn(*a, **kw)
        monkeypatch.setattr(sat, "hip_mask", drop(sa.hip_mask))
        monkeypatch.setattr(sat, "hip_attention", drop(sa.hip_attention))
        with pytest.raises(AssertionError):
            _prefill_check(build(NAME), ids, mask)


def _generate(model, ids, mask, **kw):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0, **kw)
    return out.sequences, torch.stack(out.logits)


def test_generate_decode_steps_match_the_oracle(monkeypatch):
    """Left-padded greedy generation: every decode step of the HiP layer equals the float64 oracle
    on that step's mask and position (padding as HiP's key padding), the state is carried (one
    refresh every refresh_interval steps, the refresh mask the oracle's search on the kept rows plus
    the current one), a second generate() resets it (same tokens), and a static cache gives the
    dynamic cache's tokens and logits. On the PyTorch CPU path (the kernels' prefill: the test above;
    their decode: tests/ops/hip), for the interpreter's time."""
    monkeypatch.setattr(sat, "RECORD_HIP", True)
    if DEVICE == "cpu":
        monkeypatch.setenv("SPARSEATTN_CPU_PATH", "1")
    ids, mask = batch("left")
    valid = mask.bool()
    model = build(NAME)
    seq, logits = _generate(model, ids, mask)
    log = hip_log(model)
    assert [r["kind"] for r in log] == ["prefill"] + ["decode"] * (NEW - 1)
    rows = []
    for step, rec in enumerate(log[1:]):
        st, q, k, v = rec["state"], rec["q"].cpu(), rec["k"].cpu(), rec["v"].cpu()
        Lk = k.shape[2]
        assert Lk == L + step + 1 and rec["cache_seqlens"] is None
        pad = torch.cat((valid.cpu(), torch.ones(2, step + 1, dtype=torch.bool)), 1)
        assert torch.equal(rec["key_padding_mask"].cpu(), pad)
        assert st.step == step + 1 and st.refreshed == (step % HIP.refresh_interval == 0)
        rows.append(q)
        if st.refreshed:
            block = torch.cat(rows[-HIP.refresh_interval:], 2)
            est = naive.hip_mask_scores(block, k, HIP, q_pos=query_positions(2, block.shape[2], Lk, None, "cpu"),
                                        key_padding_mask=pad)
            clear = est.margin > 1e-4
            same = (st.indices.cpu() == est.mask.indices).all(-1)
            assert not (clear & ~same).any()
        mask_ = sa.HiPMask(st.indices.cpu(), st.counts.cpu(), HIP, (1, Lk))
        qpos = query_positions(2, 1, Lk, None, "cpu")
        ref = naive.hip_attention(q, k, v, HIP, mask_, q_pos=qpos, key_padding_mask=pad)
        keep = naive.attended(mask_, HIP, 1, Lk, qpos, pad)
        assert (keep.sum(-1) < pad.sum(-1)[:, None, None]).all()             # HiP drops real keys here
        base = sa.reference.attention(q, k, v, mask=keep, dtype=torch.float32)
        assert_oracle(f"decode step {step}", rec["out"].cpu(), ref, base)
    # the tokens are the greedy choice of the logits the steps gave
    assert torch.equal(seq[:, L:], logits.argmax(-1).T)
    seq2, logits2 = _generate(model, ids, mask)
    assert torch.equal(seq2, seq) and torch.equal(logits2, logits)
    assert [r["state"].step for r in hip_log(model)[NEW + 1:]] == list(range(1, NEW))   # reset by the prefill
    seq3, logits3 = _generate(build(NAME), ids, mask, cache_implementation="static")
    assert torch.equal(seq3, seq)
    torch.testing.assert_close(logits3, logits, atol=1e-5, rtol=1e-5)


def test_refusals_and_state_rules():
    module = types.SimpleNamespace(is_causal=True, layer_idx=3, sliding_window=None)
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(1, 2, 1, 16, generator=g), torch.randn(1, 1, 40, 16, generator=g), \
        torch.randn(1, 1, 40, 16, generator=g)
    with pytest.raises(ValueError, match="not causal"):
        sat.attention_forward(types.SimpleNamespace(is_causal=False, layer_idx=0), q, k, v, None, pattern=HIP)
    with pytest.raises(ValueError, match="softcap: HiP"):
        sat.attention_forward(module, q, k, v, None, softcap=30.0, pattern=HIP)
    with pytest.raises(ValueError, match="dropout: HiP"):
        sat.attention_forward(module, q, k, v, None, dropout=0.1, pattern=HIP)
    with pytest.raises(ValueError, match="sliding window"):
        sat.attention_forward(module, q, k, v, None, sliding_window=8, pattern=HIP)
    with pytest.raises(ValueError, match="attention_mask: layer 3 runs HiP"):
        sat.attention_forward(module, q, k, v, torch.zeros(1, 1, 1, 40), pattern=HIP)
    with pytest.raises(TypeError, match="sparseattn.HiP"):
        sat.register("sparseattn_test_bad", pattern="hip")
    # decode steps: the state carries over only to the step right after
    out, _ = sat.attention_forward(module, q, k, v, None, pattern=HIP)
    assert module._sparseattn_hip_state[0].step == 1
    sat.attention_forward(module, q, k, v, None, pattern=HIP)       # the same length again: not the next step
    assert module._sparseattn_hip_state[0].step == 1
    k2, v2 = torch.cat((k, k[:, :, :1]), 2), torch.cat((v, v[:, :, :1]), 2)
    sat.attention_forward(module, q, k2, v2, None, pattern=HIP)
    assert module._sparseattn_hip_state[0].step == 2
    sat.attention_forward(module, torch.randn(1, 2, 20, 16, generator=g), k2, v2, None, pattern=HIP)   # prefill
    assert "_sparseattn_hip_state" not in module.__dict__
    torch.testing.assert_close(out.transpose(1, 2), sa.hip_decode(q, k, v, HIP)[0])


def test_torch_compile_fullgraph_prefill(monkeypatch):
    """The HiP layer's prefill (mask search, attention, padding, the state reset) compiles without a
    graph break; a decode state left on the module is dropped inside the graph too. (The custom ops
    trace alike on both backends: the CPU path, for the interpreter's time.)"""
    if DEVICE == "cpu":
        monkeypatch.setenv("SPARSEATTN_CPU_PATH", "1")
    torch._dynamo.reset()
    model = build(NAME)
    ids, mask = batch("left")
    attn = model.model.layers[1].self_attn

    def forward(ids, mask):
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    with torch.no_grad():
        eager = forward(ids, mask)
        attn._sparseattn_hip_state = ("stale", 0)
        compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")(ids, mask)
    valid = mask.bool()
    assert torch.allclose(compiled[valid], eager[valid], atol=1e-6, rtol=1e-5)
    assert "_sparseattn_hip_state" not in attn.__dict__
