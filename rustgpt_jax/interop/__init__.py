"""Weights from elsewhere (SPEC §6): Hugging Face Llama/Mistral checkpoints."""

from rustgpt_jax.interop.hf import config_from_hf, hf_config_from, params_from_hf, params_to_hf

__all__ = ['config_from_hf', 'hf_config_from', 'params_from_hf', 'params_to_hf']
