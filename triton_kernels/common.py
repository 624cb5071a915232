"""Pieces shared by the Triton kernels: interpreter detection, config choice (pinning, pruning,
timing), the compile gate's head dims and dtypes, work accounting (:class:`count_tiles`, for
tests), and small jitted helpers (program tile, strided tensor views, masked loads and stores).
Kernels trust their inputs; every check happens in Python."""
from __future__ import annotations

import os
from collections import namedtuple
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import _config

# Triton decides interpreter-or-compiler when a kernel is decorated, i.e. when the kernel modules
# are imported; this records that decision for the dispatcher.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Shared memory per block, bytes (H100: 227 KB, A100: 163 KB).
SMEM_LIMIT = {90: 232448, 80: 166912}

# What the compile gate compiles every kernel for (the kernel modules' compile_specs).
GATE_HEAD_DIMS = (16, 32, 64, 128, 256)
GATE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

CONFIG_ENV = "SPARSEATTN_CONFIG"    # read through sparseattn/_config.py, like every SPARSEATTN_* variable
AUTOTUNE_ENV = "SPARSEATTN_AUTOTUNE"


# Kernel arguments are grouped in namedtuples, which Triton flattens at the launch and kernels read
# by field name. View: a [B, H, rows, columns] tensor, pointer and strides (a broadcast dimension
# has stride 0). Plane: one (batch, head) plane of a View, as `plane` returns it.
View = namedtuple("View", ["ptr", "sb", "sh", "sr", "sc"])
Plane = namedtuple("Plane", ["ptr", "sr", "sc"])


def view(t: torch.Tensor, strides: Optional[Tuple[int, ...]] = None) -> View:
    """The View of a 4-d tensor, with its own strides or the given ones."""
    return View(t, *(t.stride() if strides is None else strides))


def view_type(ptr: str) -> View:
    """The compile gate's signature of a View whose pointer has Triton type ``ptr``."""
    return View(ptr, "i32", "i32", "i32", "i32")


def pinned_config() -> Optional[Dict[str, int]]:
    """Parse SPARSEATTN_CONFIG, e.g. ``BLOCK_M=128,BLOCK_N=64,num_warps=8,num_stages=3``."""
    text = _config.get(CONFIG_ENV)
    if not text:
        return None
    out = {}
    for item in text.split(","):
        key, sep, val = item.partition("=")
        if not sep or not val.strip().isdigit():
            raise ValueError(f"{CONFIG_ENV}: expected 'KEY=INT,...', got {text!r}")
        out[key.strip()] = int(val)
    return out


def block_d_of(head_dim: int) -> int:
    """The kernels' head-dim tile: the head dim rounded up to a power of two, at least 16."""
    return max(16, triton.next_power_of_2(head_dim))


def device_smem_limit(device: Optional[torch.device] = None) -> int:
    """Shared memory per block of the device that will run the kernel."""
    if INTERPRET or not torch.cuda.is_available():
        return SMEM_LIMIT[90]
    index = torch.cuda.current_device() if device is None or device.index is None else device.index
    return int(torch.cuda.get_device_properties(index).shared_memory_per_block_optin)


