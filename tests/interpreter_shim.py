"""Test-time fixes of the Triton interpreter's ``tl.dot`` (active only under TRITON_INTERPRET=1).

* bf16: the interpreter stores bf16 as uint16 (numpy has no bf16) and its dot multiplies those
  raw bit patterns (a 16 x 16 dot is off by ~3e10). The shim widens bf16 operands to float32
  (bf16 is the top half of a float32: ``bits << 16``) before the matmul, which makes bf16 dots
  exact, so every bf16 kernel runs on the CPU against its oracle.
* bf16 casts: the interpreter truncates float32 -> bf16 (round toward zero) where the GPU rounds
  to nearest even (Triton's default); a probability of 1 - 2^-24 became 0.996 instead of 1 (found
  by the first bf16 run: window-1 attention's dV off by one bf16 step). The shim rounds to
  nearest even.
* TF32: on the GPU, ``input_precision="tf32"`` rounds both operands to TF32 (10 mantissa bits)
  while the interpreter multiplies exact fp32; the shim rounds them (to nearest, ties to even) so
  CPU tests see the GPU's precision.

``tests/test_interpreter_shim.py`` fails loudly when the interpreter itself changes (so the shim
is removed when upstream fixes bf16). The package does not know about the shim: it probes once
whether the interpreter's bf16 dot is right (``sparseattn.triton_kernels.probe``).
"""
import numpy as np

ORIGINAL_CREATE_DOT = None
ORIGINAL_CAST_IMPL = None


def _bf16_to_f32(data: np.ndarray) -> np.ndarray:
    return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def round_tf32(data: np.ndarray) -> np.ndarray:
    """float32 -> float32 holding the nearest TF32 value (10 explicit mantissa bits, ties to even)."""
    bits = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32)
    bits = (bits + np.uint32(0x0FFF) + ((bits >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000)
    return bits.view(np.float32)


def f32_to_bf16(data: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), rounded to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return np.where(np.isnan(data), np.uint32(0x7FC0), rounded).astype(np.uint16)


def install() -> None:
    """Patch the interpreter's dot (idempotent)."""
    global ORIGINAL_CREATE_DOT
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    global ORIGINAL_CAST_IMPL
    builder = interpreter.InterpreterBuilder
    if ORIGINAL_CREATE_DOT is not None:
        return
    ORIGINAL_CREATE_DOT, ORIGINAL_CAST_IMPL = builder.create_dot, builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(f32_to_bf16(src.data), dst_type.scalar)
        return ORIGINAL_CAST_IMPL(self, src, dst_type)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a_data, b_data = a.data, b.data
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            a_data = _bf16_to_f32(a_data) if a.dtype.scalar == tl.bfloat16 else a_data.astype(np.float32)
            b_data = _bf16_to_f32(b_data) if b.dtype.scalar == tl.bfloat16 else b_data.astype(np.float32)
            out = np.matmul(a_data, b_data).astype(d.data.dtype) + d.data
            return interpreter.TensorHandle(out, d.dtype.scalar)
        if input_precision == ir.INPUT_PRECISION.TF32 and a_data.dtype == np.float32:
            a, b = (interpreter.TensorHandle(round_tf32(t.data), t.dtype.scalar) for t in (a, b))
        return ORIGINAL_CREATE_DOT(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot
    builder.cast_impl = cast_impl


class capture_launches:
    """Context manager recording, for every kernel launch inside it, what Triton's JIT would
    compile for a GPU from the same arguments (signature, constexprs, attributes, options; one
    record per distinct specialization), for ``sparseattn.triton_kernels.gate --captured``.
    ``case`` labels the records of the next launches."""

    def __init__(self):
        self.records, self.case, self._seen = [], "", set()

    def __enter__(self):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime import interpreter, jit

        backend = make_backend(GPUTarget("cuda", 90, 32))
        self._interpreter = interpreter
        self._original = original = interpreter.InterpretedFunction.run
        outer = self

        def encode(value):
            if isinstance(value, interpreter.InterpretedFunction):
                return ("__jit__", value.fn.__module__, value.fn.__name__)
            return value

        def run(fn_self, *args, grid, warmup, **kwargs):
            jitted = jit.JITFunction(fn_self.fn)
            binder = jit.create_function_from_signature(jitted.signature, jitted.params, backend)
            bound, specialization, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = jitted._pack_args(backend, kwargs, bound, specialization,
                                                                      options)
            constexprs = {k: encode(v) for k, v in constexprs.items()}
            key = (fn_self.fn.__module__, fn_self.fn.__name__, repr(signature), repr(constexprs), repr(attrs))
            if key not in outer._seen:
                outer._seen.add(key)
                outer.records.append(dict(module=fn_self.fn.__module__, kernel=fn_self.fn.__name__,
                                          signature=signature, constexprs=constexprs, attrs=attrs,
                                          options=options.__dict__, case=outer.case))
            return original(fn_self, *args, grid=grid, warmup=warmup, **kwargs)

        interpreter.InterpretedFunction.run = run
        return self

    def __exit__(self, *exc):
        self._interpreter.InterpretedFunction.run = self._original
        return False

