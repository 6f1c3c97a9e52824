"""The GGML block encodings a `QArray` may hold, and their sizes (ggml-quants.h).

  F16 / BF16: 2 bytes per value.
  Q8_0: 34 B per 32 values   = f16 d | 32 x int8 q                    y = d * q
  Q4_0: 18 B per 32          = f16 d | 16 B nibbles                   y = d * (q - 8)
  Q4_K: 144 B per 256        = f16 d | f16 dmin | 12 B 6-bit (scale, min) x 8 | 128 B nibbles
  Q5_K: 176 B per 256        = f16 d | f16 dmin | 12 B scales | 32 B high bits | 128 B nibbles
  Q6_K: 210 B per 256        = 128 B low nibbles | 64 B high 2 bits | 16 x int8 scales | f16 d
"""

from __future__ import annotations

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

T = GGMLQuantizationType
# Types a QArray holds. F32 weights stay plain float arrays.
BLOCK_TYPES = frozenset({T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_K, T.Q5_K, T.Q6_K})


def type_name(ggml_type: int) -> str:
    try:
        return T(ggml_type).name
    except ValueError:
        return f'ggml type {ggml_type}'


def check_type(ggml_type: int) -> T:
    """The GGMLQuantizationType of `ggml_type`; ValueError if a QArray cannot hold it."""
    try:
        qtype = T(ggml_type)
    except ValueError:
        qtype = None
    if qtype not in BLOCK_TYPES:
        supported = ', '.join(sorted(t.name for t in BLOCK_TYPES))
        raise ValueError(f'{type_name(ggml_type)} is not a quantized weight type here '
                         f'(supported: {supported})')
    return qtype


def block_size(ggml_type: int) -> tuple[int, int]:
    """(values per block, bytes per block) of `ggml_type`."""
    return GGML_QUANT_SIZES[check_type(ggml_type)]


def row_bytes(ggml_type: int, values: int) -> int:
    """Bytes of one row of `values` values; ValueError unless whole blocks."""
    block, size = block_size(ggml_type)
    if values % block:
        raise ValueError(f'{type_name(ggml_type)} rows are whole blocks of {block} values; '
                         f'{values} is not')
    return values // block * size
