"""Vectorised numpy dequantisation of the GGML tensor types a llama GGUF carries.

Each block type is decoded for all blocks at once (reshape to (n_blocks, block_bytes),
then whole-array bit operations), following ggml-quants.c `dequantize_row_*`:

  Q8_0: 34 B = f16 d | 32 x int8 q;                 y = d * q
  Q4_0: 18 B = f16 d | 16 B nibbles;                y[j] = d * (lo(q[j]) - 8),
                                                    y[j + 16] = d * (hi(q[j]) - 8)
  Q4_K: 144 B per 256 = f16 d | f16 dmin | 12 B of 6-bit (scale, min) x 8 | 128 B nibbles;
        y = d * sc[s] * q - dmin * m[s] for 8 sub-blocks s of 32
  Q5_K: 176 B per 256 = f16 d | f16 dmin | 12 B scales (as Q4_K) | 32 B qh | 128 B nibbles;
        as Q4_K with q = nibble + 16 * (bit s of qh[l]), so q in 0..31
  Q6_K: 210 B per 256 = 128 B low nibbles | 64 B high 2-bit pairs | 16 x int8 scale | f16 d;
        y = d * sc[s] * (q - 32) for 16 sub-blocks s of 16
"""

from __future__ import annotations

import numpy as np
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as T

SUPPORTED_TYPES = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_K, T.Q5_K, T.Q6_K)


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """(n, 1) float32 from the little-endian f16 at byte `start` of each block."""
    return blocks[:, start:start + 2].copy().view('<f2').astype(np.float32)


def _q8_0(blocks):
    d = _f16(blocks, 0)  # (n, 1)
    return d * blocks[:, 2:].view(np.int8).astype(np.float32)  # (n, 32)


def _q4_0(blocks):
    d = _f16(blocks, 0)  # (n, 1)
    qs = blocks[:, 2:]  # (n, 16)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - 8  # (n, 32)
    return d * q.astype(np.float32)


def _k_scale_min(scales: np.ndarray):
    """The 8 6-bit (scale, min) pairs packed into 12 bytes (ggml `get_scale_min_k4`).

    Args:
      scales: (n, 12) uint8.

    Returns:
      (sc, m), each (n, 8) float32.
    """
    lo, hi, top = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([lo & 63, (top & 0x0F) | ((lo >> 6) << 4)], axis=1)
    m = np.concatenate([hi & 63, (top >> 4) | ((hi >> 6) << 4)], axis=1)
    return sc.astype(np.float32), m.astype(np.float32)


def _q4_k(blocks):
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)  # (n, 1)
    sc, m = _k_scale_min(blocks[:, 4:16])  # (n, 8)
    qs = blocks[:, 16:].reshape(n, 4, 1, 32)  # 4 chunks of 32 bytes -> 64 values each
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32)  # sub-block s = 2c + hi
    y = (d * sc)[:, :, None] * q.astype(np.float32) - (dmin * m)[:, :, None]
    return y.reshape(n, 256)


def _q5_k(blocks):
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)  # (n, 1)
    sc, m = _k_scale_min(blocks[:, 4:16])  # (n, 8)
    qh = blocks[:, 16:48].reshape(n, 1, 32)  # bit s of qh[l] is the 5th bit of value l of s
    qs = blocks[:, 48:].reshape(n, 4, 1, 32)  # nibbles laid out as in Q4_K
    lo = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32)  # sub-block s = 2c + hi
    hi = (qh >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # (n, 8, 32)
    q = (lo | (hi << 4)).astype(np.float32)
    y = (d * sc)[:, :, None] * q - (dmin * m)[:, :, None]
    return y.reshape(n, 256)


def _q6_k(blocks):
    n = blocks.shape[0]
    ql = blocks[:, :128].reshape(n, 2, 2, 32)  # (half, ql[0:32] | ql[32:64], l)
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32)  # (half, -, l)
    sc = blocks[:, 192:208].view(np.int8).astype(np.float32).reshape(n, 2, 8)
    d = _f16(blocks, 208)[:, :, None]  # (n, 1, 1)
    # Within a half of 128: quarter k in 0..3 takes nibble (k // 2) of ql[(k % 2) * 32 + l]
    # and bits 2k..2k+1 of qh[l]; its 32 values use scales 2k and 2k+1 (16 values each).
    lo = np.stack([ql[:, :, 0] & 0x0F, ql[:, :, 1] & 0x0F, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4],
                  axis=2)  # (n, 2, 4, 32)
    shifts = np.array([0, 2, 4, 6], np.uint8)[None, None, :, None]
    hi = (qh >> shifts) & 3  # (n, 2, 4, 32)
    q = ((lo | (hi << 4)).astype(np.int8) - 32).astype(np.float32).reshape(n, 2, 8, 16)
    return (d[:, :, :, None] * sc[:, :, :, None] * q).reshape(n, 256)


_BLOCK_DECODERS = {T.Q8_0: _q8_0, T.Q4_0: _q4_0, T.Q4_K: _q4_k, T.Q5_K: _q5_k,
                   T.Q6_K: _q6_k}


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple) -> np.ndarray:
    """Float32 values of one tensor's raw data.

    Args:
      raw: the tensor's bytes as a uint8 array (any shape, e.g. a memmap slice), or an
        already-typed F32/F16 array.
      ggml_type: a GGMLQuantizationType value from SUPPORTED_TYPES.
      shape: numpy-order shape of the result; shape[-1] is a multiple of the block size.

    Returns:
      float32 array of `shape`.

    Raises:
      ValueError: for an unsupported type or a byte count that does not match `shape`.
    """
    qtype = T(ggml_type)
    if qtype not in SUPPORTED_TYPES:
        raise ValueError(f'tensor type {qtype.name} is not supported; supported: '
                         f'{[t.name for t in SUPPORTED_TYPES]}')
    block, type_size = GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape, dtype=np.int64))
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if n % block or raw.size != n // block * type_size:
        raise ValueError(f'{qtype.name} tensor of shape {tuple(shape)} needs '
                         f'{n // block * type_size} bytes, got {raw.size}')
    if qtype == T.F32:
        out = raw.view('<f4').astype(np.float32, copy=False)
    elif qtype == T.F16:
        out = raw.view('<f2').astype(np.float32)
    elif qtype == T.BF16:
        out = (raw.view('<u2').astype(np.uint32) << 16).view(np.float32)
    else:
        out = _BLOCK_DECODERS[qtype](raw.reshape(-1, type_size))
    return out.reshape(shape)
