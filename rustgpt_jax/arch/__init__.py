"""Architectures beyond the Transformer (SPEC §5), selected by `ModelConfig.architecture`."""

from rustgpt_jax.arch.hrm import HRMLM, parameter_counts_hrm
from rustgpt_jax.arch.hypermixer import (
                                         CausalHyperMixing,
                                         HyperMixerBlock,
                                         HyperMixerLM,
                                         parameter_counts_hypermixer,
)

__all__ = ['CausalHyperMixing', 'HRMLM', 'HyperMixerBlock', 'HyperMixerLM',
           'parameter_counts_hrm', 'parameter_counts_hypermixer']