class Tuner:
    """Config choice of one kernel: its configs sit beside the kernel, ``fits(cfg, **problem)``
    prunes tiles that cannot work, and the survivors are timed once per key on a GPU.

    A config is a dict of tile constexprs (``BLOCK_M``, ``BLOCK_N``) plus ``num_warps`` and
    ``num_stages``. Under the interpreter one config runs: the largest tile that fits (fewest
    interpreted iterations). ``SPARSEATTN_CONFIG`` pins one config for reproducible benchmarks;
    ``SPARSEATTN_AUTOTUNE=0`` skips the timing and runs the first candidate (configs are listed
    best guess first), which the tests use so that their results do not depend on timings.
    """

    def __init__(self, name: str, configs: List[Dict[str, int]], fits: Callable[..., bool]):
        self.name = name
        self.configs = configs
        self.fits = fits
        self.cache: Dict[Tuple, Dict[str, int]] = {}

    def candidates(self, **problem) -> List[Dict[str, int]]:
        """The configs this problem can select (what the compile gate compiles)."""
        pin = pinned_config()
        if pin is not None:
            cfg = {"num_warps": 4, "num_stages": 2, **pin}
            if not self.fits(cfg, **problem):
                raise ValueError(f"{CONFIG_ENV}: config {pin} does not fit {self.name} for {problem}")
            return [cfg]
        ok = self.fitting(**problem)
        if INTERPRET:
            return [max(ok, key=lambda c: c["BLOCK_M"] * c["BLOCK_N"])]
        return ok

    def fitting(self, **problem) -> List[Dict[str, int]]:
        """Every config that fits this problem, in list order (never empty)."""
        return [c for c in self.configs if self.fits(c, **problem)] or [self.smallest(**problem)]

    @staticmethod
    def smallest(**problem) -> Dict[str, int]:
        """A config that always fits: the layout block capped at 32, one stage (8 warps for wide
        heads, which keeps fp32 D >= 128 from spilling)."""
        return {"BLOCK_M": min(problem["layout_bq"], 32), "BLOCK_N": min(problem["layout_bk"], 32),
                "num_warps": 8 if problem.get("block_d", 0) >= 128 else 4, "num_stages": 1}

    def pick(self, launch: Callable[[Dict[str, int]], None], **problem) -> Dict[str, int]:
        """The config to run: the only candidate, or the fastest one timed on this GPU (once per
        key; during a CUDA graph capture an untimed key runs the first candidate, untimed)."""
        cands = self.candidates(**problem)
        if len(cands) == 1 or not _config.flag(AUTOTUNE_ENV):
            return cands[0]
        key = tuple(sorted(problem.items()))
        if key not in self.cache and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return cands[0]  # timing would synchronize inside a CUDA graph capture: not timed, not kept
        if key not in self.cache:
            times = []
            for cfg in cands:
                try:
                    times.append(triton.testing.do_bench(lambda: launch(cfg), warmup=5, rep=20))
                except triton.runtime.errors.OutOfResources:
                    times.append(float("inf"))
            self.cache[key] = cands[min(range(len(cands)), key=times.__getitem__)]
        return self.cache[key]


def attention_tile_fits(cfg: Dict[str, int], *, kernel: str, layout_bq: int, layout_bk: int, block_d: int,
                        elem: int, smem: int) -> bool:
    """Prune of the attention kernels: the kernel tile must divide the layout block, and an upper
    bound of its shared memory must fit the device.

    The bounds were fitted to what Triton 3.6 allocates for every config on sm_80 and sm_90,
    with every in-kernel feature on (the compile gate checks the real numbers): the 16-bit forward keeps Q in registers and
    stages K/V tiles; dK/dV (``kernel="dkdv"``) keeps K/V and streams Q/dO; dQ keeps Q/dO and
    streams K/V; fp32 products (no tensor cores) also stage the BLOCK_M x BLOCK_N score tile.
    """
    m, n, stages = cfg["BLOCK_M"], cfg["BLOCK_N"], max(1, cfg["num_stages"])
    if layout_bq % m or layout_bk % n:
        return False
    if kernel == "fwd" and elem == 2:
        need = elem * block_d * (m + n * stages) + (16 << 10)
    else:
        resident, streamed = (n, m) if kernel == "dkdv" else (m, n)
        need = elem * block_d * (2 * resident + 2 * streamed * stages) + (32 << 10)
        if elem == 4:  # fp32 score tiles staged for layout conversions (three with every rule on)
            need += 3 * elem * m * n
    if kernel == "fwd":
        need += 4 * m * n  # the score tile's layout conversion for tile bitmasks
    return need <= smem


# ----------------------------------------------------------------------------- work accounting
# The tile log of one launch (a kernel argument, ``LOG``): ``entries`` int32 [capacity, 5] and an
# int32 counter ``count`` [1] that every logged visit bumps with an atomic add (its old value is the
# visit's slot; visits past ``capacity`` are counted, not written). Kernels take ``LOG=None`` unless
# counting: None is a constexpr, so every ``if LOG is not None`` block is compiled out and the
# kernels are the uncounted ones.
TileLog = namedtuple("TileLog", ["entries", "count", "capacity"])


