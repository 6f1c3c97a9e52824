"""Architecture summary (SPEC §1): configuration, parameter counts, KV cache, window cost.

Every figure is computed analytically from the ModelConfig (no model is built), so the
summary of a 7B configuration is instant. tests/test_presets.py checks the formulas
against the shapes `jax.eval_shape` gives for the real model.

Parameter formulas are looked up per `Architecture` in `PARAMETER_FORMULAS`; other
architectures add theirs with `register_parameter_formula`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from rustgpt_jax.config import (
    IMPLEMENTATION_FIELDS,
    PRESETS,
    Architecture,
    FeedForwardType,
    ModelConfig,
    NormPlacement,
    NormType,
    PositionType,
)
from rustgpt_jax.param_counts import (
    parameter_counts_hrm,
    parameter_counts_hypermixer,
    transformer_parameter_counts,
)
from rustgpt_jax.runtime import attention as attention_runtime
from rustgpt_jax.runtime.auto import attention_call

# Fields that leave the architecture as published: how it executes
# (config.IMPLEMENTATION_FIELDS), plus dtypes, layer scanning and training settings.
_NOT_ARCHITECTURE = frozenset(IMPLEMENTATION_FIELDS) | {
    'dtype', 'param_dtype', 'scan_layers', 'init_std', 'dropout_rate'}

_DTYPE_BYTES = {'float32': 4, 'bfloat16': 2, 'float16': 2}

PARAMETER_FORMULAS: dict[Architecture, Callable[[ModelConfig], dict]] = {
    Architecture.TRANSFORMER: transformer_parameter_counts,
    Architecture.HYPERMIXER: parameter_counts_hypermixer,
    Architecture.HRM: parameter_counts_hrm,
}


def register_parameter_formula(architecture: Architecture,
                               formula: Callable[[ModelConfig], dict]) -> None:
    """Registers the parameter-count formula of an architecture.

    Args:
      architecture: the Architecture member.
      formula: config -> dict with at least 'total' (and ideally the component keys of
        `transformer_parameter_counts`).
    """
    PARAMETER_FORMULAS[Architecture(architecture)] = formula


def parameter_counts(config: ModelConfig) -> dict:
    """Analytic parameter counts of the model `build_model(config)` builds.

    Raises:
      ValueError: when no formula is registered for `config.architecture`.
    """
    formula = PARAMETER_FORMULAS.get(config.architecture)
    if formula is None:
        raise ValueError(f'no parameter formula registered for ModelConfig.architecture='
                         f'{config.architecture.value!r}; add one with '
                         'register_parameter_formula')
    return formula(config)


def kv_cache_bytes_per_token(config: ModelConfig) -> int:
    """Bytes of K and V cached per token over all layers: 2 * L * K * H * bytes(dtype)."""
    return (2 * config.num_layers * config.num_kv_heads * config.effective_head_dim
            * _DTYPE_BYTES[config.dtype])


def gqa_reduction(config: ModelConfig) -> float:
    """How many times smaller the KV cache is than MHA's (N / K)."""
    return config.num_heads / config.num_kv_heads


def attended_pairs(seq_len: int, window: Optional[int]) -> int:
    """(query, key) pairs a causal mask of `window` keys allows over `seq_len` tokens.

    sum_i min(i + 1, W): W(W+1)/2 for the ramp plus W per later query, so O(N*W) instead
    of the full causal N(N+1)/2 = O(N^2).
    """
    if window is None or window >= seq_len:
        return seq_len * (seq_len + 1) // 2
    return window * (window + 1) // 2 + (seq_len - window) * window


def _identity(config: ModelConfig) -> dict:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if f.name not in _NOT_ARCHITECTURE}


def matching_preset(config: ModelConfig) -> Optional[str]:
    """Name of the preset with the same architecture (ignoring dtypes, remat, kernels)."""
    target = _identity(config)
    for name, build in PRESETS.items():
        if _identity(build()) == target:
            return name
    return None


_PUBLISHED = {
    'mistral_7b': 'Mistral 7B (sliding window)',
    'tinyllama_1_1b': 'TinyLlama-1.1B (LLaMA-2 architecture with GQA)',
    'rustgpt_baseline': 'RustGPT baseline (post-norm Transformer)',
}


def matched_architecture(config: ModelConfig) -> str:
    """The published architecture `config` matches, or 'custom (...)' with the reasons."""
    if config.architecture != Architecture.TRANSFORMER:
        return {Architecture.HRM: 'HRM (hierarchical reasoning model)',
                Architecture.HYPERMIXER: 'HyperMixer'}[config.architecture]
    preset = matching_preset(config)
    if preset in _PUBLISHED:
        return _PUBLISHED[preset]
    modern = (config.norm == NormType.RMS_NORM and config.feed_forward == FeedForwardType.SWIGLU
              and config.positions == PositionType.ROPE and not config.use_bias
              and config.norm_placement == NormPlacement.PRE)
    baseline = (config.norm == NormType.LAYER_NORM and config.feed_forward == FeedForwardType.RELU
                and config.positions == PositionType.LEARNED and config.use_bias)
    if modern:
        if config.static_window is not None and config.static_window < config.max_seq_len:
            return 'Mistral-style (sliding window' + (', GQA)' if _is_gqa(config) else ')')
        if config.num_kv_heads == 1:
            return 'LLaMA-style with MQA'
        return 'LLaMA-2 with GQA' if _is_gqa(config) else 'LLaMA'
    if baseline and config.static_window is None:
        if config.norm_placement == NormPlacement.POST:
            return 'RustGPT baseline (post-norm Transformer)'
        return 'GPT-2-style baseline (pre-norm, LayerNorm, learned positions)'
    return 'custom (' + ', '.join(_differences(config)) + ')'


