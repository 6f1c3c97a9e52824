"""Products with GGUF-quantized weights on CPU: an XLA FFI custom call (quant_matmul.cc).

y = x . W^T with W kept in its raw GGUF block encoding, computed as llama.cpp does:
each activation row is quantized to int8 per block (Q8_0 blocks of 32 for Q8_0/Q4_0
weights, Q8_K blocks of 256 for the K-quants), integer dot products run on AVX-512 VNNI
or AVX2, and block scales are applied in float32. F16/BF16 weights are widened in
registers and multiplied with the float32 activations. `quantize_activations` is the
numpy twin of the activation quantization, so a float64 oracle can check the kernel to
float32 rounding.

The kernel lives in the one native library (native/build.py) and shares its worker pool,
and its `threads`/`spin_us` settings, with native.cpu_gemv. CPU only: there is no
fallback for other platforms (lowering elsewhere fails), and no gradient.
"""

from __future__ import annotations

import functools
import threading
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from rustgpt_jax.native import build as native_build
from rustgpt_jax.native import cpu_gemv

T = GGMLQuantizationType
SUPPORTED_TYPES = frozenset({T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_K, T.Q5_K, T.Q6_K})
TARGET = 'rgj_quant_matmul'
MULTI_TARGET = 'rgj_quant_matmul_multi'
ISAS = {'avx2': 1, 'avx512_vnni': 2}  # the kernel's `isa` attribute; 0 = the best here
_Q8_0_ACTIVATIONS = frozenset({T.Q8_0, T.Q4_0})  # the rest of the integer types use Q8_K

_lock = threading.Lock()
_state: dict = {}  # 'isa': str ('' when unavailable), 'reason': str


def _probe(directory: Optional[str]) -> None:
    try:
        library = native_build.load(directory)
    except RuntimeError as error:
        _state['isa'], _state['reason'] = '', str(error)
        return
    best = {code: name for name, code in ISAS.items()}.get(library.RgjQuantBestIsa(), '')
    _state['isa'] = best
    _state['reason'] = '' if best else 'this CPU has neither AVX2+FMA+F16C nor AVX-512 VNNI'


def available(directory: Optional[str] = None) -> bool:
    """True when the kernel is built, loaded and the CPU has AVX2 at least (built on first
    call, into `cpu_gemv.cache_dir(directory)`; later calls return the first answer)."""
    with _lock:
        if 'isa' not in _state:
            _probe(directory)
        return bool(_state['isa'])


def unavailable_reason() -> str:
    """Why `available()` is False ('' when it is True)."""
    available()
    return _state['reason']


def isa() -> str:
    """What the kernel dispatches to on this CPU: 'avx512_vnni' or 'avx2' ('' if neither)."""
    return _best_isa()


def _best_isa() -> str:  # `isa` is also quant_matmul's argument
    available()
    return _state['isa']


def _format(ggml_type: int) -> tuple[int, int]:
    """(values, bytes) per block of a supported type."""
    try:
        kind = T(int(ggml_type))
    except ValueError:
        raise ValueError(f'quant_matmul: unknown ggml type {ggml_type!r}') from None
    if kind not in SUPPORTED_TYPES:
        raise ValueError(f'quant_matmul: unsupported ggml type {kind.name} (supported: '
                         f'{", ".join(sorted(t.name for t in SUPPORTED_TYPES))})')
    return GGML_QUANT_SIZES[kind]


def quantize_activations(x, ggml_type: int) -> np.ndarray:
    """x as the kernel sees it for weights of `ggml_type`: quantized and dequantized.

    Q8_0/Q4_0 weights: Q8_0 blocks of 32, d = fp16(amax / 127), q = round(x * 127 / amax).
    K-quants: Q8_K blocks of 256 (ggml's quantize_row_q8_K_ref), iscale = -127 / m with m
    the first element of largest magnitude, q = min(127, round(iscale * x)), d = 1 / iscale.
    Rounding is to nearest even, in float32 as in the kernel. F16/BF16: x unchanged.

    Args:
      x: (..., in) float32, `in` a whole number of the activation blocks.
      ggml_type: a member of SUPPORTED_TYPES.

    Returns:
      (..., in) float32, d * q.
    """
    _format(ggml_type)
    x = np.asarray(x, np.float32)
    kind = T(int(ggml_type))
    if kind in (T.F16, T.BF16):
        return x.copy()
    block = 32 if kind in _Q8_0_ACTIVATIONS else 256
    if x.shape[-1] % block:
        raise ValueError(f'quantize_activations: in={x.shape[-1]} is not a multiple of {block}')
    b = x.reshape(x.shape[:-1] + (-1, block))
    with np.errstate(divide='ignore'):
        if block == 32:
            amax = np.abs(b).max(-1, keepdims=True)
            d = (amax / np.float32(127)).astype(np.float16).astype(np.float32)
            scale = np.where(amax == 0, np.float32(0), np.float32(127) / amax)
            q = np.rint(b * scale.astype(np.float32))
        else:
            m = np.take_along_axis(b, np.abs(b).argmax(-1)[..., None], -1)
            scale = np.where(m == 0, np.float32(0), np.float32(-127) / m).astype(np.float32)
            d = np.where(m == 0, np.float32(0), np.float32(1) / scale).astype(np.float32)
            q = np.minimum(np.rint(b * scale), np.float32(127))
    return (d * q).astype(np.float32).reshape(x.shape)


