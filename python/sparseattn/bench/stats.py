"""Attention statistics and VAR (``python -m sparseattn.bench --suite stats``, issue 13 "Tests,
speed, done"): ``sa.attention_stats`` and ``sa.visual.var_attention`` against the attention call
they accompany and against the eager alternative, measured in the same run.

GPU (B = 1, H = 32, D = 128, bf16; ``--quick`` runs the same sizes):

* **attention_stats (given lse)** -- ``sa.attention_stats(q, k, is_causal=True, lse=lse,
  head_reduce="mean")``: head-mean column sums (H2O / FastV importance) given the LSE of the
  attention call (``sa.sparse_attention(..., return_lse=True)`` on the dense causal layout, computed
  once, not timed); **attention_stats (own lse pass)** -- the same call without ``lse`` (it runs its
  own LSE pass first). Lq = Lk = 4K, 8K, 16K, 32K. Anchors: the forward attention the statistics
  accompany, ``sa.scaled_dot_product_attention(q, k, v, is_causal=True)``, and the eager
  alternative, what ``output_attentions=True`` costs: ``softmax(q k^T * scale)`` with the causal
  mask materialised as ``[B, H, L, L]``, then ``.sum(2).mean(1)``; n/a where its score and
  probability matrices (2 x B·H·L²·2 bytes + the L² mask) pass ~40 GB (32K: 137 GB), the row's
  ``eager GB`` param says how much it needs. **Target: stats <= 1.3x the forward attention**
  (its ratio column >= 0.77); memory O(B·H·L) (no ``L x L`` tensor).
* **var_attention llava prompt** -- ``sa.visual.var_attention(q, k, v, image, sinks)`` (defaults
  p = 0.6, rho = 0.5, summ = 0.2, causal) on a LLaVA-1.5-like prompt: 35 system tokens + 576 image
  tokens (24 x 24) + 100 text tokens = 711; sinks = token 0 and 3 image tokens, whose keys are
  scaled by 4 so that they draw mass as sinks do. **var_attention multi-image prompt** -- the same
  at L = 4K, 8K, 16K, 32K: 35 system tokens, as many 576-token images as fit before the last
  100+ text tokens (``images`` param), sinks token 0 and 3 tokens of the first image. Anchor:
  plain attention ``sa.scaled_dot_product_attention(q, k, v, is_causal=True)``. **Target:
  var_attention <= 2.2x plain attention** (ratio column >= 0.45).

Targets are stated here, never asserted: no test times anything. TFLOP/s counts the work the
output needs at least: ``q k^T`` over the causal pairs (2·H·D per pair) for the statistics, the
attention (4·H·D per pair) for VAR. Peak memory is not reported: the harness has no column for it.

CPU (``--device cpu``): tiny float32 sizes (H = 2, D = 64; statistics at L = 256 and 512, 256 with
``--quick``; VAR on the 711-token prompt, plus a 2-image 1287-token prompt without ``--quick``)
through what a CPU user gets (the PyTorch CPU path, torch's CPU SDPA for the drop-in), in seconds;
no GPU number is implied. ``--lengths`` sets L of the statistics and multi-image cases.

Every case is first checked against its float64 oracle at a small size (``sa.reference``); a
failing op is refused, not timed.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Optional

import torch

from .harness import INPUTS, Case

GPU_LENGTHS = [4096, 8192, 16384, 32768]
SYSTEM, IMAGE, TEXT = 35, 576, 100                   # LLaVA-1.5: 35 system + 24 x 24 image + text tokens
SINK_OFFSETS = (10, 300, 500)                        # image sinks: offsets into the first image
SINK_SCALE = 4.0
EAGER_LIMIT_BYTES = 40e9


def stats_suite(device: str, quick: bool, args=None) -> Iterable[Case]:
    """attention_stats and var_attention cases (see the module docstring)."""
    if device == "cuda":
        dtype, H, D = torch.bfloat16, 32, 128
        stat_lengths, var_lengths = list(GPU_LENGTHS), list(GPU_LENGTHS)
    else:
        dtype, H, D = torch.float32, 2, 64
        stat_lengths = [256] if quick else [256, 512]
        var_lengths = [] if quick else [SYSTEM + 2 * IMAGE + TEXT]
    lengths = getattr(args, "lengths", None)
    if lengths:
        stat_lengths = list(lengths)
        var_lengths = [L for L in lengths if L >= SYSTEM + IMAGE + TEXT]
    for L in stat_lengths:              # both statistics rows of one size share its inputs and eager mask
        for given_lse in (True, False):
            yield _stats_case(device, dtype, H, L, D, given_lse)
    yield _var_case(device, dtype, H, SYSTEM + IMAGE + TEXT, D, "llava prompt")
    for L in var_lengths:
        yield _var_case(device, dtype, H, L, D, "multi-image prompt")


# ----------------------------------------------------------------------------- shared pieces
def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _randn(*shape, g, device, dtype):
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def causal_layout(L: int, device, block: int = 128):
    """The dense causal (top-left) layout of ``attention_stats(..., is_causal=True)``."""
    import sparseattn as sa

    n = math.ceil(L / block)
    return sa.BlockLayout.from_block_mask(torch.ones(1, 1, n, n, dtype=torch.bool, device=device), block, (L, L),
                                          causal="top_left")


def eager_bytes(B: int, H: int, L: int, dtype) -> int:
    """Memory of the eager column sums: scores and probabilities ``[B, H, L, L]`` and the mask."""
    return 2 * B * H * L * L * torch.tensor([], dtype=dtype).element_size() + L * L


def eager_column_sum(q: torch.Tensor, k: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """What ``output_attentions=True`` users do: the probabilities materialised, then summed over
    the queries and averaged over the heads. ``masked``: bool ``[L, L]``, True above the diagonal."""
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(1.0 / math.sqrt(q.shape[-1]))
    s.masked_fill_(masked, float("-inf"))
    p = torch.softmax(s, -1)
    del s
    return p.sum(2).mean(1)


def images_in(L: int) -> int:
    """How many IMAGE-token images the prompt of length L holds (SYSTEM + images + >= TEXT tokens)."""
    if L < SYSTEM + IMAGE + TEXT:
        raise ValueError(f"L: expected at least {SYSTEM + IMAGE + TEXT} for a one-image prompt, got {L}")
    return (L - SYSTEM - TEXT) // IMAGE


def prompt(L: int, device):
    """(image mask, sink mask, number of images) ``[1, L]`` of a LLaVA-like prompt: SYSTEM tokens,
    as many IMAGE-token images as leave at least TEXT text tokens, text; sinks token 0 and three
    tokens of the first image."""
    n_img = images_in(L)
    image = torch.zeros(1, L, dtype=torch.bool, device=device)
    image[:, SYSTEM:SYSTEM + n_img * IMAGE] = True
    sinks = torch.zeros(1, L, dtype=torch.bool, device=device)
    sinks[:, [0, *(SYSTEM + o for o in SINK_OFFSETS)]] = True
    return image, sinks, n_img


# ----------------------------------------------------------------------------- attention_stats
def _stats_case(device, dtype, H, L, D, given_lse: bool) -> Case:
    import sparseattn as sa

    B = 1
    size = ("stats", B, H, L, D, dtype, device)

    def make():
        """(q, k, v, lse): the LSE of the attention call on these inputs, computed with them (not timed)."""
        q, k, v = (torch.randn(B, H, L, D, device=device, dtype=dtype) for _ in range(3))
        lse = sa.sparse_attention(q, k, v, causal_layout(L, device), return_lse=True)[1] if given_lse else None
        return q, k, v, lse

    def qkv():
        return INPUTS.get(size, f"qkv{' lse' if given_lse else ''}", make, device, rotate=True)

    def ours():
        q, k, v, lse = qkv()
        extra = dict(lse=lse) if given_lse else {}
        return sa.attention_stats(q, k, is_causal=True, head_reduce="mean", **extra).column_sum

    def forward():
        q, k, v, _ = qkv()
        return sa.scaled_dot_product_attention(q, k, v, is_causal=True)

    need = eager_bytes(B, H, L, dtype)

    def eager():
        q, k, _, _ = qkv()
        masked = INPUTS.get(size, "eager mask", lambda: torch.ones(L, L, dtype=torch.bool, device=device).triu(1),
                            device)
        return eager_column_sum(q, k, masked)

    anchors: Dict[str, Optional[Callable[[], object]]] = {
        "forward attention (sa sdpa causal)": forward,
        "eager probabilities .sum(2)": eager if device != "cuda" or need <= EAGER_LIMIT_BYTES else None,
    }

    def check():
        Lc, hc = 300, 4
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (_randn(1, hc, Lc, D, g=g, device=device, dtype=dtype) for _ in range(3))
        lay = causal_layout(Lc, device)
        extra = dict(lse=sa.sparse_attention(q, k, v, lay, return_lse=True)[1]) if given_lse else {}
        got = sa.attention_stats(q, k, is_causal=True, head_reduce="mean", **extra).column_sum
        ref = sa.reference.attention_stats(q, k, lay, head_reduce="mean")["column_sum"]
        base = sa.reference.attention_stats(q, k, lay, head_reduce="mean", dtype=torch.float32)["column_sum"]
        sa.reference.assert_close("attention_stats column_sum", got, ref, base)

    pairs = L * (L + 1) / 2
    params = dict(B=B, H=H, L=L, D=D, dtype=_dtype_name(dtype), head_reduce="mean",
                  **{"eager GB": round(need / 1e9, 1)})
    op = f"attention_stats column_sum ({'given lse' if given_lse else 'own lse pass'})"
    return Case(op=op, params=params, run=ours, anchors=anchors, flops=2.0 * B * H * D * pairs, check=check)


# ----------------------------------------------------------------------------- var_attention
def structured_qkv(B, H, L, D, sinks: torch.Tensor, device, dtype, g: Optional[torch.Generator] = None):
    """Random q, k, v with the sink tokens' keys scaled by SINK_SCALE (they draw mass, as sinks do)."""
    if g is None:
        q, k, v = (torch.randn(B, H, L, D, device=device) for _ in range(3))
    else:
        q, k, v = (torch.randn(B, H, L, D, generator=g).to(device) for _ in range(3))
    k = torch.where(sinks[:, None, :, None], SINK_SCALE * k, k)
    return tuple(t.to(dtype) for t in (q, k, v))


