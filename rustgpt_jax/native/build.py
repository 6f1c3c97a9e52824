"""Builds and loads the one native library: every kernel of native/ and their shared pool.

The library is compiled from the shipped sources on first use (g++ or `$CXX`) into the
kernel cache directory, keyed by a hash of the sources, the flags, the compiler and jax's
version. One library, loaded once, because its kernels share one worker pool
(spin_pool.h): two pools would put twice the spinning threads on the same cores.

No ISA flag is global: the AVX-512 and AVX2 functions carry `#pragma GCC target` and are
chosen at run time, so the library loads on any x86-64 CPU; each kernel's Python module
says whether it can run (cpu_gemv needs AVX2 + FMA, quant_matmul AVX2 + FMA + F16C, at least).
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

import jax

HERE = Path(__file__).parent
SOURCES = (HERE / 'cpu_gemv.cc', HERE / 'quant_matmul.cc')  # compiled in this order
HEADERS = (HERE / 'spin_pool.h', HERE / 'gemv_core.inc', HERE / 'attend_core.inc',
           HERE / 'quant_core.inc',
           HERE / 'quant_fused.inc', HERE / 'quant_fused_avx2.inc', HERE / 'quant_prefill.inc',
           HERE / 'quant_half_panel.inc', HERE / 'quant_half.inc')
FLAGS = ('-O3', '-std=c++17', '-fPIC')
ENV_CACHE_DIR = 'RGJ_CACHE_DIR'

# FFI target name -> exported handler symbol.
TARGETS = {
    'rgj_gemv': 'RgjGemv',
    'rgj_gemv_input_major': 'RgjGemvInputMajor',
    'rgj_decode_attention': 'RgjDecodeAttention',
    'rgj_quant_matmul': 'RgjQuantMatmul',
    'rgj_quant_matmul_multi': 'RgjQuantMatmulMulti',
}

_lock = threading.Lock()
_loaded: dict = {}  # 'library': ctypes.CDLL, or 'error': str


def cache_dir(directory: Optional[str] = None) -> Path:
    """Where built libraries are kept: `directory`, else $RGJ_CACHE_DIR, else
    ~/.cache/rustgpt_jax."""
    root = directory or os.environ.get(ENV_CACHE_DIR)
    if root:
        return Path(root)
    base = os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache'
    return Path(base) / 'rustgpt_jax'


def compiler() -> Optional[str]:
    cxx = os.environ.get('CXX')
    if cxx:
        return shutil.which(cxx)
    return shutil.which('g++') or shutil.which('c++') or shutil.which('clang++')


def _run(command: list, what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f'building {what} failed ({" ".join(command)}):\n'
                           f'{done.stderr.strip()[-2000:]}')


def build(directory: Optional[Path] = None) -> Path:
    """Compiles the sources (if not already built) and returns the library's path.

    Each source is compiled to an object of its own (so an error names its file), then
    linked. Concurrent builders (pytest-xdist workers, several processes) wait on a file
    lock and the library appears by an atomic rename, so none loads a half-written file.

    Raises:
      RuntimeError: naming the missing compiler or the compiler's own error output.
    """
    cxx = compiler()
    if cxx is None:
        raise RuntimeError('no C++ compiler found (looked for $CXX, g++, c++, clang++)')
    parts = [p.read_bytes() for p in SOURCES + HEADERS]
    key = hashlib.sha256(b'\0'.join([*parts, ' '.join(FLAGS).encode(), cxx.encode(),
                                     jax.__version__.encode()])).hexdigest()[:16]
    directory = Path(directory or cache_dir())
    directory.mkdir(parents=True, exist_ok=True)
    library = directory / f'rgj_native-{key}.so'
    with open(directory / f'rgj_native-{key}.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if library.exists():
            return library
        partial = library.with_suffix(f'.{os.getpid()}.tmp')
        with tempfile.TemporaryDirectory(prefix='rgj_native-') as objects:
            try:
                names = []
                for source in SOURCES:
                    names.append(str(Path(objects) / f'{source.stem}.o'))
                    _run([cxx, *FLAGS, '-I', jax.ffi.include_dir(), '-c', str(source), '-o',
                          names[-1]], source.name)
                _run([cxx, '-shared', *names, '-o', str(partial), '-lpthread'], library.name)
            except RuntimeError:
                partial.unlink(missing_ok=True)
                raise
        os.replace(partial, library)
    return library


def load(directory: Optional[str] = None) -> ctypes.CDLL:
    """Builds (once per process), loads and registers every FFI target; returns the
    library. Later calls return the first library, or raise the first error again.

    Raises:
      RuntimeError: off Linux x86-64, or the build's error.
    """
    with _lock:
        if not _loaded:
            try:
                if platform.system() != 'Linux' or platform.machine() not in ('x86_64', 'AMD64'):
                    raise RuntimeError(f'needs Linux on x86-64, not {platform.system()} '
                                       f'{platform.machine()}')
                library = ctypes.cdll.LoadLibrary(str(build(cache_dir(directory))))
                for target, symbol in TARGETS.items():
                    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                                platform='cpu')
                _loaded['library'] = library
            except (RuntimeError, OSError) as error:
                _loaded['error'] = str(error)
        if 'error' in _loaded:
            raise RuntimeError(_loaded['error'])
        return _loaded['library']
