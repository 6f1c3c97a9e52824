"""Packed projections: the same model with q/k/v and gate/up fused, kernels output-major.

`runtime.Execution(packed=True)` changes only the parameter layout:

    standard                               packed
    attention.q_proj   (D, N, H)  \\
    attention.k_proj   (D, K, H)   } ->    attention.qkv_proj (N + 2K, H, D)
    attention.v_proj   (D, K, H)  /
    attention.o_proj   (N, H, D)     ->    attention.o_proj   (D, N, H)
    ffn.w1, ffn.w3     (D, F) each   ->    ffn.w13            (2F, D)      (SwiGLU)
    ffn.w2             (F, D)        ->    ffn.w2             (D, F)
    ffn.up / ffn.down  (D, F)/(F, D) ->    (F, D) / (D, F)                 (ReLU FFN)

Biases follow their kernels' output dims. Why this layout is faster on CPU (fewer,
larger products over contiguous rows): benchmarks/RESULTS.md. The standard layout stays
the default: tensor parallelism splits its head and MLP axes, which the packed kernels'
fused axes do not allow. Decoding packs on load (`decoding.cache.prepare_for_decode`);
HF and GGUF files are always in the standard layout (unpack before exporting). Any
leading (scanned-layer) axes pass through unchanged. The layout is not recorded in the
params: the caller's `Execution` says which one it holds.
"""

from __future__ import annotations

from typing import Any

import flax
import jax.numpy as jnp

from rustgpt_jax import quant
from rustgpt_jax.config import FeedForwardType, ModelConfig

# Kernel rank in the standard layout (to find leading layer axes).
_RANK = {'q_proj': 3, 'k_proj': 3, 'v_proj': 3, 'o_proj': 3, 'w1': 2, 'w2': 2, 'w3': 2,
         'up': 2, 'down': 2}


def _output_major(w, contract: int, lead: int):
    """(*lead, *contracted, *features) -> (*lead, *features, *contracted)."""
    order = list(range(lead)) + list(range(lead + contract, w.ndim)) + list(
        range(lead, lead + contract))
    return _transpose(w, order)


def _input_major(w, contract: int, lead: int):
    """The inverse of `_output_major`."""
    features = w.ndim - lead - contract
    order = list(range(lead)) + list(range(w.ndim - contract, w.ndim)) + list(
        range(lead, lead + features))
    return _transpose(w, order)


def _transpose(w, order):
    # A quantized kernel is stored as W (out, in) in either layout: only its logical
    # shape (the names of the dims) changes.
    if quant.is_quantized(w):
        return quant.relabel(w, tuple(w.shape[i] for i in order))
    return jnp.transpose(w, order)


def _concat(kernels, axis: int):
    """jnp.concatenate, or for quantized kernels a row stack (`quant.QConcat`): in the
    standard layout their concatenated axis is an output axis, so the rows of W stack."""
    if not quant.is_quantized(kernels[0]):
        return jnp.concatenate(kernels, axis=axis)
    shape = list(kernels[0].shape)
    shape[axis] = sum(k.shape[axis] for k in kernels)
    return quant.concat_rows(kernels, tuple(shape))


def _split(w, bounds, axis: int):
    """The inverse of `_concat` at `bounds` [(start, stop), ...] along `axis`."""
    if not quant.is_quantized(w):
        return [w[(slice(None),) * axis + (slice(a, b),)] for a, b in bounds]
    parts = quant.parts(w)
    if len(parts) != len(bounds):
        raise ValueError(f'cannot split the quantized kernel {w!r} into {len(bounds)} parts')
    return [quant.relabel(p, w.shape[:axis] + (b - a,) + w.shape[axis + 1:])
            for p, (a, b) in zip(parts, bounds)]


def _lead(name: str, kernel) -> int:
    return kernel.ndim - _RANK[name]


def _pack_attention(attn: dict) -> dict:
    if 'q_proj' not in attn:
        return attn
    attn = dict(attn)
    q, k, v = (attn.pop(n) for n in ('q_proj', 'k_proj', 'v_proj'))
    lead = _lead('q_proj', q['kernel'])
    fused = _concat([q['kernel'], k['kernel'], v['kernel']], axis=lead + 1)
    packed = {'kernel': _output_major(fused, 1, lead)}  # (..., N + 2K, H, D)
    if 'bias' in q:
        packed['bias'] = jnp.concatenate([q['bias'], k['bias'], v['bias']], axis=lead)
    attn['qkv_proj'] = packed
    o = dict(attn['o_proj'])
    o['kernel'] = _output_major(o['kernel'], 2, _lead('o_proj', o['kernel']))
    attn['o_proj'] = o
    return attn


