"""Every autotune config a kernel can select is correct, not only the one the tests happen to run.

The other tests run one config per problem (the interpreter takes the largest tile; on a GPU the
conftest turns timing off and the first candidate runs). Here each tuner is forced through every
config that fits, in turn, and fwd + bwd is checked against the float64 oracle."""
import pytest
import torch
import triton

import sparseattn as sa
from sparseattn.triton_kernels import attention as attn_kernels
from sparseattn.triton_kernels import lightning as lightning_kernels
from sparseattn.triton_kernels.common import device_smem_limit

from checks import attention_inputs as _inputs, check_attention as check
from checks import check_lightning_bwd, check_lightning_fwd, lightning_inputs
from utils import DEVICE, DTYPES

ATTN_TUNERS = (attn_kernels.FWD_TUNER, attn_kernels.DKDV_TUNER, attn_kernels.DQ_TUNER)


def _force(monkeypatch, tuners, index):
    """Make each tuner run its index-th fitting config (its last when it has fewer); returns the
    list of (tuner name, config) picks made."""
    chosen = []

    def picker(tuner):
        def pick(launch, **problem):
            fitting = tuner.fitting(**problem)
            cfg = fitting[min(index, len(fitting) - 1)]
            chosen.append((tuner.name, cfg))
            return cfg
        return pick

    for tuner in tuners:
        monkeypatch.setattr(tuner, "pick", picker(tuner))
    return chosen


@pytest.mark.parametrize("D", [64, 128] if DEVICE == "cuda" else [64])
@pytest.mark.parametrize("dtype", DTYPES if DEVICE == "cuda" else [torch.float16])
def test_every_attention_config(monkeypatch, dtype, D):
    """Causal (bottom-right, Lq != Lk) over 128-blocks with GQA: full tiles, diagonal tiles and the
    ragged last tile; then an element mask with fully masked rows (partial tiles reading it)."""
    Lq, Lk, Hq = (200, 300, 2) if DEVICE == "cpu" else (333, 517, 4)
    nq, nk = -(-Lq // 128), -(-Lk // 128)
    blocks = torch.ones(1, 1, nq, nk, dtype=torch.bool, device=DEVICE)
    prob = attn_kernels.problem(torch.empty(0, dtype=dtype, device=DEVICE), 128, 128, D)
    count = max(len(t.fitting(**prob)) for t in ATTN_TUNERS)
    assert count >= 2, f"expected several configs to choose from, got {count}"
    for index in range(count):
        chosen = _force(monkeypatch, ATTN_TUNERS, index)
        torch.manual_seed(index + D)
        q, k, v = _inputs(1, Hq, Hq // 2, Lq, Lk, D, dtype, DEVICE)
        check(q, k, v, sa.BlockLayout.from_block_mask(blocks, 128, (Lq, Lk), causal="bottom_right"), "triton")
        mask = torch.rand(1, Hq, Lq, Lk, device=DEVICE) < 0.7
        mask[:, :, :5] = False
        check(q, k, v, sa.BlockLayout.from_block_mask(blocks, 128, (Lq, Lk), mask=mask), "triton")
        assert {name for name, _ in chosen} == {t.name for t in ATTN_TUNERS}, f"config #{index}: a kernel did not run"


@pytest.mark.parametrize("Dk,Dv", [(64, 64), (128, 128), (256, 64), (32, 16)] if DEVICE == "cuda" else [(64, 64)])
@pytest.mark.parametrize("dtype", DTYPES if DEVICE == "cuda" else [torch.float32])
def test_every_lightning_config(monkeypatch, dtype, Dk, Dv):
    """Lightning forward + backward with decay and an initial state at each config."""
    elem = torch.empty(0, dtype=dtype).element_size()
    prob = lightning_kernels._problem(Dk, Dv, elem, device_smem_limit(torch.device(DEVICE)))
    count = len(lightning_kernels.TUNER.fitting(**prob))
    for index in range(count):
        chosen = _force(monkeypatch, (lightning_kernels.TUNER,), index)
        torch.manual_seed(index + Dk)
        L = 150 if DEVICE == "cpu" else 333
        q, k, v, slopes, s0 = lightning_inputs(1, 2, L, Dk, Dv, dtype, True, True, grad=True)
        check_lightning_fwd(q, k, v, slopes, s0, tag=f"config #{index}")
        check_lightning_bwd(q, k, v, slopes, s0, True, f"config #{index}")
        assert chosen, f"config #{index}: the lightning kernel did not run"


def test_autotune_picks_the_fastest_fitting_config(monkeypatch):
    """Tuner.pick times each fitting candidate once per key and keeps the fastest; a config that
    runs out of resources counts as infinitely slow; inside a CUDA graph capture an untimed key
    runs its first candidate untimed; SPARSEATTN_AUTOTUNE=0 takes the first."""
    from sparseattn.triton_kernels import common

    configs = [{"BLOCK_M": m, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2} for m in (128, 64, 32, 16)]
    tuner = common.Tuner("toy", configs, lambda cfg, *, limit, **_: cfg["BLOCK_M"] <= limit)
    times = {128: 0.1, 64: 3.0, 32: 1.0, 16: 2.0}
    calls = []

    def do_bench(fn, **_):
        fn()
        m = calls[-1]["BLOCK_M"]
        if m == 128:
            raise triton.runtime.errors.OutOfResources(1, 0, "shared memory")
        return times[m]

    monkeypatch.setattr(common, "INTERPRET", False)
    monkeypatch.setattr(common.triton.testing, "do_bench", do_bench)
    monkeypatch.setenv("SPARSEATTN_AUTOTUNE", "1")
    assert tuner.pick(calls.append, limit=128, layout_bq=128, layout_bk=128)["BLOCK_M"] == 32
    assert [c["BLOCK_M"] for c in calls] == [128, 64, 32, 16]
    assert tuner.pick(calls.append, limit=128, layout_bq=128, layout_bk=128)["BLOCK_M"] == 32
    assert len(calls) == 4, "a key is timed once"
    assert tuner.pick(calls.append, limit=64, layout_bq=128, layout_bk=128)["BLOCK_M"] == 32
    assert [c["BLOCK_M"] for c in calls[4:]] == [64, 32, 16], "only fitting configs are timed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert tuner.pick(calls.append, limit=32, layout_bq=128, layout_bk=128)["BLOCK_M"] == 32
    assert len(calls) == 7, "no timing inside a CUDA graph capture"
    assert tuner.pick(calls.append, limit=128, layout_bq=128, layout_bk=128)["BLOCK_M"] == 32, "timed keys stay"
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert tuner.pick(calls.append, limit=32, layout_bq=128, layout_bk=128)["BLOCK_M"] == 32
    assert [c["BLOCK_M"] for c in calls[7:]] == [32, 16], "an untimed key is timed after the capture"
    monkeypatch.setenv("SPARSEATTN_AUTOTUNE", "0")
    assert tuner.pick(calls.append, limit=48, layout_bq=128, layout_bk=128)["BLOCK_M"] == 32
    assert len(calls) == 9, "no timing when autotuning is off"
