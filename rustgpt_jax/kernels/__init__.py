"""Pallas attention kernels (fused training attention and single-token decode) and, in
`kernels.cpu_gemv`, an XLA FFI matrix-vector kernel for CPU decode steps."""

from rustgpt_jax.kernels.decode import flash_decode
from rustgpt_jax.kernels.flash_attention import BlockSizes, flash_attention

__all__ = ['BlockSizes', 'flash_attention', 'flash_decode']
