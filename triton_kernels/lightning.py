"""Lightning attention: chunked linear attention with per-head decay (forward, backward, decode step).

Naming chain: ``_lightning_attention_fwd_kernel`` -> launcher ``lightning_attention_fwd`` -> custom op
``sparseattn::lightning_attention_fwd`` -> public ``sparseattn.lightning_attention`` -> oracle
``sparseattn.reference.lightning_attention`` (likewise ``lightning_attention_bwd`` and the decode
``_lightning_attention_step_kernel`` -> ``lightning_attention_step``).

Definition, per head with decay ``lambda = exp(-slope)``:
``S_t = lambda S_{t-1} + k_t^T v_t`` (``S_{-1} = S0``), ``o_t = scale q_t S_t``.

One program owns one (batch, head, value tile) and walks the sequence chunk by chunk, keeping the
``[Dk, BLOCK_N]`` state in fp32 registers. Inside a chunk the decay is a matrix of
``exp((i - j) * log lambda)``, exponents of position differences bounded by the chunk size: no
running product of lambda ever underflows, whatever the length or slope.

Precision of the state (fp16 / bf16 inputs): the state is fp32 from start to end, and its update
``sum_j lambda^(n-1-j) k_j^T v_j`` is as accurate as an fp32 recurrence. The decayed keys
``k_j lambda^(n-1-j)`` are fp32 values that the input dtype cannot hold, so they enter the tensor
cores as a sum of input-dtype terms (``_decayed_kv``: two fp16 terms, three bf16 terms; the
products with v are exact, the accumulation fp32). Rounding them to the input dtype once, as
before, cost a relative error of ~1e-4 (fp16) to ~5e-4 (bf16) in every state: the final state,
the ``d initial_state`` of the backward and everything LASP-2 carries across ranks. In fp16 the
rows of the intra-chunk product ``P`` are scaled to a maximum of 1 before they are rounded to fp16
(``ROW_SCALE``): small incoming gradients (|do| ~ 1e-5) no longer fall into fp16's subnormals in
the dq and dk passes, and large scores cannot overflow.

The backward reuses the same kernel three times (no separate backward kernels):

* ``dq`` is the forward of ``(do, v, k)`` with initial state ``S0^T``;
* ``dk`` and ``dv`` are forwards over the *reversed* sequence of ``(v, do, q)`` and ``(k, q, do)``
  whose initial state is the gradient of the final state ``dS_L`` (``S0_SHIFT``: that state enters
  one decay step later), and the final state of the ``dv`` pass is ``dS0 / lambda``.

Offsets are 64-bit; any strides; any L (the last chunk is masked).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._alloc import empty, on_device
from .common import (GATE_DTYPES, GATE_HEAD_DIMS, Tuner, block_d_of, device_smem_limit, plane, tile_and_plane, view,
                     view_type)

# Autotune configs, beside the kernel: BLOCK_M is the chunk (rows per step), BLOCK_N the value
# columns one program owns. The prune is _fits.
LIGHTNING_CONFIGS = [
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
    {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1},  # Dk = 256
    {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1},  # Dk = 256, A100
    {"BLOCK_M": 64, "BLOCK_N": 16, "num_warps": 4, "num_stages": 2},  # Dv = 16
]
STEP_BLOCK_N = 32


def _fits(cfg, *, block_dk, block_dv, elem, smem, **_):
    """A config fits when its value tile is no wider than the head (16-wide only for Dv <= 16),
    its fp32 state tile stays within ~64 registers per thread, and the staged q/k/v tiles plus the
    chunk's score tile fit shared memory. The single-stage tiles exist for Dk = 256 only."""
    m, n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    if n > max(16, block_dv) or (n == 16 and block_dv > 16):
        return False
    if cfg["num_stages"] == 1 and block_dk < 256:
        return False
    if block_dk * n > 64 * 32 * cfg["num_warps"]:
        return False
    need = elem * (2 * m * block_dk + m * n) * max(1, cfg["num_stages"]) + 4 * (block_dk * n + m * m)
    return need <= smem


