"""How sparseattn registers its operators with PyTorch.

``torch.library.custom_op`` wraps every kernel it registers in ``torch._disable_dynamo``, whose
first call imports ``torch._dynamo`` (about 2 s): the first eager call of any op paid that,
although eager code never needs dynamo. :func:`custom_op` keeps custom_op's contract through
public ``torch.library`` calls that add no such wrapper: the schema inferred from the annotations
(``torch.library.infer_schema``), one implementation for every device
(``CompositeExplicitAutograd``, the kernel chooses its backend from the tensors), fake
implementations with ``torch.library.register_fake``, and an op without an autograd formula
raises on backward instead of silently giving no gradient. It returns the ``OpOverload``
(``torch.ops.sparseattn.<name>.default``), so ``torch.compile`` sees one opaque op and
``torch.library.opcheck`` takes it as is.
"""
from __future__ import annotations

from typing import Callable

import torch

_LIBS = {}   # namespace -> torch.library.Library, kept alive: the registrations live as long as it


def custom_op(qualname: str, *, differentiable: bool = False) -> Callable[[Callable], torch._ops.OpOverload]:
    """Decorator: define ``qualname`` ("sparseattn::name") from the function's annotations (no
    mutated arguments) with the function as its implementation; returns the op.

    ``differentiable=True``: the caller registers the formula with
    ``torch.library.register_autograd``; otherwise a backward through the op raises (as
    ``torch.library.custom_op`` does).
    """
    namespace, name = qualname.split("::")
    if namespace not in _LIBS:
        _LIBS[namespace] = torch.library.Library(namespace, "FRAGMENT")
    lib = _LIBS[namespace]

    def define(fn: Callable) -> torch._ops.OpOverload:
        torch.library.define(qualname, torch.library.infer_schema(fn, mutates_args=()), lib=lib)
        torch.library.impl(qualname, "CompositeExplicitAutograd", fn, lib=lib)
        if not differentiable:
            def no_backward(ctx, *grads):
                raise RuntimeError(f"{qualname}: not differentiable (no autograd formula is registered)")
            torch.library.register_autograd(qualname, no_backward, lib=lib)
        return getattr(getattr(torch.ops, namespace), name).default
    return define
