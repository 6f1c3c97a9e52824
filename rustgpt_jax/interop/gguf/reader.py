"""A bounds-checked parser of the GGUF container (header, metadata, tensor infos).

The `gguf` package's `GGUFReader` trusts the file: a hostile length field makes it slice
past the end, loop for 2**64 iterations, or raise a bare KeyError. This module walks the
same structure first, checking every count, length, dimension and offset against the
file size and fixed limits, and raises `GGUFError` (field name + byte offset) for the
first violation. Only a file that passes is handed to `GGUFReader` (see `loader.py`).

Layout (GGUF v2/v3, little-endian; https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):
  magic u32 'GGUF' | version u32 | tensor_count u64 | kv_count u64
  kv_count x (key: string, type: u32, value)
  tensor_count x (name: string, n_dims: u32, dims: u64[n_dims], type: u32, offset: u64)
  padding to `general.alignment` (default 32) | tensor data
  string = u64 length + UTF-8 bytes; array = u32 item type + u64 count + items.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

GGUF_MAGIC = b'GGUF'
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# Limits far above any real model (TinyLlama: 201 tensors, 23 keys, 32000-token vocab)
# and far below what would exhaust memory or time.
MAX_TENSORS = 1 << 16
MAX_KEY_BYTES = 1 << 16
MAX_STRING_BYTES = 1 << 24
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_DIM = 1 << 40
MAX_ELEMENTS = 1 << 40
MAX_ALIGNMENT = 1 << 16

# GGUFValueType codes -> numpy dtype of scalar items.
_SCALARS = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
            6: np.float32, 7: np.uint8, 10: np.uint64, 11: np.int64, 12: np.float64}
_BOOL, _STRING, _ARRAY = 7, 8, 9


class GGUFError(ValueError):
    """A GGUF file that is malformed, hostile or not representable here.

    Attributes:
      field: the offending field (a metadata key, tensor name or header part), or None.
      offset: the byte offset in the file where that field starts, or None.
    """

    def __init__(self, message: str, field: Optional[str] = None,
                 offset: Optional[int] = None, path: Optional[str] = None):
        where = []
        if path is not None:
            where.append(str(path))
        if field is not None:
            where.append(f'field {field!r}')
        if offset is not None:
            where.append(f'byte offset {offset}')
        super().__init__(f'GGUF {", ".join(where)}: {message}' if where else f'GGUF: {message}')
        self.field, self.offset = field, offset


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor record. `shape` is numpy order (GGUF dims reversed: ne[0] is last)."""
    name: str
    shape: tuple
    ggml_type: int
    offset: int  # relative to the start of the data section
    nbytes: int
    info_offset: int  # byte offset of this record in the file


@dataclasses.dataclass(frozen=True)
class GGUFHeader:
    """Everything before the tensor data, validated.

    Attributes:
      metadata: key -> value (int, float, bool, str, numpy array of numbers, or list of str).
      key_offsets: key -> byte offset of its record, for error messages.
    """
    version: int
    metadata: dict
    key_offsets: dict
    tensors: list
    alignment: int
    data_offset: int
    file_size: int
    kv_end: int = 0  # byte offset just after the metadata (where a missing key would be)
    path: str = '<buffer>'

    def error(self, message: str, key: str) -> GGUFError:
        """A GGUFError about metadata `key`, at its record (or the metadata end if absent)."""
        return GGUFError(message, key, self.key_offsets.get(key, self.kv_end), self.path)


class _Cursor:
    """Sequential little-endian reads from a uint8 buffer, each checked against its end."""

    def __init__(self, buf: np.ndarray, path: str):
        self.buf, self.pos, self.size, self.path = buf, 0, int(buf.shape[0]), path

    def fail(self, message: str, field: str, offset: Optional[int] = None):
        raise GGUFError(message, field, self.pos if offset is None else offset, self.path)

    def take(self, n: int, field: str) -> np.ndarray:
        if n < 0 or n > self.size - self.pos:
            self.fail(f'needs {n} bytes but the file ends after {self.size - self.pos} '
                      '(truncated or a corrupt length)', field)
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, dtype, field: str):
        return self.take(np.dtype(dtype).itemsize, field).view(np.dtype(dtype).newbyteorder('<'))[0]

    def u32(self, field: str) -> int:
        return int(self.scalar(np.uint32, field))

    def u64(self, field: str) -> int:
        return int(self.scalar(np.uint64, field))

    def string(self, field: str, limit: int = MAX_STRING_BYTES, strict: bool = False) -> str:
        start = self.pos
        n = self.u64(field)
        if n > limit:
            self.fail(f'string length {n} exceeds the limit of {limit} bytes', field, start)
        raw = self.take(n, field).tobytes()
        try:
            # Keys and names must be UTF-8; values keep stray bytes (some vocabularies have
            # them) so they round-trip through encode('utf-8', 'surrogateescape').
            return raw.decode('utf-8', 'strict' if strict else 'surrogateescape')
        except UnicodeDecodeError as e:
            self.fail(f'is not valid UTF-8 ({e.reason} at byte {e.start})', field, start)

    def value(self, vtype: int, field: str, in_array: bool = False) -> Any:
        if vtype in _SCALARS:
            v = self.scalar(_SCALARS[vtype], field)
            if vtype == _BOOL:
                return bool(v)
            if vtype == 6:  # shortest decimal of the float32 (1e-05, not 9.99999974e-06)
                return float(str(v))
            return float(v) if vtype == 12 else int(v)
        if vtype == _STRING:
            return self.string(field)
        if vtype == _ARRAY and not in_array:
            start = self.pos
            itype = self.u32(field + '[type]')
            count = self.u64(field + '[count]')
            if itype in _SCALARS:
                item = np.dtype(_SCALARS[itype]).newbyteorder('<')
                if count > (self.size - self.pos) // item.itemsize:
                    self.fail(f'array of {count} items does not fit in the file', field, start)
                out = self.take(count * item.itemsize, field).view(item)
                out = out.astype(item.newbyteorder('='))
                return out.astype(bool) if itype == _BOOL else out
            if itype == _STRING:
                if count > (self.size - self.pos) // 8:  # each string needs its u64 length
                    self.fail(f'array of {count} strings does not fit in the file', field, start)
                return [self.string(f'{field}[{i}]') for i in range(count)]
            self.fail(f'unsupported array item type {itype} (nested arrays are not allowed)',
                      field, start)
        self.fail(f'unknown value type {vtype}', field)


