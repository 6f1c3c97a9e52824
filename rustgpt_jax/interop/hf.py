"""Hugging Face LlamaForCausalLM / MistralForCausalLM <-> rustgpt_jax.

`load_pretrained(directory)` / `save_pretrained(directory, config, params, tokenizer)` read
and write whole model directories (file formats in `interop.hf_files`); the functions
below them map one config and one state dict.

Both families are the modern stack of SPEC §1 (RMSNorm, SwiGLU, RoPE, no bias, pre-norm,
GQA), so a checkpoint maps onto `ModelConfig` one field at a time. Our RoPE uses HF's
rotate-half layout (channel i pairs with i + H/2), so q/k weights load unpermuted.

Window convention: transformers 5.x masks with `kv_idx > q_idx - sliding_window`
(masking_utils.sliding_window_overlay), i.e. `i - j < W`, which is SPEC's convention, so
`sliding_window` maps to `window_size` unchanged (checked by tests/test_hf_parity.py).

Weight layouts (torch Linear stores (out, in); ours is (in, *out)):
  q_proj.weight (N*H, D) -> attention.q_proj.kernel (D, N, H)
  k_proj / v_proj (K*H, D) -> (D, K, H)
  o_proj.weight (D, N*H) -> attention.o_proj.kernel (N, H, D)
  mlp.gate_proj / up_proj (F, D) -> ffn.w1 / ffn.w3 (D, F); down_proj (D, F) -> ffn.w2 (F, D)
  embed_tokens (V, D) -> embedder.token_embedding (V, D); lm_head (V, D) -> embedder.lm_head (D, V)
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import flax
import numpy as np

from rustgpt_jax.config import (
    Architecture,
    AttentionVariant,
    FeedForwardType,
    ModelConfig,
    NormPlacement,
    NormType,
    PositionType,
    WindowStrategy,
)
from rustgpt_jax.data.instructions import chat_template_of
from rustgpt_jax.interop import hf_files

_MODEL_TYPES = ('llama', 'mistral')
_ARCHITECTURES = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM'}
# Non-persistent buffers some older checkpoints still carry; they hold no weights.
_IGNORED_SUFFIXES = ('rotary_emb.inv_freq',)


def _get(hf_config, name: str, default=None):
    if isinstance(hf_config, Mapping):
        return hf_config.get(name, default)
    return getattr(hf_config, name, default)


def _rope_base(hf_config) -> float:
    """rope_theta from transformers 5.x `rope_parameters` or 4.x `rope_theta`/`rope_scaling`."""
    params = _get(hf_config, 'rope_parameters')
    scaling = _get(hf_config, 'rope_scaling')
    if isinstance(params, Mapping) and any(isinstance(v, Mapping) for v in params.values()):
        raise ValueError('HF config: per-layer-type rope_parameters are not supported, got '
                         f'{dict(params)!r}')
    for source in (params, scaling):
        if isinstance(source, Mapping):
            rope_type = source.get('rope_type', source.get('type', 'default'))
            if rope_type != 'default':
                raise ValueError(f'HF config: rope scaling {rope_type!r} is not supported '
                                 '(only plain RoPE, rope_type="default")')
            if source.get('partial_rotary_factor', 1.0) != 1.0:
                raise ValueError('HF config: partial_rotary_factor != 1 is not supported')
    if isinstance(params, Mapping) and params.get('rope_theta') is not None:
        return float(params['rope_theta'])
    theta = _get(hf_config, 'rope_theta')
    return 10000.0 if theta is None else float(theta)


def config_from_hf(hf_config, **overrides) -> ModelConfig:
    """ModelConfig of a Hugging Face Llama or Mistral config.

    Args:
      hf_config: a `transformers` LlamaConfig / MistralConfig, or its `config.json` dict.
      **overrides: ModelConfig fields to set afterwards (e.g. a shorter `max_seq_len`,
        which also sizes the KV cache of a model without a window).

    Returns:
      The equivalent ModelConfig.

    Raises:
      ValueError: for a model type or feature this package does not implement.
    """
    model_type = _get(hf_config, 'model_type')
    if model_type not in _MODEL_TYPES:
        raise ValueError(f'HF config: model_type {model_type!r} is not supported; '
                         f'expected one of {_MODEL_TYPES}')
    act = _get(hf_config, 'hidden_act', 'silu')
    if act != 'silu':
        raise ValueError(f'HF config: hidden_act {act!r} is not supported (SwiGLU needs "silu")')
    for flag in ('attention_bias', 'mlp_bias'):
        if _get(hf_config, flag, False):
            raise ValueError(f'HF config: {flag}=True is not supported (no-bias models only)')
    layer_types = _get(hf_config, 'layer_types')
    if layer_types and len(set(layer_types)) > 1:
        raise ValueError(f'HF config: mixed layer_types {sorted(set(layer_types))} are not '
                         'supported (one window for every layer)')
    window = _get(hf_config, 'sliding_window') if model_type == 'mistral' else None
    heads = int(_get(hf_config, 'num_attention_heads'))
    kv_heads = _get(hf_config, 'num_key_value_heads')
    head_dim = _get(hf_config, 'head_dim')
    fields = dict(
        vocab_size=int(_get(hf_config, 'vocab_size')),
        embed_dim=int(_get(hf_config, 'hidden_size')),
        hidden_dim=int(_get(hf_config, 'intermediate_size')),
        num_layers=int(_get(hf_config, 'num_hidden_layers')),
        num_heads=heads,
        num_kv_heads=heads if kv_heads is None else int(kv_heads),
        head_dim=None if head_dim is None else int(head_dim),
        max_seq_len=int(_get(hf_config, 'max_position_embeddings', 2048)),
        norm=NormType.RMS_NORM, norm_eps=float(_get(hf_config, 'rms_norm_eps', 1e-6)),
        feed_forward=FeedForwardType.SWIGLU, positions=PositionType.ROPE,
        rope_base=_rope_base(hf_config), use_bias=False, norm_placement=NormPlacement.PRE,
        tie_embeddings=bool(_get(hf_config, 'tie_word_embeddings', False)),
        window_size=None if window is None else int(window))
    fields.update(overrides)
    return ModelConfig(**fields)


def _check_hf_compatible(config: ModelConfig):
    """Raises ValueError naming the first field with no Llama/Mistral equivalent."""
    required = {
        'architecture': Architecture.TRANSFORMER, 'norm': NormType.RMS_NORM,
        'feed_forward': FeedForwardType.SWIGLU, 'positions': PositionType.ROPE,
        'norm_placement': NormPlacement.PRE, 'use_bias': False,
        'window_strategy': WindowStrategy.FIXED,
        'attention_variant': AttentionVariant.STANDARD,
    }
    for name, value in required.items():
        if getattr(config, name) != value:
            shown = value.value if hasattr(value, 'value') else value
            raise ValueError(f'ModelConfig.{name}={getattr(config, name)!r} has no Hugging Face '
                             f'Llama/Mistral equivalent (needs {shown!r})')


def hf_config_from(config: ModelConfig):
    """The `transformers` config of `config`: MistralConfig when windowed, else LlamaConfig.

    Args:
      config: an HF-compatible ModelConfig (RMSNorm, SwiGLU, RoPE, pre-norm, no bias,
        fixed window, standard attention).

    Returns:
      transformers.LlamaConfig or transformers.MistralConfig.
    """
    _check_hf_compatible(config)
    import transformers
    common = dict(
        vocab_size=config.vocab_size, hidden_size=config.embed_dim,
        intermediate_size=config.hidden_dim, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        head_dim=config.effective_head_dim, max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps, tie_word_embeddings=config.tie_embeddings,
        hidden_act='silu',
        rope_parameters={'rope_type': 'default', 'rope_theta': float(config.rope_base)})
    if config.window_size is not None:
        return transformers.MistralConfig(sliding_window=config.window_size, **common)
    return transformers.LlamaConfig(attention_bias=False, mlp_bias=False, **common)


def _to_numpy(tensor) -> np.ndarray:
    """A torch tensor (any dtype, incl. bfloat16) or array-like as a numpy array."""
    if hasattr(tensor, 'detach'):  # torch: numpy() has no bfloat16, go through float32
        tensor = tensor.detach().cpu()
        if not tensor.dtype.is_floating_point or tensor.dtype.itemsize < 4:
            tensor = tensor.float()
        return tensor.numpy()
    return np.asarray(tensor)


def _hf_shapes(config: ModelConfig) -> dict[str, tuple]:
    """Expected HF tensor shapes, per-layer names with the `{i}` placeholder."""
    d, f, v = config.embed_dim, config.hidden_dim, config.vocab_size
    n, k, h = config.num_heads, config.num_kv_heads, config.effective_head_dim
    layer = 'model.layers.{i}.'
    return {
        'model.embed_tokens.weight': (v, d),
        'model.norm.weight': (d,),
        'lm_head.weight': (v, d),
        layer + 'self_attn.q_proj.weight': (n * h, d),
        layer + 'self_attn.k_proj.weight': (k * h, d),
        layer + 'self_attn.v_proj.weight': (k * h, d),
        layer + 'self_attn.o_proj.weight': (d, n * h),
        layer + 'mlp.gate_proj.weight': (f, d),
        layer + 'mlp.up_proj.weight': (f, d),
        layer + 'mlp.down_proj.weight': (d, f),
        layer + 'input_layernorm.weight': (d,),
        layer + 'post_attention_layernorm.weight': (d,),
    }


def _layer_from_hf(get, i: int, config: ModelConfig) -> dict:
    """One block's params (ours) from HF tensors of layer i."""
    d = config.embed_dim
    n, k, h = config.num_heads, config.num_kv_heads, config.effective_head_dim
    p = f'model.layers.{i}.'
    return {
        'attention': {
            'q_proj': {'kernel': get(p + 'self_attn.q_proj.weight').T.reshape(d, n, h)},
            'k_proj': {'kernel': get(p + 'self_attn.k_proj.weight').T.reshape(d, k, h)},
            'v_proj': {'kernel': get(p + 'self_attn.v_proj.weight').T.reshape(d, k, h)},
            'o_proj': {'kernel': get(p + 'self_attn.o_proj.weight').T.reshape(n, h, d)},
        },
        'ffn': {
            'w1': {'kernel': get(p + 'mlp.gate_proj.weight').T},
            'w3': {'kernel': get(p + 'mlp.up_proj.weight').T},
            'w2': {'kernel': get(p + 'mlp.down_proj.weight').T},
        },
        'attn_norm': {'scale': get(p + 'input_layernorm.weight')},
        'ffn_norm': {'scale': get(p + 'post_attention_layernorm.weight')},
    }


