"""Pieces shared by HyperMixer and HRM: embedder, input checks, a block stack, counts.

Mirrors `Transformer.hidden_states`: `config.scan_layers` picks `nn.scan` (one compiled
body, per-layer variables stacked on a leading 'layers' axis) or a Python loop, and
`config.remat_policy` wraps each block in `nn.remat` with the same named policies.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from rustgpt_jax.config import FeedForwardType, ModelConfig, NormType, PositionType, RematPolicy
from rustgpt_jax.nn import axes
from rustgpt_jax.nn.block import make_norm
from rustgpt_jax.nn.embedder import Embedder
from rustgpt_jax.nn.transformer import REMAT_POLICIES, SCANNED_COLLECTIONS


def remat_block(block_cls, config: ModelConfig):
    """`block_cls` wrapped in `nn.remat` per `config.remat_policy` (unchanged for NONE)."""
    if config.remat_policy == RematPolicy.NONE:
        return block_cls
    return nn.remat(block_cls, policy=REMAT_POLICIES[config.remat_policy],
                    prevent_cse=not config.scan_layers)


class LayerStack(nn.Module):
    """`num_layers` blocks of `block_cls`, optionally followed by a norm.

    `block_cls(config, deterministic, decode)` must be called as
    `block(x, positions, segment_ids) -> (x, None)`, like `rustgpt_jax.nn.Block`.

    Attributes:
      config: the model config.
      block_cls: the residual block class.
      num_layers: depth of the stack.
      out_norm: append the configured norm (named 'out_norm') after the last block.
      deterministic: disables dropout when True.
      decode: blocks use and update the `cache` collection.
    """
    config: ModelConfig
    block_cls: type
    num_layers: int
    out_norm: bool = False
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x, positions, segment_ids: Optional[object] = None):
        """Args: x (B, T, D); positions (B, T) int32; segment_ids (B, T) or None.

        Returns:
          (B, T, D).
        """
        cfg = self.config
        block_cls = remat_block(self.block_cls, cfg)
        if cfg.scan_layers:
            stack = nn.scan(
                block_cls, variable_axes={c: 0 for c in SCANNED_COLLECTIONS},
                split_rngs={'params': True, 'dropout': True},
                in_axes=(nn.broadcast, nn.broadcast), length=self.num_layers,
                metadata_params={nn.PARTITION_NAME: axes.LAYERS})
            x, _ = stack(cfg, self.deterministic, self.decode, name='layers')(
                x, positions, segment_ids)
        else:
            for i in range(self.num_layers):
                x, _ = block_cls(cfg, self.deterministic, self.decode, name=f'layer_{i}')(
                    x, positions, segment_ids)
        if self.out_norm:
            x = make_norm(cfg, 'out_norm')(x)
        return x


def make_embedder(config: ModelConfig) -> Embedder:
    """The token embedder and output head, as in the Transformer (assign in `setup`)."""
    return Embedder(
        vocab_size=config.vocab_size, embed_dim=config.embed_dim,
        max_seq_len=config.max_seq_len,
        learned_positions=config.positions == PositionType.LEARNED,
        tie_embeddings=config.tie_embeddings, init_std=config.init_std,
        dtype=config.compute_dtype, param_dtype=config.params_dtype,
        matvec_impl=config.matvec_impl.value)


def prepare_inputs(tokens, positions, config: ModelConfig, decode: bool):
    """Validates tokens and fills in default positions.

    Args:
      tokens: (B, T) integer token ids.
      positions: (B, T) int32 or None (0..T-1).
      config: the model config (for max_seq_len).
      decode: decode calls may carry positions beyond T (they continue a cache).

    Returns:
      (tokens, positions) as int32 (B, T) arrays.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f'tokens must be (batch, seq) int32, got shape {tokens.shape}')
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32),
                                     tokens.shape)
    positions = jnp.asarray(positions, jnp.int32)
    if positions.shape != tokens.shape:
        raise ValueError(f'positions shape {positions.shape} must equal tokens shape '
                         f'{tokens.shape}')
    if not decode and tokens.shape[1] > config.max_seq_len:
        raise ValueError(f'sequence length {tokens.shape[1]} exceeds '
                         f'ModelConfig.max_seq_len={config.max_seq_len}')
    return tokens, positions


# -- analytical parameter counts ----------------------------------------------------


def norm_param_count(config: ModelConfig) -> int:
    """Parameters of one norm layer: RMSNorm has a scale, LayerNorm a scale and a bias."""
    return config.embed_dim * (2 if config.norm == NormType.LAYER_NORM else 1)


def feed_forward_param_count(config: ModelConfig) -> int:
    """Parameters of one feed-forward layer (D -> F -> D; SwiGLU has two up projections)."""
    d, f = config.embed_dim, config.hidden_dim
    if config.feed_forward == FeedForwardType.SWIGLU:
        return 3 * d * f + (2 * f + d if config.use_bias else 0)
    return 2 * d * f + (f + d if config.use_bias else 0)


def embedding_param_counts(config: ModelConfig) -> dict:
    """{'embedding': token (+ learned position) table, 'head': untied output head or 0}."""
    d = config.embed_dim
    embedding = config.vocab_size * d
    if config.positions == PositionType.LEARNED:
        embedding += config.max_seq_len * d
    return {'embedding': embedding, 'head': 0 if config.tie_embeddings else d * config.vocab_size}
