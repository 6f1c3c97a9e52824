"""Weights from elsewhere (SPEC §6): Hugging Face Llama/Mistral checkpoints and directories."""

from rustgpt_jax.interop.hf import (
    config_from_hf,
    config_json,
    hf_config_from,
    load_pretrained,
    params_from_hf,
    params_to_hf,
    save_pretrained,
)

__all__ = ['config_from_hf', 'config_json', 'hf_config_from', 'load_pretrained',
           'params_from_hf', 'params_to_hf', 'save_pretrained']
