"""`load_gguf`: a llama-architecture GGUF file -> (ModelConfig, params, tokenizer).

Tensor names (llama.cpp `LLM_ARCH_LLAMA`), numpy shapes = GGUF dims reversed = HF shapes:
  token_embd.weight (V, D)   output.weight (V, D), absent when tied   output_norm.weight (D,)
  blk.{i}.attn_q.weight (N*H, D)  attn_k / attn_v (K*H, D)  attn_output (D, N*H)
  blk.{i}.ffn_gate / ffn_up (F, D)  ffn_down (D, F)  attn_norm / ffn_norm (D,)
convert_hf_to_gguf.py permutes q/k rows from HF's rotate-half RoPE layout to llama.cpp's
adjacent-pair layout; `unpermute_qk` undoes it so the weights feed our RoPE
(rustgpt_jax/nn/rope.py, HF layout). Kernel layouts follow rustgpt_jax/interop/hf.py.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

from rustgpt_jax.config import ModelConfig
from rustgpt_jax.interop.gguf import dequant
from rustgpt_jax.interop.gguf.quantized import build_quantized_params
from rustgpt_jax.interop.gguf.reader import GGUFError, GGUFHeader, read_header
from rustgpt_jax.interop.gguf.tokenizer import GGUFTokenizer
from rustgpt_jax.interop.gguf.validate import check_tensors

ARCH = 'llama'
GGUF_TO_HF = {
    'token_embd.weight': 'model.embed_tokens.weight',
    'output_norm.weight': 'model.norm.weight',
    'output.weight': 'lm_head.weight',
}
LAYER_TO_HF = {
    'attn_q': 'self_attn.q_proj', 'attn_k': 'self_attn.k_proj', 'attn_v': 'self_attn.v_proj',
    'attn_output': 'self_attn.o_proj', 'ffn_gate': 'mlp.gate_proj', 'ffn_up': 'mlp.up_proj',
    'ffn_down': 'mlp.down_proj', 'attn_norm': 'input_layernorm',
    'ffn_norm': 'post_attention_layernorm',
}
# Metadata that would change the computation in ways this model cannot reproduce.
_REFUSED_KEYS = {
    f'{ARCH}.expert_count': 'mixture-of-experts layers',
    f'{ARCH}.attention.sliding_window': 'a sliding window (llama arch)',
    f'{ARCH}.rope.scaling.factor': 'RoPE scaling',
    f'{ARCH}.attention.layer_norm_epsilon': 'LayerNorm',
}


def permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp adjacent pairs (convert_hf_to_gguf `permute`).

    Args:
      w: (heads * H, D) q or k weight (torch layout).
      heads: query heads for q, KV heads for k.
    """
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def unpermute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of `permute_qk`: llama.cpp rows -> HF rotate-half rows."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def _meta(header: GGUFHeader, key: str, kind, default: Any = None, required: bool = False):
    """A metadata value checked for type, or `default`; raises GGUFError naming the key."""
    md = header.metadata
    if key not in md:
        if required:
            raise header.error('required metadata key is missing', key)
        return default
    value = md[key]
    ok = (isinstance(value, kind) and not (kind is int and isinstance(value, bool)))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise header.error(f'expected {kind.__name__}, got {type(value).__name__} {value!r:.60}',
                           key)
    return value


