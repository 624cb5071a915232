"""The PyTorch CPU path of Lightning attention: the same chunked algorithm and the same three-pass
backward as the Triton kernels (``sparseattn.triton_kernels.lightning``), in PyTorch ops.

Precision policy, shared with the kernels: the state is fp32 from the initial state (any float
dtype, converted once) to the final one, and every term that enters it (the decayed ``k^T v`` of a
chunk, ``lambda^n S``) is computed to fp32 accuracy whatever the inputs' dtype; only ``o`` (and
dq, dk, dv) are rounded to the inputs' dtype, once, at the end. Here that is fp32 matmuls of the
inputs converted to fp32; the kernels reach the same accuracy with split tensor-core operands."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def lightning_pass_cpu(q: Tensor, k: Tensor, v: Tensor, slopes: Optional[Tensor], s0: Optional[Tensor], scale: float,
              inter_scale: float, kv_scale: float, reverse: bool = False, s0_shift: bool = False,
              s0_transposed: bool = False, chunk: int = 0) -> Tuple[Tensor, Tensor]:
    """One chunked pass in fp32 with PyTorch ops: the CPU twin of the kernel (same arguments as
    ``triton_kernels.lightning.lightning_attention_pass``). Returns (out in v's dtype, fp32 state)."""
    if reverse:
        q, k, v = (t.flip(2) for t in (q, k, v))
    B, H, L, Dk = q.shape
    Dv = v.shape[-1]
    f32 = torch.float32
    if s0 is None:
        state = torch.zeros(B, H, Dk, Dv, dtype=f32, device=q.device)
    else:
        state = (s0.transpose(-1, -2) if s0_transposed else s0).to(f32)
    log_lam = None if slopes is None else -slopes.to(f32).view(1, H, 1, 1)
    chunk = chunk or (64 if max(Dk, Dv) <= 64 else 128)  # intra work ~ L * chunk * D: chunk ~ D
    decays = {}  # per chunk length: (decay matrix, q exponents, k decays)
    outs = []
    for t0 in range(0, L, chunk):
        n = min(chunk, L - t0)
        shift = 1 if (s0_shift and t0 == 0) else 0
        qc, kc, vc = (t[:, :, t0:t0 + n].to(f32) for t in (q, k, v))
        s = qc @ kc.transpose(-1, -2)
        if log_lam is None:
            o = (s.tril() * scale) @ vc + (qc * inter_scale) @ state
            state = state + (kc.transpose(-1, -2) @ vc) * kv_scale
        else:
            if n not in decays:
                i = torch.arange(n, device=q.device, dtype=f32)
                diff = i[:, None] - i[None, :]
                dmat = torch.exp(torch.where(diff >= 0, diff * log_lam, torch.full_like(diff, float("-inf"))))
                decays[n] = (dmat * scale, (i + 1)[:, None], torch.exp((n - 1 - i)[:, None] * log_lam))
            dmat, q_pos, k_dec = decays[n]
            q_dec = torch.exp((q_pos - shift) * log_lam) * inter_scale
            o = (s * dmat) @ vc + (qc * q_dec) @ state
            state = state * torch.exp((n - shift) * log_lam) + ((kc * k_dec).transpose(-1, -2) @ vc) * kv_scale
        outs.append(o)
    out = torch.cat(outs, 2).to(v.dtype)
    return (out.flip(2) if reverse else out).contiguous(), state.contiguous()


def lightning_attention_bwd_cpu(do, dsf, q, k, v, slopes, s0, scale):
    """The three passes of ``triton_kernels.lightning.lightning_attention_bwd`` on the CPU path."""
    dq, _ = lightning_pass_cpu(do, v, k, slopes, s0, scale, scale, 1.0, s0_transposed=True)
    dk, _ = lightning_pass_cpu(v, do, q, slopes, dsf, scale, 1.0, scale, reverse=True, s0_shift=True, s0_transposed=True)
    dv, ds0 = lightning_pass_cpu(k, q, do, slopes, dsf, scale, 1.0, scale, reverse=True, s0_shift=True)
    if slopes is not None:
        ds0 = ds0 * torch.exp(-slopes.float())[None, :, None, None]
    return dq, dk, dv, ds0


def lightning_attention_step_cpu(q, k, v, state, slopes, scale):
    """Decode step with PyTorch ops (differentiable): S' = lambda S + k^T v, o = scale q S'."""
    state = state.to(torch.float32)
    if slopes is not None:
        state = state * torch.exp(-slopes.to(torch.float32)).view(1, -1, 1, 1)
    state = state + k.to(torch.float32)[..., :, None] * v.to(torch.float32)[..., None, :]
    o = torch.einsum("bhk,bhkv->bhv", q.to(torch.float32), state) * scale
    return o.to(q.dtype), state