def _is_gqa(config: ModelConfig) -> bool:
    return config.num_kv_heads < config.num_heads


def _differences(config: ModelConfig) -> list[str]:
    return [f'{name}={getattr(config, name).value}' for name in
            ('norm', 'feed_forward', 'positions', 'norm_placement')] + [
            f'use_bias={config.use_bias}']


def _fmt(n: int) -> str:
    return f'{n:,}'


def architecture_summary(config: ModelConfig) -> str:
    """A multi-line text summary of `config` (SPEC §1).

    Lists the configuration, parameter counts per component (per layer and total), KV
    cache bytes per token with the GQA reduction vs MHA, window/complexity figures at
    `max_seq_len`, the published architecture the configuration matches, and which
    attention implementation runs on this process's backend, and why.
    """
    c = config
    lines = [f'Architecture: {matched_architecture(c)}'
             + (f'  [preset {matching_preset(c)}]' if matching_preset(c) else ''),
             '', 'Configuration:']
    for name in ('architecture', 'vocab_size', 'embed_dim', 'hidden_dim', 'num_layers',
                 'num_heads', 'num_kv_heads', 'max_seq_len', 'norm', 'feed_forward',
                 'positions', 'norm_placement', 'use_bias', 'tie_embeddings',
                 'window_strategy', 'window_size', 'attention_variant', 'dtype',
                 'param_dtype'):
        value = getattr(c, name)
        lines.append(f'  {name:<18} {value.value if hasattr(value, "value") else value}')
    lines.append(f'  {"head_dim":<18} {c.effective_head_dim}')
    if c.positions == PositionType.ROPE:
        lines.append(f'  {"rope_base":<18} {c.rope_base:g}')

    lines += ['', 'Parameters:']
    try:
        counts = parameter_counts(c)
    except ValueError as err:
        lines.append(f'  (unavailable: {err})')
    else:
        per_layer = counts.get('per_layer', {})
        order = ('embedding', 'positions', 'attention', 'feed_forward', 'norms', 'head')
        extra_keys = [k for k in counts if k not in order + ('total', 'per_layer')]
        for key in order[:-1] + tuple(extra_keys) + order[-1:]:
            if key in counts:
                extra = (f'   ({_fmt(per_layer[key])} per layer)' if key in per_layer else '')
                lines.append(f'  {key:<18} {_fmt(counts[key]):>16}{extra}')
        if 'total' in per_layer:
            lines.append(f'  {"per layer":<18} {_fmt(per_layer["total"]):>16}')
        lines.append(f'  {"total":<18} {_fmt(counts["total"]):>16}')

    if c.architecture == Architecture.HYPERMIXER:
        lines += ['', 'Decode state:',
                  '  HyperMixer keeps a running prefix sum per layer (no KV cache): '
                  f'{_fmt(c.num_layers * (c.hypermixer_hidden_dim or c.hidden_dim) * c.embed_dim)}'
                  ' floats per sequence, constant in length; token mixing spans the whole '
                  'prefix (the window does not apply)']
        return '\n'.join(lines)
    cached_layers = c.num_layers
    if c.architecture == Architecture.HRM:
        # Every application of L and H keeps its own cache (N*T*low + N*high layers).
        cached_layers = (c.hrm_cycles * c.hrm_steps * c.hrm_low_layers
                         + c.hrm_cycles * c.hrm_high_layers)
        lines += ['', f'HRM: N={c.hrm_cycles} cycles x T={c.hrm_steps} low-level steps; '
                  f'L has {c.hrm_low_layers} block(s), H has {c.hrm_high_layers}; '
                  f'{cached_layers} cached layer applications per token']
    per_token = kv_cache_bytes_per_token(c) // c.num_layers * cached_layers
    mha = per_token * c.num_heads // c.num_kv_heads
    kind = ('MHA' if c.num_kv_heads == c.num_heads
            else 'MQA' if c.num_kv_heads == 1 else 'GQA')
    lines += ['', f'KV cache ({c.dtype}):',
              f'  bytes per token    {_fmt(per_token)} (2 x L={cached_layers} x K={c.num_kv_heads}'
              f' x H={c.effective_head_dim} x {_DTYPE_BYTES[c.dtype]} B)',
              f'  MHA equivalent     {_fmt(mha)} bytes per token; {kind} reduction '
              f'{gqa_reduction(c):g}x',
              f'  slots per sequence {_fmt(c.cache_length)} -> '
              f'{_fmt(c.cache_length * per_token)} bytes per sequence']

    # Described for the longest sequence the model takes (AUTO's CPU choice depends on T).
    call = dataclasses.replace(attention_call(c), length=c.max_seq_len)
    full_impl, step_impl = attention_runtime.describe(c.attention_impl, call)
    lines += ['', 'Attention implementation:',
              f'  full sequences     {full_impl}', f'  decode step        {step_impl}']

    n, w = c.max_seq_len, c.static_window
    full = attended_pairs(n, None)
    lines += ['', f'Attention cost at max_seq_len={_fmt(n)}:']
    if w is None or w >= n:
        lines.append(f'  full causal: O(N^2), {_fmt(full)} (query, key) pairs')
    else:
        pairs = attended_pairs(n, w)
        lines += [f'  window W={_fmt(w)}: O(N*W), {_fmt(pairs)} (query, key) pairs',
                  f'  full causal: O(N^2), {_fmt(full)} pairs -> {full / pairs:.2f}x less '
                  f'attention work (N/W = {n / w:g}), KV cache O(W)']
    return '\n'.join(lines)
