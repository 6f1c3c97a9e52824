"""How attention executes: the one dispatch on `AttentionImpl`.

`attention_kernels(impl, call)` returns the implementations of one `AttentionImpl` for
every place attention runs (full sequences, and a decode step over the KV cache); the
model's layers call what it returns and never branch on the enum themselves. AUTO is
resolved here too, by `runtime.auto.choose` on the backend and the call's static facts
(`AttentionCall`), into one of the explicit members.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P

from rustgpt_jax import axes, kernels
from rustgpt_jax import masks as masks_lib
from rustgpt_jax.config import AttentionImpl
from rustgpt_jax.ops import blocked, index_mask, reference
from rustgpt_jax.runtime import auto
from rustgpt_jax.runtime.auto import AttentionCall
from rustgpt_jax.runtime.decode_attention import cached_decode_attention

# What CUDNN asks `jax.nn.dot_product_attention` for; tests set 'xla' (the same mask
# through XLA), since cuDNN can be neither run nor lowered without a GPU.
CUDNN_IMPLEMENTATION = 'cudnn'


@dataclasses.dataclass(frozen=True)
class AttentionKernels:
    """The implementations of one `AttentionImpl`.

    Attributes:
      full: `full(q, k, v, *, q_positions, kv_positions, window, q_segment_ids,
        kv_segment_ids, scale)`, as `dot_product_attention`.
      step: one decode step over the KV cache. With `step_before_write` it is called as
        `runtime.decode_attention.cached_decode_attention` (the cache before the new
        token is written, plus the token; an `execution` keyword), otherwise as `full`
        on the (B, C, K, H) cache after the write (no segment ids).
      step_before_write: which of the two the step is.
      dense_probs: `full` forms the dense probabilities, so statistics such as the
        attention entropy can be read from them exactly.
    """
    full: Callable
    step: Callable
    step_before_write: bool
    dense_probs: bool


def attention_kernels(impl: AttentionImpl,
                      call: AttentionCall = AttentionCall()) -> AttentionKernels:
    """The implementations of `impl` (the only function that branches on AttentionImpl).

    Args:
      impl: the implementation; AUTO is chosen per backend and call (`runtime.auto`).
      call: the static facts of the calls (AUTO and CUDNN read them; the shapes and
        dtypes are filled in from the arrays at trace time).
    """
    impl = AttentionImpl(impl)
    if impl == AttentionImpl.AUTO:
        step = attention_kernels(auto.choose_step().impl, call)
        # Which kernel runs the full sequences also depends on the arrays (T == S, the
        # dtype), so it is chosen at trace time; `dense_probs` follows the layer's facts.
        whole = attention_kernels(auto.choose(call).impl, call)
        return AttentionKernels(functools.partial(_auto_full, call), step.step,
                                step.step_before_write, whole.dense_probs)
    if impl == AttentionImpl.REFERENCE:
        return AttentionKernels(reference.mha_reference, cached_decode_attention, True, True)
    if impl == AttentionImpl.BLOCKED:
        return AttentionKernels(blocked.blocked_attention, cached_decode_attention, True, False)
    if impl == AttentionImpl.PALLAS:
        return AttentionKernels(_pallas_full, kernels.flash_decode, False, False)
    if impl == AttentionImpl.CUDNN:
        return AttentionKernels(functools.partial(_cudnn_full, call), kernels.flash_decode,
                                False, False)
    raise ValueError(f'unknown attention implementation {impl!r}')  # pragma: no cover


def describe(impl: AttentionImpl, call: AttentionCall = AttentionCall(),
             backend: Optional[str] = None) -> list[str]:
    """Which implementation runs `call`'s full sequences and decode steps, and why.

    Args:
      impl: the configured implementation.
      call: the static facts (a training call: T == S).
      backend: default `jax.default_backend()`.

    Returns:
      Two lines of text: full sequences, decode step.
    """
    impl = AttentionImpl(impl)
    if impl != AttentionImpl.AUTO:
        return [f'{impl.value} (explicit)', f'{impl.value} (explicit)']
    full, step = auto.choose(call, backend), auto.choose_step(backend)
    return [f'auto -> {full.impl.value} ({full.reason})', f'auto ({step.reason})']


def _auto_full(call: AttentionCall, q, k, v, *, q_positions, kv_positions,
               window=masks_lib.NO_WINDOW, q_segment_ids=None, kv_segment_ids=None,
               scale=None):
    choice = auto.choose(call.at(q, k, q_segment_ids))
    return attention_kernels(choice.impl, call).full(
        q, k, v, q_positions=q_positions, kv_positions=kv_positions, window=window,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, scale=scale)


def dot_product_attention(q, k, v, *, q_positions, kv_positions,
                          window=masks_lib.NO_WINDOW, q_segment_ids=None,
                          kv_segment_ids=None,
                          impl: AttentionImpl = AttentionImpl.REFERENCE,
                          scale: Optional[float] = None):
    """Masked multi-head attention with grouped KV heads.

    The mask is `masks.allowed(q_pos, k_pos, window, q_seg, k_seg)`. The blocked and
    Pallas paths also assume the self-attention layout (key index j > query index i is
    never allowed, nor i - j >= window), which holds for training batches, packed
    sequences and left padding; decoding against a cache uses `AttentionKernels.step`.

    Args:
      q: (B, T, N, H) queries.
      k, v: (B, S, K, H) keys and values, N % K == 0.
      q_positions: (B, T) int32.
      kv_positions: (B, S) int32; negative marks an empty slot.
      window: int32 scalar or (B,) traced window (masks.NO_WINDOW = full causal).
      q_segment_ids, kv_segment_ids: optional (B, T), (B, S) int32.
      impl: which implementation computes it.
      scale: logit scale, default 1/sqrt(H).

    Returns:
      (B, T, N, H) in q's dtype.
    """
    return attention_kernels(impl).full(
        q, k, v, q_positions=q_positions, kv_positions=kv_positions, window=window,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, scale=scale)


def _pallas_full(q, k, v, *, q_positions, kv_positions, window=masks_lib.NO_WINDOW,
                 q_segment_ids=None, kv_segment_ids=None, scale=None):
    fn = _per_shard(kernels.flash_attention, window, q_segment_ids is not None)
    return fn(q, k, v, q_positions=q_positions, kv_positions=kv_positions, window=window,
              q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, scale=scale)


def _cudnn_full(call: AttentionCall, q, k, v, *, q_positions, kv_positions,
                window=masks_lib.NO_WINDOW, q_segment_ids=None, kv_segment_ids=None,
                scale=None):
    """cuDNN's fused attention where it takes the call, the Pallas kernel elsewhere."""
    kw = dict(q_positions=q_positions, kv_positions=kv_positions, window=window,
              q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, scale=scale)
    if auto.cudnn_refusal(call.at(q, k, q_segment_ids)) is not None:
        return _pallas_full(q, k, v, **kw)
    kernel = functools.partial(_cudnn_or_pallas, static_window=call.static_window)
    return _per_shard(kernel, window, q_segment_ids is not None)(q, k, v, **kw)


