"""What the interpreter never checks about a launch.

* Grids stay inside CUDA's limits whatever B * H: axes 1 and 2 stop at 65535 programs (a GPU
  refuses such a launch), so every launcher runs one flat axis of (tile, batch x head) programs.
  On CPU the launches are recorded, not run (65536 programs are minutes of interpreter); on CUDA
  the kernels run and the first and last heads are checked.
* Kernels launch on the inputs' device: Triton launches on the current device, so tensors on
  cuda:1 while cuda:0 is current need the launchers' device guard.
"""
import contextlib

import pytest
import torch

import sparseattn as sa
from sparseattn.triton_kernels import attention as attn_kernels
from sparseattn.triton_kernels import lightning as lightning_kernels

from utils import DEVICE, assert_oracle, randn

PLANES = 65536 + 64  # B * H just past the limit of grid axes 1 and 2
CUDA_GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)


class _Recorder:
    """Stands in for a jitted kernel: ``kernel[grid](...)`` records the grid instead of launching,
    and whether the launch happened inside the launcher's device guard."""

    guarded = 0  # depth of on_device contexts entered (shared by all recorders)

    def __init__(self):
        self.grids = []
        self.unguarded = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.grids.append(tuple(grid(kwargs) if callable(grid) else grid))
            self.unguarded += _Recorder.guarded == 0
        return launch


@contextlib.contextmanager
def _guard(t):
    _Recorder.guarded += 1
    try:
        yield
    finally:
        _Recorder.guarded -= 1


def _assert_launchable(rec, planes, tiles_at_least=1):
    grids = rec.grids
    assert grids, "the kernel was not launched"
    assert rec.unguarded == 0, "a launch outside on_device(q): it would run on the current device, not q's"
    for grid in grids:
        assert all(0 < g <= lim for g, lim in zip(grid, CUDA_GRID_LIMITS)), f"grid {grid} exceeds CUDA's limits"
        n = 1
        for g in grid:
            n *= g
        assert n >= planes * tiles_at_least, f"grid {grid} has fewer programs than {planes} planes"


