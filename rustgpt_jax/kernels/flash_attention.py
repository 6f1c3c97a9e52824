"""Fused (FlashAttention-2) attention in Pallas with the semantics of `mha_reference`.

`flash_attention` pads the inputs to whole blocks, picks a backend and runs a
`jax.custom_vjp` whose forward and backward passes are Pallas kernels:

  * 'triton': GPU kernels (`_triton.py`), interpret mode (`interpret=True`) elsewhere;
  * 'mosaic': TPU kernels (`_mosaic.py`), TPU interpret mode elsewhere
    (`pltpu.InterpretParams`, the same as running under `pltpu.force_tpu_interpret_mode`).

Masks come from the shared predicate `masks.allowed` applied to position / segment-id
tiles; the window is a traced int32 value (scalar or (B,)), so changing it never
recompiles. Key blocks outside the causal / sliding-window band of token indices are
skipped when T == S (the self-attention layout, see `_common`), so sliding-window work
grows as T * W. Rows with no visible key (padding rows) give 0, where the dense reference
gives a uniform average; callers never produce such rows for real tokens.

The reference is beside the kernel: `reference = ops.reference.mha_reference`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from rustgpt_jax import masks as masks_lib
from rustgpt_jax.kernels import _common as cm
from rustgpt_jax.kernels import _mosaic, _triton
from rustgpt_jax.ops.reference import mha_reference as reference
from rustgpt_jax.ops.tiling import BlockSizes

__all__ = ['flash_attention', 'reference', 'default_backend']

BACKENDS = ('triton', 'mosaic')
_SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def default_backend() -> str:
    """'mosaic' on TPU, 'triton' everywhere else (interpret mode off GPU)."""
    return 'mosaic' if jax.default_backend() == 'tpu' else 'triton'


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything static about one call (the nondiff argument of the custom_vjp)."""
    backend: str
    scale: float
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    skip: bool
    interpret: object

    def kernels(self):
        return _triton if self.backend == 'triton' else _mosaic


def _interpret_mode(backend: str, interpret: Optional[bool]):
    native = {'triton': 'gpu', 'mosaic': 'tpu'}[backend]
    if interpret is None:
        interpret = jax.default_backend() != native
    if not interpret:
        return False
    if backend == 'mosaic':
        from jax.experimental.pallas import tpu as pltpu
        return pltpu.InterpretParams()
    return True


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _flash(q, k, v, qpos, kpos, qseg, kseg, win, st: _Static):
    out, _ = _flash_fwd(q, k, v, qpos, kpos, qseg, kseg, win, st)
    return out


def _flash_fwd(q, k, v, qpos, kpos, qseg, kseg, win, st: _Static):
    out, lse = st.kernels().forward(q, k, v, qpos, kpos, qseg, kseg, win, scale=st.scale,
                                    block_q=st.block_q, block_k=st.block_k, skip=st.skip,
                                    interpret=st.interpret)
    return out, (q, k, v, qpos, kpos, qseg, kseg, win, out, lse)


def _flash_bwd(st: _Static, res, do):
    q, k, v, qpos, kpos, qseg, kseg, win, out, lse = res
    dq, dk, dv = st.kernels().backward(
        q, k, v, qpos, kpos, qseg, kseg, win, out, lse, do, scale=st.scale,
        block_q=st.block_q_bwd, block_k=st.block_k_bwd, skip=st.skip,
        interpret=st.interpret)
    # Integer inputs (positions, segment ids, window) have no cotangent.
    return dq, dk, dv, None, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _check_inputs(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f'q, k, v must be 4-D (B, T, N, H) / (B, S, K, H); got shapes '
                         f'{q.shape}, {k.shape}, {v.shape}')
    b, t, n, h = q.shape
    if k.shape != v.shape:
        raise ValueError(f'k and v shapes differ: {k.shape} vs {v.shape}')
    if k.shape[0] != b or k.shape[3] != h:
        raise ValueError(f'k/v shape {k.shape} does not match q shape {q.shape} '
                         '(batch and head_dim must agree)')
    if n % k.shape[2]:
        raise ValueError(f'query heads ({n}) must be a multiple of KV heads ({k.shape[2]})')
    for name, x in (('q', q), ('k', k), ('v', v)):
        if not any(x.dtype == d for d in _SUPPORTED_DTYPES):
            raise ValueError(f'{name} dtype {x.dtype} is not one of float32/bfloat16/float16')
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f'q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}')
    s = k.shape[1]
    if tuple(q_positions.shape) != (b, t):
        raise ValueError(f'q_positions shape {q_positions.shape} != (B, T) = {(b, t)}')
    if tuple(kv_positions.shape) != (b, s):
        raise ValueError(f'kv_positions shape {kv_positions.shape} != (B, S) = {(b, s)}')
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError('q_segment_ids and kv_segment_ids must be given together')
    if q_segment_ids is not None:
        if tuple(q_segment_ids.shape) != (b, t):
            raise ValueError(f'q_segment_ids shape {q_segment_ids.shape} != {(b, t)}')
        if tuple(kv_segment_ids.shape) != (b, s):
            raise ValueError(f'kv_segment_ids shape {kv_segment_ids.shape} != {(b, s)}')