def _stack(trees: list) -> Any:
    if isinstance(trees[0], dict):
        return {key: _stack([t[key] for t in trees]) for key in trees[0]}
    return np.stack(trees)


def params_from_hf(state_dict: Mapping[str, Any], config: ModelConfig) -> dict:
    """Params of `Transformer(config)` from a Llama/Mistral state dict.

    Args:
      state_dict: name -> torch tensor or numpy array, as from `model.state_dict()` or a
        safetensors file; names may lack the `model.` prefix (a bare LlamaModel).
      config: the ModelConfig (e.g. from `config_from_hf`). When `lm_head.weight` is
        missing the head is the embedding table (tied); with `config.tie_embeddings` a
        present `lm_head.weight` is ignored.

    Returns:
      A plain (unboxed) param tree of jax arrays in `config.param_dtype`, with layers
      stacked on a leading L axis under 'layers' when `config.scan_layers`, else
      under 'layer_{i}'. Use as `Transformer(config).apply({'params': params}, tokens)`.

    Raises:
      ValueError: on an incompatible config, a missing or unexpected tensor, or a shape
        mismatch (naming the tensor and both shapes).
    """
    import jax.numpy as jnp

    _check_hf_compatible(config)
    tensors = {}
    for name, value in state_dict.items():
        full = name if name.startswith(('model.', 'lm_head.')) else 'model.' + name
        tensors[full] = value
    shapes = _hf_shapes(config)
    expected = {name.format(i=i): shape for name, shape in shapes.items()
                for i in range(config.num_layers)}
    if 'lm_head.weight' not in tensors:
        expected.pop('lm_head.weight')
    unexpected = sorted(name for name in tensors
                        if name not in expected and not name.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        raise ValueError(f'HF state dict: unexpected tensors (unsupported feature or a '
                         f'config mismatch, e.g. num_layers): {unexpected[:8]}'
                         + (' ...' if len(unexpected) > 8 else ''))
    missing = sorted(name for name in expected if name not in tensors)
    if missing:
        raise ValueError(f'HF state dict: missing tensor {missing[0]!r}'
                         + (f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''))

    def get(name):
        array = _to_numpy(tensors[name])
        if array.shape != expected[name]:
            raise ValueError(f'HF state dict: tensor {name!r} has shape {tuple(array.shape)}, '
                             f'expected {expected[name]} for this ModelConfig')
        return array.astype(np.float32)

    embed = get('model.embed_tokens.weight')
    embedder = {'token_embedding': embed}
    if not config.tie_embeddings:
        has_head = 'lm_head.weight' in tensors
        embedder['lm_head'] = (get('lm_head.weight') if has_head else embed).T
    params = {'embedder': embedder, 'final_norm': {'scale': get('model.norm.weight')}}
    layers = [_layer_from_hf(get, i, config) for i in range(config.num_layers)]
    if config.scan_layers:
        params['layers'] = _stack(layers)
    else:
        params.update({f'layer_{i}': layer for i, layer in enumerate(layers)})
    dtype = config.params_dtype
    params = _map_tree(lambda a: jnp.asarray(a, dtype), params)
    return params


def _paths(tree, prefix=()):
    """Key paths of a nested dict's leaves."""
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _paths(value, prefix + (key,))
    else:
        yield prefix


def _map_tree(fn, tree):
    if isinstance(tree, Mapping):
        return {key: _map_tree(fn, value) for key, value in tree.items()}
    return fn(tree)


def params_to_hf(params: Mapping[str, Any], config: ModelConfig) -> dict[str, np.ndarray]:
    """The inverse of `params_from_hf`: a LlamaForCausalLM/MistralForCausalLM state dict.

    Args:
      params: the param tree of `Transformer(config)` (boxed or plain arrays).
      config: its HF-compatible ModelConfig.

    Returns:
      name -> float32 numpy array, including `lm_head.weight` (the embedding table when
      tied), so `model.load_state_dict(..., strict=True)` accepts it after
      `torch.from_numpy`.
    """
    _check_hf_compatible(config)
    params = flax.core.meta.unbox(params)
    if any(name in str(path) for path in _paths(params) for name in ('qkv_proj', 'w13')):
        raise ValueError('params_to_hf: these params are in the packed layout; export the '
                         'standard layout (nn.packing.unpack_projections(config, params))')
    np32 = lambda a: np.asarray(a, np.float32)
    d, lc = config.embed_dim, config.num_layers
    embedder = params['embedder']
    embed = np32(embedder['token_embedding'])
    head = embed if config.tie_embeddings else np32(embedder['lm_head']).T
    out = {'model.embed_tokens.weight': embed, 'lm_head.weight': head,
           'model.norm.weight': np32(params['final_norm']['scale'])}
    stacked = _map_tree(np32, params['layers']) if config.scan_layers else None
    for i in range(lc):
        layer = (_map_tree(lambda a: a[i], stacked) if config.scan_layers
                 else _map_tree(np32, params[f'layer_{i}']))
        attn, ffn, p = layer['attention'], layer['ffn'], f'model.layers.{i}.'
        for proj in ('q_proj', 'k_proj', 'v_proj'):
            kernel = attn[proj]['kernel']  # (D, N or K, H)
            out[p + f'self_attn.{proj}.weight'] = kernel.reshape(d, -1).T
        out[p + 'self_attn.o_proj.weight'] = attn['o_proj']['kernel'].reshape(-1, d).T
        out[p + 'mlp.gate_proj.weight'] = ffn['w1']['kernel'].T
        out[p + 'mlp.up_proj.weight'] = ffn['w3']['kernel'].T
        out[p + 'mlp.down_proj.weight'] = ffn['w2']['kernel'].T
        out[p + 'input_layernorm.weight'] = layer['attn_norm']['scale']
        out[p + 'post_attention_layernorm.weight'] = layer['ffn_norm']['scale']
    # Writable and C-contiguous, so torch.from_numpy takes them without a warning.
    return {name: np.require(value, requirements=['C', 'W']) for name, value in out.items()}


def config_json(config: ModelConfig, bos_id: Optional[int] = None,
                eos_id: Optional[int] = None, pad_id: Optional[int] = None) -> dict:
    """The `config.json` of `config` (transformers 5.x layout), written without transformers.

    Args:
      config: an HF-compatible ModelConfig; MistralForCausalLM when windowed, else Llama.
      bos_id, eos_id, pad_id: the tokenizer's special ids (None when it has none).
    """
    _check_hf_compatible(config)
    model_type = 'mistral' if config.window_size is not None else 'llama'
    out = {
        'architectures': [_ARCHITECTURES[model_type]], 'model_type': model_type,
        'vocab_size': config.vocab_size, 'hidden_size': config.embed_dim,
        'intermediate_size': config.hidden_dim, 'num_hidden_layers': config.num_layers,
        'num_attention_heads': config.num_heads, 'num_key_value_heads': config.num_kv_heads,
        'head_dim': config.effective_head_dim, 'max_position_embeddings': config.max_seq_len,
        'rms_norm_eps': config.norm_eps, 'tie_word_embeddings': config.tie_embeddings,
        'hidden_act': 'silu', 'attention_dropout': 0.0, 'initializer_range': config.init_std,
        'rope_parameters': {'rope_type': 'default', 'rope_theta': float(config.rope_base)},
        'bos_token_id': bos_id, 'eos_token_id': eos_id, 'pad_token_id': pad_id,
        'dtype': 'float32', 'use_cache': True}
    if model_type == 'mistral':
        out['sliding_window'] = config.window_size
    else:
        out.update(attention_bias=False, mlp_bias=False)
    return out


def load_pretrained(directory: str, **overrides):
    """(config, params, tokenizer) of a Hugging Face Llama / Mistral model directory.

    Args:
      directory: holds config.json, model.safetensors (or model.safetensors.index.json
        and its shards) and, optionally, tokenizer.json (+ tokenizer_config.json,
        chat_template.jinja).
      **overrides: ModelConfig fields to set (e.g. `max_seq_len`, `param_dtype`).

    Returns:
      (ModelConfig, plain param tree in the standard layout, data.HFTokenizer or None).

    Raises:
      ValueError: a missing file, or a field this package does not implement (named:
        architectures, model_type, rope scaling, attention_bias, ...).
    """
    directory = os.fspath(directory)
    config_path = os.path.join(directory, hf_files.CONFIG_JSON)
    values = hf_files.read_json(config_path)
    architectures = values.get('architectures') or []
    unknown = [a for a in architectures if a not in _ARCHITECTURES.values()]
    if unknown:
        raise ValueError(f'{config_path}: architectures {unknown} are not supported; expected '
                         f'one of {sorted(_ARCHITECTURES.values())}')
    try:
        config = config_from_hf(values, **overrides)
    except ValueError as e:
        raise ValueError(f'{config_path}: {e}') from None
    params = params_from_hf(hf_files.read_state_dict(directory), config)
    tokenizer = hf_files.read_tokenizer(directory)
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f'{directory}: the tokenizer has {tokenizer.vocab_size} ids, '
                         f'vocab_size is {config.vocab_size}')
    return config, params, tokenizer


