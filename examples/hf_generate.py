"""Greedy generation with a Hugging Face transformers model on sparseattn: attn_implementation="sparseattn".

A tiny Llama (4 layers, grouped-query attention: 4 query heads share 2 K/V heads) built from its
config with random weights (no download). Layers 0-1 stay dense; layers 2-3 run PowerAttention
(64-token blocks: each block sees the blocks at distance 0, 1, 2, 4, ... and the first block). The
batch is two prompts of different lengths, left-padded as generate() wants: the padding reaches
the kernels as a key-padding rule, never as a dense mask. Prefill runs the fused sparse_attention
kernels, every new token sparseattn's decode_attention with the same pattern.

It also runs the model with every layer dense on sparseattn and on transformers' "sdpa", which
must give the same tokens, and writes OUT/hf_generate.json (tokens, time, path taken).

Run: python examples/hf_generate.py OUT   (needs transformers: pip install -e ".[hf]"; CUDA when
available, else the CPU path)
"""
import json
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import sparseattn as sa
from sparseattn.integrations import transformers as sat

OUT = sys.argv[1] if len(sys.argv) > 1 else "sparseattn_hf_generate"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROMPTS, NEW_TOKENS = (320, 200), 12


def tiny_llama(impl):
    """A 4-layer Llama from its config, random weights (the same for every implementation)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      initializer_range=0.1)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).to(DEVICE).eval()


def main():
    os.makedirs(OUT, exist_ok=True)
    # One line per attention setup: a pattern per layer (the callable gets the layer index and module).
    sat.register("sparseattn", pattern=lambda layer, module: None if layer < 2 else sa.PowerAttention(block_size=64))
    sat.register("sparseattn_dense")            # every layer dense, for the check against sdpa

    g = torch.Generator().manual_seed(1)
    n = max(PROMPTS)
    ids = torch.randint(1, 256, (len(PROMPTS), n), generator=g)
    mask = torch.zeros(len(PROMPTS), n, dtype=torch.long)
    for b, p in enumerate(PROMPTS):             # left padding
        mask[b, n - p:] = 1
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)

    results = {}
    for impl in ("sparseattn", "sparseattn_dense", "sdpa"):
        model = tiny_llama(impl)
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        seconds = time.perf_counter() - t
        results[impl] = {"tokens": out[:, n:].tolist(), "seconds": round(seconds, 3),
                         "last_backend": sa.last_backend(), "last_fallback_reason": sa.last_fallback_reason()}
        print(f"{impl:17s} {seconds:6.2f} s  new tokens {out[:, n:].tolist()}  (last call: {sa.last_backend()})")

    pattern = sa.PowerAttention(block_size=64)
    print(f"PowerAttention(64) density at L={n}: {pattern.density(n):.2f} (layers 2-3), 1.00 elsewhere")
    assert results["sparseattn_dense"]["tokens"] == results["sdpa"]["tokens"], "dense sparseattn != sdpa"
    path = os.path.join(OUT, "hf_generate.json")
    with open(path, "w") as f:
        json.dump({"device": DEVICE, "prompts": PROMPTS, "new_tokens": NEW_TOKENS,
                   "power_attention_density": pattern.density(n), "runs": results}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
