"""`Execution`: how a model's products and attention run. Never what they compute.

A model is its `ModelConfig` (the math) plus an `Execution` (the parameter layout and
the kernels that evaluate its products). Every `Execution` gives the same function of
the same weights; training uses the default, and `decoding.prepare_for_decode` picks the
fastest one for the backend. The layers receive it explicitly (`nn.dense.Projection`,
`nn.attention.Attention`, `nn.embedder.Embedder`) and hand it to `runtime.products`,
the one place that dispatches on it.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Optional


class MatvecImpl(enum.Enum):
    """Which product computes decode-step products of at most `products.MATVEC_MAX_ROWS` rows."""
    XLA = 'xla'  # XLA's dot
    CPU_GEMV = 'cpu_gemv'  # the XLA FFI kernel of rustgpt_jax.native.cpu_gemv (CPU only)


@dataclasses.dataclass(frozen=True)
class Execution:
    """A frozen, hashable choice of parameter layout and product kernels.

    Attributes:
      packed: the packed parameter layout (`nn.packing`): q/k/v as one kernel, SwiGLU's
        gate/up as one, every block kernel output-major (torch's Linear layout). False is
        the standard layout that training, sharding rules and HF/GGUF files use.
      row_blocks: ((projection name, blocks), ...) for packed kernels, e.g. (('w2', 2),):
        that (out, in) kernel is evaluated as one batched dot over `blocks` row blocks of
        out / blocks rows when the input has at most MATVEC_MAX_ROWS rows (decode steps).
        The same products; `nn.packing.check_row_blocks` validates names and divisibility
        against a model.
      matvec: which product computes float32 decode-step products of at most
        MATVEC_MAX_ROWS rows: packed projections, the output head and the two dots over
        the KV cache; and every product with a quantized weight (`quant.QArray`, any
        layout). CPU_GEMV falls back to XLA's dot, with one warning, where the kernel
        cannot be built. Standard-layout float kernels are input-major and keep XLA's dot.
      gemv_threads: threads per cpu_gemv product. None: $RGJ_GEMV_THREADS, else the
        allowed CPUs, at most 8.
      gemv_spin_us: microseconds cpu_gemv's workers spin between products before they
        sleep. None: $RGJ_GEMV_SPIN_US, else 1000.
      kernel_cache_dir: where native kernels are compiled to on first use. None:
        $RGJ_CACHE_DIR, else ~/.cache/rustgpt_jax. Read when a kernel is first built or
        loaded in a process.
    """
    packed: bool = False
    row_blocks: tuple = ()
    matvec: MatvecImpl = MatvecImpl.XLA
    gemv_threads: Optional[int] = None
    gemv_spin_us: Optional[int] = None
    kernel_cache_dir: Optional[str] = None

    def __post_init__(self):
        try:
            object.__setattr__(self, 'matvec', MatvecImpl(self.matvec))
        except ValueError:
            allowed = ', '.join(repr(m.value) for m in MatvecImpl)
            raise ValueError(f'Execution.matvec={self.matvec!r} is not one of {allowed}') from None
        try:
            blocks = tuple((str(name), count) for name, count in self.row_blocks)
        except (TypeError, ValueError):
            raise ValueError(f'Execution.row_blocks must be a tuple of (projection name, blocks) '
                             f'pairs, got {self.row_blocks!r}') from None
        for name, count in blocks:
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise ValueError(f'Execution.row_blocks: {name}: blocks must be an integer '
                                 f'>= 1, got {count!r}')
        object.__setattr__(self, 'row_blocks', blocks)
        if not self.packed:
            if blocks:
                raise ValueError('Execution.row_blocks applies to packed (output-major) kernels: '
                                 'set packed=True as well')
        for name, least in (('gemv_threads', 1), ('gemv_spin_us', 0)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < least):
                raise ValueError(f'Execution.{name} must be an integer >= {least} or None, '
                                 f'got {value!r}')

    def blocks_for(self, name: str) -> int:
        """Row blocks of the packed projection `name` (1: the whole matrix)."""
        return dict(self.row_blocks).get(name, 1)

    def replace(self, **changes) -> 'Execution':
        return dataclasses.replace(self, **changes)
