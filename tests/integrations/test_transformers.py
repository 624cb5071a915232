"""attn_implementation="sparseattn" (sparseattn.integrations.transformers) on tiny Hugging Face
models built from configs (random weights, no downloads): logits, parameter gradients and greedy
generation against transformers' own "sdpa" / "eager" under the oracle rule (float64 model =
oracle, the same model in float32 = baseline), with padded batches whose padding, sliding window
and softcap change the result (so a dropped rule fails), per-layer patterns against "eager" with
the pattern's mask added, torch.compile, and the fallbacks."""
import subprocess
import sys
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")   # the [hf] extra (CI installs it)

import sparseattn as sa                                                    # noqa: E402
from sparseattn.integrations import transformers as sat                    # noqa: E402
from transformers import AttentionInterface                                # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, eager_mask  # noqa: E402
from transformers.models.llama.modeling_llama import eager_attention_forward  # noqa: E402
from utils import DEVICE, assert_oracle                                    # noqa: E402

NAME = sat.register("sparseattn")
L, PAD, NEW = 16, 5, 4   # tokens per sequence, padding tokens of the second sequence, generated tokens
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
            initializer_range=0.1)   # large enough that attention is far from uniform and softcap bites
# name -> (config, model, options, transformers' reference implementation)
MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, "sdpa"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1),
              "sdpa"),                                  # layer 0 full, layer 1 a window of 5
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=5), "sdpa"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(sliding_window=5, attn_logit_softcapping=1.0,
                                                         query_pre_attn_scalar=16), "eager"),   # sdpa: no softcap
}


def with_pattern(attention_mask, pattern, lq, lk):
    """An eager float mask [B, 1, Lq, Lk] with the pattern's dense mask added. The pattern's
    queries are the last Lq of the n keys the last query sees (n = Lk, except with a static
    cache, whose slots past the current token are empty)."""
    low = torch.finfo(attention_mask.dtype).min
    n = int((attention_mask[0, 0, -1] > low / 2).nonzero().max()) + 1
    keep = torch.nn.functional.pad(pattern.dense_mask(lq, n), (0, lk - n)).to(attention_mask.device)
    return attention_mask.masked_fill(~keep, low)


def oracle_attention(pattern=None, layer=None):
    """transformers' eager attention (scale, Gemma 2's softcap, the additive mask, softmax) with
    the softmax in the inputs' dtype, and the pattern's dense mask added on ``layer``. (The models'
    own eager code takes the softmax in float32, where a float64 mask's minimum becomes -inf and a
    fully masked padding row gives NaN: no float64 oracle.)"""
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
        if pattern is not None and module.layer_idx == layer:
            attention_mask = with_pattern(attention_mask, pattern, query.shape[2], key.shape[2])
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        s = query @ key.transpose(2, 3) * scaling
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        p = torch.softmax(s + attention_mask, dim=-1)
        return (p @ value).transpose(1, 2).contiguous(), p
    return attention


AttentionInterface.register("test_oracle", oracle_attention())
AttentionMaskInterface.register("test_oracle", eager_mask)
ORACLE = {"gemma2": "test_oracle"}   # the float64 implementation where it is not the reference's own


def build(name, impl, dtype=torch.float32, **overrides):
    """The model `name` with the same random weights for every implementation and dtype."""
    config, model, options, _ = MODELS[name]
    if dtype == torch.float64 and impl == MODELS[name][3]:
        impl = ORACLE.get(name, impl)
    torch.manual_seed(0)
    cfg = getattr(transformers, config)(**{**TINY, **options, **overrides})
    m = getattr(transformers, model)(cfg).to(device=DEVICE, dtype=dtype).eval()
    m.set_attn_implementation(impl)
    return m


