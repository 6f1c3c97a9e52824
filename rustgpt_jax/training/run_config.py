"""Plain dataclasses describing a training run (gin configures them at the edges)."""

from __future__ import annotations

import dataclasses
from typing import Optional

from rustgpt_jax.config import ModelConfig
from rustgpt_jax.data.tokenizers import TOKENIZER_KINDS
from rustgpt_jax.sharding.mesh import MeshConfig
from rustgpt_jax.sharding.rules import logical_axis_rules
from rustgpt_jax.training.optim import OptimizerConfig

PHASE_KINDS = ('lm', 'instruct')
SHAKESPEARE = 'shakespeare'


class ConfigError(ValueError):
    """A run configuration that cannot run as given: a mesh the devices cannot form, a
    vocabulary larger than the model's. Field checks of the dataclasses below raise a
    plain ValueError at construction (gin reports those)."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_fraction(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f'{name} must be in [0, 1), got {value!r}')


def _check_mesh(mesh) -> None:
    """What a MeshConfig says on its own; whether the devices fit it is checked by
    `loop.prepare`, which builds the mesh before the run writes anything."""
    if not isinstance(mesh, MeshConfig):
        raise ValueError(f'RunConfig.mesh must be a MeshConfig (@MeshConfig()) or None, '
                         f'got {mesh!r}')
    if len(mesh.shape) != len(mesh.axis_names):
        raise ValueError(f'MeshConfig.shape {tuple(mesh.shape)} and MeshConfig.axis_names '
                         f'{tuple(mesh.axis_names)} differ in length')
    if not all(_is_int(s) and (s >= 1 or s == -1) for s in mesh.shape) or list(
            mesh.shape).count(-1) > 1:
        raise ValueError(f'MeshConfig.shape {tuple(mesh.shape)}: use sizes >= 1 and at most '
                         'one -1')
    try:
        logical_axis_rules(mesh.strategy)
    except ValueError as e:
        raise ValueError(f'MeshConfig.strategy: {e}') from None



@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the pretraining text and the tokenizer come from.

    Attributes:
      corpus: 'shakespeare' (the bundled corpus) or a path to a text file / folder of
        .txt files. The tokenizer vocabulary is built from this text.
      tokenizer: 'char', 'bpe' or 'word'.
      tokenizer_options: keyword options of the kind (e.g. bpe `vocab_size`), as pairs.
      validation_fraction: the last fraction of the tokens is held out.
      max_chars: use only the first this many characters (quick runs, tests).
    """
    corpus: str = SHAKESPEARE
    tokenizer: str = 'char'
    tokenizer_options: tuple = ()
    validation_fraction: float = 0.1
    max_chars: Optional[int] = None

    def __post_init__(self):
        # Checked here, not when the data is first read: a bad value must stop the run
        # before it writes anything to its directory.
        if not isinstance(self.corpus, str) or not self.corpus:
            raise ValueError(f"DataConfig.corpus must be '{SHAKESPEARE}' or a path, "
                             f'got {self.corpus!r}')
        if self.tokenizer not in TOKENIZER_KINDS:
            raise ValueError(f'DataConfig.tokenizer={self.tokenizer!r} is not one of '
                             f'{TOKENIZER_KINDS}')
        _check_fraction('DataConfig.validation_fraction', self.validation_fraction)
        if self.max_chars is not None and (not _is_int(self.max_chars) or self.max_chars < 2):
            raise ValueError(f'DataConfig.max_chars must be >= 2 or None, got {self.max_chars}')