def read_header(buf: np.ndarray, path: str = '<buffer>') -> GGUFHeader:
    """Parses and validates everything up to the tensor data.

    Args:
      buf: (file_size,) uint8 array, usually `np.memmap(path, mode='r')`.
      path: shown in error messages.

    Returns:
      The validated GGUFHeader.

    Raises:
      GGUFError: naming the field and byte offset of the first problem.
    """
    c = _Cursor(buf, path)
    if c.take(4, 'magic').tobytes() != GGUF_MAGIC:
        c.fail(f'bad magic {bytes(buf[:4])!r}, expected {GGUF_MAGIC!r} (not a GGUF file)',
               'magic', 0)
    version = c.u32('version')
    if version not in SUPPORTED_VERSIONS:
        hint = ' (a big-endian file?)' if version & 0xFFFF == 0 else ''
        c.fail(f'unsupported version {version}{hint}; supported: {SUPPORTED_VERSIONS}',
               'version', 4)
    n_tensors = c.u64('tensor_count')
    n_kv = c.u64('kv_count')
    # Every tensor record takes >= 24 bytes and every KV record >= 13: counts the rest of
    # the file cannot hold are rejected before any loop runs.
    if n_tensors > MAX_TENSORS or n_tensors > (c.size - c.pos) // 24:
        c.fail(f'tensor_count {n_tensors} is absurd for a {c.size}-byte file '
               f'(limit {MAX_TENSORS})', 'tensor_count', 8)
    if n_kv > (c.size - c.pos) // 13:
        c.fail(f'kv_count {n_kv} does not fit in a {c.size}-byte file', 'kv_count', 16)

    metadata, key_offsets = {}, {}
    for i in range(n_kv):
        start = c.pos
        key = c.string(f'kv[{i}].key', limit=MAX_KEY_BYTES, strict=True)
        if key in metadata:
            c.fail('duplicate metadata key', key, start)
        vtype = c.u32(key + '[type]')
        metadata[key] = c.value(vtype, key)
        key_offsets[key] = start

    kv_end = c.pos
    alignment = metadata.get('general.alignment', DEFAULT_ALIGNMENT)
    if 'general.alignment' in metadata and (
            not isinstance(alignment, int) or alignment < 1 or alignment > MAX_ALIGNMENT
            or alignment & (alignment - 1)):
        c.fail(f'must be a power of two in [1, {MAX_ALIGNMENT}], got {alignment!r}',
               'general.alignment', key_offsets['general.alignment'])

    infos, names = [], set()
    for i in range(n_tensors):
        start = c.pos
        name = c.string(f'tensor[{i}].name', limit=MAX_KEY_BYTES, strict=True)
        if name in names:
            c.fail('duplicate tensor name', name, start)
        names.add(name)
        n_dims = c.u32(name + '.n_dims')
        if not 1 <= n_dims <= MAX_DIMS:
            c.fail(f'n_dims {n_dims} outside [1, {MAX_DIMS}]', name, start)
        dims = [c.u64(f'{name}.dims[{j}]') for j in range(n_dims)]
        if any(not 1 <= d <= MAX_DIM for d in dims):
            c.fail(f'dimensions {dims} must each be in [1, 2**40]', name, start)
        n_elements = int(np.prod(dims, dtype=object))
        if n_elements > MAX_ELEMENTS:
            c.fail(f'{n_elements} elements is absurd', name, start)
        type_pos = c.pos
        raw_type = c.u32(name + '.type')
        try:
            ggml_type = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[ggml_type]
        except (ValueError, KeyError):
            c.fail(f'unknown tensor type {raw_type}', name + '.type', type_pos)
        if dims[0] % block:
            c.fail(f'row length {dims[0]} is not a multiple of the {ggml_type.name} block '
                   f'size {block}', name, start)
        offset = c.u64(name + '.offset')
        if offset % alignment:
            c.fail(f'data offset {offset} is not a multiple of the alignment {alignment}',
                   name + '.offset', c.pos - 8)
        infos.append(TensorInfo(name, tuple(reversed(dims)), int(ggml_type), offset,
                                n_elements // block * type_size, start))

    data_offset = -(-c.pos // alignment) * alignment
    data_size = c.size - data_offset
    for t in infos:
        if t.offset + t.nbytes > data_size:
            c.fail(f'data [{t.offset}, {t.offset + t.nbytes}) runs past the end of the '
                   f'{max(data_size, 0)}-byte data section (truncated file or bad offset)',
                   t.name + '.offset', t.info_offset)
    return GGUFHeader(version, metadata, key_offsets, infos, alignment, data_offset, c.size,
                      kv_end, path)
