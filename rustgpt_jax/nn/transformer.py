"""The decoder-only Transformer: embed, a scanned stack of blocks, final norm, head."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from rustgpt_jax.config import ModelConfig, NormPlacement, PositionType, RematPolicy
from rustgpt_jax.nn import axes
from rustgpt_jax.nn.block import Block, make_norm
from rustgpt_jax.nn.embedder import Embedder

# Collections that hold one entry per layer and so are stacked by nn.scan.
SCANNED_COLLECTIONS = ('params', 'cache', 'intermediates', 'adaptive')

REMAT_POLICIES = {
    RematPolicy.FULL: jax.checkpoint_policies.nothing_saveable,
    RematPolicy.DOTS: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _block_class(config: ModelConfig):
    if config.remat_policy == RematPolicy.NONE:
        return Block
    return nn.remat(Block, policy=REMAT_POLICIES[config.remat_policy],
                    prevent_cse=not config.scan_layers)


class Transformer(nn.Module):
    """A decoder-only language model built from one `ModelConfig`."""
    config: ModelConfig

    def setup(self):
        cfg = self.config
        self.embedder = Embedder(
            vocab_size=cfg.vocab_size, embed_dim=cfg.embed_dim, max_seq_len=cfg.max_seq_len,
            learned_positions=cfg.positions == PositionType.LEARNED,
            tie_embeddings=cfg.tie_embeddings, init_std=cfg.init_std,
            dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
            matvec_impl=cfg.matvec_impl.value)
        if cfg.norm_placement == NormPlacement.PRE:
            self.final_norm = make_norm(cfg, 'final_norm')

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
        tokens = jnp.asarray(tokens, jnp.int32)
        if tokens.ndim != 2:
            raise ValueError(f'tokens must be (batch, seq) int32, got shape {tokens.shape}')
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32),
                                         tokens.shape)
        if not decode and tokens.shape[1] > cfg.max_seq_len:
            raise ValueError(f'sequence length {tokens.shape[1]} exceeds '
                             f'ModelConfig.max_seq_len={cfg.max_seq_len}')
        x = self.embedder.encode(tokens, positions)  # (B, T, D)
        x = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)(x)
        x = nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.EMBED))

        block_cls = _block_class(cfg)
        if cfg.scan_layers:
            stack = nn.scan(
                block_cls, variable_axes={c: 0 for c in SCANNED_COLLECTIONS},
                split_rngs={'params': True, 'dropout': True},
                in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: axes.LAYERS})
            x, _ = stack(cfg, deterministic, decode, name='layers')(x, positions, segment_ids)
        else:
            for i in range(cfg.num_layers):
                x, _ = block_cls(cfg, deterministic, decode, name=f'layer_{i}')(
                    x, positions, segment_ids)
        if cfg.norm_placement == NormPlacement.PRE:
            x = self.final_norm(x)
        return x
