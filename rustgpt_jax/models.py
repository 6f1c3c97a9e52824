"""`build_model(config, execution)`: the one place that dispatches on `Architecture`."""

from __future__ import annotations

import flax.linen as nn

from rustgpt_jax.arch.hrm import HRMLM
from rustgpt_jax.arch.hypermixer import HyperMixerLM
from rustgpt_jax.arch.transformer import Transformer
from rustgpt_jax.config import Architecture, ModelConfig
from rustgpt_jax.runtime.execution import Execution


def build_model(config: ModelConfig, execution: Execution = Execution()) -> nn.Module:
    """Returns the Flax module for `config.architecture`, executing as `execution`.

    Every architecture is called as `model.apply(variables, tokens, positions=None,
    segment_ids=None, deterministic=True, decode=False)` and returns float32 logits
    (B, T, V). `execution` (`runtime.Execution`) picks the parameter layout and the
    product kernels; every value computes the same function.
    """
    arch = config.architecture
    if arch == Architecture.TRANSFORMER:
        return Transformer(config, execution)
    if arch == Architecture.HYPERMIXER:
        return HyperMixerLM(config, execution)
    if arch == Architecture.HRM:
        return HRMLM(config, execution)
    raise ValueError(f'unknown architecture {arch!r}')  # pragma: no cover
