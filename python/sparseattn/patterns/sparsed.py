"""SparseD (INV-WZQ/SparseD, ICLR 2026): sparse attention for bidirectional diffusion language
models. At one early denoising step the pattern is estimated per layer and head from that step's
q and k (block importance = softmax probability mass per block), then reused for all later steps;
the first ``skip`` fraction of steps use full attention.

The importances are computed with torch ops in fp32 (fp64 for fp64 inputs), chunked over query
blocks (at most ~``_CHUNK`` scores at once, never the whole ``[L, L]`` matrix for large L); a
fused statistics kernel (LSE pass, then block sums of ``exp(s - lse)``) is the statistics issue's
job (issue 13). The selection and the layout are built on the device (no host read).

The oracle :func:`sparsed_blocks` (``sparseattn.reference.sparsed_blocks``) recomputes the
importances and the selection in float64.
"""
from __future__ import annotations

import math
from typing import Dict, Hashable, Optional

import torch

from ..layout import BlockLayout
from ..ops.common import check_inputs
from .topk_blocks import check_pattern_block, compute_dtype, ids_to_block_mask, to_tiles, topk_lowest_first

_CHUNK = 1 << 25  # score elements per chunk of query blocks


def _keep_count(n: int, select: float) -> int:
    """``max(1, int(n * select) + 1)`` blocks (the reference code's count), at most ``n``."""
    return min(n, max(1, int(n * select) + 1))