def batch(side, length=L, pad=PAD):
    """Two sequences of `length` tokens; the second has `pad` padding tokens on `side`."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, slice(0, pad) if side == "left" else slice(length - pad, length)] = 0
    return ids.to(DEVICE), mask.to(DEVICE)


def logits_and_grads(model, ids, mask, weight):
    """Logits at the real tokens, and d(sum(logits * weight))/d(every parameter)."""
    valid = mask.bool()
    logits = model(input_ids=ids, attention_mask=mask).logits[valid]
    named = list(model.named_parameters())
    grads = torch.autograd.grad((logits.double() * weight).sum(), [p for _, p in named])
    return logits.detach(), {n: g for (n, _), g in zip(named, grads)}


@pytest.fixture
def no_dense_mask(monkeypatch):
    """The common paths never ask transformers for a dense [B, 1, Lq, Lk] mask."""
    def refuse(kw):
        raise AssertionError("sparseattn's mask function built a dense mask on a common path")
    monkeypatch.setattr(sat, "_dense", refuse)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", list(MODELS))
def test_logits_and_grads_match_transformers(name, side, no_dense_mask):
    ids, mask = batch(side)
    weight = torch.randn(int(mask.sum()), TINY["vocab_size"], dtype=torch.float64,
                         generator=torch.Generator().manual_seed(2)).to(DEVICE)
    ref_impl = MODELS[name][3]
    out, out_grads = logits_and_grads(build(name, NAME), ids, mask, weight)
    assert sa.last_backend() == "triton" and sa.last_fallback_reason() is None
    ref, ref_grads = logits_and_grads(build(name, ref_impl, torch.float64), ids, mask, weight)
    base, base_grads = logits_and_grads(build(name, ref_impl), ids, mask, weight)
    assert_oracle(f"{name} logits", out, ref, base)
    for n in ref_grads:
        assert_oracle(f"{name} grad {n}", out_grads[n], ref_grads[n], base_grads[n])


@pytest.mark.parametrize("name", list(MODELS))
def test_inputs_exercise_every_rule(name):
    """Padding, the sliding window and the softcap each change the reference logits of these
    inputs: an implementation that dropped one would fail the comparisons above."""
    ids, mask = batch("left")
    valid = mask.bool()
    impl = MODELS[name][3]
    with torch.no_grad():
        ref = build(name, impl, torch.float64)(input_ids=ids, attention_mask=mask).logits[valid]
        variants = {"padding": build(name, impl, torch.float64)(input_ids=ids).logits[valid]}
        if "sliding_window" in MODELS[name][2]:
            variants["window"] = build(name, impl, torch.float64, sliding_window=4 * L)(
                input_ids=ids, attention_mask=mask).logits[valid]
        if name == "gemma2":
            variants["softcap"] = build(name, impl, torch.float64, attn_logit_softcapping=None)(
                input_ids=ids, attention_mask=mask).logits[valid]
    for rule, other in variants.items():
        assert (other - ref).abs().max() > 1e-2, f"{name}: the {rule} does not change these logits"


def _generate(model, ids, mask, cache):
    kw = dict(cache_implementation="static") if cache == "static" else {}
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0, **kw)
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("name,cache", [("llama", "dynamic"), ("llama", "static"), ("qwen2", "dynamic"),
                                        ("mistral", "dynamic"), ("mistral", "static"), ("gemma2", "dynamic")])
def test_greedy_generate_matches(name, cache, monkeypatch):
    """Prefill on the kernels, then every step through decode_attention (left-padded batch)."""
    calls = []

    def counting_decode(*args, **kwargs):
        calls.append(args[0].shape[2])
        return sa.decode_attention(*args, **kwargs)
    monkeypatch.setattr(sat, "decode_attention", counting_decode)
    ids, mask = batch("left")
    ref_impl = MODELS[name][3]
    seq, logits = _generate(build(name, NAME), ids, mask, cache)
    ref_seq, ref_logits = _generate(build(name, ref_impl, torch.float64), ids, mask, cache)
    base_seq, base_logits = _generate(build(name, ref_impl), ids, mask, cache)
    assert torch.equal(seq, base_seq) and torch.equal(seq, ref_seq)
    assert_oracle(f"{name} {cache} step logits", logits, ref_logits, base_logits)
    assert calls == [1] * (NEW - 1) * TINY["num_hidden_layers"]


def _eager_with_pattern(pattern, layer):
    """transformers' eager attention with the pattern's dense mask added on one layer."""
    def attention(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx == layer:
            attention_mask = with_pattern(attention_mask, pattern, query.shape[2], key.shape[2])
        return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return attention


def test_pattern_layer_matches_eager_with_its_mask():
    pattern = sa.SlidingWindow(window=4, sinks=2)
    name = sat.register("sparseattn_test_pattern", pattern=lambda i, module: pattern if i == 1 else None)
    for impl, fn in (("eager_test_pattern", _eager_with_pattern(pattern, 1)),
                     ("oracle_test_pattern", oracle_attention(pattern, 1))):
        AttentionInterface.register(impl, fn)
        AttentionMaskInterface.register(impl, eager_mask)
    ids, mask = batch("left")
    valid = mask.bool()
    with torch.no_grad():
        out = build("llama", name)(input_ids=ids, attention_mask=mask).logits[valid]
        ref = build("llama", "oracle_test_pattern", torch.float64)(input_ids=ids, attention_mask=mask).logits[valid]
        base = build("llama", "eager_test_pattern")(input_ids=ids, attention_mask=mask).logits[valid]
        dense = build("llama", "test_oracle", torch.float64)(input_ids=ids, attention_mask=mask).logits[valid]
    assert (dense - ref).abs().max() > 1e-2, "the pattern does not change these logits"
    assert_oracle("pattern logits", out, ref, base)
    for cache in ("dynamic", "static"):
        seq, logits = _generate(build("llama", name), ids, mask, cache)
        ref_seq, ref_logits = _generate(build("llama", "oracle_test_pattern", torch.float64), ids, mask, cache)
        base_seq, base_logits = _generate(build("llama", "eager_test_pattern"), ids, mask, cache)
        assert torch.equal(seq, ref_seq) and torch.equal(seq, base_seq), cache
        assert_oracle(f"pattern {cache} step logits", logits, ref_logits, base_logits)


@pytest.mark.parametrize("case", ["window, 3 queries", "static slots", "static row, pattern",
                                  "static prefill 4-D, pattern"])
def test_attention_function_cases(case):
    """The attention function alone, on the forms it is handed: a 2-D padding mask with a window
    that cuts inside a multi-query decode step, the mask function's key mask of a static cache
    (shorter than the cache, whose empty slots hold garbage), transformers' one-row [B, 1, 1, Lk]
    decode mask of a static cache with a pattern, and a dense 4-D mask of a static cache's
    prefill (the fallback) with a pattern."""
    g = torch.Generator().manual_seed(4)
    lq = {"window, 3 queries": 3, "static prefill 4-D, pattern": 5}.get(case, 1)
    B, Hq, Hkv, D, Lk = 2, 4, 2, 16, 40
    q, k, v = (torch.randn(B, h, n, D, generator=g).to(DEVICE) for h, n in ((Hq, lq), (Hkv, Lk), (Hkv, Lk)))
    module = types.SimpleNamespace(is_causal=True, layer_idx=0, sliding_window=None)
    pad = torch.ones(B, Lk, dtype=torch.bool, device=DEVICE)
    pad[1, :2] = False                                                   # left padding
    i = torch.arange(lq, device=DEVICE)[:, None] + Lk - lq
    j = torch.arange(Lk, device=DEVICE)[None, :]
    pattern, n = None, 29                                                # slots >= n are empty
    if case == "window, 3 queries":
        module.sliding_window, n = 6, Lk
        mask, keep = pad, (j <= i) & (i - j < 6) & pad[:, None, None, :]
    elif case == "static slots":                                         # the mask function's form
        mask, keep = pad[:, None, None, :n].to(sat.KEYS_DTYPE), (j < n) & pad[:, None, None, :]
    elif case == "static row, pattern":                                  # the row sits at position n - 1
        pattern = sa.SlidingWindow(window=8, sinks=2)
        mask = (pad & (j[0] < n))[:, None, None, :]
        keep = torch.nn.functional.pad(pattern.dense_mask(1, n).to(DEVICE), (0, Lk - n)) & mask
    else:                                                                # rows at positions n - 5 .. n - 1
        pattern = sa.SlidingWindow(window=3, sinks=1)
        mask = (j <= i - (Lk - n)) & pad[:, None, None, :]
        keep = torch.nn.functional.pad(pattern.dense_mask(lq, n).to(DEVICE), (0, Lk - n)) & mask
    # empty slots: never read where the keys are cut (NaN), never weighted by a dense mask (1e4)
    k[:, :, n:], v[:, :, n:] = 1e4, (1e4 if case.startswith("static prefill") else float("nan"))
    out, _ = sat.attention_forward(module, q, k, v, mask, scaling=0.3, pattern=pattern)
    ref = sa.reference.attention(q, k[:, :, :n], v[:, :, :n], mask=keep[..., :n], scale=0.3)
    base = sa.reference.attention(q, k[:, :, :n], v[:, :, :n], mask=keep[..., :n], scale=0.3, dtype=q.dtype)
    assert_oracle(case, out.transpose(1, 2), ref, base)


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = build("gemma2", NAME, num_hidden_layers=1)    # softcap and a window in the graph
    ids, mask = batch("left")

    def forward(ids, mask):
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    with torch.no_grad():
        eager = forward(ids, mask)     # builds and caches the layouts outside the graph
        compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")(ids, mask)
    valid = mask.bool()
    assert torch.allclose(compiled[valid], eager[valid], atol=1e-6, rtol=1e-5)
    assert sa.last_backend() == "triton"


def test_4d_masks_fall_back_exactly_with_a_reason():
    """Packed sequences (transformers builds a dense mask) and a caller's 4-D float mask run on
    the SDPA drop-in, with the reason recorded, and match eager."""
    ids = batch("left")[0][:1]
    pos = torch.cat([torch.arange(9), torch.arange(L - 9)])[None].to(DEVICE)   # two packed sequences
    keep = torch.rand(L, L, generator=torch.Generator().manual_seed(3)) < 0.6
    keep = (keep & torch.ones(L, L, dtype=torch.bool).tril()) | torch.eye(L, dtype=torch.bool)
    mask4 = torch.zeros(1, 1, L, L).masked_fill(~keep, torch.finfo(torch.float32).min).to(DEVICE)
    cases = {"packed": dict(position_ids=pos, use_cache=False), "4-D mask": dict(attention_mask=mask4)}
    for case, kw in cases.items():
        with torch.no_grad():
            out = build("llama", NAME)(input_ids=ids, **kw).logits
            assert sa.last_fallback_reason().startswith(sat.FOUR_D_REASON), case
            ref = build("llama", "test_oracle", torch.float64)(input_ids=ids, **kw).logits
            base = build("llama", "eager")(input_ids=ids, **kw).logits
            plain = build("llama", "test_oracle", torch.float64)(input_ids=ids, position_ids=torch.arange(L)[None].to(DEVICE)).logits
        assert (plain - ref).abs().max() > 1e-2, f"{case}: the mask does not change these logits"
        assert_oracle(case, out, ref, base)


def test_errors_name_the_argument():
    with pytest.raises(TypeError, match="pattern"):
        sat.register("sparseattn_bad", pattern=sa.BlockLayout.from_block_mask(torch.ones(1, 1, 1, 1, dtype=torch.bool),
                                                                             64, (16, 16)))
    with pytest.raises(ValueError, match="name"):
        sat.register("sdpa")
    ids, mask = batch("left")
    sat.register("sparseattn_test_window", pattern=sa.PowerAttention())       # Mistral's layers have a window
    with pytest.raises(ValueError, match="sliding window"):
        build("mistral", "sparseattn_test_window")(input_ids=ids, attention_mask=mask)
    full = sa.BlockSparse(torch.ones(1, 1, 1, 1, dtype=torch.bool), block_size=64)   # not causal
    sat.register("sparseattn_test_noncausal", pattern=full)
    with pytest.raises(ValueError, match="causal"):
        build("llama", "sparseattn_test_noncausal")(input_ids=ids, attention_mask=mask)


def test_import_sparseattn_does_not_import_transformers():
    code = ("import sys, sparseattn, sparseattn.integrations; "
            "assert 'transformers' not in sys.modules, 'transformers was imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
