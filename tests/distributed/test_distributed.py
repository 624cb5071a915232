"""Sequence parallelism on gloo (127.0.0.1): LASP-2 (lightning_attention_sp) and LASP-2H
(attention_sp) with 2 and 4 spawned processes equal the single-process result, forward and
backward, with equal and unequal piece lengths. Each worker checks its own rows against the
float64 oracle (tolerance from the single-process result) and reports failures to the parent."""
import datetime
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _full_inputs(seed, B, H, L, Dk, Dv, Hkv=None):
    g = torch.Generator().manual_seed(seed)
    Hkv = Hkv or H
    q = torch.randn(B, H, L, Dk, generator=g)
    k = torch.randn(B, Hkv, L, Dk, generator=g)
    v = torch.randn(B, Hkv, L, Dv, generator=g)
    do = torch.randn(B, H, L, Dv, generator=g)
    return q, k, v, do


def _grads(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do.to(o.dtype))
    return o.detach(), dq, dk, dv


def _check_rank(rank, world, lens, seed, which):
    import sparseattn as sa
    from sparseattn import reference
    from utils import assert_oracle

    L = sum(lens)
    off = sum(lens[:rank])
    sl = slice(off, off + lens[rank])
    B, H, Dk, Dv = 1, 2, 32, 16
    if which.startswith("lasp2-") or which == "lasp2":
        q, k, v, do = _full_inputs(seed, B, H, L, Dk, Dv)
        slopes = None if which == "lasp2-nodecay" else torch.tensor([0.3, 0.02])
        full = _grads(lambda q, k, v: sa.lightning_attention(q, k, v, slopes), q, k, v, do)
        ref = _grads(lambda q, k, v: reference.lightning_attention(q, k, v, slopes)[0], q, k, v, do)
        sp = _grads(lambda q, k, v: sa.distributed.lightning_attention_sp(q, k, v, slopes),
                    *(t[:, :, sl] for t in (q, k, v, do)))
    else:
        Dv = Dk  # the fused softmax kernels take Dv == D
        q, k, v, do = _full_inputs(seed, B, 4, L, Dk, Dv, Hkv=2)
        full = _grads(lambda q, k, v: sa.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                      q, k, v, do)
        ref = _grads(lambda q, k, v: reference.attention(q, k, v, is_causal=True), q, k, v, do)
        sp = _grads(lambda q, k, v: sa.distributed.attention_sp(q, k, v, is_causal=True, enable_gqa=True),
                    *(t[:, :, sl] for t in (q, k, v, do)))
    for name, got, r, base in zip(("o", "dq", "dk", "dv"), sp, ref, full):
        assert_oracle(f"{which} rank {rank}/{world} lens {lens} {name}", got, r[:, :, sl], base[:, :, sl])
        # and the single-process result itself, row for row
        torch.testing.assert_close(got, base[:, :, sl], rtol=1e-4, atol=1e-4)


def _worker(rank, world, port, cases, errors):
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=TIMEOUT_S // 2))
        for lens, seed, which in cases:
            _check_rank(rank, world, lens, seed, which)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - the parent reports every worker's failure
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise


def _spawn(world, cases):
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, cases, errors)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=TIMEOUT_S)
    for p in procs:
        p.join(max(1.0, (deadline - datetime.datetime.now()).total_seconds()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    msgs = []
    while not errors.empty():
        msgs.append(errors.get())
    assert not msgs, "\n".join(msgs)
    assert not hung, f"ranks {hung} did not finish within {TIMEOUT_S} s"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    # The spawned workers import the tests' helpers and inherit the interpreter setting.
    here = os.path.dirname(os.path.abspath(__file__))
    monkeypatch.setenv("PYTHONPATH", here + os.pathsep + os.environ.get("PYTHONPATH", ""))


def test_two_processes_equal_and_unequal_pieces():
    _spawn(2, [([64, 64], 1, "lasp2"), ([100, 37], 2, "lasp2"), ([90, 50], 8, "lasp2-nodecay"),
               ([64, 64], 3, "lasp2h"), ([70, 30], 4, "lasp2h")])


def test_four_processes_unequal_pieces():
    """World size 4 with a sequence (200) split unevenly, one piece of a single token."""
    _spawn(4, [([50, 50, 50, 50], 5, "lasp2"), ([37, 64, 1, 98], 6, "lasp2"), ([37, 64, 1, 98], 7, "lasp2h")])


def test_requires_initialized_group():
    import sparseattn as sa
    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        sa.distributed.lightning_attention_sp(q, q, q)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        sa.distributed.attention_sp(q, q, q)