class SparseD:
    """The SparseD pattern estimator (non-causal block-sparse attention for diffusion LMs).

    With ``bs = block_size``, ``nB = ceil(L / bs)`` blocks and ``g`` the first block of the
    generation region (the first block starting at or after ``generation_start``, or the last block
    if none), per (batch, query head) and query block ``I``:

    1. ``imp[I, J]`` = sum over the block's (query, key) pairs of ``softmax(q k^T * scale)`` over
       **all** keys; keep the top ``max(1, int(nB * select) + 1)`` key blocks ``J`` of all ``nB``,
       then drop those ``>= g`` (so the prompt region keeps at most that many);
    2. ``imp_gen[I, J]``: the same with the softmax over the generation region's keys only
       (``k[g * bs:]``); keep the top ``max(1, int(nG * select) + 1)`` of its ``nG`` blocks;
    3. the pattern is the union of both, without a causal rule.

    Ties are broken towards the lower block index. The reference code averages over the bs x bs
    block (sum / bs^2): the same ranking. GQA: query head ``h`` reads key head ``h // (Hq // Hkv)``.

    Quirks of the reference code: LLaDA's estimate uses ``scale = 1 / sqrt(num_heads)`` (pass
    ``scale=`` to reproduce it; Dream uses the default ``1 / sqrt(D)``); it rounds the probabilities
    to the model dtype before averaging (dropped: fp32 here); its generate() passes the total step
    count as the generation length (here ``generation_start`` is explicit).

    Args:
        block_size: pattern block, a power of two >= 64 (the reference's 32 for short contexts
            would need per-tile bits, which device-built layouts do not carry).
        select: keep ratio in (0, 1].
        skip: fraction of the denoising steps that use full attention, in [0, 1)
            (:class:`SparseDSchedule`).
        scale: score scale of the estimate, default ``1 / sqrt(D)``.

    Example::

        >>> import torch, sparseattn as sa
        >>> q, k, v = (torch.randn(1, 2, 512, 64) for _ in range(3))
        >>> sd = sa.SparseD(block_size=64, select=0.3)
        >>> layout = sd.estimate(q, k, generation_start=384)   # non-causal BlockLayout
        >>> out = sa.sparse_attention(q, k, v, layout)
    """

    def __init__(self, block_size: int = 128, select: float = 0.3, skip: float = 0.2, scale: Optional[float] = None):
        self.block_size = check_pattern_block("block_size", block_size)
        for name, v in (("select", select), ("skip", skip)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{name}: expected a float, got {type(v).__name__}")
        if not 0 < select <= 1:
            raise ValueError(f"select: expected a keep ratio in (0, 1], got {select}")
        if not 0 <= skip < 1:
            raise ValueError(f"skip: expected a fraction of steps in [0, 1), got {skip}")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
            raise ValueError(f"scale: expected a positive float or None, got {scale!r}")
        self.select, self.skip = float(select), float(skip)
        self.scale = None if scale is None else float(scale)

    def __repr__(self):
        return f"SparseD(block_size={self.block_size}, select={self.select}, skip={self.skip}, scale={self.scale})"

    # ------------------------------------------------------------------ pieces
    def generation_block(self, L: int, generation_start: int) -> int:
        """``g``: the first block starting at or after ``generation_start``, or the last block."""
        if isinstance(generation_start, bool) or not isinstance(generation_start, int):
            raise TypeError(f"generation_start: expected an int, got {type(generation_start).__name__}")
        if not 0 <= generation_start <= L:
            raise ValueError(f"generation_start: expected a token index in [0, {L}], got {generation_start}")
        nb = math.ceil(L / self.block_size)
        return min(math.ceil(generation_start / self.block_size), nb - 1)

    def _check(self, q, k, generation_start):
        B, Hq, Hkv, Lq, Lk, D = check_inputs(q, k, k, gqa=True, names=("q", "k", "k"))
        if Lq != Lk:
            raise ValueError(f"q, k: expected one sequence (Lq == Lk, bidirectional self-attention), got {Lq} and {Lk}")
        if Lq == 0:
            raise ValueError("q: expected a length >= 1, got 0")
        return B, Hq, Hkv, Lq, D, self.generation_block(Lq, generation_start)

    def _chunks(self, q, k, g):
        """Yield (i0, i1, imp [B, Hq, c, nB], imp_gen [B, Hq, c, nB - g]) per chunk of query blocks."""
        B, Hq, L, D = q.shape
        Hkv, G, bs = k.shape[1], q.shape[1] // k.shape[1], self.block_size
        nb = math.ceil(L / bs)
        dt = compute_dtype(q)
        scale = 1.0 / math.sqrt(D) if self.scale is None else self.scale
        kf = k.detach().to(dt)
        step = max(1, _CHUNK // max(1, 2 * B * Hq * bs * L))
        for i0 in range(0, nb, step):
            i1 = min(nb, i0 + step)
            r0, r1 = i0 * bs, min(L, i1 * bs)
            qc = q.detach()[:, :, r0:r1].to(dt).reshape(B, Hkv, G * (r1 - r0), D)
            s = (qc @ kf.transpose(-1, -2)) * scale                                # [B, Hkv, G*rows, L]
            imp = self._block_sums(torch.softmax(s, -1), B, Hq, r1 - r0, i1 - i0, 0, L)
            gen = self._block_sums(torch.softmax(s[..., g * bs:], -1), B, Hq, r1 - r0, i1 - i0, g * bs, L)
            yield i0, i1, imp, gen

    def _block_sums(self, p, B, Hq, rows, c, k0, L):
        """Probabilities [B, Hkv, G*rows, L - k0] -> block sums [B, Hq, c, nB - k0 / bs]."""
        bs = self.block_size
        nk = math.ceil((L - k0) / bs)
        p = torch.nn.functional.pad(p.reshape(B, Hq, rows, L - k0), (0, nk * bs - (L - k0), 0, c * bs - rows))
        return p.unflatten(-1, (nk, bs)).sum(-1).unflatten(2, (c, bs)).sum(3)

    def block_importance(self, q: torch.Tensor, k: torch.Tensor, generation_start: int):
        """The importances: ``(imp [B, Hq, nB, nB], imp_gen [B, Hq, nB, nB - g])``, fp32 (fp64 for
        fp64 inputs); probability mass of each (query block, key block), the second under the
        softmax over the generation region's keys. Holds all nB x nB values (for tests and plots)."""
        *_, g = self._check(q, k, generation_start)
        parts = list(self._chunks(q, k, g))
        return torch.cat([p[2] for p in parts], 2), torch.cat([p[3] for p in parts], 2)

    def select_blocks(self, q: torch.Tensor, k: torch.Tensor, generation_start: int) -> torch.Tensor:
        """Key-block ids per query block, int32 ``[B, Hq, nB, W]``: the prompt-region picks of
        pass 1 then the generation-region picks of pass 2, -1 for an unused slot. No host read."""
        B, Hq, Hkv, L, D, g = self._check(q, k, generation_start)
        nb = math.ceil(L / self.block_size)
        k1, k2 = _keep_count(nb, self.select), _keep_count(nb - g, self.select)
        out = []
        for i0, i1, imp, gen in self._chunks(q, k, g):
            top1 = topk_lowest_first(imp, torch.ones_like(imp, dtype=torch.bool), k1)
            top2 = topk_lowest_first(gen, torch.ones_like(gen, dtype=torch.bool), k2)
            out.append(torch.cat([torch.where(top1 < g, top1, -1), torch.where(top2 >= 0, top2 + g, -1)], -1))
        return torch.cat(out, 2).to(torch.int32)

    def block_mask(self, q: torch.Tensor, k: torch.Tensor, generation_start: int) -> torch.Tensor:
        """The pattern as bool ``[B, Hq, nB, nB]`` (True = attended block)."""
        return ids_to_block_mask(self.select_blocks(q, k, generation_start), math.ceil(q.shape[2] / self.block_size))

    def estimate(self, q: torch.Tensor, k: torch.Tensor, generation_start: int) -> BlockLayout:
        """The pattern of this layer as a non-causal :class:`BlockLayout` (lists ``[B, Hq, ...]``),
        built on q's device with no host read.

        Args:
            q: ``[B, Hq, L, D]``; k: ``[B, Hkv, L, D]`` (one sequence: prompt then generation).
            generation_start: token index where the generation region starts (prompt length).
        """
        ids = self.select_blocks(q, k, generation_start)
        tiles, t = to_tiles(ids, self.block_size, q.shape[2])
        return BlockLayout.from_topk(tiles, t, (q.shape[2], k.shape[2]), validate=False)


class SparseDSchedule:
    """SparseD's step schedule over one generation of ``total_steps`` denoising steps (all
    semi-autoregressive blocks together): with ``end = int(total_steps * skip) + 1``, steps
    ``0 .. end`` use full attention, step ``end`` also estimates and caches the pattern of each
    layer (by a key you choose), steps ``> end`` run block-sparse attention on the cached pattern.
    Step 0 clears the cache (a new generation).

    Example::

        >>> import torch, sparseattn as sa
        >>> sched = sa.SparseDSchedule(sa.SparseD(block_size=64), total_steps=8)
        >>> q = k = v = torch.randn(1, 2, 256, 64)
        >>> outs = [sched.attention("layer0", q, k, v, step, generation_start=128) for step in range(8)]
        >>> sched.estimate_step, sched.use_sparse(7)
        (2, True)
    """

    def __init__(self, sparsed: SparseD, total_steps: int = 128):
        if not isinstance(sparsed, SparseD):
            raise TypeError(f"sparsed: expected a sparseattn.SparseD, got {type(sparsed).__name__}")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps: expected an int >= 1, got {total_steps!r}")
        self.sparsed, self.total_steps = sparsed, total_steps
        self.estimate_step = int(total_steps * sparsed.skip) + 1
        self._layouts: Dict[Hashable, BlockLayout] = {}

    def __repr__(self):
        return f"SparseDSchedule({self.sparsed!r}, total_steps={self.total_steps})"

    def use_sparse(self, step: int) -> bool:
        """True for the steps that run on the cached pattern (``step > estimate_step``)."""
        return step > self.estimate_step

    def layout(self, key: Hashable) -> Optional[BlockLayout]:
        """The cached pattern of layer ``key`` (None before the estimate step)."""
        return self._layouts.get(key)

    def reset(self) -> None:
        """Forget every cached pattern (done at step 0)."""
        self._layouts.clear()

    def attention(self, key: Hashable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: int,
                  generation_start: int) -> torch.Tensor:
        """One layer's attention at denoising ``step``: ``q [B, Hq, L, D]``, ``k, v [B, Hkv, L, D]``
        -> ``[B, Hq, L, D]``, bidirectional (default scale; ``SparseD.scale`` is the estimate's)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step: expected an int >= 0, got {step!r}")
        if step == 0:
            self.reset()
        if step == self.estimate_step:
            self._layouts[key] = self.sparsed.estimate(q, k, generation_start)
        if not self.use_sparse(step):
            from ..ops.attention.sdpa import scaled_dot_product_attention
            return scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1])
        layout = self._layouts.get(key)
        if layout is None:
            raise RuntimeError(f"SparseDSchedule: no pattern cached for layer key {key!r} at step {step}: the "
                               f"layer must run at the estimate step {self.estimate_step} of this generation first")
        from ..ops.attention.op import sparse_attention
        return sparse_attention(q, k, v, layout)


# ----------------------------------------------------------------------------- oracle
def sparsed_blocks(q: torch.Tensor, k: torch.Tensor, sparsed: SparseD, generation_start: int,
                   return_importance: bool = False):
    """Float64 oracle of :meth:`SparseD.block_mask` (``sparseattn.reference.sparsed_blocks``): the
    dense ``[L, L]`` softmax per (batch, head), block sums, the two top-k passes.

    Returns:
        bool ``[B, Hq, nB, nB]``; with ``return_importance`` also ``imp [B, Hq, nB, nB]`` and
        ``imp_gen [B, Hq, nB, nB - g]`` in float64.
    """
    bs = sparsed.block_size
    B, Hq, L, D = q.shape
    G = Hq // k.shape[1]
    nb = -(-L // bs)
    g = min(-(-generation_start // bs), nb - 1)
    scale = 1.0 / math.sqrt(D) if sparsed.scale is None else sparsed.scale
    qd, kd = q.detach().double(), k.detach().double().repeat_interleave(G, 1)
    s = (qd @ kd.transpose(-1, -2)) * scale

    def block_sums(p, ncol):
        out = torch.zeros(B, Hq, nb, ncol, dtype=torch.float64)
        for I in range(nb):
            for J in range(ncol):
                out[:, :, I, J] = p[:, :, I * bs:(I + 1) * bs, J * bs:(J + 1) * bs].sum((-1, -2))
        return out

    imp = block_sums(torch.softmax(s, -1), nb)
    imp_gen = block_sums(torch.softmax(s[..., g * bs:], -1), nb - g)
    keep = torch.zeros(B, Hq, nb, nb, dtype=torch.bool)
    n1 = min(nb, max(1, int(nb * sparsed.select) + 1))
    n2 = min(nb - g, max(1, int((nb - g) * sparsed.select) + 1))
    for b in range(B):
        for h in range(Hq):
            for I in range(nb):
                for J in sorted(range(nb), key=lambda j: (-imp[b, h, I, j].item(), j))[:n1]:
                    if J < g:
                        keep[b, h, I, J] = True
                for J in sorted(range(nb - g), key=lambda j: (-imp_gen[b, h, I, j].item(), j))[:n2]:
                    keep[b, h, I, g + J] = True
    return (keep, imp, imp_gen) if return_importance else keep
