"""Pallas attention kernels: fused training attention and single-token decode."""

from rustgpt_jax.kernels.decode import flash_decode
from rustgpt_jax.kernels.flash_attention import BlockSizes, flash_attention

__all__ = ['BlockSizes', 'flash_attention', 'flash_decode']
