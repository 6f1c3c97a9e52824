"""The optimizer: AdamW with linear warmup + cosine decay and global-norm clipping."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Hyper-parameters of `make_optimizer`.

    Attributes:
      learning_rate: peak learning rate, reached after `warmup_steps`.
      warmup_steps: linear warmup from 0 to the peak.
      decay_steps: total schedule length; cosine decay from the peak to
        `learning_rate * final_lr_fraction` between warmup_steps and decay_steps.
      final_lr_fraction: the floor of the cosine as a fraction of the peak.
      b1, b2, eps: Adam moments.
      weight_decay: decoupled (AdamW) decay, applied to matrices only: norm scales
        and biases (rank < 2) are not decayed, as in GPT-2 / LLaMA training.
      grad_clip_norm: clip the global gradient norm to this (None or 0 = off).
    """
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    decay_steps: int = 10_000
    final_lr_fraction: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip_norm: float | None = 1.0

    def __post_init__(self):
        if not self.learning_rate > 0:
            raise ValueError(f'OptimizerConfig.learning_rate must be > 0, got {self.learning_rate}')
        if self.warmup_steps < 0:
            raise ValueError(f'OptimizerConfig.warmup_steps must be >= 0, got {self.warmup_steps}')
        if self.decay_steps <= self.warmup_steps:
            raise ValueError(f'OptimizerConfig.decay_steps ({self.decay_steps}) must exceed '
                             f'warmup_steps ({self.warmup_steps})')
        if not 0.0 <= self.final_lr_fraction <= 1.0:
            raise ValueError('OptimizerConfig.final_lr_fraction must be in [0, 1], got '
                             f'{self.final_lr_fraction}')
        if self.grad_clip_norm is not None and self.grad_clip_norm < 0:
            raise ValueError('OptimizerConfig.grad_clip_norm must be >= 0 or None, got '
                             f'{self.grad_clip_norm}')


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
    """Linear warmup 0 -> peak over `warmup_steps`, then cosine to the floor."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
        decay_steps=config.decay_steps,
        end_value=config.learning_rate * config.final_lr_fraction)


def _decay_mask(params):
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW(schedule), weight decay on matrices only.

    Gradient accumulation is not an optax wrapper here: `steps.train_step` sums the
    micro-batch gradients inside one jitted step (so the update equals the big-batch
    update exactly, padding-aware), and the optimizer sees one gradient per step.
    """
    parts = []
    if config.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    parts.append(optax.adamw(
        learning_rate_schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
        weight_decay=config.weight_decay, mask=_decay_mask))
    return optax.chain(*parts)
