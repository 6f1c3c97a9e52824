"""Every weight product of the model, evaluated as `Execution` says: the one dispatch on
`MatvecImpl`, and the only caller of the native matrix-vector kernel.

Layers hold the math (which weights multiply which activations); these functions own
how: XLA's dot, a row-blocked batched dot, or `native.cpu_gemv`, for the same products.
A weight may also be a `quant.QArray` (raw GGUF blocks): its products run in the native
quantized kernel or, where that cannot serve, as XLA's dot of the weight dequantised
inside the jitted step (`quantized_matmul`).
Why each form exists and what it measured: benchmarks/RESULTS.md ("decode").
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from rustgpt_jax import quant
from rustgpt_jax.native import cpu_gemv, quant_matmul
from rustgpt_jax.runtime.execution import Execution, MatvecImpl

# Row blocks and the matrix-vector kernel apply to products of at most this many input
# rows (decode steps up to batch 8): larger ones (prefill, training) keep XLA's dot.
MATVEC_MAX_ROWS = cpu_gemv.MAX_ROWS


def _uses_gemv(execution: Execution, x, w) -> bool:
    """Whether the product of x (..., rows, in) and w runs in `native.cpu_gemv`."""
    if execution.matvec == MatvecImpl.XLA:
        return False
    if execution.matvec != MatvecImpl.CPU_GEMV:  # pragma: no cover - the enum is exhaustive
        raise ValueError(f'unknown matvec implementation {execution.matvec!r}')
    if not 1 <= x.shape[-2] <= MATVEC_MAX_ROWS:
        return False
    if x.dtype != jnp.float32 or w.dtype != jnp.float32:
        return False  # the kernel is float32 only; other dtypes keep XLA's dot
    if not cpu_gemv.available(execution.kernel_cache_dir):
        cpu_gemv.warn_unavailable_once()
        return False
    return True


def matmul(x, w, *, input_major: bool, execution: Execution):
    """y (..., rows, out) = x (..., rows, in) . w, with float32 accumulation.

    Args:
      x: (*batch, rows, in).
      w: (*batch, out, in), or (*batch, in, out) with `input_major`; batch dims (e.g.
        KV heads) are independent products.
      input_major: the layout of `w`.
      execution: picks XLA's dot or `native.cpu_gemv`.

    Returns:
      (*batch, rows, out) float32.
    """
    if _uses_gemv(execution, x, w):
        return cpu_gemv.gemv(x, w, input_major, execution.gemv_threads, execution.gemv_spin_us)
    spec = '...bi,...io->...bo' if input_major else '...bi,...oi->...bo'
    return jnp.einsum(spec, x.astype(w.dtype), w, preferred_element_type=jnp.float32)


def project(x, kernel, *, contract: int, output_major: bool, blocks: int, dtype,
            execution: Execution, name: str = 'projection'):
    """y = x . kernel, contracting the last `contract` dims of x.

    Args:
      x: (..., *in_dims).
      kernel: (*in_dims, *features), or (*features, *in_dims) when `output_major`.
      contract: how many trailing dims of x are contracted.
      output_major: the kernel's layout (`Execution.packed`).
      blocks: row blocks of an output-major kernel (`Execution.blocks_for`).
      dtype: compute dtype.
      execution: picks the product.
      name: the projection's name, for errors.

    Returns:
      (..., *features) in `dtype`.
    """
    lead = x.shape[:x.ndim - contract]
    if quant.is_quantized(kernel):
        # W is (out, in) whatever the layout flag: the logical shape only names the dims.
        features = kernel.shape[:kernel.ndim - contract] if output_major else kernel.shape[
            contract:]
        y = quantized_matmul(x.reshape(lead + (-1,)), kernel, dtype=dtype, execution=execution,
                             name=name)
        return y.astype(dtype).reshape(lead + tuple(features))
    if not output_major:
        features = kernel.shape[contract:]
        batch, contracted, out = 'abcdefgh'[:len(lead)], 'ijk'[:contract], 'uvw'[:len(features)]
        return jnp.einsum(f'{batch}{contracted},{contracted}{out}->{batch}{out}',
                          x.astype(dtype), kernel.astype(dtype))
    features = kernel.shape[:kernel.ndim - contract]
    rows = math.prod(features)
    if rows % blocks:  # checked at any input size, not only where blocks apply
        raise ValueError(f'{name}: {rows} output rows do not split into {blocks} row blocks')
    # As one 2-D (out, in) matrix: XLA:CPU canonicalises a dot with several output or
    # contracted kernel dims by transpose-copying the kernel on every call; reshapes of
    # row-major arrays are free.
    x2 = x.reshape(lead + (-1,)).astype(dtype)  # (..., in)
    w2 = kernel.reshape(rows, -1)
    n = math.prod(lead)
    if _uses_gemv(execution, x2.reshape(n, -1), w2):
        y = cpu_gemv.gemv(x2.reshape(n, -1), w2, False, execution.gemv_threads,
                          execution.gemv_spin_us)
    elif blocks == 1 or n > MATVEC_MAX_ROWS:
        y = jnp.einsum('...i,oi->...o', x2, w2.astype(dtype))
    else:
        # The block axis leads on both sides: XLA runs it as one batched dot over
        # contiguous (rows / blocks, in) slices, with no copy of the kernel.
        xb = jnp.broadcast_to(x2, (blocks,) + x2.shape)  # (S, ..., in)
        kb = kernel.reshape(blocks, rows // blocks, -1).astype(dtype)
        y = jnp.einsum('s...i,soi->...so', xb, kb)  # (..., S, rows / S)
    return y.reshape(lead + tuple(features))


def logits(x, table, *, table_output_major: bool, dtype, execution: Execution):
    """Output-head logits x . table.

    Args:
      x: (B, T, D) final hidden states.
      table: the (D, V) head, or with `table_output_major` a tied (V, D) embedding table.
      dtype: compute dtype.
      execution: picks the product.

    Returns:
      (B, T, V) float32.
    """
    if quant.is_quantized(table):  # W is (V, D) for a tied table and a head alike
        return quantized_matmul(x, table, dtype=dtype, execution=execution, name='logits')
    x = x.astype(dtype)
    rows = math.prod(x.shape[:-1])
    flat = x.reshape(rows, -1)
    if _uses_gemv(execution, flat, table):
        y = cpu_gemv.gemv(flat, table, not table_output_major, execution.gemv_threads,
                          execution.gemv_spin_us)
        return y.reshape(x.shape[:-1] + (-1,))
    y = jnp.einsum('BTD,VD->BTV' if table_output_major else 'BTD,DV->BTV', x,
                   table.astype(dtype), preferred_element_type=jnp.float32)
    return y.astype(jnp.float32)


def _uses_quant_kernel(execution: Execution, w) -> bool:
    """Whether a product of `rows` rows with `w` runs in `native.quant_matmul`: at any
    row count, prompts included (its batched form beat dequantise + XLA's float32 dot:
    benchmarks/RESULTS.md, "GGUF")."""
    if execution.matvec != MatvecImpl.CPU_GEMV:
        return False
    if any(p.ggml_type not in quant_matmul.SUPPORTED_TYPES for p in quant.parts(w)):
        return False
    if not quant_matmul.available(execution.kernel_cache_dir):
        quant_matmul.warn_unavailable_once()
        return False
    return True


def quantized_matmul(x, w, *, dtype, execution: Execution, name: str = 'projection'):
    """y (..., out) = x (..., in) . W^T for a quantized W (out, in), float32.

    One function in two forms: llama.cpp's, where x is quantized to int8 per block
    (`quant.quantize_activations`) and multiplied with W's blocks. On CPU under
    `matvec=CPU_GEMV` that is the native kernel; elsewhere XLA computes the same values
    from W dequantised inside the jitted step (XLA fuses the convert into the dot).

    Args:
      x: (..., in) activations.
      w: a QArray, or a QConcat (row-stacked QArrays, e.g. packed q/k/v: one kernel
        call for all of them).
      dtype: compute dtype of the XLA form's dot.
      execution: `matvec=CPU_GEMV` runs the native kernel where it serves.
      name: the weight's name, for errors.
    """
    if x.shape[-1] != w.in_features:
        raise ValueError(f'{name}: input has {x.shape[-1]} features; the quantized weight '
                         f'{w!r} takes {w.in_features}')
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    parts = quant.parts(w)
    if _uses_quant_kernel(execution, w):
        # One call for every part (x quantized once, one dispatch of the worker pool).
        y = quant_matmul.quant_matmul_multi(x2, [(p.blocks, p.ggml_type) for p in parts],
                                            execution.gemv_threads, execution.gemv_spin_us)
    else:
        ys = [jnp.einsum('ni,oi->no', quant.quantize_activations(x2, p.ggml_type).astype(dtype),
                         quant.dequantize(p, dtype), preferred_element_type=jnp.float32)
              for p in parts]
        y = ys[0] if len(ys) == 1 else jnp.concatenate(ys, axis=-1)
    return y.reshape(lead + (w.out_features,))


def lookup(table, ids):
    """Rows `ids` (...) of an embedding table (V, D): (..., D), dequantised if quantized."""
    if quant.is_quantized(table):
        return quant.take_rows(table, ids)
    return jnp.take(table, ids, axis=0)
