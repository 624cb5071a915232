"""Lightning attention: kernels (Triton, interpreted on CPU) and the CPU path against the float64
step-by-step recurrence; decode step; autograd, torch.compile, opcheck; bad input."""

import pytest
import torch

import sparseattn as sa
from sparseattn import reference
from sparseattn.ops.lightning.op import lightning_attention_bwd, lightning_attention_fwd, lightning_attention_step_op

from utils import DEVICE, DTYPES, assert_oracle, randn
from checks import check_lightning_bwd as _check_bwd, check_lightning_fwd as _check_fwd, lightning_inputs as _inputs





# ----------------------------------------------------------------------------- forward
FWD_CASES = [  # (B, H, L, Dk, Dv, decay, initial state, strided)
    (1, 2, 1, 32, 32, True, True, False),
    (2, 2, 63, 16, 16, False, False, False),
    (1, 3, 200, 32, 64, True, True, True),
    (1, 2, 1000, 32, 32, True, False, False),
    (1, 1, 97, 128, 128, True, True, False),
    (1, 1, 40, 256, 64, True, True, False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", FWD_CASES, ids=lambda c: "B{}H{}L{}Dk{}Dv{}-decay{}-s0{}-strided{}".format(*c))
def test_forward_matches_recurrence(case, dtype):
    B, H, L, Dk, Dv, decay, s0, stride = case
    if Dk == 256 and dtype != torch.float32:
        pytest.skip("one D = 256 case is enough on CPU")
    torch.manual_seed(L + Dk)
    q, k, v, slopes, state = _inputs(B, H, L, Dk, Dv, dtype, decay, s0, stride=stride)
    _check_fwd(q, k, v, slopes, state, tag=str(case))
    assert sa.last_backend() == "triton"


def test_forward_scale_and_plain_output():
    torch.manual_seed(1)
    q, k, v, slopes, state = _inputs(1, 2, 70, 32, 16, torch.float32, True, True)
    _check_fwd(q, k, v, slopes, state, scale=0.3)
    o = sa.lightning_attention(q, k, v, slopes, initial_state=state)
    assert isinstance(o, torch.Tensor)


# ----------------------------------------------------------------------------- backward
BWD_CASES = [  # (B, H, L, Dk, Dv, decay, initial state, final-state grad, dtype)
    (1, 2, 1, 16, 32, True, True, True, torch.float32),
    (1, 2, 63, 32, 32, True, True, True, torch.float32),
    (1, 2, 200, 32, 16, False, False, False, torch.float16),
    (1, 2, 200, 16, 16, True, True, True, torch.float16),
    (1, 1, 1000, 16, 16, True, False, True, torch.float32),
    (1, 1, 130, 64, 128, True, True, True, torch.float32),
]



@pytest.mark.parametrize("case", BWD_CASES, ids=lambda c: "B{}H{}L{}Dk{}Dv{}-decay{}-s0{}-dsf{}-{}".format(*c))
def test_backward_matches_recurrence(case):
    B, H, L, Dk, Dv, decay, s0, with_dsf, dtype = case
    torch.manual_seed(L + 7)
    q, k, v, slopes, state = _inputs(B, H, L, Dk, Dv, dtype, decay, s0, grad=True)
    _check_bwd(q, k, v, slopes, state, with_dsf, str(case))


@pytest.mark.parametrize("L", [63, 1000])
def test_bf16_forward_backward(L):
    """bf16 forward and backward (its bf16 state path); on the CPU through the interpreter (small)."""
    if DEVICE != "cuda" and L > 100:
        pytest.skip("one bf16 length is enough on CPU")
    torch.manual_seed(L)
    B, H, D = (2, 4, 128) if DEVICE == "cuda" else (1, 2, 32)
    q, k, v, slopes, state = _inputs(B, H, L, D, D, torch.bfloat16, True, True, grad=True)
    _check_fwd(q, k, v, slopes, state)
    _check_bwd(q, k, v, slopes, state, True, "bf16")


def test_strided_backward_and_stride0_grad():
    torch.manual_seed(3)
    q, k, v, slopes, _ = _inputs(1, 2, 90, 32, 32, torch.float32, True, False, grad=True, stride=True)
    o = sa.lightning_attention(q, k, v, slopes)
    got = torch.autograd.grad(o.sum(), (q, k, v))  # the incoming gradient is an expanded (stride-0) tensor
    ref = reference.lightning_attention(q, k, v, slopes)[0]
    rg = torch.autograd.grad(ref.sum(), (q, k, v))
    base = torch.autograd.grad(reference.lightning_attention(q, k, v, slopes, dtype=q.dtype)[0].sum(), (q, k, v))
    for name, g, r, b in zip("qkv", got, rg, base):
        assert_oracle("d" + name, g, r, b)


# ----------------------------------------------------------------------------- CPU path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_path(monkeypatch, dtype):
    monkeypatch.setenv("SPARSEATTN_CPU_PATH", "1")
    torch.manual_seed(5)
    q, k, v, slopes, state = (t.cpu() if t is not None else None
                              for t in _inputs(1, 2, 300, 32, 16, dtype, True, True))
    for t in (q, k, v, state):
        t.requires_grad_(True)
    if DEVICE != "cpu":
        slopes = slopes.cpu()
    _check_fwd(q, k, v, slopes, state, tag="cpu path")
    assert sa.last_backend() == "cpu"
    _check_bwd(q, k, v, slopes, state, True, "cpu path")
    _check_bwd(q, k, v, None, None, False, "cpu path, no decay")


# ----------------------------------------------------------------------------- long sequences
def _sampled_oracle(q, k, v, slopes, scale, positions, dtype):
    """o_t at a few positions and the final state, from the definition with lambda^(t-j) as
    exp(-(t-j) * slope) (no recurrence), in ``dtype``."""
    H, L = q.shape[1], q.shape[2]
    q, k, v = q[:, :, positions].to(dtype), k.to(dtype), v.to(dtype)
    idx = torch.arange(L, device=q.device, dtype=dtype)
    s = slopes.to(dtype).view(H, 1)
    rows = []
    for i, t in enumerate(positions):
        w = torch.exp(-(t - idx[: t + 1]) * s)                                       # [H, t+1]
        sc = (k[0, :, : t + 1] @ q[0, :, i, :, None]).squeeze(-1) * w * scale        # [H, t+1]
        rows.append((sc[:, None, :] @ v[0, :, : t + 1]).squeeze(1))                  # [H, Dv]
    wf = torch.exp(-(L - 1 - idx) * s)
    state = (k[0] * wf[..., None]).transpose(-1, -2) @ v[0]
    return torch.stack(rows, 1)[None], state[None]


@pytest.mark.parametrize("L, path", [(4096, "kernel"), (1 << 20, "cpu")])
def test_long_sequence_large_slopes(monkeypatch, L, path):
    """Slopes up to 8 (lambda ~ 3e-4) stay exact at long L: decay powers are exponents of position
    differences, never a running product. 1M tokens runs the kernel on CUDA, the CPU path on CPU
    (the interpreter would need minutes)."""
    if path == "cpu" and DEVICE == "cpu":
        monkeypatch.setenv("SPARSEATTN_CPU_PATH", "1")
    torch.manual_seed(11)
    slopes = torch.tensor([8.0, 1.0, 1e-3], device=DEVICE)
    q, k, v = (randn(1, 3, L, 16) for _ in range(3))
    o, sf = sa.lightning_attention(q, k, v, slopes, output_final_state=True)
    positions = [0, 1, 63, 64, 65, 1000, L // 2 + 3] + list(range(L - 8, L))
    scale = 1 / 4
    ref_o, ref_s = _sampled_oracle(q, k, v, slopes, scale, positions, torch.float64)
    base_o, base_s = _sampled_oracle(q, k, v, slopes, scale, positions, torch.float32)
    assert_oracle("o at sampled positions", o[:, :, positions], ref_o, base_o)
    assert_oracle("final state", sf, ref_s, base_s)
    assert torch.isfinite(o).all()


# ----------------------------------------------------------------------------- decode step
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grad", [False, True])
def test_step_equals_chunked(dtype, grad):
    torch.manual_seed(9)
    B, H, L0, n, Dk, Dv = 2, 2, 70, 6, 32, 16
    q, k, v, slopes, s0 = _inputs(B, H, L0 + n, Dk, Dv, dtype, True, True)
    full, full_state = sa.lightning_attention(q, k, v, slopes, initial_state=s0, output_final_state=True)
    ref, ref_state = reference.lightning_attention(q, k, v, slopes, None, s0)
    base, base_state = reference.lightning_attention(q, k, v, slopes, None, s0, dtype=dtype)
    _, state = sa.lightning_attention(q[:, :, :L0], k[:, :, :L0], v[:, :, :L0], slopes, initial_state=s0,
                                      output_final_state=True)
    outs = []
    for t in range(L0, L0 + n):
        qt, kt, vt = (x[:, :, t].clone().requires_grad_(grad) for x in (q, k, v))
        before = state.clone()
        o_t, state = sa.lightning_attention_step(qt, kt, vt, state, slopes)
        assert not torch.equal(before, state.detach()) and o_t.shape == (B, H, Dv)
        assert sa.last_backend() == ("torch" if grad else "triton")
        outs.append(o_t.detach())
    step_o = torch.stack(outs, 2)
    assert_oracle("step o", step_o, ref[:, :, L0:], base[:, :, L0:])
    assert_oracle("step state", state.detach(), ref_state, base_state.float())
    assert_oracle("chunked o (same tokens)", full[:, :, L0:], ref[:, :, L0:], base[:, :, L0:])
    assert_oracle("chunked state", full_state, ref_state, base_state.float())


def test_step_strided_state_and_no_decay():
    torch.manual_seed(4)
    q, k, v = (randn(2, 3, 64) for _ in range(3))
    state = randn(2, 3, 64, 64).transpose(-1, -2)  # non-contiguous
    o, new = sa.lightning_attention_step(q, k, v, state)
    ref_o, ref_s = reference.lightning_attention(q[:, :, None], k[:, :, None], v[:, :, None], None, None, state)
    base_o, base_s = reference.lightning_attention(q[:, :, None], k[:, :, None], v[:, :, None], None, None, state,
                                                   dtype=torch.float32)
    assert_oracle("step o", o, ref_o[:, :, 0], base_o[:, :, 0])
    assert_oracle("step state", new, ref_s, base_s)
    assert new.is_contiguous() and new.dtype == torch.float32


# ----------------------------------------------------------------------------- torch.compile, opcheck
def test_torch_compile_fullgraph():
    torch.manual_seed(2)
    q, k, v, slopes, s0 = _inputs(1, 2, 80, 16, 16, torch.float32, True, True, grad=True)

    def f(q, k, v, s0):
        o, sf = sa.lightning_attention(q, k, v, slopes, initial_state=s0, output_final_state=True)
        return (o * o).sum() + sf.sum()

    compiled = torch.compile(f, fullgraph=True)
    loss = compiled(q, k, v, s0)
    got = torch.autograd.grad(loss, (q, k, v, s0))
    ref = torch.autograd.grad(f(q, k, v, s0), (q, k, v, s0))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_opcheck():
    torch.manual_seed(6)
    q, k, v, slopes, s0 = _inputs(1, 2, 20, 16, 16, torch.float32, True, True, grad=True)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(lightning_attention_fwd, (q, k, v, slopes, s0, 0.25), test_utils=tests)
    torch.library.opcheck(lightning_attention_fwd, (q, k, v, None, None, 0.25), test_utils=tests)
    do, dsf = randn(1, 2, 20, 16), randn(1, 2, 16, 16)
    qd, kd, vd, sd = (t.detach() for t in (q, k, v, s0))
    torch.library.opcheck(lightning_attention_bwd, (do, dsf, qd, kd, vd, slopes, sd, 0.25), test_utils=tests)
    torch.library.opcheck(lightning_attention_step_op, (qd[:, :, 0], kd[:, :, 0], vd[:, :, 0], sd, slopes, 0.25),
                          test_utils=tests)


# ----------------------------------------------------------------------------- slopes, bad input
def test_slopes():
    torch.testing.assert_close(sa.lightning_slopes(8), torch.tensor([2.0 ** -i for i in range(1, 9)]))
    s6 = sa.lightning_slopes(6)
    assert s6.shape == (6,) and (s6 > 0).all()
    torch.testing.assert_close(s6[:4], sa.lightning_slopes(4))
    torch.testing.assert_close(s6[4:], sa.lightning_slopes(8)[0::2][:2])
    torch.testing.assert_close(sa.lightning_slopes(4, 0, 5), sa.lightning_slopes(4) * (1 + 1e-5))
    torch.testing.assert_close(sa.lightning_slopes(4, 4, 5), sa.lightning_slopes(4) * 1e-5)
    with pytest.raises(ValueError, match="num_heads"):
        sa.lightning_slopes(0)
    with pytest.raises(ValueError, match="layer_idx"):
        sa.lightning_slopes(4, 5, 5)
    with pytest.raises(ValueError, match="both or neither"):
        sa.lightning_slopes(4, 1)


def test_bad_input():
    q, k, v = (randn(1, 2, 10, 16) for _ in range(3))
    la = sa.lightning_attention
    with pytest.raises(ValueError, match=r"slopes: expected finite rates >= 0.*-0\.5"):
        la(q, k, v, torch.tensor([0.1, -0.5], device=DEVICE))
    with pytest.raises(ValueError, match=r"slopes: expected shape \[2\].*\[3\]"):
        la(q, k, v, torch.ones(3, device=DEVICE))
    with pytest.raises(TypeError, match="slopes: expected a torch.Tensor"):
        la(q, k, v, [0.1, 0.2])
    with pytest.raises(TypeError, match="slopes: expected a floating point"):
        la(q, k, v, torch.ones(2, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="k: expected head dim 16"):
        la(q, randn(1, 2, 10, 32), v)
    with pytest.raises(ValueError, match="expected the same heads and length"):
        la(q, k, randn(1, 2, 11, 16))
    with pytest.raises(ValueError, match="expected the same number of heads"):
        la(q, randn(1, 1, 10, 16), randn(1, 1, 10, 16))
    with pytest.raises(TypeError, match="expected one dtype"):
        la(q, k, v.half())
    with pytest.raises(ValueError, match=r"q: expected 4 dims"):
        la(q[0], k[0], v[0])
    with pytest.raises(TypeError, match="q: expected float16, bfloat16 or float32, got torch.float64"):
        la(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="v: expected head dim in"):
        la(q, k, randn(1, 2, 10, 300))
    with pytest.raises(ValueError, match=r"initial_state: expected shape .* = \[1, 2, 16, 16\], got \[1, 2, 16, 8\]"):
        la(q, k, v, initial_state=randn(1, 2, 16, 8))
    with pytest.raises(TypeError, match="initial_state: expected a torch.Tensor"):
        la(q, k, v, initial_state=1.0)
    state = randn(1, 2, 16, 16)
    step = sa.lightning_attention_step
    with pytest.raises(ValueError, match=r"q: expected 3 dims \[B, H, D\]"):
        step(q, k, v, state)
    with pytest.raises(ValueError, match=r"state: expected shape .* = \[1, 2, 16, 16\], got \[1, 2, 16\]"):
        step(q[:, :, 0], k[:, :, 0], v[:, :, 0], state[..., 0])
    with pytest.raises(ValueError, match=r"slopes: expected shape \[2\]"):
        step(q[:, :, 0], k[:, :, 0], v[:, :, 0], state, torch.ones(1, device=DEVICE))
    with pytest.raises(ValueError, match="slopes: expected a constant"):
        la(q, k, v, torch.ones(2, device=DEVICE, requires_grad=True))


def test_lightning_names_its_head_constraint():
    q, k = randn(1, 4, 16, 16), randn(1, 2, 16, 16)
    with pytest.raises(ValueError, match="lightning_attention has no GQA"):
        sa.lightning_attention(q, k, k)
