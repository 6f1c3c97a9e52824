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

import mmap
import os

import jax
import numpy as np

from rustgpt_jax.config import ModelConfig
from rustgpt_jax.interop.gguf import dequant
from rustgpt_jax.interop.gguf.reader import GGUFHeader, TensorInfo
from rustgpt_jax.quant import BLOCK_TYPES, QArray

ALIGN = 64  # what XLA:CPU needs to alias a host buffer instead of copying it
LARGE = 1 << 21  # buffers from this size up are anonymous mappings


def _aligned_empty(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 buffer whose data starts on an ALIGN-byte boundary.

    Large ones are private anonymous mappings: first-touch page faults dominate filling
    fresh memory on a VM, and pread filled np.empty buffers at 0.4 GB/s here against
    1.7-2.1 GB/s for such a mapping (AMD EPYC VM, 256 MB reads from the page cache). No
    MADV_HUGEPAGE: with THP defrag=madvise its faults compact memory synchronously, and
    loads after other large allocations stalled (Q4_K_M: 0.9 s became 4.5 s). A mapping is
    page-aligned, so ALIGN-aligned.
    """
    if nbytes >= LARGE:
        region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        return np.frombuffer(region, np.uint8)  # keeps `region` alive
    base = np.empty(nbytes + ALIGN, np.uint8)
    start = -base.ctypes.data % ALIGN
    return base[start:start + nbytes]


def _raw(buf: np.ndarray, header: GGUFHeader, info: TensorInfo, rows: int,
         fd: int) -> np.ndarray:
    """The tensor's bytes as (rows, row_bytes) uint8: a view of the mapped file when it
    is aligned, else an aligned copy read with pread (reading through the mapping would
    leave its pages resident beside the copy, doubling the peak RSS)."""
    start = header.data_offset + info.offset
    view = buf[start:start + info.nbytes].reshape(rows, -1)
    if view.ctypes.data % ALIGN == 0:
        return view
    out = _aligned_empty(info.nbytes)
    done = 0
    while done < info.nbytes:  # pread may return short counts
        n = os.preadv(fd, [memoryview(out[done:])], start + done)
        if n <= 0:
            raise OSError(f'short read of {info.name} at byte {start + done}')
        done += n
    return out.reshape(rows, -1)


def _device(array: np.ndarray):
    return jax.device_put(array)  # aliases `array` on CPU when aligned (see module doc)


def _matrices(config: ModelConfig) -> list:
    """(our path, GGUF name, logical shape, contracted dims, q/k heads) of every matrix.

    The logical shape is our kernel's (input-major, contracted dims first), except the
    (V, D) embedding table (contracted dims 0: it is W itself). q and k rows are in
    llama.cpp's RoPE order in the file (`unpermute_qk` with that many heads).
    """
    d, f, v = config.embed_dim, config.hidden_dim, config.vocab_size
    n, k, h = config.num_heads, config.num_kv_heads, config.effective_head_dim
    out = [(('embedder', 'token_embedding'), 'token_embd.weight', (v, d), 0, 0)]
    if not config.tie_embeddings:
        out.append((('embedder', 'lm_head'), 'output.weight', (d, v), 1, 0))
    for i in range(config.num_layers):
        layer, b = f'layer_{i}', f'blk.{i}.'
        out += [((layer, 'attention', 'q_proj', 'kernel'), b + 'attn_q.weight', (d, n, h), 1, n),
                ((layer, 'attention', 'k_proj', 'kernel'), b + 'attn_k.weight', (d, k, h), 1, k),
                ((layer, 'attention', 'v_proj', 'kernel'), b + 'attn_v.weight', (d, k, h), 1, 0),
                ((layer, 'attention', 'o_proj', 'kernel'), b + 'attn_output.weight', (n, h, d),
                 2, 0),
                ((layer, 'ffn', 'w1', 'kernel'), b + 'ffn_gate.weight', (d, f), 1, 0),
                ((layer, 'ffn', 'w3', 'kernel'), b + 'ffn_up.weight', (d, f), 1, 0),
                ((layer, 'ffn', 'w2', 'kernel'), b + 'ffn_down.weight', (f, d), 1, 0)]
    return out


def _vectors(config: ModelConfig) -> list:
    """(our path, GGUF name) of every norm scale."""
    out = [(('final_norm', 'scale'), 'output_norm.weight')]
    for i in range(config.num_layers):
        out += [((f'layer_{i}', 'attn_norm', 'scale'), f'blk.{i}.attn_norm.weight'),
                ((f'layer_{i}', 'ffn_norm', 'scale'), f'blk.{i}.ffn_norm.weight')]
    return out


def build_quantized_params(path: str, buf: np.ndarray, header: GGUFHeader, infos: dict,
                           config: ModelConfig, unpermute_qk) -> dict:
    """Params of `Transformer(config)` (scan_layers=False) over the file's own blocks.

    Args:
      path: the file; buf: all of it, memory-mapped uint8.
      header: its validated header; infos: tensor name -> TensorInfo.
      config: the model (scan_layers False).
      unpermute_qk: loader.unpermute_qk (llama.cpp q/k rows -> HF rotate-half rows).
    """
    with open(path, 'rb') as f:
        return _build(f.fileno(), buf, header, infos, config, unpermute_qk)


def _build(fd: int, buf, header, infos, config, unpermute_qk) -> dict:
    dtype = config.params_dtype
    params: dict = {}
    for path, name, logical, contract, heads in _matrices(config):
        if name == 'output.weight' and name not in infos:
            name = 'token_embd.weight'  # an untied model whose file shares the table
        info = infos[name]
        raw = _raw(buf, header, info, info.shape[0], fd)
        if info.ggml_type not in BLOCK_TYPES:  # F32: a float kernel in our layout
            w = dequant.dequantize(raw, info.ggml_type, info.shape)  # W (out, in)
            w = unpermute_qk(w, heads) if heads else w
            value = jax.numpy.asarray(w.T.reshape(logical) if contract else w, dtype)
        else:
            if heads:  # whole rows move, so the blocks are untouched
                permuted = _aligned_empty(raw.size).reshape(raw.shape)
                np.copyto(permuted, unpermute_qk(raw, heads))
                raw = permuted
            value = QArray(_device(raw), info.ggml_type, logical)
        _set(params, path, value)
    for path, name in _vectors(config):
        info = infos[name]
        w = dequant.dequantize(_raw(buf, header, info, 1, fd), info.ggml_type, info.shape)
        _set(params, path, jax.numpy.asarray(w, dtype))
    return params


def export_tensors(params: dict, config: ModelConfig, encode, permute_qk) -> list:
    """[(GGUF name, data, raw ggml type or None)] of unrolled params holding QArrays.

    The inverse of `build_quantized_params`: a QArray's blocks are written as they are
    (bit-identical to the file it came from); float leaves go through `encode(name, W)`
    (the writer's ftype encoding of W (out, in)), norm scales stay F32.
    """
    out = []
    for path, name, logical, contract, heads in _matrices(config):
        leaf = _get(params, path, name)
        if isinstance(leaf, QArray):
            if leaf.shape != logical:
                raise ValueError(f'save_gguf: {"/".join(path)} has shape {leaf.shape}, the '
                                 f'config gives {logical}')
            rows = np.asarray(leaf.blocks)
            out.append((name, permute_qk(rows, heads) if heads else rows, leaf.ggml_type))
            continue
        w = np.asarray(leaf, np.float32)
        w = w.reshape(int(np.prod(logical[:contract])), -1).T if contract else w
        out.append((name, *encode(name, permute_qk(w, heads) if heads else w)))
    for path, name in _vectors(config):
        out.append((name, np.asarray(_get(params, path, name), np.float32), None))
    return out


def _get(tree: dict, path: tuple, name: str):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            raise ValueError(f'save_gguf: the params have no {"/".join(path)} (for {name}); '
                             f'quantized params are unrolled (layer_0, layer_1, ...)')
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