TUNER = Tuner("lightning_attention", LIGHTNING_CONFIGS, _fits)


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _decayed_kv(kd, v, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    """``kd^T v`` ([Dk, BLOCK_N] fp32) for fp32 decayed keys ``kd [M, Dk]`` and ``v [M, BLOCK_N]``
    in the input dtype, accurate to fp32: ``kd`` is split into SPLIT terms of v's dtype whose sum is
    kd to ~24 bits, each multiplied exactly by v on the tensor cores (fp32 accumulation), smallest
    first. SPLIT 1: fp32 inputs (one ieee dot). SPLIT 2: fp16, the residual scaled by 2^11 (exact)
    so that it stays in fp16's normal range. SPLIT 3: bf16 (8-bit significands, fp32's range)."""
    if SPLIT == 1:
        return tl.dot(tl.trans(kd.to(v.dtype)), v, input_precision=PRECISION)
    hi = kd.to(v.dtype)
    rest = kd - hi.to(tl.float32)  # exact
    if SPLIT == 2:
        lo = (rest * 2048.0).to(v.dtype)
        acc = tl.dot(tl.trans(lo), v, input_precision=PRECISION) * (1.0 / 2048.0)
    else:
        mid = rest.to(v.dtype)
        lo = (rest - mid.to(tl.float32)).to(v.dtype)
        acc = tl.dot(tl.trans(lo), v, input_precision=PRECISION)
        acc = tl.dot(tl.trans(mid), v, acc, input_precision=PRECISION)
    return tl.dot(tl.trans(hi), v, acc, input_precision=PRECISION)


@triton.jit
def _lightning_attention_fwd_kernel(
        Q, K, V, S0, O, SF, SLOPES, H, L, scale, inter_scale, kv_scale,
        DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, HAS_DECAY: tl.constexpr, HAS_S0: tl.constexpr, STORE_SF: tl.constexpr,
        REVERSE: tl.constexpr, S0_SHIFT: tl.constexpr, LOWP_STATE: tl.constexpr,
        PRECISION: tl.constexpr, STATE_PRECISION: tl.constexpr, STATE_SPLIT: tl.constexpr,
        ROW_SCALE: tl.constexpr):
    """out_t = scale * sum_{j<=t in chunk} lambda^(t-j) (q_t.k_j) v_j
               + inter_scale * lambda^(i+1) q_t S_chunk            (i: position in the chunk)
    S_next = lambda^n S_chunk + kv_scale * sum_j lambda^(n-1-j) k_j^T v_j; S before the first
    chunk is S0 (fp32). With REVERSE, chunk position p reads row L-1-p. With S0_SHIFT, the first
    chunk's state carries one decay step less (exponents i and n-1). Q, K, V, O [B, H, L, D] and
    S0, SF [B, H, Dk, Dv] are Views. STATE_SPLIT: terms of the decayed keys in the state update
    (``_decayed_kv``); ROW_SCALE: rows of the intra-chunk P scaled to max 1 before the fp16 cast."""
    pid_v, pid_bh = tile_and_plane(DV, BLOCK_N)  # value tiles of one (batch, head) consecutive
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_DK)
    offs_v = pid_v * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    if HAS_DECAY:
        log_lam = -tl.load(SLOPES + h).to(tl.float32)
    else:
        log_lam = 0.0
    st_ok = k_ok[:, None] & v_ok[None, :]
    if HAS_S0:
        S0p = plane(S0, b, h)
        state = tl.load(S0p.ptr + offs_k[:, None] * S0p.sr + offs_v[None, :] * S0p.sc, mask=st_ok,
                        other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BLOCK_DK, BLOCK_N], dtype=tl.float32)
    Qp, Kp, Vp, Op = plane(Q, b, h), plane(K, b, h), plane(V, b, h), plane(O, b, h)
    causal = offs_c[:, None] >= offs_c[None, :]
    if HAS_DECAY:
        # exp of (position difference x log lambda), masked to 0 above the diagonal
        dmat = tl.exp(tl.where(causal, (offs_c[:, None] - offs_c[None, :]).to(tl.float32) * log_lam,
                               float("-inf")))
    for c in range(tl.cdiv(L, BLOCK_M)):
        pos = c * BLOCK_M + offs_c
        n = tl.minimum(L - c * BLOCK_M, BLOCK_M)
        valid = offs_c < n
        if REVERSE:
            row = (L - 1 - pos).to(tl.int64)
        else:
            row = pos.to(tl.int64)
        q = tl.load(Qp.ptr + row[:, None] * Qp.sr + offs_k[None, :] * Qp.sc, mask=valid[:, None] & k_ok[None, :],
                    other=0.0)
        k = tl.load(Kp.ptr + row[:, None] * Kp.sr + offs_k[None, :] * Kp.sc, mask=valid[:, None] & k_ok[None, :],
                    other=0.0)
        v = tl.load(Vp.ptr + row[:, None] * Vp.sr + offs_v[None, :] * Vp.sc, mask=valid[:, None] & v_ok[None, :],
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)                              # [M, M]
        if HAS_DECAY:
            s = s * dmat * scale
        else:
            s = tl.where(causal, s, 0.0) * scale
        if ROW_SCALE:  # fp16: each row of P scaled to max |P| = 1 before the cast (no subnormals)
            row_max = tl.maximum(tl.max(tl.abs(s), 1), 1e-30)
            acc = tl.dot((s * (1.0 / row_max)[:, None]).to(v.dtype), v, input_precision=PRECISION)
            acc = acc * row_max[:, None]                                                   # intra-chunk
        else:
            acc = tl.dot(s.to(v.dtype), v, input_precision=PRECISION)                      # intra-chunk
        if HAS_DECAY:
            shift = S0_SHIFT * (1 - tl.minimum(c, 1))  # the first chunk only
            q_dec = tl.exp((offs_c + 1 - shift).to(tl.float32) * log_lam) * inter_scale
            k_dec = tl.where(valid, tl.exp(tl.maximum(n - 1 - offs_c, 0).to(tl.float32) * log_lam), 0.0)
            s_dec = tl.exp((n - shift).to(tl.float32) * log_lam)
            qd = q.to(tl.float32) * q_dec[:, None]
            kv = _decayed_kv(k.to(tl.float32) * k_dec[:, None], v, STATE_SPLIT, PRECISION)  # fp32-exact
        else:
            qd = q.to(tl.float32) * inter_scale
            kv = tl.dot(tl.trans(k), v, input_precision=PRECISION)  # undecayed: exact products
            s_dec = 1.0
        if LOWP_STATE:  # bf16: the state enters the tensor cores in bf16 (fp32 range, as FLA)
            acc = tl.dot(qd.to(q.dtype), state.to(q.dtype), acc)
        else:  # fp16 (tf32: fp16's mantissa with fp32's range) and fp32 (ieee)
            acc = tl.dot(qd, state, acc, input_precision=STATE_PRECISION)
        tl.store(Op.ptr + row[:, None] * Op.sr + offs_v[None, :] * Op.sc, acc.to(Op.ptr.dtype.element_ty),
                 mask=valid[:, None] & v_ok[None, :])
        state = state * s_dec + kv * kv_scale
    if STORE_SF:
        SFp = plane(SF, b, h)
        tl.store(SFp.ptr + offs_k[:, None] * SFp.sr + offs_v[None, :] * SFp.sc, state, mask=st_ok)


