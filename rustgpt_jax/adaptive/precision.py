"""Adaptive-precision attention (SPEC §4): a run-time switch between fp32, bf16, fp16
and fp8 branches, each compiled once.

Levels are ordered from most to least precise: fp32, bf16, fp16, fp8 (bf16 keeps
fp32's range, fp16 and fp8 do not, so "one level up" on overflow risk moves towards
range). The policy picks a base level among the levels the backend supports:
quality -> fp32, speed -> the lowest allowed, balanced -> the middle one
(index (n - 1) // 2 of the allowed list, i.e. bf16 both with and without fp8). Then,
at run time: one level up when max |q|, |k|, |v| > 10, one level down when the key
length exceeds 2048, clamped to the allowed levels.
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from rustgpt_jax import masks as masks_lib
from rustgpt_jax.adaptive.core import masked_attention
from rustgpt_jax.config import PrecisionPolicy

LEVELS = ('fp32', 'bf16', 'fp16', 'fp8')
LEVEL_DTYPES = {'fp32': jnp.float32, 'bf16': jnp.bfloat16, 'fp16': jnp.float16,
                'fp8': jnp.float8_e4m3fn}
OVERFLOW_THRESHOLD = 10.0
LONG_SEQUENCE = 2048
# fp8 matmuls need Ada (8.9) or Hopper (9.0) tensor cores.
_FP8_MIN_COMPUTE_CAPABILITY = 8.9


def _gpu_supports_fp8() -> bool:
    try:
        devices = jax.devices('gpu')
    except RuntimeError:
        return False
    capability = getattr(devices[0], 'compute_capability', None) if devices else None
    try:
        return capability is not None and float(capability) >= _FP8_MIN_COMPUTE_CAPABILITY
    except (TypeError, ValueError):
        return False


def supported_levels(backend: Optional[str] = None) -> tuple:
    """Precision levels this backend runs natively, most precise first.

    fp32, bf16 and fp16 everywhere (XLA emulates the narrow types on CPU); fp8 only on
    GPUs with compute capability >= 8.9.

    Args:
      backend: 'cpu', 'gpu', 'tpu' (default: jax.default_backend()).
    """
    backend = backend or jax.default_backend()
    levels = ('fp32', 'bf16', 'fp16')
    if backend in ('gpu', 'cuda') and _gpu_supports_fp8():
        levels += ('fp8',)
    return levels


def _check_levels(levels: Sequence[str]) -> tuple:
    levels = tuple(levels)
    if not levels or any(level not in LEVELS for level in levels):
        raise ValueError(f'precision levels must be a non-empty subset of {LEVELS}, got {levels}')
    if list(levels) != sorted(levels, key=LEVELS.index):
        raise ValueError(f'precision levels must be ordered most precise first, got {levels}')
    return levels


def policy_base_index(policy: PrecisionPolicy, num_levels: int) -> int:
    """Index into the allowed levels: quality 0, balanced (n - 1) // 2, speed n - 1."""
    policy = PrecisionPolicy(policy)
    if policy == PrecisionPolicy.QUALITY:
        return 0
    if policy == PrecisionPolicy.SPEED:
        return num_levels - 1
    return (num_levels - 1) // 2


def choose_precision(policy: PrecisionPolicy, max_abs, seq_len, levels: Sequence[str]):
    """The run-time precision decision.

    Args:
      policy: PrecisionPolicy.
      max_abs: max |q|, |k|, |v| (float scalar, may be traced).
      seq_len: key length L (int or traced).
      levels: allowed levels, most precise first.

    Returns:
      int32 scalar index into `levels`.
    """
    levels = _check_levels(levels)
    index = jnp.int32(policy_base_index(policy, len(levels)))
    index = index - (jnp.asarray(max_abs) > OVERFLOW_THRESHOLD).astype(jnp.int32)
    index = index + (jnp.asarray(seq_len) > LONG_SEQUENCE).astype(jnp.int32)
    return jnp.clip(index, 0, len(levels) - 1).astype(jnp.int32)


def level_one_hot(index, levels: Sequence[str]):
    """(4,) float32 one-hot over LEVELS of the chosen allowed level (for histograms)."""
    table = jnp.array([LEVELS.index(level) for level in levels], jnp.int32)
    return jax.nn.one_hot(table[index], len(LEVELS), dtype=jnp.float32)


def max_abs_qkv(q, k, v):
    """max |q|, |k|, |v| as a float32 scalar, outside the gradient."""
    return jax.lax.stop_gradient(jnp.maximum(jnp.maximum(
        jnp.max(jnp.abs(q)), jnp.max(jnp.abs(k))), jnp.max(jnp.abs(v))).astype(jnp.float32))


class AdaptivePrecisionAttention(nn.Module):
    """Attention whose matmul dtype is chosen at run time by `lax.switch`.

    Called like `runtime.attention.dot_product_attention`. Sows `precision`, a (4,)
    one-hot over LEVELS, into `intermediates`.

    Attributes:
      policy: PrecisionPolicy.
      levels: allowed levels (default: `supported_levels()` of the running backend).
    """
    head_dim: int
    policy: PrecisionPolicy = PrecisionPolicy.BALANCED
    levels: Optional[Sequence[str]] = None

    @nn.compact
    def __call__(self, q, k, v, *, q_positions, kv_positions, window=masks_lib.NO_WINDOW,
                 q_segment_ids=None, kv_segment_ids=None):
        """Args: q (B, T, N, H); k, v (B, S, K, H); the rest as dot_product_attention.

        Returns:
          (B, T, N, H).
        """
        levels = _check_levels(self.levels or supported_levels())
        index = choose_precision(self.policy, max_abs_qkv(q, k, v), k.shape[1], levels)

        def branch(level):
            def run(q, k, v):
                mask = masks_lib.make_attention_mask(q_positions, kv_positions, window,
                                                     q_segment_ids, kv_segment_ids)
                return masked_attention(q, k, v, mask, self.head_dim ** -0.5,
                                        LEVEL_DTYPES[level])
            return run

        out = jax.lax.switch(index, [branch(level) for level in levels], q, k, v)
        self.sow('intermediates', 'precision', level_one_hot(index, levels))
        return out