@dataclass
class Launch:
    """One counted launch: ``kernel`` (the launcher's kernel name, e.g. ``"sparse_attention_fwd"``),
    ``grid`` (programs), ``meta`` (what a reader needs to predict the visits: tile sizes, layout
    block, heads; the launcher says) and ``entries`` int64 ``[n, 5]``, one row per visited tile in
    the order each program logged them: (program id, plane, row, start, kind). plane = ``b * Hq +
    h``, the batch element and query head whose walk visited the tile. For the tile walk of
    ``walk.py``: row = the row of the layout's lists walked (``layout_row``), start = the first
    position (key, or query in a key-major walk) of the visited tile, kind = 1 for a partial tile, 0
    for a full one. For HiP's walk: row = the key set (0 sinks, 1 window, 2 selected), start = the
    tile's first key (sinks, window) or its offset in the gathered selected keys, kind = 1."""
    kernel: str
    grid: int
    meta: Dict[str, object]
    entries: torch.Tensor

    def per_program(self) -> torch.Tensor:
        """Visited tiles per program, int64 ``[grid]``."""
        return torch.bincount(self.entries[:, 0], minlength=self.grid)


@dataclass(eq=False)
class count_tiles:
    """Work accounting, for tests: inside ``with count_tiles() as log:`` every launch of the
    softmax-attention kernels (block-sparse forward, dK/dV and dQ, the attention statistics, HiP's
    forward and backward) also records which tiles each program visited; ``log.launches`` holds one
    :class:`Launch` per launch, in order (``log.of(kernel)``: those of one kernel). Costs a host
    read per launch; off (the default) it costs nothing: the kernels get ``LOG=None``.

    ``capacity``: visits a launch may log (more raise RuntimeError naming the count).
    """
    capacity: int = 1 << 16
    launches: List[Launch] = field(default_factory=list)

    def __enter__(self) -> "count_tiles":
        _COUNTING.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _COUNTING[:] = [c for c in _COUNTING if c is not self]

    def of(self, kernel: str) -> List[Launch]:
        return [launch for launch in self.launches if launch.kernel == kernel]


_COUNTING: List[count_tiles] = []


def tile_log(device) -> Optional[TileLog]:
    """The LOG argument of a launch: a fresh tile log inside :class:`count_tiles`, else None."""
    if not _COUNTING:
        return None
    cap = _COUNTING[-1].capacity
    return TileLog(torch.full((cap, 5), -1, dtype=torch.int32, device=device),
                   torch.zeros(1, dtype=torch.int32, device=device), cap)


def save_tile_log(log: Optional[TileLog], kernel: str, grid: int, **meta) -> None:
    """After a launch given ``log`` (:func:`tile_log`): record it in the innermost count_tiles."""
    if log is None:
        return
    n = int(log.count.item())
    if n > log.capacity:
        raise RuntimeError(f"count_tiles: {kernel} visited {n} tiles, more than capacity={log.capacity}")
    _COUNTING[-1].launches.append(Launch(kernel, int(grid), meta, log.entries[:n].long().cpu()))


@triton.jit
def log_tile(LOG, plane, row, start, kind):
    """Append (program id, plane, row, start, kind) to the tile log (:data:`TileLog`;
    :class:`Launch` says what the fields mean)."""
    slot = tl.atomic_add(LOG.count, 1)
    if slot < LOG.capacity:
        e = LOG.entries + slot.to(tl.int64) * 5
        tl.store(e, tl.program_id(0))
        tl.store(e + 1, plane)
        tl.store(e + 2, row)
        tl.store(e + 3, start)
        tl.store(e + 4, kind)


