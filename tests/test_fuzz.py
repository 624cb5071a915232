"""Differential fuzzing (sparseattn.fuzz), bounded and deterministic: random shapes, GQA, dtypes
(bf16 included, through the interpreter shim), strides, patterns, score options (key padding, key
bias, softcap, ALiBi), the SDPA drop-in's routes, varlen and HiP against the float64 oracle.
Long runs: ``TRITON_INTERPRET=1 python -m sparseattn.fuzz --minutes 60 --seed S``."""
import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparseattn as sa
from sparseattn import fuzz


@settings(derandomize=True, max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2 ** 31 - 1))
def test_random_cases_match_the_oracle(seed):
    case = fuzz.draw_case(random.Random(seed), max_len=160)
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
    assert fuzz.run_case(case) is None