def _var_case(device, dtype, H, L, D, family: str) -> Case:
    import sparseattn as sa

    B = 1
    size = ("stats var", B, H, L, D, dtype, device)
    n_img = images_in(L)

    def inputs():
        """(q, k, v, image mask, sink mask), built when the case runs."""
        def make():
            image, sinks, _ = prompt(L, device)
            return (*structured_qkv(B, H, L, D, sinks, device, dtype), image, sinks)
        return INPUTS.get(size, "qkv, image, sinks", make, device, rotate=True)

    def ours():
        q, k, v, image, sinks = inputs()
        return sa.visual.var_attention(q, k, v, image, sinks)

    def plain():
        q, k, v, _, _ = inputs()
        return sa.scaled_dot_product_attention(q, k, v, is_causal=True)

    def check():
        # a small prompt of the same shape: 35 system + 12 x 12 image + 21 text tokens
        Lc, hc, n = 200, 4, 144
        img = torch.zeros(1, Lc, dtype=torch.bool, device=device)
        img[:, SYSTEM:SYSTEM + n] = True
        snk = torch.zeros(1, Lc, dtype=torch.bool, device=device)
        snk[:, [0, SYSTEM + 5, SYSTEM + 70, SYSTEM + 130]] = True
        q, k, v = structured_qkv(1, hc, Lc, D, snk, device, dtype, torch.Generator(device="cpu").manual_seed(0))
        out, sel = sa.visual.var_attention(q, k, v, img, snk, return_selected=True)
        ref, _ = sa.reference.var_attention(q, k, v, img, snk, selected=sel)
        base, _ = sa.reference.var_attention(q, k, v, img, snk, selected=sel, dtype=dtype)
        sa.reference.assert_close("var_attention", out, ref, base)
        assert sel.any(), "var_attention: no row selected: the case would not redistribute anything"

    pairs = L * (L + 1) / 2
    params = dict(B=B, H=H, L=L, D=D, dtype=_dtype_name(dtype), images=n_img, image_tokens=n_img * IMAGE,
                  sinks=1 + len(SINK_OFFSETS))
    return Case(op=f"var_attention {family}", params=params, run=ours,
                anchors={"plain attention (sa sdpa causal)": plain}, flops=4.0 * B * H * D * pairs, check=check)
