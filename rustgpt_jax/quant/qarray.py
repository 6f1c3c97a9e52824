"""`QArray`: a weight matrix kept in its GGUF block encoding, as a pytree leaf.

A GGUF file stores a matrix W (out, in) row by row, each row a whole number of blocks
along `in`. A QArray holds those raw rows, `blocks` (out, row_bytes) uint8, plus two
static facts: the ggml type and the logical `shape` under which the model knows the
weight (e.g. a q projection kernel (D, N, H), whose W is (N * H, D)). Only `blocks` is a
child, so the leaf passes through `jit`, `lax.while_loop` and the decode loop like an
array, and a jitted step specialises on the type and shape.

The model's layers never look inside: `runtime.products` computes products with it
(a native kernel on CPU, or `dequantize` inside the jitted step, which XLA fuses into
the dot), and `nn.weights.weight` hands it to them in place of a float kernel.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from rustgpt_jax.quant import formats

T = formats.T


@dataclasses.dataclass(frozen=True)
class QArray:
    """Raw GGUF rows of a matrix W (out, in) under a logical shape.

    Attributes:
      blocks: (out, row_bytes) uint8, each row `in / block` blocks of `ggml_type`.
      ggml_type: a GGMLQuantizationType in `formats.BLOCK_TYPES` (static).
      shape: the logical shape the model expects (static); its size is out * in.
    """
    blocks: jax.Array
    ggml_type: int
    shape: tuple

    def __post_init__(self):
        formats.check_type(self.ggml_type)
        object.__setattr__(self, 'ggml_type', int(self.ggml_type))
        object.__setattr__(self, 'shape', tuple(int(s) for s in self.shape))
        b = self.blocks
        # Pytree placeholders (tree_map with object leaves) skip checks. Abstract values
        # are checked by shape and dtype alone: JAX's own stand-ins (`jit(f).lower`'s
        # ArgInfo) have no `ndim`.
        if not hasattr(b, 'shape') or not hasattr(b, 'dtype'):
            return
        if len(b.shape) != 2 or b.dtype != np.uint8:
            raise ValueError(f'QArray blocks must be (out, row_bytes) uint8, got '
                             f'{b.dtype} {tuple(b.shape)}')
        block, size = formats.block_size(self.ggml_type)
        if b.shape[1] % size:
            raise ValueError(f'QArray: {b.shape[1]}-byte rows are not whole '
                             f'{formats.type_name(self.ggml_type)} blocks of {size} bytes')
        if math.prod(self.shape) != b.shape[0] * (b.shape[1] // size * block):
            raise ValueError(f'QArray: logical shape {self.shape} does not hold '
                             f'{b.shape[0]} rows of {b.shape[1] // size * block} values')

    @property
    def out_features(self) -> int:
        return self.blocks.shape[0]

    @property
    def in_features(self) -> int:
        block, size = formats.block_size(self.ggml_type)
        return self.blocks.shape[1] // size * block

    @property
    def dtype(self):
        """The dtype of the values (`dequantize` gives float32 unless asked otherwise)."""
        return jnp.dtype(jnp.float32)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return int(self.blocks.size)

    def __repr__(self):
        return (f'QArray({formats.type_name(self.ggml_type)}, shape={self.shape}, '
                f'W=({self.out_features}, {self.in_features}))')


jax.tree_util.register_dataclass(QArray, data_fields=['blocks'],
                                 meta_fields=['ggml_type', 'shape'])


@dataclasses.dataclass(frozen=True)
class QConcat:
    """Quantized matrices stacked by rows, W = [W_0; W_1; ...] (sum of out_i, in), whose
    types may differ: how the packed layout (`nn.packing`) fuses q/k/v or gate/up of a
    GGUF model (in Q4_K_M files v is often Q6_K while q and k are Q4_K). Nothing is
    copied; a product with it is one kernel call over all parts.

    Attributes:
      parts: the QArrays, each (out_i, in) with the same `in`.
      shape: the logical shape of the whole (static), e.g. (N + 2K, H, D).
    """
    parts: tuple
    shape: tuple

    def __post_init__(self):
        object.__setattr__(self, 'parts', tuple(self.parts))
        object.__setattr__(self, 'shape', tuple(int(s) for s in self.shape))
        if not all(isinstance(p, QArray) for p in self.parts):
            return  # pytree placeholders while JAX rebuilds the tree
        ins = {p.in_features for p in self.parts if hasattr(p.blocks, 'shape')}
        if len(ins) > 1:
            raise ValueError(f'QConcat: parts take different input sizes {sorted(ins)}')
        if ins and math.prod(self.shape) != self.out_features * ins.pop():
            raise ValueError(f'QConcat: logical shape {self.shape} does not hold the parts '
                             f'{self.parts}')

    @property
    def out_features(self) -> int:
        return sum(p.out_features for p in self.parts)

    @property
    def in_features(self) -> int:
        return self.parts[0].in_features

    dtype = QArray.dtype
    ndim = QArray.ndim
    size = QArray.size

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


jax.tree_util.register_dataclass(QConcat, data_fields=['parts'], meta_fields=['shape'])


def is_quantized(x) -> bool:
    return isinstance(x, (QArray, QConcat))


def relabel(q, shape: tuple):
    """The same quantized matrix W under another logical shape (its storage is always
    (out, in), so only the names of the dims change; `nn.packing` uses this)."""
    if isinstance(q, QConcat):
        return QConcat(q.parts, shape)
    return QArray(q.blocks, q.ggml_type, shape)


def parts(q) -> tuple:
    """The QArrays of a QArray (itself) or of a QConcat, in row order."""
    return q.parts if isinstance(q, QConcat) else (q,)


def concat_rows(matrices, shape: tuple) -> QConcat:
    """[W_0; W_1; ...] of QArrays (or QConcats, flattened) under the logical `shape`."""
    return QConcat(tuple(p for m in matrices for p in parts(m)), shape)


def dequantize(q, dtype=jnp.float32) -> jax.Array:
    """W (out, in) of a QArray or QConcat in `dtype`, computed with jnp (inside a jitted
    step XLA fuses it)."""
    return jnp.concatenate([_decode_rows(p.blocks, p.ggml_type).astype(dtype)
                            for p in parts(q)], axis=0)


def take_rows(q: QArray, ids, dtype=jnp.float32) -> jax.Array:
    """Rows `ids` of W, dequantised: (*ids.shape, in) — an embedding lookup."""
    rows = jnp.take(q.blocks, jnp.asarray(ids).reshape(-1), axis=0)
    return _decode_rows(rows, q.ggml_type).astype(dtype).reshape(jnp.shape(ids) + (-1,))


def _f16(b, start: int):
    """The little-endian f16 at bytes [start, start + 2) of every block, as float32 (n, 1)."""
    return jax.lax.bitcast_convert_type(b[:, start:start + 2], jnp.float16).astype(
        jnp.float32)[:, None]


def _q8_0(b):
    q = jax.lax.bitcast_convert_type(b[:, 2:], jnp.int8).astype(jnp.float32)
    return _f16(b, 0) * q


def _q4_0(b):
    qs = b[:, 2:18]
    q = jnp.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(jnp.float32) - 8.0
    return _f16(b, 0) * q


def _k_scale_min(s):
    """ggml get_scale_min_k4 for all 8 sub-blocks: s (n, 12) -> scales, mins (n, 8) f32."""
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = jnp.concatenate([lo & 63, (hi & 0x0F) | ((lo >> 6) << 4)], axis=1)
    m = jnp.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=1)
    return sc.astype(jnp.float32), m.astype(jnp.float32)


def _k_values(d, dmin, scales, q):
    """d * scale * q - dmin * min for 8 sub-blocks of 32: q (n, 8, 32) -> (n, 256)."""
    sc, m = _k_scale_min(scales)
    y = (d * sc)[:, :, None] * q.astype(jnp.float32) - (dmin * m)[:, :, None]
    return y.reshape(q.shape[0], 256)


def _q4_k(b):
    n = b.shape[0]
    qs = b[:, 16:144].reshape(n, 4, 1, 32)  # 4 chunks of 32 bytes -> 64 values each
    q = jnp.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32)  # sub-block 2c + hi
    return _k_values(_f16(b, 0), _f16(b, 2), b[:, 4:16], q)


def _q5_k(b):
    n = b.shape[0]
    qh = b[:, 16:48][:, None, :]  # (n, 1, 32): bit s of qh[l] is the 5th bit of sub-block s
    qs = b[:, 48:176].reshape(n, 4, 1, 32)
    lo = jnp.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32)
    shifts = jnp.arange(8, dtype=jnp.uint8)[None, :, None]
    q = lo | (((qh >> shifts) & 1) << 4)
    return _k_values(_f16(b, 0), _f16(b, 2), b[:, 4:16], q)


def _q6_k(b):
    n = b.shape[0]
    ql = b[:, :128].reshape(n, 2, 2, 32)  # (half, ql[0:32] | ql[32:64], l)
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    sc = jax.lax.bitcast_convert_type(b[:, 192:208], jnp.int8).astype(jnp.float32)
    # Quarter k of a half takes nibble k // 2 of ql[(k % 2) * 32 + l] and bits 2k, 2k + 1
    # of qh[l]; its 32 values use scales 2k and 2k + 1 (16 values each).
    lo = jnp.stack([ql[:, :, 0] & 0x0F, ql[:, :, 1] & 0x0F, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4],
                   axis=2)  # (n, 2, 4, 32)
    shifts = jnp.array([0, 2, 4, 6], jnp.uint8)[None, None, :, None]
    q = (lo | (((qh >> shifts) & 3) << 4)).astype(jnp.float32) - 32.0
    y = (_f16(b, 208)[:, :, None] * sc.reshape(n, 2, 8))[..., None] * q.reshape(n, 2, 8, 16)
    return y.reshape(n, 256)


_DECODERS = {T.Q8_0: _q8_0, T.Q4_0: _q4_0, T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k}


def _decode_rows(rows, ggml_type: int):
    """rows (..., row_bytes) uint8 -> (..., in) float32 values."""
    lead, nbytes = rows.shape[:-1], rows.shape[-1]
    qtype = formats.check_type(ggml_type)
    if qtype == T.F16:
        return jax.lax.bitcast_convert_type(rows.reshape(lead + (-1, 2)), jnp.float16).astype(
            jnp.float32)
    if qtype == T.BF16:
        return jax.lax.bitcast_convert_type(rows.reshape(lead + (-1, 2)), jnp.bfloat16).astype(
            jnp.float32)
    block, size = formats.block_size(qtype)
    values = _DECODERS[qtype](rows.reshape(-1, size))  # (blocks, block)
    return values.reshape(lead + (nbytes // size * block,))


# Weight types whose products quantize the activations to Q8_0 blocks of 32 (ggml's
# vec_dot_type); the K-quants use Q8_K blocks of 256; F16/BF16 take x as it is.
_Q8_0_ACTIVATIONS = frozenset({T.Q8_0, T.Q4_0})


def quantize_activations(x, ggml_type: int):
    """x (..., in) float32 as a product with `ggml_type` weights sees it: quantized to int8
    per block and dequantized, as ggml (and `native.quant_matmul`) does.

    Q8_0 (for Q8_0/Q4_0 weights): blocks of 32, d = fp16(amax / 127), q = rint(x * 127 /
    amax). Q8_K (the K-quants): blocks of 256, m the first value of largest magnitude,
    iscale = -127 / m, q = min(127, rint(iscale * x)), d = 1 / iscale. Ties round to
    even. F16/BF16: x unchanged. Computing the XLA form from these values makes it the
    same function as the native kernel, to float32 rounding.
    """
    qtype = formats.check_type(ggml_type)
    x = jnp.asarray(x, jnp.float32)
    if qtype in (T.F16, T.BF16):
        return x
    block = 32 if qtype in _Q8_0_ACTIVATIONS else 256
    b = x.reshape(x.shape[:-1] + (-1, block))
    if block == 32:
        amax = jnp.max(jnp.abs(b), axis=-1, keepdims=True)
        d = (amax / 127.0).astype(jnp.float16).astype(jnp.float32)
        scale = jnp.where(amax == 0, 0.0, 127.0 / jnp.where(amax == 0, 1.0, amax))
        q = jnp.round(b * scale)
    else:
        m = jnp.take_along_axis(b, jnp.argmax(jnp.abs(b), axis=-1)[..., None], axis=-1)
        scale = jnp.where(m == 0, 0.0, -127.0 / jnp.where(m == 0, 1.0, m))
        d = jnp.where(m == 0, 0.0, 1.0 / jnp.where(m == 0, 1.0, scale))
        q = jnp.minimum(jnp.round(b * scale), 127.0)
    return (d * q).reshape(x.shape)
