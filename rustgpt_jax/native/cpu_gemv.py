"""A CPU matrix-vector kernel for decode steps: an XLA FFI custom call (cpu_gemv.cc).

`runtime.Execution(matvec='cpu_gemv')` routes the products of decode steps (at most
`MAX_ROWS` input rows, float32) through it: the packed (output-major) projections, the
output head (input-major (D, V), or a tied (V, D) table) and the two dots over the KV
cache (one matrix per KV head). Why a kernel of our own: benchmarks/RESULTS.md, "The CPU
matrix-vector kernel". The kernel cuts the output into chunks that the calling thread
and `threads - 1` workers take from a shared ticket; the workers spin (yielding) for
`spin_us` microseconds between calls before they sleep.

The kernel is part of the one native library (native/build.py: compiled on first use,
cached, shared pool with native.quant_matmul), in an AVX-512F and an AVX2 + FMA copy.
Where it cannot be built or run (not Linux x86-64, neither instruction set, no compiler,
a failed build) `available()` is False, `unavailable_reason()` says why, and
`runtime.products` falls back to XLA's dot (one warning).

Settings (README, "Settings"): threads, spin and cache directory are explicit arguments
(fields of `runtime.Execution`); where one is None, the environment variable
`RGJ_GEMV_THREADS`, `RGJ_GEMV_SPIN_US` or `RGJ_CACHE_DIR` overrides the default
(min(allowed CPUs, 8) threads, 1000 us, ~/.cache/rustgpt_jax).
"""

from __future__ import annotations

import functools
import math
import os
import threading
import warnings
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from rustgpt_jax.native import build as native_build

MAX_ROWS = 8  # rows of x the kernel takes (decode steps up to batch 8)
TARGET = 'rgj_gemv'  # W output-major (out, in)
TARGET_INPUT_MAJOR = 'rgj_gemv_input_major'  # W input-major (in, out)
TARGET_ATTENTION = 'rgj_decode_attention'  # one decode step's attention over a KV cache
ISAS = {'avx2': 1, 'avx512f': 2}  # the kernel's `isa` attribute; 0 = the best here

ENV_THREADS = 'RGJ_GEMV_THREADS'
ENV_SPIN_US = 'RGJ_GEMV_SPIN_US'
ENV_CACHE_DIR = native_build.ENV_CACHE_DIR
DEFAULT_SPIN_US = 1000
MAX_DEFAULT_THREADS = 8

_lock = threading.Lock()
_state: dict = {}  # 'ok': bool, 'reason': str


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name, '')
    if value == '':
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f'${name} must be an integer, got {value!r}') from None


def threads_setting(threads: Optional[int] = None) -> int:
    """Threads per product: `threads`, else $RGJ_GEMV_THREADS, else min(allowed CPUs, 8)."""
    if threads is None:
        threads = _env_int(ENV_THREADS)
    if threads is None:
        threads = min(len(os.sched_getaffinity(0)), MAX_DEFAULT_THREADS)
    return max(1, int(threads))


def spin_setting(spin_us: Optional[int] = None) -> int:
    """Worker spin between products: `spin_us`, else $RGJ_GEMV_SPIN_US, else 1000 us."""
    if spin_us is None:
        spin_us = _env_int(ENV_SPIN_US)
    return DEFAULT_SPIN_US if spin_us is None else max(0, int(spin_us))


def cache_dir(directory: Optional[str] = None) -> Path:
    """Where built libraries are kept: `directory`, else $RGJ_CACHE_DIR, else
    ~/.cache/rustgpt_jax."""
    return native_build.cache_dir(directory)


def _compiler() -> Optional[str]:
    return native_build.compiler()


