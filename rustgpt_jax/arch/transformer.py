"""The decoder-only Transformer: embed, a stack of blocks, final norm (pre-norm), head."""

from __future__ import annotations

import flax.linen as nn

from rustgpt_jax import axes
from rustgpt_jax.arch._stack import make_embedder, prepare_inputs, run_blocks
from rustgpt_jax.config import ModelConfig, NormPlacement
from rustgpt_jax.nn.block import Block, make_norm
from rustgpt_jax.runtime.execution import Execution


class Transformer(nn.Module):
    """A decoder-only language model built from one `ModelConfig`.

    Attributes:
      config: the model (its math).
      execution: how its products run; the default is the standard parameter layout
        with XLA's products (`runtime.Execution`, `decoding.prepare_for_decode`).
    """
    config: ModelConfig
    execution: Execution = Execution()

    def setup(self):
        self.embedder = make_embedder(self.config, self.execution)
        if self.config.norm_placement == NormPlacement.PRE:
            self.final_norm = make_norm(self.config, 'final_norm')

    def __call__(self, tokens, positions=None, segment_ids=None, deterministic: bool = True,
                 decode: bool = False):
        """Next-token logits.

        Args:
          tokens: (B, T) int32 token ids.
          positions: (B, T) int32; default 0..T-1. Negative marks left padding.
          segment_ids: (B, T) int32 for packed sequences (tokens attend only within
            their segment), or None.
          deterministic: disables dropout when True.
          decode: use and update the `cache` collection (prefill or one-token steps).

        Returns:
          (B, T, V) float32 logits.
        """
        x = self.hidden_states(tokens, positions, segment_ids, deterministic, decode)
        return self.embedder.decode(x)

    @nn.compact
    def hidden_states(self, tokens, positions=None, segment_ids=None,
                      deterministic: bool = True, decode: bool = False):
        """Final hidden states (B, T, D) before the output head."""
        cfg = self.config
        tokens, positions = prepare_inputs(tokens, positions, cfg, decode)
        x = self.embedder.encode(tokens, positions)  # (B, T, D)
        x = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)(x)
        x = nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.EMBED))
        x = run_blocks(cfg, Block, cfg.num_layers, x, positions, segment_ids,
                       execution=self.execution, deterministic=deterministic, decode=decode)
        if cfg.norm_placement == NormPlacement.PRE:
            x = self.final_norm(x)
        return x
