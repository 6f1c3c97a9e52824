"""Flax Linen layers of rustgpt_jax (the models that stack them are in `arch`)."""

from rustgpt_jax.nn.attention import Attention
from rustgpt_jax.nn.block import Block
from rustgpt_jax.nn.embedder import Embedder
from rustgpt_jax.nn.feed_forward import ReluFeedForward, SwiGLU
from rustgpt_jax.nn.norms import LayerNorm, RMSNorm
from rustgpt_jax.nn.rope import apply_rope, rope_frequencies

__all__ = ['Attention', 'Block', 'Embedder', 'LayerNorm', 'RMSNorm', 'ReluFeedForward',
           'SwiGLU', 'apply_rope', 'rope_frequencies']
