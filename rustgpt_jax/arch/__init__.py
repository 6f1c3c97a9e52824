"""The model architectures, selected by `ModelConfig.architecture` (`models.build_model`):
the Transformer, and HyperMixer and HRM (SPEC §5)."""

from rustgpt_jax.arch.hrm import HRMLM, parameter_counts_hrm
from rustgpt_jax.arch.hypermixer import (
    CausalHyperMixing,
    HyperMixerBlock,
    HyperMixerLM,
    parameter_counts_hypermixer,
)
from rustgpt_jax.arch.transformer import Transformer

__all__ = ['CausalHyperMixing', 'HRMLM', 'HyperMixerBlock', 'HyperMixerLM', 'Transformer',
           'parameter_counts_hrm', 'parameter_counts_hypermixer']