def config_from_metadata(header: GGUFHeader, **overrides) -> ModelConfig:
    """ModelConfig of a llama-architecture GGUF header (`overrides` win)."""
    arch = _meta(header, 'general.architecture', str, required=True)
    if arch != ARCH:
        raise header.error(f"architecture {arch!r} is not supported (only 'llama')",
                           'general.architecture')
    for key, what in _REFUSED_KEYS.items():
        value = header.metadata.get(key)
        if value not in (None, 0, 1.0, 'none'):
            raise header.error(f'{what} ({value!r}) is not supported', key)
    k = lambda name, kind=int, **kw: _meta(header, f'{ARCH}.{name}', kind, **kw)
    d = k('embedding_length', required=True)
    heads = k('attention.head_count', required=True)
    kv_heads = k('attention.head_count_kv', default=heads)
    if heads < 1 or d < 1 or d % heads and k('attention.key_length', default=None) is None:
        raise header.error(f'embedding_length {d} / head_count {heads} give no head size',
                           f'{ARCH}.attention.head_count')
    head_dim = k('attention.key_length', default=d // heads)
    rope_dim = k('rope.dimension_count', default=head_dim)
    if rope_dim != head_dim:
        raise header.error(f'partial RoPE ({rope_dim} of {head_dim} channels) is not supported',
                           f'{ARCH}.rope.dimension_count')
    vocab = header.metadata.get('tokenizer.ggml.tokens')
    fields = dict(
        vocab_size=k('vocab_size', default=len(vocab) if vocab else None),
        embed_dim=d, hidden_dim=k('feed_forward_length', required=True),
        num_layers=k('block_count', required=True), num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim,
        max_seq_len=k('context_length', default=2048),
        norm_eps=k('attention.layer_norm_rms_epsilon', float, default=1e-5),
        rope_base=k('rope.freq_base', float, default=10000.0),
        norm='rms_norm', feed_forward='swiglu', positions='rope', use_bias=False,
        norm_placement='pre')
    if fields['vocab_size'] is None:
        embd = next((t for t in header.tensors if t.name == 'token_embd.weight'), None)
        fields['vocab_size'] = embd.shape[0] if embd else None
    fields.update(overrides)
    try:
        return ModelConfig(**fields)
    except (ValueError, TypeError) as e:
        raise header.error(f'metadata gives an invalid model: {e}', f'{ARCH}.*') from None


def tokenizer_from_metadata(header: GGUFHeader) -> Optional[GGUFTokenizer]:
    """The GGUFTokenizer of `tokenizer.ggml.*`, or None when the file has no vocabulary."""
    md = header.metadata
    model = md.get('tokenizer.ggml.model')
    if model is None or model in ('none', 'no_vocab'):
        return None
    t = lambda name, kind, **kw: _meta(header, f'tokenizer.ggml.{name}', kind, **kw)
    tokens = t('tokens', list, required=True)
    if not all(isinstance(s, str) for s in tokens):
        raise header.error('must be an array of strings', 'tokenizer.ggml.tokens')
    arrays = {name: t(name, np.ndarray) for name in ('scores', 'token_type')}
    for name, array in arrays.items():
        if array is not None and array.shape != (len(tokens),):
            raise header.error(f'has {array.shape[0]} entries for {len(tokens)} tokens',
                               f'tokenizer.ggml.{name}')
    defaults = {'bos': 1, 'eos': 2, 'unk': 0} if model == 'llama' else {}
    ids = {name: t(f'{name}_token_id', int, default=defaults.get(name))
           for name in ('bos', 'eos', 'unk', 'padding')}
    try:
        return GGUFTokenizer(
            str(model), tokens, scores=arrays['scores'], token_types=arrays['token_type'],
            merges=t('merges', list, default=None), bos_id=ids['bos'], eos_id=ids['eos'],
            unk_id=ids['unk'], pad_id=ids['padding'],
            add_bos=t('add_bos_token', bool, default=None),
            add_eos=t('add_eos_token', bool, default=False),
            add_space_prefix=t('add_space_prefix', bool, default=None),
            pre=t('pre', str, default=None),
            chat_template=_meta(header, 'tokenizer.chat_template', str, default=None))
    except ValueError as e:
        raise header.error(str(e), 'tokenizer.ggml.model') from None


def _expected_shapes(config: ModelConfig) -> dict:
    d, f, v = config.embed_dim, config.hidden_dim, config.vocab_size
    h = config.effective_head_dim
    nh, kh = config.num_heads * h, config.num_kv_heads * h
    shapes = {'token_embd.weight': (v, d), 'output_norm.weight': (d,), 'output.weight': (v, d)}
    per_layer = {'attn_q': (nh, d), 'attn_k': (kh, d), 'attn_v': (kh, d), 'attn_output': (d, nh),
                 'ffn_gate': (f, d), 'ffn_up': (f, d), 'ffn_down': (d, f), 'attn_norm': (d,),
                 'ffn_norm': (d,)}
    for i in range(config.num_layers):
        shapes.update({f'blk.{i}.{name}.weight': s for name, s in per_layer.items()})
    return shapes


def _tensor_data(path: str, header: GGUFHeader) -> dict:
    """name -> raw memory-mapped data, via gguf.GGUFReader on the validated file."""
    import gguf
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the header already passed read_header; this is a backstop
        raise GGUFError(f'gguf.GGUFReader rejected the file: {e}', path=path) from None
    ours = {t.name: t for t in header.tensors}
    out = {}
    for t in reader.tensors:
        info = ours.get(t.name)
        if info is None or int(t.data_offset) != header.data_offset + info.offset:
            raise GGUFError('gguf.GGUFReader disagrees with the validated header', t.name,
                            path=path)
        out[t.name] = t.data
    return out


def load_gguf(path: str, max_seq_len: Optional[int] = None, param_dtype: str = 'float32',
              quantized: bool = False, validate: bool = False,
              **config_overrides) -> tuple[ModelConfig, dict, Optional[GGUFTokenizer]]:
    """Loads a llama-architecture GGUF model.

    Args:
      path: the .gguf file.
      max_seq_len: overrides `llama.context_length` (it also sizes the decode KV cache).
      param_dtype: dtype of the returned float params ('float32', 'bfloat16', 'float16');
        the config's `param_dtype` is set to it (compute `dtype` too unless overridden).
      quantized: keep every F16/BF16/Q8_0/Q4_0/Q4_K/Q5_K/Q6_K matrix in its encoding, as
        a `quant.QArray` over the memory-mapped file (`gguf.quantized`); layers are then
        unrolled (scan_layers=False). False dequantises everything to `param_dtype`.
      validate: also scan every tensor's data first, like llama.cpp's check_tensors:
        NaN/inf block scales and values raise GGUFError naming the tensor (see
        `validate.py`; ~0.1 s per GB in the page cache).
      **config_overrides: further ModelConfig fields (e.g. attention_impl, scan_layers).

    Returns:
      (config, params, tokenizer): params is the plain param tree of
      `arch.transformer.Transformer(config)` in the standard layout (scanned layers
      stacked on L unless `quantized`); tokenizer is a GGUFTokenizer, or None when the
      file has no vocabulary.

    Raises:
      GGUFError (a ValueError): for any malformed, hostile or unsupported file, naming the
        field and byte offset.
    """
    path = os.fspath(path)
    try:
        buf = np.memmap(path, mode='r') if os.path.getsize(path) else np.zeros(0, np.uint8)
    except OSError as e:
        raise GGUFError(f'cannot open: {e}', path=path) from None
    header = read_header(buf, path)
    overrides = dict(param_dtype=param_dtype, dtype=param_dtype, **config_overrides)
    if quantized:
        overrides['scan_layers'] = False
    if max_seq_len is not None:
        overrides['max_seq_len'] = max_seq_len
    config = config_from_metadata(header, **overrides)
    tokenizer = tokenizer_from_metadata(header)
    if tokenizer is not None and tokenizer.vocab_size != config.vocab_size:
        raise header.error(f'{tokenizer.vocab_size} tokens for vocab_size {config.vocab_size}',
                           'tokenizer.ggml.tokens')
    expected = _expected_shapes(config)
    infos = {t.name: t for t in header.tensors}
    for t in header.tensors:
        if t.name not in expected:
            raise GGUFError('unexpected tensor (unsupported feature, e.g. biases or '
                            'rope_freqs, or a block_count mismatch)', t.name, t.info_offset, path)
        if t.shape != expected[t.name]:
            raise GGUFError(f'shape {t.shape} does not match the metadata ({expected[t.name]})',
                            t.name, t.info_offset, path)
        if t.ggml_type not in dequant.SUPPORTED_TYPES:
            raise GGUFError(f'tensor type {dequant.T(t.ggml_type).name} is not supported; '
                            f'supported: {[q.name for q in dequant.SUPPORTED_TYPES]}',
                            t.name, t.info_offset, path)
    missing = [name for name in expected if name not in infos and name != 'output.weight']
    if missing:
        raise GGUFError(f'missing tensor (and {len(missing) - 1} more)' if len(missing) > 1
                        else 'missing tensor', missing[0], header.data_offset, path)
    if 'output.weight' not in infos and not config.tie_embeddings:
        config = config.replace(tie_embeddings=True)
    if validate:
        check_tensors(buf, header)
    if quantized:
        params = build_quantized_params(path, buf, header, infos, config, unpermute_qk)
    else:
        params = _build_params(_tensor_data(path, header), infos, config)
    return config, params, tokenizer


def _build_params(raw: dict, infos: dict, config: ModelConfig) -> dict:
    """Dequantises straight into the param tree, one float32 copy per tensor.

    Layer weights fill preallocated (L, ...) stacks so a 1.1B model never holds more than
    the numpy tree plus its device copy.
    """
    import jax.numpy as jnp

    d, lc = config.embed_dim, config.num_layers
    n, k, h = config.num_heads, config.num_kv_heads, config.effective_head_dim
    get = lambda name: dequant.dequantize(raw[name], infos[name].ggml_type, infos[name].shape)
    # our path, per-layer GGUF name, torch-layout weight -> our kernel layout
    layer_parts = [
        (('attention', 'q_proj', 'kernel'), 'attn_q',
         lambda w: unpermute_qk(w, n).T.reshape(d, n, h)),
        (('attention', 'k_proj', 'kernel'), 'attn_k',
         lambda w: unpermute_qk(w, k).T.reshape(d, k, h)),
        (('attention', 'v_proj', 'kernel'), 'attn_v', lambda w: w.T.reshape(d, k, h)),
        (('attention', 'o_proj', 'kernel'), 'attn_output', lambda w: w.T.reshape(n, h, d)),
        (('ffn', 'w1', 'kernel'), 'ffn_gate', lambda w: w.T),
        (('ffn', 'w3', 'kernel'), 'ffn_up', lambda w: w.T),
        (('ffn', 'w2', 'kernel'), 'ffn_down', lambda w: w.T),
        (('attn_norm', 'scale'), 'attn_norm', lambda w: w),
        (('ffn_norm', 'scale'), 'ffn_norm', lambda w: w),
    ]
    dtype = config.params_dtype
    embed = get('token_embd.weight')  # (V, D)
    params = {'embedder': {'token_embedding': jnp.asarray(embed, dtype)},
              'final_norm': {'scale': jnp.asarray(get('output_norm.weight'), dtype)}}
    if not config.tie_embeddings:
        head = get('output.weight') if 'output.weight' in infos else embed
        params['embedder']['lm_head'] = jnp.asarray(head.T, dtype)  # (D, V)
    del embed
    for path, part, to_ours in layer_parts:
        stack = None
        for i in range(lc):
            w = to_ours(get(f'blk.{i}.{part}.weight'))
            if stack is None:
                stack = np.empty((lc,) + w.shape, np.float32)
            stack[i] = w
        if config.scan_layers:
            _set(params, ('layers',) + path, jnp.asarray(stack, dtype))
        else:
            for i in range(lc):
                _set(params, (f'layer_{i}',) + path, jnp.asarray(stack[i], dtype))
        del stack
    return params


def _set(tree: dict, path: tuple, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
