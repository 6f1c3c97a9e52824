"""Builds the tokenizer and each phase's batch iterators from the run config."""

from __future__ import annotations

import dataclasses
from typing import Iterable, Optional

import numpy as np

from rustgpt_jax import data as data_lib
from rustgpt_jax.config import ModelConfig
from rustgpt_jax.training.run_config import SHAKESPEARE, ConfigError, DataConfig, PhaseConfig


@dataclasses.dataclass
class PhaseData:
    """A phase's training iterator (resumable) and fixed validation batches."""
    train: data_lib.ResumableIterator
    validation: Iterable[dict]
    description: str


def corpus_text(config: DataConfig, path: Optional[str] = None) -> str:
    """The corpus text (bundled Shakespeare or a file / folder), cut to `max_chars`."""
    source = path or config.corpus
    if source == SHAKESPEARE:
        try:
            text = data_lib.shakespeare_text()
        except ModuleNotFoundError as e:  # the corpus package: a set-up step, not a bug
            raise data_lib.DataError(f"DataConfig.corpus='{SHAKESPEARE}': {e}") from None
    else:
        try:
            text = data_lib.load_text(source)
        except data_lib.DataError as e:  # say which field named the path
            field = 'PhaseConfig.data_path' if path else 'DataConfig.corpus'
            raise data_lib.DataError(f'{field}: {e}') from None
    if config.max_chars is not None:
        text = text[:config.max_chars]
    return text


def build_tokenizer(config: DataConfig) -> data_lib.Tokenizer:
    """The tokenizer of `config.tokenizer`, built on the corpus."""
    return data_lib.build_tokenizer(config.tokenizer, corpus_text(config),
                                    **dict(config.tokenizer_options))


def check_vocab(tokenizer: data_lib.Tokenizer, model: ModelConfig) -> None:
    """Every token id must index the embedding table."""
    if tokenizer.vocab_size > model.vocab_size:
        raise ConfigError(
            f'the {tokenizer.kind} tokenizer has {tokenizer.vocab_size} ids but '
            f'ModelConfig.vocab_size={model.vocab_size}; set vocab_size >= '
            f'{tokenizer.vocab_size} (or use a smaller vocabulary)')


def build_phase_data(phase: PhaseConfig, data_config: DataConfig,
                     tokenizer: data_lib.Tokenizer, seed: int) -> PhaseData:
    """Iterators of one phase; the training iterator yields (batch_size * accum_steps, T).

    Args:
      phase: the phase.
      data_config: corpus settings (the 'lm' phases' text unless phase.data_path).
      tokenizer: the run's tokenizer.
      seed: the data-order seed.
    """
    rows = phase.batch_size * phase.accum_steps
    if phase.kind == 'lm':
        tokens = tokenizer.encode_array(corpus_text(data_config, phase.data_path))
        train, val = data_lib.train_validation_split(tokens, data_config.validation_fraction)
        return PhaseData(
            train=data_lib.LMBatchIterator(train, rows, phase.seq_len, seed=seed),
            validation=data_lib.LMValidationBatches(val, phase.batch_size, phase.seq_len,
                                                    num_batches=phase.eval_batches,
                                                    pad_id=tokenizer.pad_id),
            description=f'{len(train):,} train / {len(val):,} validation tokens')
    examples = [data_lib.encode_instruction(tokenizer, ex)
                for ex in data_lib.load_instructions(phase.data_path)]
    if len(examples) >= 2:
        train, val = data_lib.train_validation_split(
            examples, max(phase.validation_fraction, 1.0 / len(examples)))
    else:
        train, val = examples, examples  # one example: validate on it
    return PhaseData(
        train=data_lib.PackedBatchIterator(train, rows, phase.seq_len, seed=seed,
                                           pad_id=tokenizer.pad_id),
        validation=data_lib.PackedValidationBatches(val, phase.batch_size, phase.seq_len,
                                                    num_batches=phase.eval_batches,
                                                    pad_id=tokenizer.pad_id),
        description=f'{len(train)} train / {len(val)} validation instruction examples')


def as_device_batch(batch: dict) -> dict:
    """Host numpy batch -> contiguous int32 / float32 arrays."""
    return {k: np.ascontiguousarray(v) for k, v in batch.items()}
