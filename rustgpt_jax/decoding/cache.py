"""KV-cache helpers: build an empty cache, reorder it per beam, pad prompts, context limits.

The cache itself lives in the model (the Flax `cache` collection of `nn.attention`): a
ring of `config.cache_length` slots per layer, empty slots at position -1, and a column
counter shared by the rows (column i of the left-padded token stream lives in slot
i % C). Every call therefore advances all rows by its width T; left padding belongs in
the first (prefill) call only. Any module with the same interface works here:

    cache = init_cache(model, batch)
    logits, vars = model.apply({'params': p, 'cache': cache}, tokens, positions=pos,
                               decode=True, last_only=..., mutable=['cache'])

`tokens` is a prefill chunk (B, T) or one token (B, 1); negative positions mark left
padding, which is never written to the cache nor attended. `last_only=True` (prefill)
asks for the logits of the last position only, (B, 1, V).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from rustgpt_jax import quant
from rustgpt_jax.config import FeedForwardType, ModelConfig, PositionType
from rustgpt_jax.models import build_model
from rustgpt_jax.native import cpu_gemv, quant_matmul
from rustgpt_jax.nn.packing import check_row_blocks, pack_blocks, pack_projections
from rustgpt_jax.runtime.execution import Execution, MatvecImpl

# Single prompts are left-padded to a multiple of this, so a chat session reuses a few
# compiled prefill programs instead of compiling one per prompt length.
PROMPT_BUCKET = 64


def _cache_shapes(model, batch: int):
    tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
    shapes = jax.eval_shape(
        lambda t: model.init(jax.random.key(0), t, decode=True), tokens)
    if 'cache' not in shapes:
        raise ValueError(f'{type(model).__name__} created no `cache` collection in decode '
                         f'mode, so it cannot be decoded incrementally')
    return shapes['cache']


def _leaf_name(path) -> str:
    last = path[-1]
    return str(getattr(last, 'key', getattr(last, 'name', last)))


def init_cache(model, batch: int):
    """An empty cache for `batch` rows: zero keys/values, every slot at position -1.

    Args:
      model: a Flax module following the decode interface above.
      batch: number of rows B.

    Returns:
      The `cache` collection (a pytree of arrays).
    """
    def empty(path, s):
        fill = -1 if _leaf_name(path) == 'positions' else 0
        return jnp.full(s.shape, fill, s.dtype)
    return jax.tree_util.tree_map_with_path(empty, _cache_shapes(model, batch))


@functools.lru_cache(maxsize=32)
def cache_batch_axes(model):
    """Which axis of each cache leaf is the batch axis (1 under nn.scan, else 0).

    Found by comparing the cache shapes for batch 1 and batch 2, so it holds for any
    layer stacking. Returns a pytree of ints with the cache's structure; -1 marks a leaf
    shared by all rows (the column counter).
    """
    one, two = _cache_shapes(model, 1), _cache_shapes(model, 2)

    def axis(a, b):
        diff = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
        if not diff:
            return -1
        if len(diff) != 1:
            raise ValueError(f'cannot find the batch axis of a cache leaf {a.shape}')
        return diff[0]
    return jax.tree_util.tree_map(axis, one, two)


def reorder_cache(cache, indices, batch_axes):
    """Gathers rows of every cache leaf: row i of the result is row indices[i] of `cache`.

    Args:
      cache: the `cache` collection.
      indices: (B,) int32 source rows (beam search: the parent beam of each new beam).
      batch_axes: the pytree from `cache_batch_axes`.

    Returns:
      The reordered cache (same shapes).
    """
    return jax.tree_util.tree_map(
        lambda x, a: x if a < 0 else jnp.take(x, indices, axis=a), cache, batch_axes)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0,
             multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Packs prompts of different lengths into one left-padded batch.

    Left padding keeps every prompt's last token in the last column, so one prefill
    yields each row's next-token logits at the same index. Padding the width up to a
    `multiple` lets prompts of nearby lengths share one compiled program.

    Args:
      prompts: B sequences of token ids, each non-empty.
      pad_id: id written into the padding (never attended: its position is negative).
      multiple: round the padded width up to a multiple of this.

    Returns:
      tokens (B, P) int32 and lengths (B,) int32.
    """
    if not prompts:
        raise ValueError('no prompts given')
    lengths = np.array([len(p) for p in prompts], dtype=np.int32)
    if lengths.min() < 1:
        raise ValueError(f'prompt {int(np.argmin(lengths))} is empty; generation needs at '
                         f'least one token to condition on (e.g. BOS or EOS)')
    width = int(-(-lengths.max() // multiple) * multiple)
    tokens = np.full((len(prompts), width), pad_id, dtype=np.int32)
    for row, p in enumerate(prompts):
        tokens[row, width - len(p):] = np.asarray(p, dtype=np.int32)
    return tokens, lengths


def prompt_positions(lengths, width: int):
    """Positions of a left-padded prompt batch: 0..len-1 at the right, negative padding.

    Args:
      lengths: (B,) int32 prompt lengths.
      width: P, the padded width.

    Returns:
      (B, P) int32.
    """
    lengths = jnp.asarray(lengths, jnp.int32)
    return jnp.arange(width, dtype=jnp.int32)[None, :] - (width - lengths)[:, None]


def context_limit(config: Optional[ModelConfig]) -> Optional[int]:
    """Longest prompt + generation the cache holds exactly, or None when unbounded.

    With RoPE and a window W <= max_seq_len the cache is a ring of W slots: a slot is
    overwritten only once its key has left every later query's window, so generation
    may run past max_seq_len (positions keep counting; RoPE has no table). Otherwise
    (full causal, or learned absolute positions) the context is max_seq_len tokens.
    """
    if config is None:
        return None
    window = config.static_window
    if (config.positions == PositionType.ROPE and window is not None
            and window <= config.max_seq_len):
        return None
    return config.max_seq_len


def unstack_layers(config: ModelConfig, params,
                   per_layer: Callable[[dict], dict] = lambda layer: layer
                   ) -> tuple[ModelConfig, dict]:
    """Turns scanned params (`layers` with a leading L axis) into `layer_{i}` params.

    The unrolled model (`scan_layers=False`) decodes faster on CPU: each layer's
    weights and cache are separate buffers, so the step neither slices the stacked
    weights nor restacks the whole cache per token.

    Args:
      config: a config with scan_layers=True.
      params: its parameters (boxed or plain arrays).
      per_layer: applied to each layer's params as it is sliced out, so a layout change
        of every layer never holds a third copy of the weights.

    Returns:
      (config with scan_layers=False, params for it).
    """
    params = flax.core.meta.unbox(params)
    if not config.scan_layers:
        return config, params
    params = dict(params)
    stacked = params.pop('layers')
    for i in range(config.num_layers):
        params[f'layer_{i}'] = per_layer(jax.tree_util.tree_map(lambda x, i=i: x[i], stacked))
    return config.replace(scan_layers=False), params


class DecodeModel(NamedTuple):
    """A model in its decode form: the config, params in `execution`'s layout, and how
    its products run. `model` builds the Flax module."""
    config: ModelConfig
    params: dict
    execution: Execution

    @property
    def model(self):
        return build_model(self.config, self.execution)


def prepare_for_decode(config: ModelConfig, params, *, params_packed: bool = False,
                       row_blocks: Optional[tuple] = None,
                       matvec: Optional[MatvecImpl | str] = None,
                       gemv_threads: Optional[int] = None, gemv_spin_us: Optional[int] = None,
                       kernel_cache_dir: Optional[str] = None) -> DecodeModel:
    """The fastest decode form of a model: unrolled layers, packed projections.

    All are layout or kernel changes of the same function (`unstack_layers`,
    `nn.packing.pack_projections`, `runtime.Execution`); the CLIs and benchmarks decode
    through this.

    Args:
      config, params: a model as trained or imported (scanned or unrolled layers).
      params_packed: `params` are already in the packed layout.
      row_blocks: `Execution.row_blocks`; None picks `default_row_blocks` for the backend.
      matvec: `Execution.matvec`; None picks `default_matvec_impl` for the backend.
      gemv_threads, gemv_spin_us, kernel_cache_dir: `Execution`'s native kernel settings.

    Returns:
      The `DecodeModel`.
    """
    # GGUF weights kept in their encodings (`load_gguf(quantized=True)`) pack too: q/k/v
    # and gate/up become `quant.QConcat`s without copying (a QArray is output-major by
    # nature), one kernel call each. Row blocks are a float-kernel device: none for them.
    quantized = any(quant.is_quantized(leaf) for leaf in jax.tree_util.tree_leaves(
        params, is_leaf=quant.is_quantized))
    if params_packed or not config.scan_layers:
        config, params = unstack_layers(config, params)
        if not params_packed:
            params = pack_projections(params)
    else:
        # Packed layer by layer as it is sliced out: a large model holds its stacked
        # params plus one more copy, not stacked + unrolled + packed.
        config, params = unstack_layers(config, params, per_layer=pack_blocks)
    if row_blocks is None:
        row_blocks = () if quantized else default_row_blocks(config)
    if matvec is None:
        matvec = default_matvec_impl(config, directory=kernel_cache_dir, quantized=quantized)
    execution = Execution(packed=True, row_blocks=row_blocks, matvec=matvec,
                          gemv_threads=gemv_threads, gemv_spin_us=gemv_spin_us,
                          kernel_cache_dir=kernel_cache_dir)
    check_row_blocks(config, execution.row_blocks)
    return DecodeModel(config, params, execution)


def default_matvec_impl(config: ModelConfig, backend: Optional[str] = None,
                        directory: Optional[str] = None, quantized: bool = False) -> MatvecImpl:
    """`Execution.matvec` for decoding on `backend` (default: JAX's).

    With `quantized` (QArray weights): CPU_GEMV where `native.quant_matmul` runs here.
    CPU_GEMV on CPU for float32 models where the kernel builds (into `directory`, see
    `native.cpu_gemv.cache_dir`); it decoded faster (benchmarks/RESULTS.md). Otherwise
    XLA, with one warning that says why where the kernel cannot be built here.
    """
    backend = backend or jax.default_backend()
    if backend != 'cpu' or config.dtype != 'float32' or config.param_dtype != 'float32':
        return MatvecImpl.XLA
    if quantized:  # weights held as QArrays: the native quantized kernel (AVX2 at least)
        if quant_matmul.available(directory):
            return MatvecImpl.CPU_GEMV
        quant_matmul.warn_unavailable_once()
        return MatvecImpl.XLA
    if not cpu_gemv.available(directory):
        cpu_gemv.warn_unavailable_once()
        return MatvecImpl.XLA
    return MatvecImpl.CPU_GEMV


def default_row_blocks(config: ModelConfig, backend: Optional[str] = None) -> tuple:
    """`Execution.row_blocks` for batch-1 decoding on `backend` (default: JAX's).

    On CPU the feed-forward down projection (D, F) is split into two row blocks, which
    XLA:CPU's matrix-vector product streams faster than the whole matrix; the other
    kernels gained nothing (benchmarks/RESULTS.md). Other backends: no blocks.
    """
    backend = backend or jax.default_backend()
    if backend != 'cpu' or config.embed_dim % 2:
        return ()
    down = 'w2' if config.feed_forward == FeedForwardType.SWIGLU else 'down'
    return ((down, 2),)
