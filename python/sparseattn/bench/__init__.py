"""``python -m sparseattn.bench``: the harness (:mod:`.harness`) and one module per suite.

Suites are registered from the explicit list below, not discovered: a suite module that fails to
import is an error naming it (``ImportError: benchmark suite 'decode' ...``), never a suite that
silently disappears. A suite is ``fn(device, quick, args) -> iterable of Case``; its cases build
their inputs through the one shared cache :data:`INPUTS` (:class:`.harness.InputCache`).
"""
from __future__ import annotations

import importlib

from . import harness
from .harness import INPUTS, SUITES, Case, InputCache, Rotating, lazy, main, run_cases, time_ms, to_markdown

# name -> (module of this package, function)
SUITE_LIST = {
    "attention": ("attention", "attention_suite"),
    "patterns": ("patterns", "patterns_suite"),
    "decode": ("decode", "decode_suite"),
    "lightning": ("lightning", "lightning_suite"),
    "dynamic": ("dynamic", "dynamic_suite"),
    "engine": ("engine", "engine_suite"),
    "stats": ("stats", "stats_suite"),
    "hip": ("hip", "hip_suite"),
}


def _register() -> None:
    for name, (module, fn) in SUITE_LIST.items():
        try:
            mod = importlib.import_module(f"{__name__}.{module}")
        except ImportError as e:
            raise ImportError(f"benchmark suite {name!r} ({__name__}.{module}) failed to import: {e}") from e
        SUITES[name] = getattr(mod, fn)


_register()

__all__ = ["INPUTS", "SUITES", "SUITE_LIST", "Case", "InputCache", "Rotating", "harness", "lazy", "main",
           "run_cases", "time_ms", "to_markdown"]
