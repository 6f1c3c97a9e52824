"""Training: optax state and steps, orbax checkpoints, the loop and its metrics."""

from rustgpt_jax.training.checkpoint import Checkpointer, CheckpointError, load_for_inference
from rustgpt_jax.training.init_from import InitFromError, Pretrained, load_source
from rustgpt_jax.training.loop import NonFiniteLossError, TrainResult, train
from rustgpt_jax.training.optim import OptimizerConfig, learning_rate_schedule, make_optimizer
from rustgpt_jax.training.run_config import DataConfig, PhaseConfig, RunConfig
from rustgpt_jax.training.state import TrainState, create_train_state
from rustgpt_jax.training.steps import (
                                        evaluate,
                                        make_eval_step,
                                        make_train_step,
                                        masked_cross_entropy_sum,
)

__all__ = [
    'CheckpointError', 'Checkpointer', 'DataConfig', 'InitFromError', 'NonFiniteLossError',
    'OptimizerConfig', 'PhaseConfig', 'Pretrained', 'RunConfig', 'TrainResult', 'TrainState',
    'create_train_state', 'evaluate', 'learning_rate_schedule', 'load_for_inference',
    'load_source', 'make_eval_step', 'make_optimizer', 'make_train_step',
    'masked_cross_entropy_sum', 'train',
]
