"""Orbax checkpoints of a training run, and `load_for_inference` for the decoding CLIs.

Layout of a checkpoint directory (orbax `CheckpointManager`):

    <dir>/<step>/state   params, optimizer state, step, RNG, 'adaptive' collection
    <dir>/<step>/data    JSON: the data iterator position (phase name + iterator state)
    <dir>/<step>/meta    JSON: model config, gin config text, tokenizer fingerprint, val loss
    <dir>/tokenizer/     the tokenizer (`Tokenizer.save`), written once beside the steps

Orbax writes each step into a temporary directory and renames it when complete, so a
kill at any moment leaves only finished steps visible (unfinished ones are removed
on the next start). The manager keeps the last `max_to_keep` steps plus the best one by
validation loss.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import shutil
from typing import Any, Optional

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from rustgpt_jax.config import IMPLEMENTATION_FIELDS, REMOVED_FIELDS, ModelConfig
from rustgpt_jax.data import Tokenizer, load_tokenizer
from rustgpt_jax.nn.packing import unpack_projections

FORMAT_VERSION = 1
TOKENIZER_DIR = 'tokenizer'
CHECKPOINT_SUBDIR = 'checkpoints'
# Steps the keep policy drops are renamed in here (atomic), then removed. Orbax's default
# removes a step directory file by file: a kill in between left a step that still listed
# but had lost its 'meta' item (seen once in tests/test_checkpoint.py's kill test).
TRASH_SUBDIR = '.deleted'


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here (missing, or for another model/tokenizer)."""


def config_to_dict(config: ModelConfig) -> dict:
    """JSON-able ModelConfig (enum values as strings, tuples as lists)."""
    out = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, enum.Enum):
            value = value.value
        elif isinstance(value, tuple):
            value = list(value)
        out[field.name] = value
    return out


def config_from_dict(values: dict) -> ModelConfig:
    """The ModelConfig of a checkpoint's JSON, also from before execution choices left it:
    their fields (`config.REMOVED_FIELDS`) are dropped, and `legacy_packed` tells
    whether the params were saved in the packed layout."""
    values = {k: v for k, v in values.items() if k not in REMOVED_FIELDS}
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise CheckpointError(f'checkpoint model config has fields this code does not know: '
                              f'{unknown}')
    return ModelConfig(**values)


def legacy_packed(values: dict) -> bool:
    """Whether a checkpoint's JSON config says its params are in the packed layout
    (`packed_projections`, a field of ModelConfig before the runtime layer)."""
    return bool(values.get('packed_projections', False))


def config_differences(saved: ModelConfig, current: ModelConfig,
                       ignore=IMPLEMENTATION_FIELDS) -> list[str]:
    """'field: checkpoint X, config Y' for every differing field not in `ignore`."""
    a, b = config_to_dict(saved), config_to_dict(current)
    return [f'{k}: checkpoint {a[k]!r}, config {b[k]!r}'
            for k in a if k not in ignore and a[k] != b[k]]


def resolve_directory(directory: str) -> str:
    """Accepts a run directory (holding `checkpoints/`) or a checkpoint directory."""
    sub = os.path.join(directory, CHECKPOINT_SUBDIR)
    return sub if os.path.isdir(sub) else directory