def _cpu_flags() -> set:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('flags'):
                    return set(line.split(':', 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_has_kernels() -> bool:
    """AVX-512F (the kernels' wide copy) or AVX2 + FMA (the other one): cpu_gemv.cc."""
    flags = _cpu_flags()
    return 'avx512f' in flags or {'avx2', 'fma'} <= flags


def build(directory: Optional[Path] = None) -> Path:
    """Compiles the native library (native/build.py; if not already built) and returns
    its path.

    Raises:
      RuntimeError: naming the missing compiler or the compiler's own error output.
    """
    return native_build.build(directory)


def _load(directory: Optional[str]) -> None:
    if not _cpu_has_kernels():
        raise RuntimeError('this CPU has neither AVX-512F nor AVX2 + FMA')
    native_build.load(directory)


def available(directory: Optional[str] = None) -> bool:
    """True when the kernel is built, loaded and registered (built on first call, into
    `cache_dir(directory)`; later calls return the first answer)."""
    with _lock:
        if 'ok' not in _state:
            try:
                _load(directory)
                _state['ok'], _state['reason'] = True, ''
            except (RuntimeError, OSError) as error:
                _state['ok'], _state['reason'] = False, str(error)
        return _state['ok']


def unavailable_reason() -> str:
    """Why `available()` is False ('' when it is True)."""
    available()
    return _state['reason']


def _out_dim(w, input_major: bool) -> int:
    return w.shape[-1] if input_major else w.shape[-2]


def _ffi_gemv(x, w, input_major, threads, spin_us, isa_code):
    lead = w.shape[:-2]
    p = math.prod(lead)
    y = jax.ffi.ffi_call(
        TARGET_INPUT_MAJOR if input_major else TARGET,
        jax.ShapeDtypeStruct((p, x.shape[-2], _out_dim(w, input_major)), x.dtype),
        vmap_method='sequential')(x.reshape((p,) + x.shape[-2:]), w.reshape((p,) + w.shape[-2:]),
                                  threads=np.int64(threads), spin_us=np.int64(spin_us),
                                  isa=np.int64(isa_code))
    return y.reshape(x.shape[:-1] + (_out_dim(w, input_major),))


def _xla_gemv(x, w, input_major):
    return jnp.einsum('...bi,...io->...bo' if input_major else '...bi,...oi->...bo', x, w)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5))
def gemv(x, w, input_major: bool = False, threads: Optional[int] = None,
         spin_us: Optional[int] = None, isa: Optional[str] = None):
    """y = x . W on CPU through the kernel, XLA's dot on other platforms.

    Args:
      x: (*batch, rows, in) float32, 1 <= rows <= MAX_ROWS.
      w: float32, (*batch, out, in) (a packed kernel, torch's Linear layout) or, with
        `input_major`, (*batch, in, out) (e.g. the output head's (D, V) table, or a
        cache's (C, H) values); `batch` dims (e.g. KV heads) are independent products.
      input_major: which layout `w` has.
      threads, spin_us: the kernel's settings (`threads_setting`, `spin_setting`).
      isa: 'avx512f' or 'avx2' to force one copy of the kernels (tests); None = the best
        here.

    Returns:
      (*batch, rows, out) float32. Differentiable (tangents go through XLA's dots).
    """
    layout = '(..., in, out)' if input_major else '(..., out, in)'
    if (x.ndim < 2 or x.ndim != w.ndim or x.shape[:-2] != w.shape[:-2]
            or x.shape[-1] != w.shape[-2 if input_major else -1]):
        raise ValueError(f'gemv: expected x (..., rows, in) and w {layout} with the same '
                         f'leading dims, got {x.shape} and {w.shape}')
    if not 1 <= x.shape[-2] <= MAX_ROWS:
        raise ValueError(f'gemv: x has {x.shape[-2]} rows; the kernel takes 1 to {MAX_ROWS}')
    if x.dtype != jnp.float32 or w.dtype != jnp.float32:
        raise ValueError(f'gemv: float32 only, got {x.dtype} and {w.dtype}')
    if isa is not None and isa not in ISAS:
        raise ValueError(f'gemv: isa must be None or one of {sorted(ISAS)}, got {isa!r}')
    if not available():
        raise RuntimeError(f'the cpu_gemv kernel is unavailable: {unavailable_reason()}')
    if isa == 'avx512f' and 'avx512f' not in _cpu_flags():
        raise ValueError('gemv: this CPU has no AVX-512F')
    return jax.lax.platform_dependent(
        x, w, cpu=functools.partial(_ffi_gemv, input_major=input_major,
                                    threads=threads_setting(threads),
                                    spin_us=spin_setting(spin_us), isa_code=ISAS.get(isa, 0)),
        default=functools.partial(_xla_gemv, input_major=input_major))