@pytest.mark.parametrize("B,H", [(1, PLANES), (PLANES // 64, 64)])
def test_attention_grids_within_cuda_limits(monkeypatch, B, H):
    recorders = {}
    for name in ("_sparse_attention_fwd_kernel", "_sparse_attention_bwd_preprocess_kernel",
                 "_sparse_attention_bwd_dkdv_kernel", "_sparse_attention_bwd_dq_kernel"):
        recorders[name] = _Recorder()
        monkeypatch.setattr(attn_kernels, name, recorders[name])
    monkeypatch.setattr(attn_kernels, "on_device", _guard)
    q, k, v, do = (torch.zeros(B, H, 1, 16) for _ in range(4))
    layout = sa.BlockLayout.from_block_mask(torch.ones(1, 1, 1, 1, dtype=torch.bool), 16, (1, 1))
    kinds = (1.0, 16, 16, None, None, 0)
    out, lse = attn_kernels.sparse_attention_fwd(q, k, v, layout.lists()[:5], None, None, None, *kinds)
    attn_kernels.sparse_attention_bwd(do, None, q, k, v, out, lse, layout.lists(), None, None, None, *kinds)
    for rec in recorders.values():
        _assert_launchable(rec, B * H)


@pytest.mark.parametrize("B,H", [(1, PLANES), (PLANES // 64, 64)])
def test_lightning_grids_within_cuda_limits(monkeypatch, B, H):
    chunk, step = _Recorder(), _Recorder()
    monkeypatch.setattr(lightning_kernels, "_lightning_attention_fwd_kernel", chunk)
    monkeypatch.setattr(lightning_kernels, "_lightning_attention_step_kernel", step)
    monkeypatch.setattr(lightning_kernels, "on_device", _guard)
    q, k, v = (torch.zeros(B, H, 1, 16) for _ in range(3))
    lightning_kernels.lightning_attention_fwd(q, k, v, None, None, 1.0)
    lightning_kernels.lightning_attention_bwd(q, None, q, k, v, None, None, 1.0)
    lightning_kernels.lightning_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0],
                                               torch.zeros(B, H, 16, 16), None, 1.0)
    _assert_launchable(chunk, B * H)
    _assert_launchable(step, B * H)


def _check_causal_sdpa(q, k, v, heads):
    """Causal SDPA fwd + bwd (fp16) against float64 on the given heads."""
    out = sa.scaled_dot_product_attention(q, k, v, is_causal=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad((out.float() * dout.float()).sum(), (q, k, v))
    res = {}
    for dt in (torch.float64, torch.float16):
        leaves = [t.detach()[:, heads].to(dt).requires_grad_() for t in (q, k, v)]
        o = sa.reference.attention(*leaves, is_causal=True, dtype=dt)
        res[dt] = (o, *torch.autograd.grad((o.double() * dout[:, heads].double()).sum(), leaves))
    for name, g, r, b in zip(("out", "dq", "dk", "dv"), (out, *grads), res[torch.float64], res[torch.float16]):
        assert_oracle(name, g[:, heads], r, b)


@pytest.mark.skipif(DEVICE != "cuda", reason="65536+ (batch, head) planes: minutes in the interpreter")
def test_many_planes_run_on_cuda():
    """Attention (fwd + bwd) and lightning with B * H > 65535: the first and last heads against float64."""
    B, H, L, D = 2, PLANES // 2, 20, 16
    q, k, v = (randn(B, H, L, D, dtype=torch.float16, requires_grad=True) for _ in range(3))
    heads = torch.tensor([0, H - 1], device=DEVICE)
    _check_causal_sdpa(q, k, v, heads)

    slopes = torch.rand(H, device=DEVICE) + 0.01
    o, state = sa.lightning_attention(q.detach(), k.detach(), v.detach(), slopes, output_final_state=True)
    sub = [t.detach()[:, heads] for t in (q, k, v)]
    ref_o, ref_s = sa.reference.lightning_attention(*sub, slopes[heads])
    base_o, base_s = sa.reference.lightning_attention(*sub, slopes[heads], dtype=torch.float16)
    assert_oracle("lightning o", o[:, heads], ref_o, base_o)
    assert_oracle("lightning state", state[:, heads], ref_s, base_s.float())
    o_t, new = sa.lightning_attention_step(q[:, :, 0].detach(), k[:, :, 0].detach(), v[:, :, 0].detach(), state,
                                           slopes)
    ref_t, ref_new = sa.reference.lightning_attention(*(t[:, :, :1] for t in sub), slopes[heads],
                                                      initial_state=state[:, heads].double())
    assert torch.allclose(o_t[:, heads].double(), ref_t[:, :, 0], atol=1e-2, rtol=1e-2)
    assert torch.allclose(new[:, heads].double(), ref_new, atol=1e-3, rtol=1e-3)


@pytest.mark.skipif(DEVICE != "cuda" or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_inputs_on_a_non_current_device():
    """Tensors on cuda:1 while cuda:0 is current: the kernels run on cuda:1 and are correct."""
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    q, k, v = (randn(1, 2, 100, 64, dtype=torch.float16, device=dev, requires_grad=True) for _ in range(3))
    _check_causal_sdpa(q, k, v, torch.arange(2, device=dev))
    ql, kl, vl = (t.detach() for t in (q, k, v))
    o, state = sa.lightning_attention(ql, kl, vl, output_final_state=True)
    ref_o, ref_s = sa.reference.lightning_attention(ql, kl, vl)
    base_o, base_s = sa.reference.lightning_attention(ql, kl, vl, dtype=torch.float16)
    assert_oracle("lightning o", o, ref_o, base_o)
    o_t, _ = sa.lightning_attention_step(ql[:, :, 0], kl[:, :, 0], vl[:, :, 0], state)
    assert o_t.device == dev and torch.isfinite(o_t).all()