def _unpack_attention(attn: dict, num_heads: int, num_kv_heads: int) -> dict:
    if 'qkv_proj' not in attn:
        return attn
    attn = dict(attn)
    packed = attn.pop('qkv_proj')
    lead = packed['kernel'].ndim - 3
    fused = _input_major(packed['kernel'], 1, lead)  # (..., D, N + 2K, H)
    n, kh = num_heads, num_kv_heads
    bounds = {'q_proj': (0, n), 'k_proj': (n, n + kh), 'v_proj': (n + kh, n + 2 * kh)}
    kernels = _split(fused, list(bounds.values()), lead + 1)
    for (name, (a, b)), kernel in zip(bounds.items(), kernels):
        attn[name] = {'kernel': kernel}
        if 'bias' in packed:
            attn[name]['bias'] = packed['bias'][(slice(None),) * lead + (slice(a, b),)]
    o = dict(attn['o_proj'])
    o['kernel'] = _input_major(o['kernel'], 2, o['kernel'].ndim - 3)
    attn['o_proj'] = o
    return attn


def _pack_ffn(ffn: dict) -> dict:
    ffn = dict(ffn)
    if 'w1' in ffn:  # SwiGLU
        w1, w3 = ffn.pop('w1'), ffn.pop('w3')
        lead = _lead('w1', w1['kernel'])
        fused = _concat([w1['kernel'], w3['kernel']], axis=lead + 1)  # (..., D, 2F)
        ffn['w13'] = {'kernel': _output_major(fused, 1, lead)}
        if 'bias' in w1:
            ffn['w13']['bias'] = jnp.concatenate([w1['bias'], w3['bias']], axis=lead)
    for name in ('w2', 'up', 'down'):
        if name in ffn:
            layer = dict(ffn[name])
            layer['kernel'] = _output_major(layer['kernel'], 1, _lead(name, layer['kernel']))
            ffn[name] = layer
    return ffn


def _unpack_ffn(ffn: dict) -> dict:
    ffn = dict(ffn)
    for name in ('w2', 'up', 'down'):
        if name in ffn:
            layer = dict(ffn[name])
            layer['kernel'] = _input_major(layer['kernel'], 1, layer['kernel'].ndim - 2)
            ffn[name] = layer
    if 'w13' in ffn:
        packed = ffn.pop('w13')
        lead = packed['kernel'].ndim - 2
        fused = _input_major(packed['kernel'], 1, lead)  # (..., D, 2F)
        f = fused.shape[-1] // 2
        w1, w3 = _split(fused, [(0, f), (f, 2 * f)], fused.ndim - 1)
        ffn['w1'], ffn['w3'] = {'kernel': w1}, {'kernel': w3}
        if 'bias' in packed:
            ffn['w1']['bias'], ffn['w3']['bias'] = packed['bias'][..., :f], packed['bias'][..., f:]
    return ffn


def _map_blocks(tree: Any, attention_fn, ffn_fn) -> Any:
    if not isinstance(tree, dict):
        return tree
    out = {}
    for key, value in tree.items():
        if key == 'attention' and isinstance(value, dict):
            out[key] = attention_fn(value)
        elif key == 'ffn' and isinstance(value, dict):
            out[key] = ffn_fn(value)
        else:
            out[key] = _map_blocks(value, attention_fn, ffn_fn)
    return out


def pack_projections(params) -> dict:
    """Standard params (boxed or plain; scanned or unrolled layers) in the packed layout."""
    return pack_blocks(flax.core.meta.unbox(params))


def pack_blocks(tree) -> dict:
    """Packs every block ('attention' / 'ffn' subtree) found in `tree`, e.g. one layer's
    params; `pack_projections` is this over a whole model."""
    return _map_blocks(dict(tree), _pack_attention, _pack_ffn)


def unpack_projections(config: ModelConfig, params) -> dict:
    """The inverse of `pack_projections`: packed params of `config` in the standard layout."""
    return _map_blocks(
        dict(flax.core.meta.unbox(params)),
        lambda a: _unpack_attention(a, config.num_heads, config.num_kv_heads), _unpack_ffn)


def packed_rows(config: ModelConfig) -> dict[str, int]:
    """Output rows of each packed block kernel of `config` (the names of row blocks)."""
    d, f = config.embed_dim, config.hidden_dim
    qkv = (config.num_heads + 2 * config.num_kv_heads) * config.effective_head_dim
    ffn = ({'w13': 2 * f, 'w2': d} if config.feed_forward == FeedForwardType.SWIGLU
           else {'up': f, 'down': d})
    return {'qkv_proj': qkv, 'o_proj': d, **ffn}


def check_row_blocks(config: ModelConfig, row_blocks) -> tuple:
    """Validates `Execution.row_blocks` against `config`'s packed kernels; returns them.

    Raises:
      ValueError: naming an unknown projection or one whose rows do not divide.
    """
    rows = packed_rows(config)
    for name, count in row_blocks:
        if name not in rows:
            raise ValueError(f'Execution.row_blocks: unknown projection {name!r}; one of '
                             f'{sorted(rows)}')
        if rows[name] % count:
            raise ValueError(f'Execution.row_blocks: {name} has {rows[name]} output rows, not '
                             f'divisible into {count} blocks')
    return tuple(row_blocks)