def window_per_row(window, batch: int):
    """int32 (B,) window clipped to [0, NO_WINDOW] (clipping keeps the mask unchanged)."""
    window = jnp.asarray(window, jnp.int32)
    if window.ndim == 0:
        window = jnp.broadcast_to(window, (batch,))
    elif window.shape != (batch,):
        raise ValueError(f'window must be a scalar or shape (B,) = ({batch},), '
                         f'got shape {window.shape}')
    return jnp.clip(window, 0, masks_lib.NO_WINDOW)


def _pad_axis(x, axis: int, size: int, value=0):
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def flash_attention(q, k, v, *, q_positions, kv_positions, window=masks_lib.NO_WINDOW,
                    q_segment_ids=None, kv_segment_ids=None, scale: Optional[float] = None,
                    block_sizes: Optional[BlockSizes] = None,
                    backend: Optional[str] = None, interpret: Optional[bool] = None,
                    skip_blocks: Optional[bool] = None):
    """Masked multi-head attention with grouped KV heads, as one fused Pallas kernel.

    Args:
      q: (B, T, N, H) queries (float32, bfloat16 or float16).
      k, v: (B, S, K, H) keys and values, N % K == 0, same dtype as q.
      q_positions: (B, T) int32.
      kv_positions: (B, S) int32; negative marks an empty slot.
      window: traced int32 scalar or (B,) (masks.NO_WINDOW = full causal).
      q_segment_ids, kv_segment_ids: optional (B, T), (B, S) int32.
      scale: logit scale, default 1/sqrt(H).
      block_sizes: tile sizes; default per backend.
      backend: 'triton' (GPU) or 'mosaic' (TPU); default from jax.default_backend().
      interpret: run in interpret mode; default: when not on the backend's hardware.
      skip_blocks: skip key blocks outside the token-index band; default T == S.

    Returns:
      (B, T, N, H) in q's dtype.
    """
    _check_inputs(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
    backend = default_backend() if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f'backend must be one of {BACKENDS}, got {backend!r}')
    b, t, n, h = q.shape
    s = k.shape[1]
    if skip_blocks is None:
        skip_blocks = t == s
    elif skip_blocks and t != s:
        raise ValueError(f'skip_blocks needs the self-attention layout T == S, got T={t}, '
                         f'S={s}')
    if block_sizes is None:
        block_sizes = BlockSizes.for_tpu() if backend == 'mosaic' else BlockSizes.for_triton()
    block_sizes.check_power_of_2()
    block_q_bwd, block_k_bwd = block_sizes.backward
    scale = float(h ** -0.5 if scale is None else scale)

    if skip_blocks:
        # One padded length for both sides keeps query i and key i the same token.
        length = max(t, s)
        blocks = [cm.clamp_block(bs, length) for bs in (
            block_sizes.block_q, block_sizes.block_k, block_q_bwd,
            block_k_bwd)]
        t_pad = s_pad = cm.round_up(length, max(blocks))
    else:
        blocks = [cm.clamp_block(block_sizes.block_q, t), cm.clamp_block(block_sizes.block_k, s),
                  cm.clamp_block(block_q_bwd, t),
                  cm.clamp_block(block_k_bwd, s)]
        t_pad = cm.round_up(t, max(blocks[0], blocks[2]))
        s_pad = cm.round_up(s, max(blocks[1], blocks[3]))
    # Triton arrays must have power-of-2 sizes; zero columns leave q.k and o unchanged.
    h_pad = 1 << max(0, (h - 1).bit_length())

    st = _Static(backend=backend, scale=scale, block_q=blocks[0], block_k=blocks[1],
                 block_q_bwd=blocks[2], block_k_bwd=blocks[3], skip=bool(skip_blocks),
                 interpret=_interpret_mode(backend, interpret))
    qp = _pad_axis(_pad_axis(q, 1, t_pad), 3, h_pad)
    kp = _pad_axis(_pad_axis(k, 1, s_pad), 3, h_pad)
    vp = _pad_axis(_pad_axis(v, 1, s_pad), 3, h_pad)
    # Padded queries get position -1 and padded keys are empty slots: never attended.
    qpos = _pad_axis(jnp.asarray(q_positions, jnp.int32), 1, t_pad, -1)
    kpos = _pad_axis(jnp.asarray(kv_positions, jnp.int32), 1, s_pad, -1)
    qseg = kseg = None
    if q_segment_ids is not None:
        qseg = _pad_axis(jnp.asarray(q_segment_ids, jnp.int32), 1, t_pad)
        kseg = _pad_axis(jnp.asarray(kv_segment_ids, jnp.int32), 1, s_pad)
    win = window_per_row(window, b)[:, None]  # (B, 1)
    out = _flash(qp, kp, vp, qpos, kpos, qseg, kseg, win, st)
    return out[:, :t, :, :h]
