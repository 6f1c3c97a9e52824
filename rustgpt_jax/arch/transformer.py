"""The decoder-only Transformer: embed, a stack of blocks, final norm (pre-norm), head."""

from __future__ import annotations

from rustgpt_jax.arch._stack import LanguageModel, run_blocks
from rustgpt_jax.nn.block import Block


class Transformer(LanguageModel):
    """A decoder-only language model: `Transformer(config, execution)` (`LanguageModel`)."""

    def mix(self, x, positions, segment_ids, deterministic: bool, decode: bool):
        """The block stack: (B, T, D) -> (B, T, D)."""
        return run_blocks(self.config, Block, self.config.num_layers, x, positions, segment_ids,
                          execution=self.execution, deterministic=deterministic, decode=decode)