def quant_matmul(x, blocks, ggml_type: int, threads: Optional[int] = None,
                 spin_us: Optional[int] = None, isa: Optional[str] = None):
    """y = x . W^T on CPU with W in its raw GGUF encoding.

    Args:
      x: (rows, in) float32, any rows >= 1 (decode 1..8, prefill e.g. 128).
      blocks: (out, row_bytes) uint8, W's GGUF rows: each row a whole number of blocks
        along `in`, in = row_bytes // type_size * block_size.
      ggml_type: a member of SUPPORTED_TYPES (gguf.GGMLQuantizationType or its int).
      threads, spin_us: the shared pool's settings (`cpu_gemv.threads_setting`,
        `cpu_gemv.spin_setting`).
      isa: 'avx512_vnni' or 'avx2' to force a path (tests); None = the best here.

    Returns:
      (rows, out) float32. Not differentiable.
    """
    _check_weight('quant_matmul', x, blocks, ggml_type)
    _check_isa('quant_matmul', isa)
    return _call(x, blocks, int(ggml_type), cpu_gemv.threads_setting(threads),
                 cpu_gemv.spin_setting(spin_us), ISAS.get(isa, 0))


def quant_matmul_multi(x, parts, threads: Optional[int] = None, spin_us: Optional[int] = None,
                       isa: Optional[str] = None):
    """y = concat_i(x . W_i^T) in one call, for weights that share the input x (q/k/v,
    gate/up).

    x is quantized once per activation format the parts need, and one pool dispatch
    spreads the chunks of every part over the threads, so small products (k and v at
    decode) do not each pay a dispatch. Equal, bit for bit, to concatenating the
    `quant_matmul` of each part.

    Args:
      x: (rows, in) float32.
      parts: [(blocks_i (out_i, row_bytes_i) uint8, ggml_type_i), ...], at least one; the
        types may differ, every W_i has x's `in`.
      threads, spin_us, isa: as in `quant_matmul`.

    Returns:
      (rows, sum of out_i) float32, part i in columns [sum_{j<i} out_j, ... + out_i).
    """
    parts = list(parts)
    if not parts:
        raise ValueError('quant_matmul_multi: parts is empty')
    for blocks, ggml_type in parts:
        _check_weight('quant_matmul_multi', x, blocks, ggml_type)
    _check_isa('quant_matmul_multi', isa)
    return _call_multi(x, tuple(b for b, _ in parts), tuple(int(t) for _, t in parts),
                       cpu_gemv.threads_setting(threads), cpu_gemv.spin_setting(spin_us),
                       ISAS.get(isa, 0))


def _check_weight(name: str, x, blocks, ggml_type) -> None:
    values, size = _format(ggml_type)
    if x.ndim != 2 or blocks.ndim != 2:
        raise ValueError(f'{name}: expected x (rows, in) and blocks (out, row_bytes), '
                         f'got {x.shape} and {blocks.shape}')
    if x.dtype != jnp.float32:
        raise ValueError(f'{name}: x must be float32, got {x.dtype}')
    if blocks.dtype != jnp.uint8:
        raise ValueError(f'{name}: blocks must be uint8, got {blocks.dtype}')
    if blocks.shape[1] % size:
        raise ValueError(f'{name}: row_bytes={blocks.shape[1]} is not a whole number of '
                         f'{T(int(ggml_type)).name} blocks ({size} bytes)')
    if blocks.shape[1] // size * values != x.shape[1]:
        raise ValueError(f'{name}: blocks hold in={blocks.shape[1] // size * values} '
                         f'values per row, x has in={x.shape[1]}')
    if x.shape[0] < 1 or blocks.shape[0] < 1:
        raise ValueError(f'{name}: empty operands {x.shape} and {blocks.shape}')


def _check_isa(name: str, isa: Optional[str]) -> None:
    if isa is not None and isa not in ISAS:
        raise ValueError(f'{name}: isa must be None or one of {sorted(ISAS)}, got {isa!r}')
    if not available():
        raise RuntimeError(f'the quant_matmul kernel is unavailable: {unavailable_reason()}')
    if isa == 'avx512_vnni' and _best_isa() != 'avx512_vnni':
        raise ValueError(f'{name}: this CPU has no AVX-512 VNNI')


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _call(x, blocks, ggml_type, threads, spin_us, isa_code):
    return jax.ffi.ffi_call(
        TARGET, jax.ShapeDtypeStruct((x.shape[0], blocks.shape[0]), jnp.float32),
        vmap_method='sequential')(x, blocks, ggml_type=np.int64(ggml_type),
                                  threads=np.int64(threads), spin_us=np.int64(spin_us),
                                  isa=np.int64(isa_code))


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _call_multi(x, blocks, ggml_types, threads, spin_us, isa_code):
    out = sum(b.shape[0] for b in blocks)
    return jax.ffi.ffi_call(
        MULTI_TARGET, jax.ShapeDtypeStruct((x.shape[0], out), jnp.float32),
        vmap_method='sequential')(x, *blocks, ggml_types=np.array(ggml_types, np.int64),
                                  threads=np.int64(threads), spin_us=np.int64(spin_us),
                                  isa=np.int64(isa_code))


@functools.cache
def warn_unavailable_once() -> None:
    """Warns (once per process) that quantized products configured for the kernel use
    the XLA form."""
    warnings.warn(f"Execution.matvec='cpu_gemv': quantized products fall back to XLA: "
                  f'{unavailable_reason()}', RuntimeWarning, stacklevel=3)