@dataclasses.dataclass(frozen=True)
class PhaseConfig:
    """One phase of a run (pretraining, then optionally instruction tuning).

    Attributes:
      name: unique name (saved with the data position).
      kind: 'lm' (next-token prediction on the corpus) or 'instruct' (JSONL prompt /
        response pairs, loss on responses only, packed with segment ids).
      steps: optimizer steps in this phase.
      batch_size: rows per micro-batch B.
      seq_len: tokens per row T (<= ModelConfig.max_seq_len).
      accum_steps: micro-batches per optimizer step (the effective batch is their union).
      optimizer: AdamW settings; each phase starts a fresh optimizer state.
      data_path: the JSONL file of an 'instruct' phase; for 'lm', None uses the corpus.
      validation_fraction: held-out fraction of an 'instruct' phase's examples.
      eval_batches: validation batches per evaluation (None = all).
    """
    name: str = 'pretrain'
    kind: str = 'lm'
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 64
    accum_steps: int = 1
    optimizer: OptimizerConfig = OptimizerConfig()
    data_path: Optional[str] = None
    validation_fraction: float = 0.1
    eval_batches: Optional[int] = 16

    def __post_init__(self):
        if self.kind not in PHASE_KINDS:
            raise ValueError(f'PhaseConfig.kind={self.kind!r} is not one of {PHASE_KINDS}')
        for name in ('steps', 'batch_size', 'seq_len', 'accum_steps'):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f'PhaseConfig.{name} must be an integer >= 1, got {value!r}')
        if not isinstance(self.optimizer, OptimizerConfig):
            raise ValueError(f'phase {self.name!r}: PhaseConfig.optimizer must be an '
                             f'OptimizerConfig (@OptimizerConfig()), got {self.optimizer!r}')
        _check_fraction('PhaseConfig.validation_fraction', self.validation_fraction)
        if self.eval_batches is not None and (not _is_int(self.eval_batches)
                                              or self.eval_batches < 1):
            raise ValueError(f'PhaseConfig.eval_batches must be an integer >= 1 or None, '
                             f'got {self.eval_batches!r}')
        if self.kind == 'instruct' and not self.data_path:
            raise ValueError(f'phase {self.name!r}: an instruct phase needs data_path '
                             '(a JSONL file of {"prompt": ..., "response": ...})')


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole run: model, data, phases and bookkeeping.

    Attributes:
      model: the model.
      data: corpus and tokenizer.
      phases: run in order; the step counter continues across phases.
      run_dir: checkpoints, TensorBoard events, metrics.csv and config.gin go here.
      seed: parameter init, data order and dropout.
      checkpoint_every: evaluate and checkpoint every this many steps (and at the end
        of every phase).
      max_to_keep: latest checkpoints kept (the best by validation loss is kept too).
      log_every: progress-bar / CSV / TensorBoard interval in steps.
      time_budget_s: stop (with a final evaluation and checkpoint) after this many
        seconds of training; None = run every step.
      progress: show a tqdm progress bar.
      mesh: shard the run over a device mesh (data / FSDP / tensor parallel); None
        trains on the default device.
    """
    model: ModelConfig
    data: DataConfig = DataConfig()
    phases: tuple = (PhaseConfig(),)
    run_dir: str = 'runs/default'
    seed: int = 0
    checkpoint_every: int = 200
    max_to_keep: int = 3
    log_every: int = 10
    time_budget_s: Optional[float] = None
    progress: bool = True
    mesh: Optional[MeshConfig] = None

    def __post_init__(self):
        for name, kind in (('model', ModelConfig), ('data', DataConfig)):
            if not isinstance(getattr(self, name), kind):
                raise ValueError(f'RunConfig.{name} must be a {kind.__name__} '
                                 f'(@{kind.__name__}()), got {getattr(self, name)!r}')
        if not self.phases:
            raise ValueError('RunConfig.phases is empty')
        bad = [p for p in self.phases if not isinstance(p, PhaseConfig)]
        if bad:
            raise ValueError(f'RunConfig.phases must be PhaseConfigs (@PhaseConfig()), got '
                             f'{bad[0]!r}')
        if not isinstance(self.run_dir, str) or not self.run_dir:
            raise ValueError(f'RunConfig.run_dir must be a non-empty path, got {self.run_dir!r}')
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            raise ValueError(f'RunConfig.phases have duplicate names: {names}')
        for phase in self.phases:
            if phase.seq_len > self.model.max_seq_len:
                raise ValueError(f'phase {phase.name!r}: seq_len {phase.seq_len} exceeds '
                                 f'ModelConfig.max_seq_len={self.model.max_seq_len}')
        for name in ('checkpoint_every', 'max_to_keep', 'log_every'):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f'RunConfig.{name} must be >= 1, got {getattr(self, name)}')
        if not _is_int(self.seed):
            raise ValueError(f'RunConfig.seed must be an integer, got {self.seed!r}')
        if self.time_budget_s is not None and (
                isinstance(self.time_budget_s, bool)
                or not isinstance(self.time_budget_s, (int, float)) or self.time_budget_s <= 0):
            raise ValueError(f'RunConfig.time_budget_s must be > 0 seconds or None, got '
                             f'{self.time_budget_s!r}')
        if self.mesh is not None:
            _check_mesh(self.mesh)

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.phases)

    def phase_at(self, step: int) -> tuple[int, PhaseConfig, int]:
        """(index, phase, first global step of the phase) that runs global step `step`."""
        start = 0
        for i, phase in enumerate(self.phases):
            if step < start + phase.steps:
                return i, phase, start
            start += phase.steps
        return len(self.phases) - 1, self.phases[-1], start - self.phases[-1].steps