@triton.jit
def _lightning_attention_step_kernel(
        Q, K, V, S, O, SN, SLOPES,
        sqb, sqh, sqd, skb, skh, skd, svb, svh, svd, ssb, ssh, ssk, ssv, sob, soh, sod,
        H, scale,
        DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_DECAY: tl.constexpr):
    """One decode token: S' = lambda S + k^T v (fp32, written to SN contiguous), o = scale q S'."""
    pid_v, pid_bh = tile_and_plane(DV, BLOCK_N)  # value tiles of one (batch, head) consecutive
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_DK)
    offs_v = pid_v * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    ok = k_ok[:, None] & v_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_k * sqd, mask=k_ok, other=0.0).to(tl.float32)
    k = tl.load(K + b * skb + h * skh + offs_k * skd, mask=k_ok, other=0.0).to(tl.float32)
    v = tl.load(V + b * svb + h * svh + offs_v * svd, mask=v_ok, other=0.0).to(tl.float32)
    state = tl.load(S + b * ssb + h * ssh + offs_k[:, None] * ssk + offs_v[None, :] * ssv, mask=ok,
                    other=0.0).to(tl.float32)
    if HAS_DECAY:
        state = state * tl.exp(-tl.load(SLOPES + h).to(tl.float32))
    state = state + k[:, None] * v[None, :]
    o = tl.sum(q[:, None] * state, 0) * scale
    tl.store(O + b * sob + h * soh + offs_v * sod, o.to(O.dtype.element_ty), mask=v_ok)
    tl.store(SN + ((b * H + h) * DK + offs_k[:, None]) * DV + offs_v[None, :], state, mask=ok)


