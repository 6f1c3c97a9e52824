"""The decoder-only Transformer: embed, a stack of blocks, final norm (pre-norm), head."""

from __future__ import annotations

import flax.linen as nn

from rustgpt_jax import axes
from rustgpt_jax.arch._stack import LanguageModel, make_embedder, prepare_inputs, run_blocks
from rustgpt_jax.config import NormPlacement
from rustgpt_jax.nn.block import Block, make_norm


class Transformer(LanguageModel):
    """A decoder-only language model: `Transformer(config, execution)` (`LanguageModel`)."""

    def setup(self):
        self.embedder = make_embedder(self.config, self.execution)
        if self.config.norm_placement == NormPlacement.PRE:
            self.final_norm = make_norm(self.config, 'final_norm')

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
