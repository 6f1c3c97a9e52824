"""Pure step functions: masked cross entropy, `train_step` and `eval_step`."""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

from rustgpt_jax.config import ModelConfig
from rustgpt_jax.training import adaptive_glue
from rustgpt_jax.training.state import TrainState

STEP_KEYS = ('tokens', 'targets', 'loss_mask', 'positions', 'segment_ids')


def masked_cross_entropy_sum(logits, targets, loss_mask):
    """Sum of next-token cross entropy over scored slots, in float32.

    Args:
      logits: (B, T, V) float32 logits.
      targets: (B, T) int32 next tokens.
      loss_mask: (B, T) float32, 1 where the target is scored.

    Returns:
      (loss_sum, count): float32 scalars; the masked mean is loss_sum / count.
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)  # (B, T)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # (B, T)
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum((log_z - target_logit) * mask), jnp.sum(mask)


def _forward(apply_fn, params, adaptive, batch, rng, deterministic):
    """Model apply with the optional mutable collections; returns (logits, mutated)."""
    variables = {'params': params, 'adaptive': adaptive} if adaptive else {'params': params}
    return apply_fn(variables, batch['tokens'], positions=batch['positions'],
                    segment_ids=batch['segment_ids'], deterministic=deterministic,
                    rngs={'dropout': rng}, mutable=adaptive_glue.MUTABLE)


def make_train_step(config: ModelConfig, accum_steps: int = 1,
                    schedule: Optional[optax.Schedule] = None,
                    donate: bool = True, shardings: Optional[tuple] = None) -> Callable:
    """Builds the jitted `train_step(state, batch) -> (state, metrics)`.

    The batch holds `accum_steps * B` rows; they are split into `accum_steps`
    micro-batches of B rows and their gradients summed in a `lax.scan`. The loss is the
    masked mean over *all* scored tokens of the batch (sum over micro-batches divided by
    the total count), so the update equals the one-big-batch update exactly, whatever
    padding each micro-batch holds.

    Args:
      config: the model config (dropout on when dropout_rate > 0; passed to
        `adaptive.observe_loss`).
      accum_steps: micro-batches per optimizer step.
      schedule: learning-rate schedule, only to report it in the metrics.
      donate: donate the input state's buffers (the caller must not reuse `state`).
      shardings: optional (state shardings as a TrainState prefix, batch sharding) from
        `sharding.ShardingPlan`; the updated state keeps the input state's shardings.

    Returns:
      train_step(state, batch) with batch arrays (accum_steps * B, T); metrics hold
      'loss' (masked mean, float32), 'grad_norm', 'learning_rate', 'tokens' (scored
      count) and 'intermediates' (mean over micro-batches, possibly {}).
    """
    if accum_steps < 1:
        raise ValueError(f'accum_steps must be >= 1, got {accum_steps}')
    deterministic = config.dropout_rate == 0.0

    def train_step(state: TrainState, batch: dict):
        batch = {k: batch[k] for k in STEP_KEYS}
        rows = batch['tokens'].shape[0]
        if rows % accum_steps:
            raise ValueError(f'batch of {rows} rows does not split into accum_steps='
                             f'{accum_steps} equal micro-batches')
        total = jnp.maximum(jnp.sum(batch['loss_mask'].astype(jnp.float32)), 1.0)
        step_rng = jax.random.fold_in(state.rng, state.step)

        def micro_grads(params, adaptive, micro, index):
            def loss_fn(p):
                logits, mutated = _forward(state.apply_fn, p, adaptive, micro,
                                           jax.random.fold_in(step_rng, index), deterministic)
                loss_sum, _ = masked_cross_entropy_sum(logits, micro['targets'],
                                                       micro['loss_mask'])
                return loss_sum / total, mutated
            (loss, mutated), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            return loss, grads, mutated.get('adaptive', adaptive), mutated.get(
                'intermediates', {})

        if accum_steps == 1:
            loss, grads, adaptive, inter = micro_grads(state.params, state.adaptive, batch, 0)
        else:
            micro_batches = jax.tree.map(
                lambda x: x.reshape((accum_steps, rows // accum_steps) + x.shape[1:]), batch)

            def body(carry, xs):
                loss_acc, grad_acc, adaptive = carry
                micro, index = xs
                loss, grads, adaptive, inter = micro_grads(state.params, adaptive, micro, index)
                grad_acc = jax.tree.map(jnp.add, grad_acc, grads)
                return (loss_acc + loss, grad_acc, adaptive), inter

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (loss, grads, adaptive), inters = jax.lax.scan(
                body, (jnp.zeros((), jnp.float32), zeros, state.adaptive),
                (micro_batches, jnp.arange(accum_steps)))
            inter = jax.tree.map(lambda x: jnp.mean(x, axis=0), inters)

        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        adaptive = adaptive_glue.observe_loss(adaptive, loss, config)
        metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads),
                   'tokens': jnp.sum(batch['loss_mask']), 'intermediates': inter,
                   'learning_rate': (schedule(state.step) if schedule is not None
                                     else jnp.zeros((), jnp.float32))}
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  adaptive=adaptive)
        return new_state, metrics

    donate_argnums = (0,) if donate else ()
    if shardings is None:
        return jax.jit(train_step, donate_argnums=donate_argnums)
    state_sharding, batch_sharding = shardings
    return jax.jit(train_step, donate_argnums=donate_argnums,
                   in_shardings=(state_sharding, batch_sharding),
                   out_shardings=(state_sharding, None))


def make_eval_step(config: ModelConfig) -> Callable:
    """Builds the jitted `eval_step(state, batch) -> {'loss_sum', 'count'}` (no dropout).

    The 'adaptive' collection is read but not updated: evaluation must not change
    training. Aggregate with `summarize_eval`.
    """
    del config  # evaluation never uses dropout; kept for a symmetric signature

    def eval_step(state: TrainState, batch: dict):
        logits, _ = _forward(state.apply_fn, state.params, state.adaptive, batch,
                             jax.random.PRNGKey(0), True)
        loss_sum, count = masked_cross_entropy_sum(logits, batch['targets'],
                                                   batch['loss_mask'])
        return {'loss_sum': loss_sum, 'count': count}

    return jax.jit(eval_step)


def evaluate(eval_step: Callable, state: TrainState, batches) -> dict[str, float]:
    """Masked mean loss and perplexity over an iterable of batches.

    Returns:
      {'loss': float, 'perplexity': exp(loss), 'tokens': scored count}.
    """
    loss_sum, count = 0.0, 0.0
    for batch in batches:
        out = eval_step(state, {k: batch[k] for k in STEP_KEYS})
        loss_sum += float(out['loss_sum'])
        count += float(out['count'])
    if count == 0:
        raise ValueError('evaluation data has no scored tokens (every loss_mask is 0)')
    loss = loss_sum / count
    return {'loss': loss, 'perplexity': float(jnp.exp(loss)), 'tokens': count}
