"""One decode step of attention against a KV cache, reading the cache before it is written.

Attending over [C cached slots, the new token] and writing the new token into its slot
afterwards gives the same result as writing first and attending over the C slots: the
slot being overwritten holds column i - C, which the mask already excludes (the ring
invariant of `nn.attention`). Reading the old buffer, with the write made to depend on
the result, lets XLA update the cache in place after the reads (benchmarks/RESULTS.md,
"decode": when the dot reads the updated buffer, XLA:CPU copies every layer's cache).

How it runs: under `matvec=CPU_GEMV` on CPU, in float32, the whole step (scores, mask,
softmax, values) is one native call (`native.cpu_gemv.decode_attention`), which skips
the slots the mask drops; everywhere else it is the XLA form below, whose two dots over
the cache go through `products.matmul`. The two are one function (tests compare them).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from rustgpt_jax import masks as masks_lib
from rustgpt_jax.native import cpu_gemv
from rustgpt_jax.runtime import products
from rustgpt_jax.runtime.execution import Execution, MatvecImpl


def cached_decode_attention(q, k, v, cache_k, cache_v, *, q_positions, cache_positions,
                            window=masks_lib.NO_WINDOW, scale: Optional[float] = None,
                            execution: Execution = Execution()):
    """Attention of one new token per row over the cache plus itself.

    Args:
      q: (B, 1, N, H) the new token's queries.
      k, v: (B, 1, K, H) its key and value (not yet in the cache).
      cache_k, cache_v: (B, K, C, H) the cache before this token is written.
      q_positions: (B, 1) int32 the token's position.
      cache_positions: (B, C) int32 the position in each slot (negative = empty).
      window: int32 scalar or (B,) window.
      scale: logit scale, default 1/sqrt(H).
      execution: `matvec=CPU_GEMV` runs the step in the native kernel (float32 on CPU);
        otherwise it picks the product of the XLA form's two dots over the cache (one
        per KV head, G = N / K query rows each; `products.matmul`).

    Returns:
      (B, 1, N, H) in q's dtype.
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    if t != 1:
        raise ValueError(f'cached_decode_attention takes one token per row, got {t}')
    scale = h ** -0.5 if scale is None else scale
    q = q.reshape(b, kv_heads, n // kv_heads, h)  # (B, K, G, H)
    mask = masks_lib.make_attention_mask(q_positions, cache_positions, window)[:, 0]  # (B, C)
    operands = (q, k[:, 0], v[:, 0], cache_k, cache_v, mask)
    xla = functools.partial(_attend, scale=scale, execution=execution)
    if _uses_kernel(execution, operands[:5]):
        kernel = functools.partial(cpu_gemv.decode_attention, scale=scale,
                                   threads=execution.gemv_threads, spin_us=execution.gemv_spin_us)
        out = jax.lax.platform_dependent(*operands, cpu=kernel, default=xla)
    else:
        out = xla(*operands)
    return out.reshape(b, 1, n, h).astype(q.dtype)


def _uses_kernel(execution: Execution, arrays) -> bool:
    """Whether the step runs in the native kernel: CPU_GEMV, float32, the library built."""
    if execution.matvec != MatvecImpl.CPU_GEMV or any(a.dtype != jnp.float32 for a in arrays):
        return False
    if not cpu_gemv.available(execution.kernel_cache_dir):
        cpu_gemv.warn_unavailable_once()
        return False
    return True


def _attend(q, k, v, cache_k, cache_v, mask, *, scale, execution):
    """The step in XLA: q (B, K, G, H), k, v (B, K, H), caches (B, K, C, H), mask (B, C).

    Returns (B, K, G, H) float32.
    """
    # Keys are (C, H) output-major per KV head, values (C, H) input-major.
    old = products.matmul(q, cache_k, input_major=False, execution=execution) * scale
    old = jnp.where(mask[:, None, None], old, masks_lib.MASK_VALUE)  # (B, K, G, C)
    new = jnp.einsum('BKGH,BKH->BKG', q, k,
                     preferred_element_type=jnp.float32)[..., None] * scale  # (B, K, G, 1)
    probs = jax.nn.softmax(jnp.concatenate([old, new], axis=-1), axis=-1)
    out = products.matmul(probs[..., :-1], cache_v, input_major=True, execution=execution)
    return out + probs[..., -1:] * v[:, :, None].astype(jnp.float32)


def cached_chunk_attention(full, q, k, v, cache_k, cache_v, *, q_positions, cache_positions,
                           window=masks_lib.NO_WINDOW, skip_empty: bool = True):
    """Attention of a chunk of T new tokens over [the cache before it is written, the chunk].

    When no slot of the cache holds a position (all empty: a prompt's prefill), the cache
    adds exact zeros to every softmax, so the chunk attends to itself alone: `lax.cond`
    runs only that branch, and a prompt's cost does not grow with the cache (TinyLlama's
    2048 slots, as the CLIs size the cache, made a 128-token prompt 0.6x llama.cpp's rate
    where the 168-slot benchmark cache gave 0.9x; benchmarks/RESULTS.md).

    Args:
      full: the layer's attention (`AttentionKernels.full`).
      q: (B, T, N, H); k, v: (B, T, K, H), the chunk's keys and values.
      cache_k, cache_v: (B, C, K, H) views of the cache.
      q_positions: (B, T) int32, the chunk's positions.
      cache_positions: (B, C) int32 (negative = empty).
      window: int32 scalar or (B,) window.
      skip_empty: the `lax.cond` on an empty cache; False for a `full` that must not run
        inside JAX control flow (an AdaAttn core, a Flax module with its own variables).

    Returns:
      (B, T, N, H), as `full` returns it.
    """
    def alone(_):
        return full(q, k, v, q_positions=q_positions, kv_positions=q_positions, window=window)

    def with_cache(_):
        keys = jnp.concatenate([cache_k, k], axis=1)  # (B, C + T, K, H)
        values = jnp.concatenate([cache_v, v], axis=1)
        kv_positions = jnp.concatenate([cache_positions, q_positions], axis=1)  # (B, C + T)
        return full(q, keys, values, q_positions=q_positions, kv_positions=kv_positions,
                    window=window)

    if not skip_empty:
        return with_cache(None)
    return jax.lax.cond(jnp.all(cache_positions < 0), alone, with_cache, None)
