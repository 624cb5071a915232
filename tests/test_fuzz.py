"""Differential fuzzing (sparseattn.fuzz), bounded and deterministic: random shapes, GQA, dtypes
(bf16 included, through the interpreter shim), strides, patterns, score options (key padding, key
bias, softcap, ALiBi), the SDPA drop-in's routes, varlen and HiP against the float64 oracle.
Long runs: ``TRITON_INTERPRET=1 python -m sparseattn.fuzz --minutes 60 --seed S``."""
import json
import random

import pytest
import torch
from torch.nn.attention.bias import CausalBias
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparseattn as sa
from sparseattn import fuzz
from utils import DEVICE


@settings(derandomize=True, max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2 ** 31 - 1))
def test_random_cases_match_the_oracle(seed):
    """The kernels: on CUDA where there is a GPU (``device`` of the case), else through the interpreter."""
    case = dict(fuzz.draw_case(random.Random(seed), max_len=160), device=DEVICE)
    err = fuzz.run_case(case)
    assert err is None, f"{err}\nreproduce: python -m sparseattn.fuzz --case '{json.dumps(case)}'"


@settings(derandomize=True, max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2 ** 31 - 1))
def test_random_cases_on_the_cpu_path(seed, monkeypatch):
    """The same draws through the PyTorch CPU path (and torch's own SDPA where the drop-in defers
    to it), which the interpreter never runs: on a GPU machine the fuzzer's CPU tensors take it.
    Its first run found three bugs (non-unit head-dim strides read wrongly by torch's fused CPU op,
    an empty bitmask table, and 3-D inputs given to torch as 4-D)."""
    monkeypatch.setenv("SPARSEATTN_CPU_PATH", "1")
    case = fuzz.draw_case(random.Random(seed ^ 0x5EED), max_len=160)
    err = fuzz.run_case(case)
    assert err is None, f"{err}\nreproduce: SPARSEATTN_CPU_PATH=1 python -m sparseattn.fuzz --case '{json.dumps(case)}'"


def test_fuzzer_catches_a_planted_bug(monkeypatch):
    real = sa.sparse_attention
    monkeypatch.setattr(sa, "sparse_attention", lambda *a, **k: real(*a, **k) * 1.05)
    case = dict(B=1, Hkv=1, group=1, Lq=40, Lk=40, D=16, dtype="fp32", strides="contiguous",
                pattern="sliding_window", window=8, sinks=0, seed=3)
    assert "max error" in fuzz.run_case(case)
    small = fuzz.shrink(case, "planted", budget_s=30)
    assert small["Lq"] <= case["Lq"] and fuzz.run_case(small) is not None


def test_replay_prints_ok(capsys):
    case = dict(B=1, Hkv=1, group=2, Lq=17, Lk=33, D=8, dtype="fp16", strides="transposed",
                pattern="causal_sdpa", seed=5)
    assert fuzz.main(["--case", json.dumps(case)]) == 0
    assert capsys.readouterr().out.strip() == "ok"


def test_every_family_is_drawn():
    """The CI sample reaches every pattern family and every score option (else a family would
    silently drop out of the fuzzing)."""
    rng = random.Random(0)
    cases = [fuzz.draw_case(rng) for _ in range(400)]
    assert {c["pattern"] for c in cases} == set(fuzz.PATTERNS)
    assert {o for c in cases for o in c.get("options", ())} == set(fuzz.OPTIONS)


@pytest.mark.parametrize("pattern", ["varlen", "hip", "padding_sdpa", "key_bias_sdpa", "lower_right_sdpa"])
def test_fuzzer_catches_a_planted_bug_in_each_route(monkeypatch, pattern):
    """A 5% error planted in the op each new family calls is reported."""
    rng = random.Random(1)
    case = next(c for c in iter(lambda: fuzz.draw_case(rng, 64), None) if c["pattern"] == pattern)
    case = dict(case, dtype="fp32")
    name = {"varlen": "varlen_attention", "hip": "hip_attention"}.get(pattern, "scaled_dot_product_attention")
    real = getattr(sa, name)
    monkeypatch.setattr(sa, name, lambda *a, **k: real(*a, **k) * 1.05 + 0.01)
    assert "max error" in fuzz.run_case(case)


