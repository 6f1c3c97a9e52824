"""Pallas attention kernels: fused training attention and single-token decode."""

from rustgpt_jax.kernels.decode import flash_decode
from rustgpt_jax.kernels.flash_attention import flash_attention

__all__ = ['flash_attention', 'flash_decode']