# ----------------------------------------------------------------------------- launchers
def _problem(dk, dv, elem, smem):
    """What the prune looks at (layout_* size the Tuner's always-fitting fallback: 32 x 32 tiles)."""
    return dict(block_dk=block_d_of(dk), block_dv=block_d_of(dv), elem=elem, smem=smem, layout_bq=32,
                layout_bk=32)


_DTYPE_FLAGS = ("PRECISION", "STATE_PRECISION", "STATE_SPLIT", "ROW_SCALE")  # follow the dtype: not in tuner keys


def _flags(q, dk, dv):
    """Precision flags per input dtype: the state read into the output (bf16: bf16 operands;
    fp16: TF32; fp32: ieee), the terms of the state update (fp32-exact in every dtype) and fp16's
    row-scaled P."""
    return dict(DK=dk, DV=dv, BLOCK_DK=block_d_of(dk), LOWP_STATE=q.dtype == torch.bfloat16,
                PRECISION="ieee", STATE_PRECISION="tf32" if q.dtype == torch.float16 else "ieee",
                STATE_SPLIT={torch.float16: 2, torch.bfloat16: 3}.get(q.dtype, 1),
                ROW_SCALE=q.dtype == torch.float16)


def lightning_attention_pass(q, k, v, slopes: Optional[torch.Tensor], s0: Optional[torch.Tensor],
                             scale: float, inter_scale: float, kv_scale: float, reverse: bool = False,
                             s0_shift: bool = False, store_sf: bool = True, s0_transposed: bool = False):
    """One chunked pass of the kernel (the forward, or one of the three backward passes).

    q, k ``[B, H, L, Dk]``, v ``[B, H, L, Dv]`` (any strides); s0 ``[B, H, Dk, Dv]`` (or
    ``[B, H, Dv, Dk]`` read transposed with ``s0_transposed``). Returns (out ``[B, H, L, Dv]`` in
    v's dtype, final state ``[B, H, Dk, Dv]`` fp32 or None)."""
    B, H, L, Dk = q.shape
    Dv = v.shape[-1]
    out = empty(B, H, L, Dv, dtype=v.dtype, device=q.device)
    sf = empty(B, H, Dk, Dv, dtype=torch.float32, device=q.device) if store_sf else None
    if s0 is None:
        s0_view = view(out, (0, 0, 0, 0))
    elif s0_transposed:
        s0_view = view(s0, (s0.stride(0), s0.stride(1), s0.stride(3), s0.stride(2)))
    else:
        s0_view = view(s0)
    sf_view = view(sf) if store_sf else view(out, (0, 0, 0, 0))
    flags = _flags(q, Dk, Dv)
    flags.update(HAS_DECAY=slopes is not None, HAS_S0=s0 is not None, STORE_SF=store_sf, REVERSE=reverse,
                 S0_SHIFT=int(s0_shift))
    slopes_t = slopes if slopes is not None else out

    def launch(cfg):
        grid = (triton.cdiv(Dv, cfg["BLOCK_N"]) * B * H,)
        _lightning_attention_fwd_kernel[grid](view(q), view(k), view(v), s0_view, view(out), sf_view, slopes_t, H, L,
                                              scale, inter_scale, kv_scale, **flags, **cfg)

    prob = _problem(Dk, Dv, q.element_size(), device_smem_limit(q.device))
    key = {"dtype": str(q.dtype), "L": triton.next_power_of_2(L), "BH": B * H,
           **{k_: v_ for k_, v_ in flags.items() if k_ not in _DTYPE_FLAGS}}
    with on_device(q):
        launch(TUNER.pick(launch, **prob, **key))
    return out, sf


def lightning_attention_fwd(q, k, v, slopes: Optional[torch.Tensor], initial_state: Optional[torch.Tensor],
                            scale: float):
    """Launch the forward. Returns (o ``[B, H, L, Dv]`` in q's dtype, final state
    ``[B, H, Dk, Dv]`` fp32)."""
    return lightning_attention_pass(q, k, v, slopes, initial_state, scale, scale, 1.0)