# Cases the long runs found (python -m sparseattn.fuzz, README "Tests"), each a fixed bug.
FOUND = [
    # dV off by 6e-5 (> 5.2e-5): ALiBi scores of ~-150 on rows that see one key; the backward
    # recomputed P from a float32 natural-log LSE (P = 1 +- 2e-5). Fixed: float64 LSE, split base-2.
    dict(B=2, Hkv=1, group=1, Lq=293, Lk=1, D=24, dtype="fp32", strides="sliced", pattern="element_mask",
         seed=836555366, options=["alibi", "softcap"], softcap=5.0),
    # the same, found again later in the run (GQA, no softcap)
    dict(B=1, Hkv=1, group=2, Lq=265, Lk=1, D=40, dtype="fp32", strides="contiguous", pattern="element_mask",
         seed=611644237, options=["alibi"]),
    # found on the H200 (2026-11-30), where the fuzzer's CPU tensors take the PyTorch CPU path:
    # IndexError in the CPU path's bitmask lookup when the layout has partial tiles (Lk 1 < block
    # 16) but no tile bitmask (an empty bits tensor, every id -1). Fixed in unpack_bits.
    dict(B=2, Hkv=1, group=1, Lq=93, Lk=1, D=8, dtype="fp16", strides="contiguous", pattern="block_mask",
         seed=507669373, block=16, density=0.9),
]


@pytest.mark.parametrize("path", ["kernel", "cpu_path"])
@pytest.mark.parametrize("case", FOUND, ids=lambda c: f'{c["pattern"]}-{c["seed"]}')
def test_found_cases_stay_fixed(case, path, monkeypatch):
    """Each found case on both paths: the kernels (CUDA, or the interpreter on a CPU) and the
    PyTorch CPU path (what the fuzzer's CPU tensors take where there is no interpreter)."""
    if path == "cpu_path":
        monkeypatch.setenv("SPARSEATTN_CPU_PATH", "1")
    else:
        case = dict(case, device=DEVICE)
    assert fuzz.run_case(case) is None


class _BlockSparseOnMeta:
    """Stands in for sa.BlockSparse on the meta device (its layouts need data): records where
    the fuzzer put the block mask, or which device it asked the mask_mod to be evaluated on."""
    devices = []

    def __init__(self, block_mask, block_size):
        self.devices.append(block_mask.device)

    @classmethod
    def from_mask_mod(cls, mask_mod, B, H, Lq, Lk, block_size, device=None):
        cls.devices.append(torch.device(device or "cpu"))
        return cls.__new__(cls)

    def dense_mask(self, Lq, Lk):
        return torch.ones(1, 1, Lq, Lk, dtype=torch.bool, device="meta")


@pytest.mark.parametrize("pattern", fuzz.PATTERNS)
def test_every_tensor_of_a_case_is_on_its_device(pattern, monkeypatch):
    """``device`` reaches every tensor a case builds (inputs, masks, score options, varlen offsets,
    the oracle's masks), drawn the same as on the CPU, with the drawn strides: checked on the meta
    device, where a tensor left on the CPU shows without a GPU. The ops are stubbed (meta tensors
    cannot run them); the fuzzer's other tests run the real ops."""
    rng = random.Random(7)
    case = next(c for c in iter(lambda: fuzz.draw_case(rng, 64), None) if c["pattern"] == pattern)
    seen = []

    def spy(*a, **k):   # torch's CausalBias (lower_right_sdpa's mask) is metadata, valid on any device
        seen.extend(t for t in [*a, *k.values()] if isinstance(t, torch.Tensor) and not isinstance(t, CausalBias))
        return torch.empty(0, device="meta")
    for name in ("sparse_attention", "scaled_dot_product_attention", "varlen_attention", "hip_mask", "hip_attention"):
        monkeypatch.setattr(sa, name, spy)
    for name in ("attention", "varlen_attention"):
        monkeypatch.setattr(sa.reference, name, spy)
    monkeypatch.setattr(sa, "BlockSparse", _BlockSparseOnMeta)
    for strides in fuzz.STRIDES:
        c = dict(case, strides=strides, dtype="fp16", B=2, softcap=5.0,
                 options=list(fuzz.OPTIONS if pattern in fuzz.LAYOUT_PATTERNS else fuzz.SDPA_OPTIONS))
        if pattern == "varlen":
            c = dict(c, B=1, Lq=sum(a for a, _ in c["lens"]), Lk=sum(b for _, b in c["lens"]))
        cpu, meta = fuzz._inputs(c), fuzz._inputs(dict(c, device="meta"))
        for a, b in zip(cpu, meta):
            assert (b.device.type, b.dtype, b.shape, b.stride()) == ("meta", a.dtype, a.shape, a.stride())
        assert meta[0].stride(-1) == (2 if strides == "sliced" else 1)
        assert (meta[1].stride(0) == 0) == (strides == "expanded" and c["B"] > 1)
        _BlockSparseOnMeta.devices.clear()
        op, ref = fuzz._op_and_oracle(dict(c, device="meta"), *meta)
        assert all(d.type == "meta" for d in _BlockSparseOnMeta.devices)
        # (HiP's oracle reads the mask the op made)
        for run in (lambda: op(*meta), lambda: pattern == "hip" or ref(*meta, torch.float64)):
            seen.clear()
            if run() is True:
                continue
            assert seen and all(t.device.type == "meta" for t in seen), [t.device for t in seen]
