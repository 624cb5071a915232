"""One training step of a small transformer with sparse attention, under torch.compile.

A 2-layer decoder whose attention is ``sa.sparse_attention`` with a static pattern per layer
(layer 0: a sliding window of 64 tokens plus 4 attention sinks, layer 1: PowerAttention with
64-token blocks), grouped-query attention (4 query heads share 2 K/V heads) and no dense mask
anywhere. The model is compiled with ``torch.compile(fullgraph=True)``: sparseattn's kernels are
custom ops, so the graph has no break. One AdamW step on random tokens; prints the loss, the
gradient norm of every layer and the time of the compiled step, checks the compiled loss and
gradients against the same model run eagerly, and writes OUT/train_step.json.

Run: python examples/train_step.py OUT [BACKEND]   (CUDA when available; on a CPU a few seconds
with the default backend there, aot_eager; ``inductor`` compiles C++ code for ~45 s first)
"""
import json
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import sparseattn as sa

OUT = sys.argv[1] if len(sys.argv) > 1 else "sparseattn_train_step"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# torch.compile's backend: inductor on CUDA. On a CPU, inductor's C++ code generation for this
# forward + backward takes ~45 s on 2 cores, so the default there is aot_eager: the same Dynamo
# graph (fullgraph: no break) and AOT autograd, without generated code. Second argument: any backend.
BACKEND = sys.argv[2] if len(sys.argv) > 2 else ("inductor" if DEVICE == "cuda" else "aot_eager")
VOCAB, DIM, HEADS, KV_HEADS, L, BATCH = 256, 64, 4, 2, 512, 2


class Attention(nn.Module):
    def __init__(self, pattern):
        super().__init__()
        self.pattern, self.hd = pattern, DIM // HEADS
        self.q = nn.Linear(DIM, HEADS * self.hd, bias=False)
        self.kv = nn.Linear(DIM, 2 * KV_HEADS * self.hd, bias=False)
        self.o = nn.Linear(HEADS * self.hd, DIM, bias=False)

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, HEADS, self.hd).transpose(1, 2)                       # [B, Hq, L, D]
        k, v = self.kv(x).view(B, T, 2, KV_HEADS, self.hd).permute(2, 0, 3, 1, 4)      # [B, Hkv, L, D] each
        y = sa.sparse_attention(q, k, v, self.pattern)     # the pattern's layout for (L, L); GQA as is
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, pattern):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(DIM), nn.RMSNorm(DIM)
        self.attn = Attention(pattern)
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, patterns):
        super().__init__()
        self.embed, self.pos = nn.Embedding(VOCAB, DIM), nn.Parameter(0.02 * torch.randn(L, DIM))
        self.blocks = nn.ModuleList(Block(p) for p in patterns)
        self.norm, self.head = nn.RMSNorm(DIM), nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def loss_fn(model, tokens):
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def grad_norms(model):
    norms = {name: torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in mod.parameters()])).item()
             for name, mod in [("embed", model.embed)] + [(f"block {i}", b) for i, b in enumerate(model.blocks)]
             + [("head", model.head)]}
    norms["total"] = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()
    return norms


def main():
    torch.manual_seed(0)
    patterns = [sa.SlidingWindow(64, sinks=4), sa.PowerAttention(block_size=64)]
    for i, p in enumerate(patterns):
        print(f"layer {i}: {p}, density {p.layout(L, L).density:.3f} of the L x L scores (L = {L})")
    model = TinyLM(patterns).to(DEVICE)
    eager = TinyLM(patterns).to(DEVICE)
    eager.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, VOCAB, (BATCH, L + 1), device=DEVICE)

    compiled = torch.compile(model, fullgraph=True, backend=BACKEND)
    t0 = time.perf_counter()
    loss = loss_fn(compiled, tokens)            # the first call compiles forward and backward
    loss.backward()
    step_s = time.perf_counter() - t0
    norms = grad_norms(model)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)

    ref = loss_fn(eager, tokens)                # the same step without torch.compile
    ref.backward()
    ref_norms = grad_norms(eager)
    opt.step()
    opt.zero_grad(set_to_none=True)

    print(f"loss {loss.item():.4f} (eager {ref.item():.4f}; ln({VOCAB}) = {torch.log(torch.tensor(float(VOCAB))):.4f})")
    for name, n in norms.items():
        print(f"grad norm {name:8s} {n:.4f} (eager {ref_norms[name]:.4f})")
    print(f"compiled step (torch.compile backend {BACKEND}, compilation included) {step_s:.1f} s on {DEVICE}; "
          f"sparseattn backend: {sa.last_backend()}")
    assert abs(loss.item() - ref.item()) < 1e-4 * max(1.0, abs(ref.item())), "compiled loss differs from eager"
    assert all(abs(norms[k] - ref_norms[k]) <= 1e-3 * max(1.0, ref_norms[k]) for k in norms), "gradients differ"

    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "train_step.json")
    with open(path, "w") as f:
        json.dump({"device": DEVICE, "loss": loss.item(), "eager_loss": ref.item(), "grad_norms": norms,
                   "patterns": [repr(p) for p in patterns], "compile_backend": BACKEND,
                   "step_seconds_with_compile": step_s}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
