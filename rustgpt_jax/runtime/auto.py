"""`AttentionImpl.AUTO`: the attention implementation for the backend and the call.

The choice reads only static facts: `jax.default_backend()` and an `AttentionCall`
(the layer's static window, dtype and head_dim, filled in from the arrays at trace
time). It returns a concrete `AttentionImpl` and the reason, which
`runtime.attention.attention_kernels` (the one dispatch on AttentionImpl) then runs:

  backend  full sequences                                     decode step over the cache
  gpu      CUDNN where cuDNN takes the call (bf16/f16, a      Pallas flash-decoding
           static window, T == S, head_dim % 8 == 0, <= 128),  (`kernels.flash_decode`)
           else the Pallas Triton kernel (float32, traced
           windows, chunks against a cache)
  tpu      the Pallas Mosaic kernel                           the cached XLA step
  cpu      BLOCKED (REFERENCE below one tile, 256 tokens;     the cached XLA step
           for a chunk against a cache, which the blocked     (`runtime.decode_attention`)
           loop cannot take; and where the entropy window
           reads dense probabilities)

CUDNN itself still checks the data: rows that are padded or packed, or a window that is
not the static one, run the Pallas kernel (`ops.index_mask`), so AUTO is exact for every
input. On TPU, JAX's splash attention is not chosen: which of it and the Mosaic kernel
is faster has not been measured on a TPU (benchmarks/accelerator_suite.py is GPU-only).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from rustgpt_jax import masks as masks_lib
from rustgpt_jax.config import AttentionImpl, ModelConfig, WindowStrategy
from rustgpt_jax.ops.tiling import BlockSizes

# cuDNN's fused attention (jax._src.cudnn.fused_attention_stablehlo.check_layout and
# check_is_flash_attention): bf16/f16 inputs, head_dim a multiple of 8, at most 128
# before Hopper (256 from Hopper on; 128 is the bound that holds on every GPU).
CUDNN_DTYPES = ('bfloat16', 'float16')

# On CPU a sequence shorter than one tile of the blocked loop runs the dense reference:
# there the loop pads to a whole tile and skips nothing (forward + backward, 8 heads of
# 64: 3.2x slower than the reference at T = 128, 0.80x at 256, 0.19x at 1024;
# benchmarks/RESULTS.md, "AUTO on CPU").
DENSE_BELOW = BlockSizes.for_xla().block_q
CUDNN_MAX_HEAD_DIM = 128


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """What is static about one attention call: everything AUTO's choice reads.

    Attributes:
      static_window: the window when it is fixed before tracing (the FIXED strategy;
        masks.NO_WINDOW is full causal), None when it is traced (adaptive strategies).
      dtype: q's dtype name; None until known.
      head_dim: H; None until known.
      same_length: T == S, the self-attention layout (training, eval, the decode init);
        False for a chunk of queries against a KV cache.
      segments: segment ids are passed.
      entropy: the layer reports its attention entropy (the ATTENTION_ENTROPY window).
      length: T, the query length; None until known.
    """
    static_window: Optional[int] = None
    dtype: Optional[str] = None
    head_dim: Optional[int] = None
    same_length: bool = True
    segments: bool = False
    entropy: bool = False
    length: Optional[int] = None

    def at(self, q, k, q_segment_ids=None) -> 'AttentionCall':
        """This call with the facts of q (B, T, N, H), k (B, S, K, H) filled in."""
        return dataclasses.replace(
            self, dtype=jnp.dtype(q.dtype).name, head_dim=int(q.shape[-1]),
            same_length=q.shape[1] == k.shape[1], segments=q_segment_ids is not None,
            length=int(q.shape[1]))


def attention_call(config: ModelConfig) -> AttentionCall:
    """The static facts of `config`'s attention layers."""
    fixed = config.window_strategy == WindowStrategy.FIXED
    return AttentionCall(
        static_window=masks_lib.window_or_full(config.window_size) if fixed else None,
        dtype=config.dtype, head_dim=config.effective_head_dim,
        entropy=config.window_strategy == WindowStrategy.ATTENTION_ENTROPY)


@dataclasses.dataclass(frozen=True)
class Choice:
    """A concrete implementation (never AUTO) and why it was chosen."""
    impl: AttentionImpl
    reason: str


def cudnn_refusal(call: AttentionCall) -> Optional[str]:
    """Why cuDNN's fused attention cannot take `call`, or None when it can."""
    if call.static_window is None:
        return 'the window is traced (an adaptive window strategy)'
    if not call.same_length:
        return 'the queries are a chunk against a KV cache (T != S)'
    if call.dtype not in CUDNN_DTYPES:
        return f'dtype {call.dtype} (cuDNN takes bfloat16 and float16)'
    if call.head_dim is None or call.head_dim % 8 or call.head_dim > CUDNN_MAX_HEAD_DIM:
        return (f'head_dim {call.head_dim} (cuDNN takes multiples of 8 up to '
                f'{CUDNN_MAX_HEAD_DIM})')
    return None


def _backend(backend: Optional[str]) -> str:
    return jax.default_backend() if backend is None else backend


def choose(call: AttentionCall, backend: Optional[str] = None) -> Choice:
    """AUTO's implementation of full-sequence attention.

    Args:
      call: the static facts of the call.
      backend: 'gpu', 'tpu', 'cpu', ...; default `jax.default_backend()`.
    """
    backend = _backend(backend)
    if backend == 'gpu':
        refusal = cudnn_refusal(call)
        if refusal is None:
            return Choice(AttentionImpl.CUDNN,
                          'gpu: cuDNN fused attention (jax.nn.dot_product_attention); '
                          'padded or packed rows run the Pallas Triton kernel')
        return Choice(AttentionImpl.PALLAS, f'gpu: Pallas Triton kernel; not cuDNN: {refusal}')
    if backend == 'tpu':
        return Choice(AttentionImpl.PALLAS,
                      'tpu: Pallas Mosaic kernel (splash attention not measured against it)')
    if not call.same_length:
        return Choice(AttentionImpl.REFERENCE,
                      f'{backend}: dense reference; the blocked loop needs T == S and the '
                      'queries are a chunk against a KV cache')
    if call.entropy:
        return Choice(AttentionImpl.REFERENCE,
                      f'{backend}: dense reference; the entropy window reads the exact '
                      'entropy from its probabilities')
    if call.length is not None and call.length < DENSE_BELOW:
        return Choice(AttentionImpl.REFERENCE,
                      f'{backend}: dense reference for sequences shorter than one blocked tile '
                      f'({DENSE_BELOW} tokens), where the loop only adds padding and overhead')
    return Choice(AttentionImpl.BLOCKED,
                  f'{backend}: blocked XLA attention (skips masked key blocks); the dense '
                  f'reference for sequences shorter than {DENSE_BELOW} tokens')


def choose_step(backend: Optional[str] = None) -> Choice:
    """AUTO's implementation of a decode step over the KV cache."""
    backend = _backend(backend)
    if backend == 'gpu':
        return Choice(AttentionImpl.PALLAS, 'gpu: Pallas flash-decoding over the ring cache '
                      '(cuDNN cannot take its per-slot positions)')
    if backend == 'tpu':
        return Choice(AttentionImpl.BLOCKED,
                      'tpu: the cached XLA step (there is no Mosaic decode kernel)')
    return Choice(AttentionImpl.BLOCKED, f'{backend}: the cached XLA step')
