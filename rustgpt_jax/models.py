"""`build_model(config)`: the one place that dispatches on `Architecture`."""

from __future__ import annotations

import flax.linen as nn

from rustgpt_jax.config import Architecture, ModelConfig


def build_model(config: ModelConfig) -> nn.Module:
    """Returns the Flax module for `config.architecture`.

    Every architecture is called as `model.apply(variables, tokens, positions=None,
    segment_ids=None, deterministic=True, decode=False)` and returns float32 logits
    (B, T, V).
    """
    arch = config.architecture
    if arch == Architecture.TRANSFORMER:
        from rustgpt_jax.nn.transformer import Transformer
        return Transformer(config)
    if arch == Architecture.HYPERMIXER:
        from rustgpt_jax.arch.hypermixer import HyperMixerLM
        return HyperMixerLM(config)
    if arch == Architecture.HRM:
        from rustgpt_jax.arch.hrm import HRMLM
        return HRMLM(config)
    raise ValueError(f'unknown architecture {arch!r}')  # pragma: no cover
