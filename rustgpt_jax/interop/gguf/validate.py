"""An opt-in full check of GGUF tensor data, like llama.cpp's `check_tensors`.

`read_header` bounds-checks the container but never reads tensor bytes, so a file whose
weights hold NaN or inf loads "fine" and poisons every logit. llama.cpp, asked to
(`llama_model_params.check_tensors`), runs `ggml_validate_row_data` over every tensor;
this module is the same check in vectorised numpy over a memory map: the data is walked
in chunks of CHUNK_BYTES as (n_blocks, type_size) uint8 views, and only the float fields
are looked at, as raw bits (exponent all ones = NaN or inf), so nothing is converted to
float32, no floating-point warning can fire, and a 1 GB file needs a few MB extra.

What is checked (llama.cpp `ggml_validate_row_data` checks the same fields):
  F32 / F16 / BF16: every value.
  Q8_0 / Q4_0: the f16 block scale d.   Q4_K / Q5_K: f16 d and dmin.   Q6_K: f16 d.
Why the scales suffice: a quantised value is d * sc * q (- dmin * m) with integers of at
most 8 bits (|sc| <= 128, |q| <= 32 for Q6_K; sc, m <= 63, q <= 31 for Q4_K/Q5_K;
|q| <= 128 for Q8_0), so with finite f16 scales (|d| <= 65504) every float32 value is
below 65504 * 128 * 32 ~ 2.7e8 in magnitude: finite (tests/test_gguf_validate.py
checks the extremes). Nothing else is rejected: all-zero data is valid. A cast of those
values to float16 params can still overflow; that is a dtype choice, not a bad file.
"""

from __future__ import annotations

import os

import numpy as np
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as T

from rustgpt_jax.interop.gguf.reader import GGUFError, GGUFHeader, read_header

CHUNK_BYTES = 4 << 20  # per step: bounds the temporaries, still ~100 MB per numpy pass

# Float encodings by their bits: (uint dtype, exponent mask, mantissa mask). An exponent
# of all ones is inf (mantissa 0) or NaN (mantissa != 0).
_F16 = ('<u2', 0x7C00, 0x03FF)
_BF16 = ('<u2', 0x7F80, 0x007F)
_F32 = ('<u4', 0x7F800000, 0x007FFFFF)
# type -> the float fields of one block: (name, byte offset in the block, encoding).
# A float type is a "block" of one value.
CHECKED_FIELDS = {
    T.F32: (('value', 0, _F32),),
    T.F16: (('value', 0, _F16),),
    T.BF16: (('value', 0, _BF16),),
    T.Q8_0: (('d', 0, _F16),),
    T.Q4_0: (('d', 0, _F16),),
    T.Q4_K: (('d', 0, _F16), ('dmin', 2, _F16)),
    T.Q5_K: (('d', 0, _F16), ('dmin', 2, _F16)),
    T.Q6_K: (('d', 208, _F16),),  # ql[128] | qh[64] | scales[16] | d
}


def _non_finite(blocks: np.ndarray, pos: int, encoding: tuple) -> np.ndarray:
    """(n,) bool: is the float at byte `pos` of each block NaN or inf.

    Args:
      blocks: (n, type_size) uint8 view.
    """
    dtype, exp, _ = encoding
    width = np.dtype(dtype).itemsize
    bits = blocks[:, pos:pos + width].view(dtype)[:, 0]  # strided view, no copy
    return (bits & exp) == exp


def _describe(bits: int, encoding: tuple) -> str:
    """'NaN', '+inf' or '-inf' for the bits of a non-finite float."""
    dtype, _, mantissa = encoding
    if bits & mantissa:
        return 'NaN'
    sign_bit = 1 << (8 * np.dtype(dtype).itemsize - 1)
    return '-inf' if bits & sign_bit else '+inf'


def check_tensor_data(raw: np.ndarray, ggml_type: int, shape: tuple, name: str, offset: int,
                      path: str) -> None:
    """Raises GGUFError at the first NaN/inf value or block scale of one tensor.

    Args:
      raw: the tensor's bytes: a contiguous uint8 array (e.g. a read-only memmap slice)
        or the tensor as a typed array; it is viewed, never copied.
      ggml_type: a GGMLQuantizationType value in CHECKED_FIELDS.
      shape: numpy-order shape; its size fixes the expected byte count.
      name: the tensor name (GGUFError.field).
      offset: absolute byte offset of the tensor's data in the file.
      path: the file, for the message.

    Raises:
      GGUFError: with field=name and offset = the absolute byte offset of the first bad
        value (float types) or of the start of the first bad block (quantised types);
        also for a type without a check or a byte count that does not match `shape`.
    """
    qtype = T(ggml_type) if ggml_type in T._value2member_map_ else None
    if qtype not in CHECKED_FIELDS:
        shown = qtype.name if qtype is not None else ggml_type
        raise GGUFError(f'no data check for tensor type {shown}; checked: '
                        f'{[t.name for t in CHECKED_FIELDS]}', name, offset, path)
    fields = CHECKED_FIELDS[qtype]
    block, type_size = GGML_QUANT_SIZES[qtype]
    raw = np.asarray(raw).reshape(-1).view(np.uint8)
    n = int(np.prod(shape, dtype=np.int64))
    if n % block or raw.size != n // block * type_size:
        raise GGUFError(f'{raw.size} data bytes for a {qtype.name} tensor of shape '
                        f'{tuple(shape)}', name, offset, path)
    step = max(1, CHUNK_BYTES // type_size)  # blocks per chunk
    n_blocks = raw.size // type_size
    for first in range(0, n_blocks, step):
        blocks = raw[first * type_size:min(first + step, n_blocks) * type_size]
        blocks = blocks.reshape(-1, type_size)
        bad = [_non_finite(blocks, pos, encoding) for _, pos, encoding in fields]
        any_bad = bad[0] if len(bad) == 1 else np.logical_or.reduce(bad)
        if not any_bad.any():
            continue
        i = int(np.argmax(any_bad))
        field, pos, encoding = next(f for f, b in zip(fields, bad) if b[i])
        width = np.dtype(encoding[0]).itemsize
        what = _describe(int(blocks[i, pos:pos + width].view(encoding[0])[0]), encoding)
        b = first + i
        if block == 1:
            message = f'element {b} is {what}'
        else:
            message = (f'block {b} (elements {b * block}..{(b + 1) * block - 1}) has a {what} '
                       f'scale {field}')
        raise GGUFError(message, name, offset + b * type_size, path)


def check_tensors(buf: np.ndarray, header: GGUFHeader) -> None:
    """`check_tensor_data` for every tensor of a validated header.

    Args:
      buf: (file_size,) uint8, the buffer `header` was read from (e.g. a memmap).
      header: from `read_header(buf, path)`.
    """
    for t in header.tensors:
        start = header.data_offset + t.offset
        check_tensor_data(buf[start:start + t.nbytes], t.ggml_type, t.shape, t.name, start,
                          header.path)


def check_file(path: str) -> None:
    """Validates a GGUF file's header and the data of every tensor.

    Raises:
      GGUFError: naming the field (metadata key or tensor) and byte offset of the first
        problem.
    """
    path = os.fspath(path)
    try:
        buf = np.memmap(path, mode='r') if os.path.getsize(path) else np.zeros(0, np.uint8)
    except OSError as e:
        raise GGUFError(f'cannot open: {e}', path=path) from None
    check_tensors(buf, read_header(buf, path))
