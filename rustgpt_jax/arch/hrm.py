"""HRM, the hierarchical reasoning model (Wang et al., 2025, arXiv:2506.21734).

A low-level module L and a high-level module H, each a small stack of the Transformer's
causal blocks, iterate over the embedded tokens x (SPEC §5):

    for cycle in range(N):                # config.hrm_cycles
        for step in range(T):             # config.hrm_steps
            zL = L(zL + zH + x)
        zH = H(zH + zL)
    logits = head(final_norm(zH))

Every block is causal and every update is position-wise apart from causal attention, so
the model is causal. The initial states zL, zH are learned vectors (D,) broadcast over
batch and length, initialised as the paper's fixed draws (truncated normal, std 1).

Scales: the paper adds unit-scale embeddings to post-normed (unit-scale) states. Here
the embeddings start at `init_std`, so x passes through a norm (`embed_norm`) before
entering the loop; with pre-norm blocks each module ends with its own norm (`out_norm`,
as a pre-norm stack ends with a final norm) so the states stay unit-scale however many
iterations run, as they do with post-norm blocks.

Gradients flow through every iteration (full backprop; the paper's one-step gradient
approximation is not implemented). L and H apply the same weights at every iteration:
the loops are `nn.scan`s that broadcast 'params'.

Decoding: every application of L or H sees different inputs, so each of the N*T
applications of L and N applications of H keeps its own KV cache (the scans stack the
`cache` collection over iterations; within an application the blocks' ring-buffer caches
work exactly as in the Transformer). Because every state at position j depends only on
tokens <= j, the cached keys/values equal those of a full recompute, so prefill +
one-token steps give the full forward pass's logits. Cache memory is
(N*T*hrm_low_layers + N*hrm_high_layers) times a Transformer layer's. The contract is the
Transformer's: `init(..., decode=True)` creates the cache, then each call passes the
tokens following the cached ones with their positions.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from rustgpt_jax import axes
from rustgpt_jax.arch._stack import (
    SCANNED_COLLECTIONS,
    LanguageModel,
    LayerStack,
)
from rustgpt_jax.config import ModelConfig, NormPlacement
from rustgpt_jax.nn.block import Block, make_norm
from rustgpt_jax.param_counts import parameter_counts_hrm
from rustgpt_jax.runtime.execution import Execution

__all__ = ['HRMLM', 'parameter_counts_hrm']

# Per-iteration collections: each application of L / H has its own cache (and window
# state); 'params' are shared across iterations and broadcast instead.
_PER_ITERATION = {c: 0 for c in SCANNED_COLLECTIONS if c != 'params'}


def _iterate(module_cls, length: int, num_inputs: int):
    """`nn.scan` of `module_cls` over `length` iterations with shared weights.

    The carry is the first call argument; the `num_inputs` others are broadcast.
    """
    return nn.scan(module_cls, variable_broadcast='params', variable_axes=_PER_ITERATION,
                   split_rngs={'params': False, 'dropout': True},
                   in_axes=(nn.broadcast,) * num_inputs, length=length)


class _LowStep(nn.Module):
    """One low-level update zL <- L(zL + zH + x); scanned T times per cycle."""
    config: ModelConfig
    execution: Execution = Execution()
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, z_low, z_high, x, positions, segment_ids):
        cfg = self.config
        low = LayerStack(cfg, Block, cfg.hrm_low_layers,
                         out_norm=cfg.norm_placement == NormPlacement.PRE,
                         execution=self.execution, deterministic=self.deterministic,
                         decode=self.decode, name='low')
        return low(z_low + z_high + x, positions, segment_ids), None


class _Cycle(nn.Module):
    """T low-level updates, then one high-level update zH <- H(zH + zL); scanned N times."""
    config: ModelConfig
    execution: Execution = Execution()
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, carry, x, positions, segment_ids):
        cfg = self.config
        z_low, z_high = carry
        steps = _iterate(_LowStep, cfg.hrm_steps, 4)(
            cfg, self.execution, self.deterministic, self.decode, name='low_steps')
        z_low, _ = steps(z_low, z_high, x, positions, segment_ids)
        high = LayerStack(cfg, Block, cfg.hrm_high_layers,
                          out_norm=cfg.norm_placement == NormPlacement.PRE,
                          execution=self.execution, deterministic=self.deterministic,
                          decode=self.decode, name='high')
        z_high = high(z_high + z_low, positions, segment_ids)
        return (z_low, z_high), None


class HRMLM(LanguageModel):
    """Embedder, the HRM L/H iteration, final norm (pre-norm only), head."""

    def setup(self):
        super().setup()
        cfg = self.config
        self.embed_norm = make_norm(cfg, 'embed_norm')
        init = nn.with_logical_partitioning(
            nn.initializers.truncated_normal(1.0), (axes.EMBED,))
        self.z_low_init = self.param('z_low_init', init, (cfg.embed_dim,), cfg.params_dtype)
        self.z_high_init = self.param('z_high_init', init, (cfg.embed_dim,), cfg.params_dtype)

    def embed(self, tokens, positions):
        """Embeddings, normalised: the input x every L update adds."""
        return self.embed_norm(self.embedder.encode(tokens, positions))

    def mix(self, x, positions, segment_ids, deterministic: bool, decode: bool):
        """zH after N cycles of T low-level updates and one high-level update."""
        z_low = jnp.broadcast_to(self.z_low_init.astype(x.dtype), x.shape)  # (B, T, D)
        z_high = jnp.broadcast_to(self.z_high_init.astype(x.dtype), x.shape)  # (B, T, D)
        cycles = _iterate(_Cycle, self.config.hrm_cycles, 3)(
            self.config, self.execution, deterministic, decode, name='cycles')
        (_, z_high), _ = cycles((z_low, z_high), x, positions, segment_ids)
        return z_high
