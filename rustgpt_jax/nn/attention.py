"""Multi-head attention with GQA/MQA, RoPE, any window, and a ring-buffer KV cache."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rustgpt_jax import axes
from rustgpt_jax.adaptive.adaattn import make_attention_core
from rustgpt_jax.adaptive.core import attention_with_entropy
from rustgpt_jax.config import AttentionImpl, AttentionVariant, PrecisionPolicy
from rustgpt_jax.nn.dense import dense
from rustgpt_jax.nn.rope import apply_rope, split_rope
from rustgpt_jax.runtime.attention import AttentionKernels, attention_kernels
from rustgpt_jax.runtime.auto import AttentionCall
from rustgpt_jax.runtime.decode_attention import cached_chunk_attention
from rustgpt_jax.runtime.execution import Execution


class Attention(nn.Module):
    """Q/K/V/O projections around the attention of `runtime.attention.attention_kernels`.

    GQA groups query heads over KV heads inside the attention op; K/V projections have
    only `num_kv_heads` heads, so no weight or activation is ever copied per query head.

    In `decode` mode the layer keeps a `cache` collection: keys/values (B, K, C, H), the
    position held by each slot (B, C), -1 while empty, and `index`, the count of columns
    written (shared by the rows; column i lives in slot i % C). With a window W the cache
    is a ring of C = W slots and memory stays flat (SPEC §3).
    Heads come before slots so that each head's keys are one contiguous (C, H) matrix,
    the operand layout of the decode step's score dot: a (B, C, K, H) cache made XLA:CPU
    transpose-copy every layer's keys and values on every token (benchmarks/RESULTS.md).

    `call` holds the static facts of the attention (`runtime.auto.AttentionCall`, from
    `runtime.auto.attention_call(config)`) from which AttentionImpl.AUTO picks a kernel.

    `variant` replaces the kernel by an AdaAttn core (SPEC §4; rustgpt_jax.adaptive),
    in the cached decode path too. With `with_entropy` the layer returns
    `(out, H)`, H the mean attention entropy that the AttentionEntropy window strategy
    observes (SPEC §2).
    """
    num_heads: int
    num_kv_heads: int
    head_dim: int
    use_bias: bool = False
    use_rope: bool = True
    rope_base: float = 10000.0
    impl: AttentionImpl = AttentionImpl.REFERENCE
    cache_length: int = 0
    decode: bool = False
    init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    variant: AttentionVariant = AttentionVariant.STANDARD
    adaattn_ranks: tuple = (8,)
    adaattn_rank_threshold: float = 0.95
    precision_policy: PrecisionPolicy = PrecisionPolicy.BALANCED
    with_entropy: bool = False
    entropy_rows: int = 64
    execution: Execution = Execution()
    call: AttentionCall = AttentionCall()

    @nn.compact
    def __call__(self, x, positions, segment_ids, window):
        """Args:
          x: (B, T, D) inputs.
          positions: (B, T) int32 (negative = padding).
          segment_ids: (B, T) int32 or None.
          window: traced int32 scalar or (B,).

        Returns:
          (B, T, D), or ((B, T, D), H float32 scalar) when `with_entropy`.
        """
        n, kh, h = self.num_heads, self.num_kv_heads, self.head_dim
        if self.execution.packed:  # one output-major (N + 2K, H, D) kernel (nn.packing)
            qkv = self._project('qkv_proj', x, (n + 2 * kh, h),
                                (axes.EMBED, axes.QKV_HEADS, axes.HEAD_DIM))  # (B,T,N+2K,H)
            if self.use_rope:  # one concatenated cotangent for qkv (nn.rope.split_rope)
                q, k, v = split_rope(qkv, positions, n, kh, self.rope_base)
            else:
                q, k, v = qkv[:, :, :n], qkv[:, :, n:n + kh], qkv[:, :, n + kh:]
        else:
            q = self._project('q_proj', x, (n, h),
                              (axes.EMBED, axes.HEADS, axes.HEAD_DIM))  # (B,T,N,H)
            k = self._project('k_proj', x, (kh, h),
                              (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM))  # (B,T,K,H)
            v = self._project('v_proj', x, (kh, h),
                              (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM))  # (B,T,K,H)
        if self.use_rope and not self.execution.packed:
            q = apply_rope(q, positions, self.rope_base)
            k = apply_rope(k, positions, self.rope_base)
        q = nn.with_logical_constraint(q, (axes.BATCH, axes.LENGTH, axes.HEADS, axes.HEAD_DIM))

        # An AdaAttn core (SPEC §4) replaces the kernels everywhere; None for STANDARD.
        core = make_attention_core(
            self.variant, num_heads=n, num_kv_heads=kh, head_dim=h, ranks=self.adaattn_ranks,
            threshold=self.adaattn_rank_threshold, policy=self.precision_policy,
            impl=self.impl, param_dtype=self.param_dtype)
        kernels = attention_kernels(self.impl,
                                    dataclasses.replace(self.call, entropy=self.with_entropy))
        entropy = None
        if self.decode:
            out = self._attend_with_cache(q, k, v, positions, segment_ids, window, core,
                                          kernels)
        elif self.with_entropy:
            # attend=None: exact entropy from the dense kernel's own probabilities.
            exact = core is None and kernels.dense_probs
            out, entropy = attention_with_entropy(
                q, k, v, q_positions=positions, kv_positions=positions, window=window,
                q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                attend=None if exact else (kernels.full if core is None else core),
                rows=self.entropy_rows)
        else:
            attend = kernels.full if core is None else core
            out = attend(q, k, v, q_positions=positions, kv_positions=positions, window=window,
                         q_segment_ids=segment_ids, kv_segment_ids=segment_ids)
        out = nn.with_logical_constraint(out, (axes.BATCH, axes.LENGTH, axes.HEADS, axes.HEAD_DIM))
        out = self._project('o_proj', out, x.shape[-1], (axes.HEADS, axes.HEAD_DIM, axes.EMBED),
                            contract=2)  # (B, T, D)
        return out if not self.with_entropy else (out, entropy)

    def _project(self, name, x, features, kernel_axes, contract=1):
        return dense(name, x, features, kernel_axes, contract=contract, use_bias=self.use_bias,
                     init_std=self.init_std, dtype=self.dtype, param_dtype=self.param_dtype,
                     execution=self.execution)

    def _attend_with_cache(self, q, k, v, positions, segment_ids, window, core,
                           kernels: AttentionKernels):
        if segment_ids is not None:
            raise ValueError('decode mode does not take segment_ids: decode one sequence per '
                             'row (left-pad prompts with negative positions instead)')
        b, t = positions.shape
        c = self.cache_length
        if c < 1:
            raise ValueError('Attention.cache_length must be >= 1 in decode mode')
        initialised = self.has_variable('cache', 'key')
        # Stored (B, K, C, H); the kernels see the (B, C, K, H) view (see the class docstring).
        kv_shape = (b, k.shape[2], c, k.shape[3])
        cache_k = self.variable('cache', 'key', jnp.zeros, kv_shape, k.dtype)
        cache_v = self.variable('cache', 'value', jnp.zeros, kv_shape, v.dtype)
        cache_pos = self.variable('cache', 'positions', lambda: jnp.full((b, c), -1, jnp.int32))
        # Columns written so far, shared by all rows (see `_write`).
        cache_index = self.variable('cache', 'index', lambda: jnp.zeros((), jnp.int32))
        if not initialised:  # model.init(..., decode=True) only creates the cache.
            return (kernels.full if core is None else core)(q, k, v, q_positions=positions,
                                          kv_positions=positions, window=window)
        if cache_k.value.shape[0] != b:
            raise ValueError(f'cache was built for batch {cache_k.value.shape[0]}, got {b}')

        def view(x):  # (B, K, C, H) storage -> the (B, C, K, H) layout of the kernels
            return jnp.swapaxes(x, 1, 2)

        if t == 1 and core is None and kernels.step_before_write:
            # Attend over [old cache, new token], then write: the slot being overwritten
            # holds column i - C, which the mask excludes (runtime.decode_attention).
            out = kernels.step(
                q, k, v, cache_k.value, cache_v.value, q_positions=positions,
                cache_positions=cache_pos.value, window=window, execution=self.execution)
            # `tie` (an exact zero) makes the write depend on the attention output, so
            # XLA must order the reads of the old cache before the in-place update;
            # without the dependency it keeps both versions alive by copying every
            # layer's keys and values three times per token (~15% of a batch-1 step).
            tie = out[0, 0, 0, 0].astype(k.dtype) * 0
            self._write(cache_k, cache_v, cache_pos, cache_index, k + tie, v + tie, positions)
            return out
        if t == 1:
            # Other steps (AdaAttn cores, the Pallas decode kernel) see the C slots: write
            # first, then attend.
            self._write(cache_k, cache_v, cache_pos, cache_index, k, v, positions)
            attend = kernels.step if core is None else core
            return attend(q, view(cache_k.value), view(cache_v.value), q_positions=positions,
                          kv_positions=cache_pos.value, window=window)
        # Prefill: later tokens of the chunk may overwrite keys earlier ones need, so
        # attend over [old cache, new chunk] before writing.
        # The kernels are pure functions, so an empty cache can be skipped under a
        # lax.cond; an AdaAttn core (a Flax module) attends over [cache, chunk] as is.
        out = cached_chunk_attention(kernels.full if core is None else core, q, k, v,
                                     view(cache_k.value), view(cache_v.value),
                                     q_positions=positions, cache_positions=cache_pos.value,
                                     window=window, skip_empty=core is None)
        self._write(cache_k, cache_v, cache_pos, cache_index, k, v, positions)
        return out

    def _write(self, cache_k, cache_v, cache_pos, cache_index, k, v, positions):
        """Writes a (B, T) chunk into the ring: column i goes to slot i % C for every row.

        All rows share one column counter, so a decode step writes one slot with a
        `dynamic_update_slice` that XLA does in place (a per-row scatter made it copy
        every layer's cache several times per token). A row's positions are its columns
        minus its left padding, so slot reuse stays exact: column i overwrites column
        i - C, i.e. position p - C, outside any window W <= C and, when C = max_seq_len,
        a padding column (p < C). Padding is stored with its negative position and
        never attended.
        """
        c = cache_pos.value.shape[1]
        t = positions.shape[1]
        start = cache_index.value
        keys, values = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # (B, K, T, H)
        if t == 1:
            slot = start % c
            cache_k.value = jax.lax.dynamic_update_slice(cache_k.value, keys, (0, 0, slot, 0))
            cache_v.value = jax.lax.dynamic_update_slice(cache_v.value, values,
                                                         (0, 0, slot, 0))
            cache_pos.value = jax.lax.dynamic_update_slice(cache_pos.value, positions,
                                                           (0, slot))
        else:
            # Keep only the newest C columns of the chunk; older ones would collide.
            keep = min(t, c)
            slots = (start + t - keep + jnp.arange(keep)) % c  # (keep,) distinct
            cache_k.value = cache_k.value.at[:, :, slots].set(keys[:, :, t - keep:])
            cache_v.value = cache_v.value.at[:, :, slots].set(values[:, :, t - keep:])
            cache_pos.value = cache_pos.value.at[:, slots].set(positions[:, t - keep:])
        cache_index.value = start + t