@gemv.defjvp
def _gemv_jvp(input_major, threads, spin_us, isa, primals, tangents):
    (x, w), (dx, dw) = primals, tangents
    return (gemv(x, w, input_major, threads, spin_us, isa),
            _xla_gemv(dx, w, input_major) + _xla_gemv(x, dw, input_major))


def decode_attention(q, k, v, cache_k, cache_v, mask, scale: float,
                     threads: Optional[int] = None, spin_us: Optional[int] = None,
                     isa: Optional[str] = None):
    """One decode step's attention over a KV cache, per KV head, in the kernel (CPU only).

    The softmax over [the cache slots `mask` keeps, the token itself] of scale * q . key,
    applied to the values (native/attend_core.inc): the math of
    `runtime.decode_attention`, which calls this on CPU. Masked slots are skipped, not
    computed and discarded. Not differentiable (decode steps only).

    Args:
      q: (B, K, G, H) float32, the new token's G query rows per KV head.
      k, v: (B, K, H) float32, the token's key and value (not in the cache).
      cache_k, cache_v: (B, K, C, H) float32.
      mask: (B, C) bool, the slots each row attends to.
      scale: the logit scale.
      threads, spin_us: the kernel's settings (`threads_setting`, `spin_setting`).
      isa: 'avx512f' or 'avx2' to force one copy of the kernels (tests); None = the best.

    Returns:
      (B, K, G, H) float32.
    """
    if q.ndim != 4 or cache_k.shape != q.shape[:2] + (cache_k.shape[2], q.shape[3]):
        raise ValueError(f'decode_attention: expected q (B, K, G, H) and caches (B, K, C, H), '
                         f'got {q.shape} and {cache_k.shape}')
    b, heads, _, h = q.shape
    if (cache_v.shape != cache_k.shape or k.shape != (b, heads, h) or v.shape != k.shape
            or mask.shape != (b, cache_k.shape[2])):
        raise ValueError(f'decode_attention: k, v must be {(b, heads, h)}, cache_v '
                         f'{cache_k.shape} and mask {(b, cache_k.shape[2])}; got {k.shape}, '
                         f'{v.shape}, {cache_v.shape} and {mask.shape}')
    if any(a.dtype != jnp.float32 for a in (q, k, v, cache_k, cache_v)):
        raise ValueError('decode_attention: q, k, v and the caches must be float32')
    if isa is not None and isa not in ISAS:
        raise ValueError(f'decode_attention: isa must be None or one of {sorted(ISAS)}, '
                         f'got {isa!r}')
    if not available():
        raise RuntimeError(f'the cpu_gemv kernel is unavailable: {unavailable_reason()}')
    if isa == 'avx512f' and 'avx512f' not in _cpu_flags():
        raise ValueError('decode_attention: this CPU has no AVX-512F')
    return jax.ffi.ffi_call(TARGET_ATTENTION, jax.ShapeDtypeStruct(q.shape, jnp.float32),
                            vmap_method='sequential')(
        q, k, v, cache_k, cache_v, mask.astype(jnp.bool_), scale=np.float32(scale),
        threads=np.int64(threads_setting(threads)), spin_us=np.int64(spin_setting(spin_us)),
        isa=np.int64(ISAS.get(isa, 0)))


@functools.cache
def warn_unavailable_once() -> None:
    """Warns (once per process) that products configured for cpu_gemv use XLA's dot."""
    warnings.warn(f"Execution.matvec='cpu_gemv' falls back to XLA's dot: "
                  f'{unavailable_reason()}', RuntimeWarning, stacklevel=3)
