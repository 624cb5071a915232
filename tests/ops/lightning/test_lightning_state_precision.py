"""Lightning's recurrent state keeps fp32 accuracy for fp16 / bf16 inputs (issue 18, item 14).

The state is what decoding and LASP-2 carry across chunks and ranks, so the final state, the
gradient of the initial state and the state after decode steps must be as accurate as an fp32
recurrence over the same (already rounded) inputs: the bound is tied to that recurrence's own
error against float64, not to the loose same-dtype baseline (an fp16 recurrence is ~1e4x worse).
Also: an fp32 initial state with fp16 / bf16 inputs, and fp16 gradients of the parallel
(intra-chunk) form when the incoming gradient is small."""

import pytest
import torch

import sparseattn as sa
from sparseattn import reference

from utils import DEVICE, randn

LOW = [torch.float16, torch.bfloat16]




def assert_fp32_level(name, out, ref, f32, factor=4.0):
    """max|out - ref| <= factor * max|f32 - ref| + one fp32 ulp of the largest |ref|: ``ref`` is
    float64, ``f32`` the same computation in float32 from the same inputs."""
    assert out.dtype == torch.float32, f"{name}: expected float32, got {out.dtype}"
    ref = ref.double()
    err = (out.double() - ref).abs().max().item()
    f32_err = (f32.double() - ref).abs().max().item()
    tol = factor * f32_err + 2.0 ** -23 * ref.abs().max().item()
    assert err <= tol, f"{name}: max error {err:.3g} > {tol:.3g} (fp32 recurrence error {f32_err:.3g})"


def _inputs(L, dtype, device, D=32, H=2, grad=False):
    q, k, v = (randn(1, H, L, D, dtype=dtype, device=device, requires_grad=grad) for _ in range(3))
    slopes = torch.rand(H, device=device) * 2 + 0.01
    s0 = randn(1, H, D, D, device=device, requires_grad=grad)  # fp32 initial state
    return q, k, v, slopes, s0


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("L", [70, 130])
def test_final_state_as_accurate_as_fp32_recurrence(backend, dtype, L):
    """Before: the decayed keys were rounded to the input dtype in every state update (fp16
    ~6e-5, bf16 ~5e-4 relative at L = 70, where the fp32 recurrence is within ~4e-8)."""
    device, expected = backend
    if L > 100 and dtype == torch.bfloat16:
        pytest.skip("one longer length (fp16) is enough on CPU")
    torch.manual_seed(L)
    q, k, v, slopes, s0 = _inputs(L, dtype, device)
    o, sf = sa.lightning_attention(q, k, v, slopes, initial_state=s0, output_final_state=True)
    assert sa.last_backend() == expected and o.dtype == dtype
    _, ref = reference.lightning_attention(q, k, v, slopes, None, s0)
    _, f32 = reference.lightning_attention(q, k, v, slopes, None, s0, dtype=torch.float32)
    assert_fp32_level(f"final state ({dtype}, L={L})", sf, ref, f32)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_fp32_initial_state_gradient_and_decode(dtype):
    """fp16 / bf16 inputs with an fp32 initial state (what decoding and LASP-2 carry): the state's
    gradient comes back in fp32 at fp32 accuracy, and decode steps continuing from the prefill's
    final state stay at fp32 accuracy too."""
    torch.manual_seed(3)
    L0, n = 70, 3
    q, k, v, slopes, s0 = _inputs(L0 + n, dtype, DEVICE, grad=True)
    pre = [t[:, :, :L0] for t in (q, k, v)]
    o, sf = sa.lightning_attention(*pre, slopes, initial_state=s0, output_final_state=True)
    do, dsf = randn(*o.shape, dtype=dtype), randn(*sf.shape)
    ds0 = torch.autograd.grad([o, sf], [s0], [do, dsf])[0]

    def oracle_ds0(dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in (*pre, s0)]
        ro, rs = reference.lightning_attention(*leaves[:3], slopes, None, leaves[3], dtype=dt)
        return torch.autograd.grad([ro, rs], leaves[3:], [do.to(dt), dsf.to(dt)])[0]

    assert_fp32_level(f"d initial_state ({dtype})", ds0, oracle_ds0(torch.float64), oracle_ds0(torch.float32))

    state = sf.detach()
    with torch.no_grad():
        for t in range(L0, L0 + n):
            _, state = sa.lightning_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], state, slopes)
    _, ref = reference.lightning_attention(q, k, v, slopes, None, s0)
    _, f32 = reference.lightning_attention(q, k, v, slopes, None, s0, dtype=torch.float32)
    assert_fp32_level(f"state after {n} decode steps ({dtype})", state, ref, f32)


def test_initial_state_dtypes():
    """Any float initial state: read into the fp32 state (exactly, float64 rounded to fp32), the
    final state is fp32, the gradient comes back in the initial state's dtype."""
    torch.manual_seed(4)
    q, k, v, slopes, _ = _inputs(20, torch.float16, DEVICE, D=16, grad=True)
    for sdt in (torch.float64, torch.bfloat16, torch.float16):  # fp32: the tests above
        s0 = randn(1, 2, 16, 16, device=DEVICE).to(sdt).requires_grad_()
        o, sf = sa.lightning_attention(q, k, v, slopes, initial_state=s0, output_final_state=True)
        assert sf.dtype == torch.float32
        ds0 = torch.autograd.grad(sf.sum() + o.float().sum(), s0)[0]
        assert ds0.dtype == sdt and ds0.shape == s0.shape
        _, ref = reference.lightning_attention(q, k, v, slopes, None, s0)
        _, f32 = reference.lightning_attention(q, k, v, slopes, None, s0.float(), dtype=torch.float32)
        assert_fp32_level(f"final state from a {sdt} initial state", sf, ref, f32)


def test_fp16_gradients_of_small_incoming_gradients():
    """fp16 dq / dk of the parallel (intra-chunk) form with |do| ~ 1e-5 (typical of a loss
    averaged over many tokens): within 3x of fp32 math rounded to fp16. Before: the intra-chunk P
    of the dq and dk passes (do . v^T, v . do^T) fell into fp16 subnormals, ~5-16x worse."""
    torch.manual_seed(0)
    q, k, v, slopes, _ = _inputs(64, torch.float16, DEVICE, D=64, grad=True)
    do = randn(*q.shape, dtype=torch.float16, scale=1e-5)
    o = sa.lightning_attention(q, k, v, slopes)
    assert sa.last_backend() == "triton"
    got = torch.autograd.grad(o, (q, k, v), do)

    def oracle(dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        return torch.autograd.grad(reference.lightning_attention(*leaves, slopes, dtype=dt)[0], leaves, do.to(dt))

    ref, f32 = oracle(torch.float64), oracle(torch.float32)
    for name, g, r, f in zip(("dq", "dk", "dv"), got, ref, f32):
        err = (g.double() - r).abs().max().item()
        f32_err = (f.half().double() - r).abs().max().item()  # fp32 math, rounded to fp16 once
        assert err <= 3 * f32_err, f"{name}: max error {err:.3g} > 3 x {f32_err:.3g} (fp32 math rounded to fp16)"
