"""Fine-tuning: a run that starts from pretrained weights (`rustgpt-train --init_from PATH`).

PATH is a Hugging Face model directory (`interop.hf.load_pretrained`), a `.gguf` file
(`interop.gguf.load_gguf`; quantized tensors are dequantized to float32 for training) or
one of our run directories (`checkpoint.load_for_inference`, its best step). The model
config and the tokenizer come from PATH. Gin may still bind the ModelConfig fields that
leave every parameter shape alone (`SHAPE_FREE_FIELDS`: how the model runs, its dropout,
its window); any other binding would contradict the weights and is refused by name.

Importing this module also registers the 'gguf' tokenizer kind, so a run fine-tuned from
a GGUF file reloads its saved tokenizer.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import optax

from rustgpt_jax.config import ModelConfig
from rustgpt_jax.data.tokenizer_base import Tokenizer
from rustgpt_jax.interop.gguf import load_gguf
from rustgpt_jax.interop.hf import load_pretrained
from rustgpt_jax.interop.hf_files import CONFIG_JSON
from rustgpt_jax.training.checkpoint import load_for_inference
from rustgpt_jax.training.state import TrainState, create_train_state, init_variables

# Fields that change how the model computes or regularises, never a parameter's shape.
SHAPE_FREE_FIELDS = ('dropout_rate', 'dtype', 'param_dtype', 'remat_policy', 'attention_impl',
                     'window_size')


class InitFromError(ValueError):
    """--init_from names no usable source, or gin contradicts the source's model."""


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """Weights to start a run from.

    Attributes:
      config: the source's ModelConfig.
      params: its plain param tree (standard layout).
      tokenizer: its tokenizer (the run uses it instead of building one).
      path: where it came from.
    """
    config: ModelConfig
    params: Any
    tokenizer: Tokenizer
    path: str


def load_source(path: str) -> Pretrained:
    """Loads an HF directory, a .gguf file or a run directory (see the module docstring).

    Raises:
      InitFromError: PATH is none of these, or has no tokenizer.
      ValueError: the source itself is unusable (its loader's message).
    """
    path = os.fspath(path)
    if os.path.isfile(path) and path.endswith('.gguf'):
        config, params, tokenizer = load_gguf(path)
    elif os.path.isfile(os.path.join(path, CONFIG_JSON)):
        config, params, tokenizer = load_pretrained(path)
    elif os.path.isdir(path):
        config, params, tokenizer = load_for_inference(path)
    else:
        raise InitFromError(f'--init_from {path}: not a .gguf file, a Hugging Face model '
                            f'directory ({CONFIG_JSON}) or a run directory')
    if tokenizer is None:
        raise InitFromError(f'--init_from {path}: the model has no tokenizer to train with')
    return Pretrained(config, jax.device_get(params), tokenizer, path)


def model_config(source: Pretrained, bindings: Mapping[str, Any]) -> ModelConfig:
    """The source's ModelConfig with the gin `bindings` that leave parameter shapes alone.

    Args:
      source: the pretrained model.
      bindings: ModelConfig field -> value, as bound in gin.

    Raises:
      InitFromError: naming the first binding outside SHAPE_FREE_FIELDS.
    """
    refused = sorted(set(bindings) - set(SHAPE_FREE_FIELDS))
    if refused:
        raise InitFromError(
            f'--init_from {source.path} takes the model from there, but gin binds '
            f'ModelConfig.{refused[0]}' + (f' (and {refused[1:]})' if refused[1:] else '')
            + f'; only {", ".join(SHAPE_FREE_FIELDS)} may be set')
    return source.config.replace(**bindings)


def initial_state(config: ModelConfig, tx: optax.GradientTransformation, seed: int,
                  batch_size: int, seq_len: int, params: Any) -> TrainState:
    """A fresh TrainState (step 0, new optimizer state) holding the pretrained `params`.

    Args:
      config: the run's model (`model_config`).
      tx: the optimizer.
      seed: run seed (dropout key, as `create_train_state`).
      batch_size, seq_len: the micro-batch shape.
      params: the source's params; cast to `config.param_dtype`.

    Raises:
      InitFromError: a parameter missing, extra or of another shape (named).
    """
    abstract = jax.eval_shape(lambda: init_variables(config, seed, batch_size, seq_len))
    expected = {'/'.join(str(k.key) for k in path): leaf.shape
                for path, leaf in jax.tree_util.tree_leaves_with_path(abstract['params'])}
    given = {'/'.join(str(k.key) for k in path): leaf.shape
             for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    for name in sorted(set(expected) | set(given)):
        if expected.get(name) != given.get(name):
            raise InitFromError(f'pretrained parameter {name}: shape {given.get(name)}, the '
                                f'model needs {expected.get(name)}')
    return create_train_state(config, tx, seed, batch_size, seq_len, params=params)