def _cudnn_or_pallas(q, k, v, *, q_positions, kv_positions, window, q_segment_ids=None,
                     kv_segment_ids=None, scale=None, static_window: int):
    """cuDNN on batches whose mask is its causal index band, the Pallas kernel otherwise.

    The static facts only say the call *may* fit; whether the rows are unpadded single
    sequences is data, so one cheap (B, T) check picks the branch at run time and the
    result is exact for every input (`ops.index_mask`).
    """
    fits = index_mask.fits_index_mask(q_positions, kv_positions, window, q_segment_ids,
                                      kv_segment_ids, static_window)

    def fused(q, k, v):
        return index_mask.index_mask_attention(q, k, v, static_window=static_window,
                                               scale=scale,
                                               implementation=CUDNN_IMPLEMENTATION)

    def fallback(q, k, v):
        return kernels.flash_attention(
            q, k, v, q_positions=q_positions, kv_positions=kv_positions, window=window,
            q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, scale=scale)

    return jax.lax.cond(fits, fused, fallback, q, k, v)


def _per_shard(kernel, window, has_segments: bool):
    """Runs a Pallas kernel per shard under `shard_map` when a mesh and rules are active.

    XLA cannot partition a Pallas custom call, so without this it would gather the
    sharded q/k/v onto every device. Batch rows and heads are independent in
    attention, so each device runs the kernel on its (batch, heads) block: query head
    n reads KV head n // G, and contiguous head blocks keep that map local whenever the
    KV heads divide evenly over the mesh axis (the sharding rules check divisibility).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel
    q_spec = nn.logical_to_mesh_axes((axes.BATCH, axes.LENGTH, axes.HEADS, axes.HEAD_DIM))
    kv_spec = nn.logical_to_mesh_axes((axes.BATCH, axes.LENGTH, axes.KV_HEADS, axes.HEAD_DIM))
    if q_spec is None or all(a is None for a in tuple(q_spec) + tuple(kv_spec)):
        return kernel
    if q_spec[2] != kv_spec[2]:
        raise ValueError(f'Pallas attention needs query and KV heads sharded alike, got '
                         f'heads -> {q_spec[2]!r}, kv_heads -> {kv_spec[2]!r}')
    rows = P(q_spec[0], None)
    window_spec = P(q_spec[0]) if jax.numpy.ndim(window) == 1 else P()

    def call(q, k, v, q_positions, kv_positions, window, q_segment_ids=None,
             kv_segment_ids=None, scale=None):
        inner = functools.partial(kernel, scale=scale)
        if not (_divides(q.shape, q_spec, mesh) and _divides(k.shape, kv_spec, mesh)):
            # E.g. init on a (1, T) dummy batch: run unsharded rather than fail.
            return inner(q, k, v, q_positions=q_positions, kv_positions=kv_positions,
                         window=window, q_segment_ids=q_segment_ids,
                         kv_segment_ids=kv_segment_ids)
        seg_specs = (rows, rows) if has_segments else ()
        seg_args = (q_segment_ids, kv_segment_ids) if has_segments else ()

        def body(q, k, v, qp, kp, w, *segs):
            qs, ks = segs if segs else (None, None)
            return inner(q, k, v, q_positions=qp, kv_positions=kp, window=w,
                         q_segment_ids=qs, kv_segment_ids=ks)

        return jax.shard_map(
            body, in_specs=(P(*q_spec), P(*kv_spec), P(*kv_spec), rows, rows, window_spec)
            + seg_specs, out_specs=P(*q_spec), check_vma=False)(
                q, k, v, q_positions, kv_positions, window, *seg_args)

    return call


def _divides(shape, spec, mesh) -> bool:
    """Whether every dim of `shape` splits evenly over its mesh axes in `spec`."""
    for size, names in zip(shape, spec):
        if names is None:
            continue
        names = names if isinstance(names, tuple) else (names,)
        parts = 1
        for name in names:
            parts *= mesh.shape[name]
        if size % parts:
            return False
    return True