class Checkpointer:
    """Saves and restores run checkpoints.

    Args:
      directory: where the steps go (created if missing).
      max_to_keep: how many latest steps to keep (the best step is kept besides).
    """

    def __init__(self, directory: str, max_to_keep: int = 3):
        if max_to_keep < 1:
            raise ValueError(f'max_to_keep must be >= 1, got {max_to_keep}')
        self.directory = os.path.abspath(directory)
        preserve = policies.AnyPreservationPolicy([
            policies.LatestN(n=max_to_keep),
            policies.BestN(get_metric_fn=_val_loss, reverse=True, n=1,
                           keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preserve, best_fn=_val_loss, best_mode='min',
            cleanup_tmp_directories=True, enable_async_checkpointing=False, create=True,
            todelete_subdir=TRASH_SUBDIR)
        self._empty_trash()  # what a killed run was removing
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=('state', 'data', 'meta'))

    def _empty_trash(self) -> None:
        shutil.rmtree(os.path.join(self.directory, TRASH_SUBDIR), ignore_errors=True)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def best_step(self) -> Optional[int]:
        return self.manager.best_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Writes the tokenizer beside the steps (all steps of one run share it)."""
        path = os.path.join(self.directory, TOKENIZER_DIR)
        if os.path.isdir(path):
            saved = load_tokenizer(path)
            if saved.fingerprint() != tokenizer.fingerprint():
                raise CheckpointError(
                    f'{path} holds a different tokenizer (fingerprint '
                    f'{saved.fingerprint()[:12]}, this run {tokenizer.fingerprint()[:12]}); '
                    'use a new run directory')
            return
        tokenizer.save(path)

    def save(self, step: int, tree: dict, data_state: dict, meta: dict,
             val_loss: Optional[float] = None) -> None:
        """Saves one step (blocking; the directory appears only when complete).

        Args:
          step: the optimizer step.
          tree: `TrainState.checkpoint_tree()`.
          data_state: JSON-able data position.
          meta: JSON-able run description (see `make_meta`).
          val_loss: validation loss of this step, ranks the best checkpoint.
        """
        metrics = None if val_loss is None else {'val_loss': float(val_loss)}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(tree), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave({**meta, 'val_loss': metrics and metrics['val_loss']})),
            metrics=metrics, force=True)
        self.manager.wait_until_finished()
        self._empty_trash()  # steps dropped by the keep policy were renamed there

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))['meta']

    def restore(self, step: int, target_tree: dict, config: ModelConfig,
                tokenizer: Optional[Tokenizer] = None) -> tuple[dict, dict, dict]:
        """Restores `step` into the structure of `target_tree` after checking the config.

        Raises:
          CheckpointError: the checkpoint belongs to another model config (naming each
            differing field) or another tokenizer.

        Returns:
          (tree, data_state, meta).
        """
        meta = self.read_meta(step)
        check_meta(meta, config, tokenizer, f'{self.directory}/{step}')
        if legacy_packed(meta['model_config']):
            raise CheckpointError(
                f'{self.directory}/{step} holds packed params (ModelConfig.packed_projections, '
                f'removed): training resumes in the standard layout only; '
                f'load_for_inference reads it')
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target_tree), data=ocp.args.JsonRestore()))
        return restored['state'], restored['data'], meta

    def close(self) -> None:
        self.manager.close()


def _val_loss(metrics: dict) -> float:
    return metrics['val_loss']


def make_meta(config: ModelConfig, tokenizer: Tokenizer, gin_config: str = '',
              **extra: Any) -> dict:
    """The JSON meta item of a checkpoint."""
    return {'format': FORMAT_VERSION, 'model_config': config_to_dict(config),
            'gin_config': gin_config, 'tokenizer_fingerprint': tokenizer.fingerprint(),
            'tokenizer_kind': tokenizer.kind, **extra}


def check_meta(meta: dict, config: ModelConfig, tokenizer: Optional[Tokenizer],
               where: str) -> None:
    """Raises CheckpointError when `meta` does not fit `config` / `tokenizer`."""
    if meta.get('format') != FORMAT_VERSION:
        raise CheckpointError(f'{where}: checkpoint format {meta.get("format")!r} is not '
                              f'{FORMAT_VERSION}')
    diffs = config_differences(config_from_dict(meta['model_config']), config)
    if diffs:
        raise CheckpointError(f'{where} was written for a different model config; differing '
                              f'fields: ' + '; '.join(diffs))
    if tokenizer is not None and meta['tokenizer_fingerprint'] != tokenizer.fingerprint():
        raise CheckpointError(
            f'{where} was trained with another tokenizer (fingerprint '
            f'{meta["tokenizer_fingerprint"][:12]}, this run {tokenizer.fingerprint()[:12]})')


def load_for_inference(directory: str, step: Optional[int] = None, which: str = 'best',
                       ) -> tuple[ModelConfig, Any, Tokenizer]:
    """Model config, parameters and tokenizer of a saved run, ready for `model.apply`.

    Args:
      directory: a run directory or its `checkpoints/` directory.
      step: a specific step; default: `which`.
      which: 'best' (lowest validation loss; the latest step when none has one) or
        'latest'.

    Returns:
      (config, params, tokenizer).
    """
    if which not in ('best', 'latest'):
        raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
    ckpt_dir = resolve_directory(directory)
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f'no checkpoint directory at {directory!r}')
    options = ocp.CheckpointManagerOptions(best_fn=_val_loss, best_mode='min',
                                           create=False)
    manager = ocp.CheckpointManager(os.path.abspath(ckpt_dir), options=options,
                                    item_names=('state', 'data', 'meta'))
    try:
        if step is None:
            step = manager.best_step() if which == 'best' else manager.latest_step()
        if step is None:
            raise CheckpointError(f'{ckpt_dir} holds no finished checkpoint')
        if step not in manager.all_steps():
            raise CheckpointError(f'{ckpt_dir} has no step {step}; steps: '
                                  f'{list(manager.all_steps())}')
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    finally:
        manager.close()
    meta = restored['meta']
    config = config_from_dict(meta['model_config'])
    tokenizer = load_tokenizer(os.path.join(ckpt_dir, TOKENIZER_DIR))
    check_meta(meta, config, tokenizer, f'{ckpt_dir}/{step}')
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f'tokenizer has {tokenizer.vocab_size} ids but the model only '
                              f'{config.vocab_size} (ModelConfig.vocab_size)')
    params = restored['state']['params']
    if legacy_packed(meta['model_config']):
        params = unpack_projections(config, params)  # saved by an older version, packed
    return config, params, tokenizer
