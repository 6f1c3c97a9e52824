"""Token (and optional learned position) embeddings, and the output head."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from rustgpt_jax import axes
from rustgpt_jax.nn.weights import weight
from rustgpt_jax.runtime import products
from rustgpt_jax.runtime.execution import Execution


class Embedder(nn.Module):
    """Embeds tokens; with `tie_embeddings` also decodes with the transposed table.

    The head's product is `runtime.products.logits` under `execution`.
    """
    vocab_size: int
    embed_dim: int
    max_seq_len: int
    learned_positions: bool = False
    tie_embeddings: bool = False
    init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    execution: Execution = Execution()

    def setup(self):
        init = nn.initializers.normal(self.init_std)
        self.token_embedding = weight(  # float, or a quantized QArray (runtime.products)
            self, 'token_embedding', nn.with_logical_partitioning(init, (axes.VOCAB, axes.EMBED)),
            (self.vocab_size, self.embed_dim), self.param_dtype)
        if self.learned_positions:
            self.position_embedding = self.param(
                'position_embedding',
                nn.with_logical_partitioning(init, (axes.LENGTH, axes.EMBED)),
                (self.max_seq_len, self.embed_dim), self.param_dtype)
        if not self.tie_embeddings:
            self.lm_head = weight(
                self, 'lm_head', nn.with_logical_partitioning(init, (axes.EMBED, axes.VOCAB)),
                (self.embed_dim, self.vocab_size), self.param_dtype)

    def encode(self, tokens, positions):
        """Args: tokens (B, T) int32; positions (B, T) int32. Returns (B, T, D)."""
        x = products.lookup(self.token_embedding, tokens)  # (B, T, D)
        if self.learned_positions:
            # Padding carries negative positions: clip, the mask hides those tokens anyway.
            pos = jnp.clip(positions, 0, self.max_seq_len - 1)
            x = x + jnp.take(self.position_embedding, pos, axis=0)
        return x.astype(self.dtype)

    def decode(self, x):
        """Args: x (B, T, D). Returns float32 logits (B, T, V)."""
        # The tied (V, D) table is output-major, the (D, V) head input-major.
        table = self.token_embedding if self.tie_embeddings else self.lm_head
        return products.logits(x, table, table_output_major=self.tie_embeddings,
                               dtype=self.dtype, execution=self.execution)

    def __call__(self, tokens, positions):
        return self.encode(tokens, positions)
