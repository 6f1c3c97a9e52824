"""rustgpt_jax: decoder-only transformers in JAX/Flax (see docs/DESIGN.md).

The public API. Configuration, masks and the summary import eagerly (they need only
jax.numpy); the Flax model, `build_model` and the Hugging Face interop load on first use,
so `import rustgpt_jax.data` stays light.
"""

from rustgpt_jax.config import (
    PRESETS,
    Architecture,
    AttentionImpl,
    AttentionVariant,
    FeedForwardType,
    ModelConfig,
    NormPlacement,
    NormType,
    PositionType,
    PrecisionPolicy,
    RematPolicy,
    WindowStrategy,
    mistral_7b,
    mistral_tiny,
    preset,
    rustgpt_baseline,
    rustgpt_modern,
    tinyllama_1_1b,
)
from rustgpt_jax.masks import (
    NO_WINDOW,
    allowed,
    causal_mask,
    make_attention_mask,
    sliding_window_mask,
)
from rustgpt_jax.summary import architecture_summary, kv_cache_bytes_per_token, parameter_counts

_LAZY = {
    'Transformer': ('rustgpt_jax.arch.transformer', 'Transformer'),
    'build_model': ('rustgpt_jax.models', 'build_model'),
    'config_from_hf': ('rustgpt_jax.interop.hf', 'config_from_hf'),
    'params_from_hf': ('rustgpt_jax.interop.hf', 'params_from_hf'),
    'params_to_hf': ('rustgpt_jax.interop.hf', 'params_to_hf'),
    'hf_config_from': ('rustgpt_jax.interop.hf', 'hf_config_from'),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = [
    'Architecture', 'AttentionImpl', 'AttentionVariant', 'FeedForwardType', 'ModelConfig',
    'NO_WINDOW', 'NormPlacement', 'NormType', 'PRESETS', 'PositionType', 'PrecisionPolicy',
    'RematPolicy', 'WindowStrategy', 'allowed', 'architecture_summary', 'causal_mask',
    'kv_cache_bytes_per_token', 'make_attention_mask', 'mistral_7b', 'mistral_tiny',
    'parameter_counts', 'preset', 'rustgpt_baseline', 'rustgpt_modern',
    'sliding_window_mask', 'tinyllama_1_1b', *_LAZY,
]