def lightning_attention_bwd(do, dsf: Optional[torch.Tensor], q, k, v, slopes: Optional[torch.Tensor],
                            initial_state: Optional[torch.Tensor], scale: float):
    """Launch the backward: three passes of the forward kernel. ``dsf`` is the gradient of the
    final state (or None). Returns (dq, dk, dv, d initial_state fp32 or None)."""
    dq, _ = lightning_attention_pass(do, v, k, slopes, initial_state, scale, scale, 1.0, store_sf=False,
                                     s0_transposed=True)
    dk, _ = lightning_attention_pass(v, do, q, slopes, dsf, scale, 1.0, scale, reverse=True, s0_shift=True,
                                     store_sf=False, s0_transposed=True)
    dv, ds0 = lightning_attention_pass(k, q, do, slopes, dsf, scale, 1.0, scale, reverse=True, s0_shift=True,
                                       store_sf=initial_state is not None)
    if ds0 is not None and slopes is not None:
        ds0 = ds0 * torch.exp(-slopes.float())[None, :, None, None]  # the pass ends one decay step early
    return dq, dk, dv, ds0


def lightning_attention_step(q, k, v, state, slopes: Optional[torch.Tensor], scale: float):
    """Launch one decode step: q, k ``[B, H, Dk]``, v ``[B, H, Dv]``, state ``[B, H, Dk, Dv]``.
    Returns (o ``[B, H, Dv]`` in q's dtype, new state fp32 contiguous)."""
    B, H, Dk = q.shape
    Dv = v.shape[-1]
    out = empty(B, H, Dv, dtype=q.dtype, device=q.device)
    new = empty(B, H, Dk, Dv, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(Dv, STEP_BLOCK_N) * B * H,)
    with on_device(q):
        _lightning_attention_step_kernel[grid](
            q, k, v, state, out, new, slopes if slopes is not None else out,
            *q.stride(), *k.stride(), *v.stride(), *state.stride(), *out.stride(), H, scale,
            DK=Dk, DV=Dv, BLOCK_DK=block_d_of(Dk), BLOCK_N=STEP_BLOCK_N, HAS_DECAY=slopes is not None)
    return out, new


# ----------------------------------------------------------------------------- compile gate
def compile_specs(cc: int):
    """The chunk kernel at every config its prune can select on sm_<cc> for Dk = Dv in
    {16..256} and each dtype (decay, S0, final state and reversal on: the largest code; bf16 at
    D = 128, the benchmark case, also without them), plus the decode step kernel per dtype."""
    from .common import SMEM_LIMIT
    from .gate import Spec, signature

    for tname, dtype in GATE_DTYPES.items():
        ptr = "*" + tname
        scalars = {"SLOPES": "*fp32", **{n: "fp32" for n in ("scale", "inter_scale", "kv_scale")}}
        types = {**{n: view_type(ptr) for n in ("Q", "K", "V", "O")}, **{n: view_type("*fp32") for n in ("S0", "SF")},
                 **scalars}
        step_types = {**{n: ptr for n in ("Q", "K", "V", "O")}, "S": "*fp32", "SN": "*fp32", **scalars}
        elem = torch.empty((), dtype=dtype).element_size()
        q = torch.empty(0, dtype=dtype)
        for d in GATE_HEAD_DIMS:
            prob = _problem(d, d, elem, SMEM_LIMIT[cc])
            for features in ((True, False) if (tname, d) == ("bf16", 128) else (True,)):
                flags = dict(_flags(q, d, d), HAS_DECAY=features, HAS_S0=features, STORE_SF=features,
                             REVERSE=features, S0_SHIFT=int(features))
                for cfg in TUNER.candidates(**prob):
                    tiles = {k: v for k, v in cfg.items() if k.isupper()}
                    yield Spec("lightning_fwd", _lightning_attention_fwd_kernel,
                               signature(_lightning_attention_fwd_kernel, types), {**flags, **tiles},
                               cfg["num_warps"], cfg["num_stages"],
                               tags={"dtype": tname, "D": d, "features": features, **cfg})
        for d in (64, 256):
            yield Spec("lightning_step", _lightning_attention_step_kernel,
                       signature(_lightning_attention_step_kernel, step_types),
                       dict(DK=d, DV=d, BLOCK_DK=block_d_of(d), BLOCK_N=STEP_BLOCK_N, HAS_DECAY=True), 4, 1,
                       tags={"dtype": tname, "D": d})
