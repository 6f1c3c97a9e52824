"""Token (and optional learned position) embeddings, and the output head."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from rustgpt_jax.kernels import cpu_gemv
from rustgpt_jax.nn import axes


class Embedder(nn.Module):
    """Embeds tokens; with `tie_embeddings` also decodes with the transposed table.

    `matvec_impl` ('xla' or 'cpu_gemv', `ModelConfig.matvec_impl`): with 'cpu_gemv' the
    output head of at most `kernels.cpu_gemv.MAX_ROWS` float32 rows (decode steps) runs
    through that kernel, reading the (D, V) head or the tied (V, D) table in place.
    """
    vocab_size: int
    embed_dim: int
    max_seq_len: int
    learned_positions: bool = False
    tie_embeddings: bool = False
    init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    matvec_impl: str = 'xla'

    def setup(self):
        init = nn.initializers.normal(self.init_std)
        self.token_embedding = self.param(
            'token_embedding', nn.with_logical_partitioning(init, (axes.VOCAB, axes.EMBED)),
            (self.vocab_size, self.embed_dim), self.param_dtype)
        if self.learned_positions:
            self.position_embedding = self.param(
                'position_embedding',
                nn.with_logical_partitioning(init, (axes.LENGTH, axes.EMBED)),
                (self.max_seq_len, self.embed_dim), self.param_dtype)
        if not self.tie_embeddings:
            self.lm_head = self.param(
                'lm_head', nn.with_logical_partitioning(init, (axes.EMBED, axes.VOCAB)),
                (self.embed_dim, self.vocab_size), self.param_dtype)

    def encode(self, tokens, positions):
        """Args: tokens (B, T) int32; positions (B, T) int32. Returns (B, T, D)."""
        x = jnp.take(self.token_embedding, tokens, axis=0)  # (B, T, D)
        if self.learned_positions:
            # Padding carries negative positions: clip, the mask hides those tokens anyway.
            pos = jnp.clip(positions, 0, self.max_seq_len - 1)
            x = x + jnp.take(self.position_embedding, pos, axis=0)
        return x.astype(self.dtype)

    def decode(self, x):
        """Args: x (B, T, D). Returns float32 logits (B, T, V)."""
        x = x.astype(self.dtype)
        rows = math.prod(x.shape[:-1])
        # The tied (V, D) table is output-major, the (D, V) head input-major.
        table = self.token_embedding if self.tie_embeddings else self.lm_head
        if cpu_gemv.applies(self.matvec_impl, rows, x, table):
            y = cpu_gemv.gemv(x.reshape(rows, -1), table, not self.tie_embeddings)
            return y.reshape(x.shape[:-1] + (-1,))
        logits = jnp.einsum('BTD,VD->BTV' if self.tie_embeddings else 'BTD,DV->BTV', x,
                            table.astype(self.dtype), preferred_element_type=jnp.float32)
        return logits.astype(jnp.float32)

    def __call__(self, tokens, positions):
        return self.encode(tokens, positions)