@triton.jit
def load_tile(ptrs, row_ok, col_ok, ROW_MASK: tl.constexpr, COL_MASK: tl.constexpr):
    """Load a 2-D tile, masking rows and/or columns only when asked (full tiles load unmasked)."""
    if ROW_MASK:
        if COL_MASK:
            return tl.load(ptrs, mask=row_ok & col_ok, other=0.0)
        else:
            return tl.load(ptrs, mask=row_ok, other=0.0)
    else:
        if COL_MASK:
            return tl.load(ptrs, mask=col_ok, other=0.0)
        else:
            return tl.load(ptrs)


@triton.jit
def load_rows(P, offs, bound, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``offs`` of a Plane as a [len(offs), BLOCK_D] tile, zero past ``bound`` (checked only
    when MASKED) and past the head dim (checked only when it is padded)."""
    return load_rows_at(P, offs, offs < bound, MASKED, HEAD_DIM, BLOCK_D)


@triton.jit
def load_rows_at(P, rows, ok, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """load_rows with the addresses (``rows``) and the bound (``ok``) given apart (paged caches)."""
    offs_d = tl.arange(0, BLOCK_D)
    return load_tile(P.ptr + rows[:, None].to(tl.int64) * P.sr + offs_d[None, :] * P.sc, ok[:, None],
                     (offs_d < HEAD_DIM)[None, :], MASKED, HEAD_DIM != BLOCK_D)


@triton.jit
def load_cols(P, offs, bound, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``offs`` of a Plane loaded transposed, as a [BLOCK_D, len(offs)] tile (else as load_rows)."""
    return load_cols_at(P, offs, offs < bound, MASKED, HEAD_DIM, BLOCK_D)


@triton.jit
def load_cols_at(P, rows, ok, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``rows`` of a Plane loaded transposed, zero where ``ok`` is False (checked only when
    MASKED): load_cols with the addresses and the bound given apart (paged caches)."""
    offs_d = tl.arange(0, BLOCK_D)
    return load_tile(P.ptr + rows[None, :].to(tl.int64) * P.sr + offs_d[:, None] * P.sc, ok[None, :],
                     (offs_d < HEAD_DIM)[:, None], MASKED, HEAD_DIM != BLOCK_D)


@triton.jit
def store_rows(P, offs, bound, value, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store a [len(offs), BLOCK_D] tile into rows ``offs`` of a Plane, in the Plane's dtype
    (rows past ``bound`` and columns past the head dim are left alone)."""
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(P.ptr + offs[:, None].to(tl.int64) * P.sr + offs_d[None, :] * P.sc, value.to(P.ptr.dtype.element_ty),
             mask=(offs[:, None] < bound) & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def load_vec(ptr, offs, bound, MASKED: tl.constexpr):
    """A per-row vector (LSE, delta) at ``offs``, zero past ``bound`` (checked only when MASKED)."""
    if MASKED:
        return tl.load(ptr + offs, mask=offs < bound, other=0.0)
    else:
        return tl.load(ptr + offs)


@triton.jit
def plane(t, b, h):
    """The Plane (b, h) of a View."""
    return Plane(t.ptr + b * t.sb + h * t.sh, t.sr, t.sc)


@triton.jit
def tile_and_plane(L, BLOCK: tl.constexpr):
    """(tile, batch x head plane) of this program. The grid is one flat axis of cdiv(L, BLOCK)
    tiles per plane (tiles of one plane consecutive): axes 1 and 2 stop at 65535 programs, which
    B * H passes (windows folded into the batch, decode batches)."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(L, BLOCK)
    return pid % n_tiles, pid // n_tiles


@triton.jit
def program_tile(L, H, GROUP, BLOCK: tl.constexpr, LAYOUT_B: tl.constexpr):
    """This program's tile of rows (the grid of `tile_and_plane` over L rows and H heads):
    (b, h, h // GROUP, the layout block that holds the tile, the tile's row positions); b and h
    are 64-bit."""
    pid, bh = tile_and_plane(L, BLOCK)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    start = pid * BLOCK
    return b, h, h // GROUP, start // LAYOUT_B, start + tl.arange(0, BLOCK)
