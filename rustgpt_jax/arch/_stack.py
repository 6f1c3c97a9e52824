"""Pieces every architecture is built from: embedder, input checks, a block stack.

`config.scan_layers` picks `nn.scan` (one compiled body, per-layer variables stacked on
a leading 'layers' axis) or a Python loop, and `config.remat_policy` wraps each block
in `nn.remat` with a named policy.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from rustgpt_jax import axes
from rustgpt_jax.config import ModelConfig, NormPlacement, PositionType, RematPolicy
from rustgpt_jax.nn.block import make_norm
from rustgpt_jax.nn.embedder import Embedder
from rustgpt_jax.runtime.execution import Execution

# Collections that hold one entry per layer and so are stacked by nn.scan.
SCANNED_COLLECTIONS = ('params', 'cache', 'intermediates', 'adaptive')

REMAT_POLICIES = {
    RematPolicy.FULL: jax.checkpoint_policies.nothing_saveable,
    RematPolicy.DOTS: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class LanguageModel(nn.Module):
    """What every architecture is: logits = head(hidden_states(tokens)).

    `hidden_states` is embed -> dropout -> `mix` -> final norm (pre-norm only). Subclasses
    define `mix` (and may extend `setup` and `embed`); `build_model` constructs them as
    `cls(config, execution)`.

    Attributes:
      config: the model (its math).
      execution: how its products run (`runtime.Execution`; the default is the standard
        parameter layout with XLA's products).
    """
    config: ModelConfig
    execution: Execution = Execution()

    def __call__(self, tokens, positions=None, segment_ids=None, deterministic: bool = True,
                 decode: bool = False, last_only: bool = False):
        """Next-token logits.

        Args:
          tokens: (B, T) int32 token ids.
          positions: (B, T) int32; default 0..T-1. Negative marks left padding.
          segment_ids: (B, T) int32 for packed sequences (each token sees only its own
            segment), or None.
          deterministic: disables dropout when True.
          decode: use and update the `cache` collection (prefill or one-token steps; the
            architecture's module docstring says what it holds).
          last_only: the logits of the last position only, as a prompt step needs them
            (the output head is the largest single product: over a 128-token prompt of a
            TinyLlama-sized model, 6% of the step's FLOPs).

        Returns:
          (B, T, V) float32 logits; (B, 1, V) with `last_only`.
        """
        x = self.hidden_states(tokens, positions, segment_ids, deterministic, decode)
        return self.embedder.decode(x[:, -1:] if last_only else x)

    def setup(self):
        self.embedder = make_embedder(self.config, self.execution)
        if self.config.norm_placement == NormPlacement.PRE:
            self.final_norm = make_norm(self.config, 'final_norm')

    @nn.compact
    def hidden_states(self, tokens, positions=None, segment_ids=None,
                      deterministic: bool = True, decode: bool = False):
        """Final hidden states (B, T, D) before the output head: embed, mix, final norm."""
        cfg = self.config
        tokens, positions = prepare_inputs(tokens, positions, cfg, decode)
        x = self.embed(tokens, positions)  # (B, T, D)
        x = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)(x)
        x = nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.EMBED))
        x = self.mix(x, positions, segment_ids, deterministic, decode)
        if cfg.norm_placement == NormPlacement.PRE:
            x = self.final_norm(x)
        return x

    def embed(self, tokens, positions):
        """(B, T) ids -> (B, T, D) embeddings."""
        return self.embedder.encode(tokens, positions)

    def mix(self, x, positions, segment_ids, deterministic: bool, decode: bool):
        """The architecture's body: (B, T, D) -> (B, T, D) (called inside `hidden_states`,
        whose scope holds the submodules it creates)."""
        raise NotImplementedError


def remat_block(block_cls, config: ModelConfig):
    """`block_cls` wrapped in `nn.remat` per `config.remat_policy` (unchanged for NONE)."""
    if config.remat_policy == RematPolicy.NONE:
        return block_cls
    return nn.remat(block_cls, policy=REMAT_POLICIES[config.remat_policy],
                    prevent_cse=not config.scan_layers)


class LayerStack(nn.Module):
    """`num_layers` blocks of `block_cls`, optionally followed by a norm.

    `block_cls(config, execution, deterministic, decode)` must be called as
    `block(x, positions, segment_ids) -> (x, None)`, like `rustgpt_jax.nn.Block`.

    Attributes:
      config: the model config.
      block_cls: the residual block class.
      num_layers: depth of the stack.
      out_norm: append the configured norm (named 'out_norm') after the last block.
      execution: how the blocks' products run (`runtime.Execution`).
      deterministic: disables dropout when True.
      decode: blocks use and update the `cache` collection.
    """
    config: ModelConfig
    block_cls: type
    num_layers: int
    out_norm: bool = False
    execution: Execution = Execution()
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x, positions, segment_ids: Optional[object] = None):
        """Args: x (B, T, D); positions (B, T) int32; segment_ids (B, T) or None.

        Returns:
          (B, T, D).
        """
        x = run_blocks(self.config, self.block_cls, self.num_layers, x, positions, segment_ids,
                       execution=self.execution, deterministic=self.deterministic,
                       decode=self.decode)
        if self.out_norm:
            x = make_norm(self.config, 'out_norm')(x)
        return x


def run_blocks(config: ModelConfig, block_cls: type, num_layers: int, x, positions,
               segment_ids, *, execution: Execution, deterministic: bool, decode: bool):
    """Applies `num_layers` blocks; call inside a compact method, whose scope gets them.

    Scanned: one submodule 'layers' with per-layer variables stacked on a leading axis;
    unrolled: submodules 'layer_{i}'.

    Args:
      config, block_cls, num_layers, execution, deterministic, decode: as `LayerStack`.
      x: (B, T, D); positions: (B, T) int32; segment_ids: (B, T) or None.

    Returns:
      (B, T, D).
    """
    block_cls = remat_block(block_cls, config)
    if config.scan_layers:
        stack = nn.scan(
            block_cls, variable_axes={c: 0 for c in SCANNED_COLLECTIONS},
            split_rngs={'params': True, 'dropout': True},
            in_axes=(nn.broadcast, nn.broadcast), length=num_layers,
            metadata_params={nn.PARTITION_NAME: axes.LAYERS})
        x, _ = stack(config, execution, deterministic, decode, name='layers')(
            x, positions, segment_ids)
        return x
    for i in range(num_layers):
        x, _ = block_cls(config, execution, deterministic, decode, name=f'layer_{i}')(
            x, positions, segment_ids)
    return x


def make_embedder(config: ModelConfig, execution: Execution = Execution()) -> Embedder:
    """The token embedder and output head (assign in `setup`)."""
    return Embedder(
        vocab_size=config.vocab_size, embed_dim=config.embed_dim,
        max_seq_len=config.max_seq_len,
        learned_positions=config.positions == PositionType.LEARNED,
        tie_embeddings=config.tie_embeddings, init_std=config.init_std,
        dtype=config.compute_dtype, param_dtype=config.params_dtype, execution=execution)


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
