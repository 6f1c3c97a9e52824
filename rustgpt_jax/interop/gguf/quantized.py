"""The param tree of a GGUF file with its weights left in their block encodings.

Every F16/BF16/Q8_0/Q4_0/Q4_K/Q5_K/Q6_K matrix becomes a `quant.QArray` of its raw rows;
F32 tensors (norm scales, F32 matrices) become float arrays as `loader._build_params`
makes them. Layers stay unrolled (`layer_{i}`): the types of a Q4_K_M file differ from
layer to layer (Q6_K in some attn_v / ffn_down), so they cannot be stacked.

No tensor is dequantised, and most are not copied: JAX's CPU client aliases a host
array whose data is 64-byte aligned, so a tensor at such an offset of the memory-mapped
file becomes a device array over the file's own pages. The others (GGUF aligns to 32
bytes) are read once into an aligned buffer that JAX then aliases; so are q and k, whose
rows `unpermute_qk` reorders (whole rows, so the blocks are untouched).
"""

from __future__ import annotations

import jax
import numpy as np

from rustgpt_jax.config import ModelConfig
from rustgpt_jax.interop.gguf import dequant
from rustgpt_jax.interop.gguf.reader import GGUFHeader, TensorInfo
from rustgpt_jax.quant import BLOCK_TYPES, QArray

ALIGN = 64  # what XLA:CPU needs to alias a host buffer instead of copying it


def _aligned_empty(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 buffer whose data starts on an ALIGN-byte boundary."""
    base = np.empty(nbytes + ALIGN, np.uint8)
    start = -base.ctypes.data % ALIGN
    return base[start:start + nbytes]


def _raw(buf: np.ndarray, header: GGUFHeader, info: TensorInfo, rows: int) -> np.ndarray:
    """The tensor's bytes as (rows, row_bytes) uint8: a view of the mapped file when it
    is aligned, else an aligned copy."""
    start = header.data_offset + info.offset
    view = buf[start:start + info.nbytes].reshape(rows, -1)
    if view.ctypes.data % ALIGN == 0:
        return view
    out = _aligned_empty(info.nbytes).reshape(rows, -1)
    np.copyto(out, view)
    return out


def _device(array: np.ndarray):
    return jax.device_put(array)  # aliases `array` on CPU when aligned (see module doc)


def build_quantized_params(buf: np.ndarray, header: GGUFHeader, infos: dict,
                           config: ModelConfig, unpermute_qk) -> dict:
    """Params of `Transformer(config)` (scan_layers=False) over the file's own blocks.

    Args:
      buf: the whole file, memory-mapped uint8.
      header: its validated header; infos: tensor name -> TensorInfo.
      config: the model (scan_layers False).
      unpermute_qk: loader.unpermute_qk (llama.cpp q/k rows -> HF rotate-half rows).
    """
    d, f = config.embed_dim, config.hidden_dim
    n, k, h = config.num_heads, config.num_kv_heads, config.effective_head_dim
    dtype = config.params_dtype

    def matrix(name: str, logical: tuple, heads: int = 0, table: bool = False):
        """W (out, in) of `name` as a weight of `logical` shape: a QArray, or for F32 the
        float kernel (input-major, W.T reshaped; an embedding `table` is W itself)."""
        info = infos[name]
        rows = info.shape[0]
        if info.ggml_type not in BLOCK_TYPES:  # F32: a float kernel in our layout
            w = dequant.dequantize(_raw(buf, header, info, rows), info.ggml_type, info.shape)
            if heads:
                w = unpermute_qk(w, heads)
            return jax.numpy.asarray(w if table else w.T.reshape(logical), dtype)
        raw = _raw(buf, header, info, rows)
        if heads:
            permuted = _aligned_empty(raw.size).reshape(raw.shape)
            np.copyto(permuted, unpermute_qk(raw, heads))
            raw = permuted
        return QArray(_device(raw), info.ggml_type, logical)

    def vector(name: str):
        info = infos[name]
        w = dequant.dequantize(_raw(buf, header, info, 1), info.ggml_type, info.shape)
        return jax.numpy.asarray(w, dtype)

    params = {'embedder': {'token_embedding': matrix('token_embd.weight', (config.vocab_size, d),
                                                       table=True)},
              'final_norm': {'scale': vector('output_norm.weight')}}
    if not config.tie_embeddings:
        head = 'output.weight' if 'output.weight' in infos else 'token_embd.weight'
        params['embedder']['lm_head'] = matrix(head, (d, config.vocab_size))
    for i in range(config.num_layers):
        b = f'blk.{i}.'
        params[f'layer_{i}'] = {
            'attention': {
                'q_proj': {'kernel': matrix(b + 'attn_q.weight', (d, n, h), heads=n)},
                'k_proj': {'kernel': matrix(b + 'attn_k.weight', (d, k, h), heads=k)},
                'v_proj': {'kernel': matrix(b + 'attn_v.weight', (d, k, h))},
                'o_proj': {'kernel': matrix(b + 'attn_output.weight', (n, h, d))}},
            'ffn': {'w1': {'kernel': matrix(b + 'ffn_gate.weight', (d, f))},
                    'w3': {'kernel': matrix(b + 'ffn_up.weight', (d, f))},
                    'w2': {'kernel': matrix(b + 'ffn_down.weight', (f, d))}},
            'attn_norm': {'scale': vector(b + 'attn_norm.weight')},
            'ffn_norm': {'scale': vector(b + 'ffn_norm.weight')}}
    return params