def save_pretrained(directory: str, config: ModelConfig, params, tokenizer=None) -> str:
    """Writes a model directory `transformers.AutoModelForCausalLM.from_pretrained` loads.

    Args:
      directory: created if missing.
      config: an HF-compatible ModelConfig.
      params: its param tree (boxed or plain).
      tokenizer: None (model files only), one of ours (char, word, bpe: exported as a
        `tokenizers` JSON with PROMPT_TEMPLATE as the chat template) or an HFTokenizer.

    Returns:
      `directory`.

    Raises:
      ValueError: a ModelConfig field with no Llama/Mistral equivalent, or a tokenizer
        kind with no `tokenizers` mapping (named).
    """
    directory = os.fspath(directory)
    _check_hf_compatible(config)
    os.makedirs(directory, exist_ok=True)
    state = params_to_hf(params, config)
    if config.tie_embeddings:  # transformers ties it to the embedding table on load
        state.pop('lm_head.weight')
    ids = {}
    if tokenizer is not None:
        hf_files.write_tokenizer(directory, tokenizer, chat_template_of(tokenizer),
                                 config.max_seq_len)
        ids = dict(bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    hf_files.write_json(os.path.join(directory, hf_files.CONFIG_JSON), config_json(config, **ids))
    hf_files.write_weights(directory, state)
    return directory
