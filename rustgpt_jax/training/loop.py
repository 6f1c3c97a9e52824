"""The training loop: phases, evaluation, checkpoints, metrics and resumption.

Side effects (files, progress bar, printing) live here only; the steps are pure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from typing import Callable, Optional

import jax
from tqdm.auto import tqdm

from rustgpt_jax import data as data_lib
from rustgpt_jax.sharding.mesh import resolve_shape
from rustgpt_jax.sharding.training import ShardingPlan, make_plan, rules_batch_axis
from rustgpt_jax.summary import architecture_summary
from rustgpt_jax.training import adaptive_glue, data_setup, init_from, optim, steps
from rustgpt_jax.training import metrics as metrics_lib
from rustgpt_jax.training.checkpoint import (
    TOKENIZER_DIR,
    Checkpointer,
    CheckpointError,
    check_meta,
    make_meta,
)
from rustgpt_jax.training.run_config import ConfigError, RunConfig
from rustgpt_jax.training.state import TrainState, count_params, create_train_state


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/inf; the run stopped before saving it."""


@dataclasses.dataclass
class TrainResult:
    """What `train` returns.

    Attributes:
      state: the final train state.
      step: the last completed global step.
      train_losses: {global step: training loss} of the steps this call ran.
      validation: the last evaluation ({'loss', 'perplexity', 'tokens'}) or None.
      tokenizer: the run's tokenizer.
      run_dir: where everything was written.
      stopped_early: True when the time budget ended the run.
    """
    state: TrainState
    step: int
    train_losses: dict
    validation: Optional[dict]
    tokenizer: data_lib.Tokenizer
    run_dir: str
    stopped_early: bool = False


@dataclasses.dataclass
class Prepared:
    """What `prepare` built and checked before the run directory is touched.

    Attributes:
      tokenizer: the run's tokenizer (rebuilt from the corpus, or the saved one on resume).
      phase_data: each phase's data, in `run.phases` order.
      plan: the sharding plan of `run.mesh` (None without a mesh).
    """
    tokenizer: data_lib.Tokenizer
    phase_data: list
    plan: Optional[ShardingPlan]


def prepare(run: RunConfig, resume: bool = False,
            init: Optional[init_from.Pretrained] = None) -> Prepared:
    """Validates everything about `run` that can fail on the user's input, writing nothing.

    The run directory is untouched until this returns: an existing run without
    `resume`, a corpus or instruction file that is missing or malformed, a tokenizer
    that does not fit the model, an empty validation split of any phase, a mesh the
    devices cannot form, or a checkpoint from another phase list all raise here.

    `init` (pretrained weights, `init_from.load_source`) supplies the tokenizer of a
    fresh run.

    Raises:
      ValueError: a DataError, CheckpointError or ConfigError naming the field, file
        or checkpoint.
    """
    ckpt_dir = os.path.join(run.run_dir, 'checkpoints')
    if not resume and _finished_steps(ckpt_dir):
        raise CheckpointError(f'{ckpt_dir} already holds checkpoints; pass --resume to '
                              'continue that run or choose another run_dir')
    if resume:
        _check_resumable(run, ckpt_dir)
    tokenizer = _setup_tokenizer(run, ckpt_dir, resume, init)
    # Every phase's data now, not at its start: a bad instruction file must not surface
    # only after the pretraining phase has run for an hour.
    phase_data = [data_setup.build_phase_data(p, run.data, tokenizer, run.seed)
                  for p in run.phases]
    plan = None
    if run.mesh is not None:
        _check_mesh_fits(run)
        first = run.phases[0]
        plan = make_plan(run.mesh, run.model, optim.make_optimizer(first.optimizer),
                         first.batch_size, first.seq_len)
    return Prepared(tokenizer=tokenizer, phase_data=phase_data, plan=plan)


def _check_mesh_fits(run: RunConfig) -> None:
    """The mesh against the devices and every phase's batch size (`make_plan` checks only
    the first phase, and only after tracing the model)."""
    try:
        shape = resolve_shape(run.mesh.shape, jax.device_count())
    except ValueError as e:
        raise ConfigError(f'RunConfig.mesh: {e}') from None
    data_axis = rules_batch_axis(run.mesh.rules)
    if data_axis not in tuple(run.mesh.axis_names):
        return
    size = shape[tuple(run.mesh.axis_names).index(data_axis)]
    for phase in run.phases:
        if phase.batch_size % size:
            raise ConfigError(f'phase {phase.name!r}: PhaseConfig.batch_size '
                              f'{phase.batch_size} is not divisible by the {data_axis!r} mesh '
                              f'axis ({size} devices)')


def _finished_steps(ckpt_dir: str) -> list[int]:
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(name) for name in os.listdir(ckpt_dir) if name.isdigit())


def _check_resumable(run: RunConfig, ckpt_dir: str) -> None:
    """The latest checkpoint belongs to this model and one of the run's phases.

    Read from the step's JSON items directly: orbax's manager would create and clean
    directories, and nothing may be written before the run is known to be good.
    """
    steps = _finished_steps(ckpt_dir)
    if not steps:
        return  # --resume of a run that has not saved yet starts it
    step_dir = os.path.join(ckpt_dir, str(steps[-1]))
    try:
        items = {}
        for item in ('data', 'meta'):
            with open(os.path.join(step_dir, item, 'metadata'), encoding='utf-8') as f:
                items[item] = json.load(f)
    except (OSError, ValueError):
        return  # unreadable items: `Checkpointer.restore` reports them with its own error
    check_meta(items['meta'], run.model, None, step_dir)
    phase = items['data'].get('phase')
    names = [p.name for p in run.phases]
    if phase not in names:
        raise CheckpointError(f'checkpoint step {steps[-1]} belongs to phase {phase!r}, '
                              f'which this run config does not have (phases: {names})')


def _restore_or_none(run: RunConfig, ckpt: Checkpointer, tokenizer,
                     plan: Optional[ShardingPlan]):
    """(state, phase index, iterator state) from the latest checkpoint, or None.

    With a sharding plan the template is laid out on the current mesh first, so a
    checkpoint saved on one mesh restores onto another.
    """
    latest = ckpt.latest_step()
    if latest is None:
        return None
    meta = ckpt.read_meta(latest)
    names = [p.name for p in run.phases]
    if meta.get('phase') not in names:
        raise CheckpointError(f'checkpoint step {latest} belongs to phase '
                              f'{meta.get("phase")!r}, which this run config does not have '
                              f'(phases: {names})')
    index = names.index(meta['phase'])
    phase = run.phases[index]
    template = create_train_state(run.model, optim.make_optimizer(phase.optimizer), run.seed,
                                  phase.batch_size, phase.seq_len)
    if plan is not None:
        template = plan.place_state(template)
    tree, data_state, _ = ckpt.restore(latest, template.checkpoint_tree(), run.model, tokenizer)
    return template.replace_tree(tree), index, data_state['iterator']


def _setup_tokenizer(run: RunConfig, ckpt_dir: str, resume: bool,
                     init: Optional[init_from.Pretrained] = None) -> data_lib.Tokenizer:
    saved = os.path.join(ckpt_dir, TOKENIZER_DIR)
    if resume and os.path.isdir(saved):
        tokenizer = data_lib.load_tokenizer(saved)
    elif init is not None:
        tokenizer = init.tokenizer
    else:
        tokenizer = data_setup.build_tokenizer(run.data)
    data_setup.check_vocab(tokenizer, run.model)
    return tokenizer


def train(run: RunConfig, resume: bool = False, gin_config: str = '',
          log: Callable[[str], None] = print, stop_at_step: Optional[int] = None,
          prepared: Optional[Prepared] = None,
          init: Optional[init_from.Pretrained] = None) -> TrainResult:
    """Runs (or resumes) every phase of `run`.

    Args:
      run: the run configuration.
      resume: continue from the latest checkpoint in `run.run_dir/checkpoints`; without
        it an existing checkpoint is an error (so a run is never overwritten silently).
      gin_config: the operative gin config text, stored with every checkpoint.
      log: where progress lines go.
      stop_at_step: end abruptly once this global step is done, with no final
        evaluation or checkpoint, as a kill would (for resumption tests).
      prepared: `prepare(run, resume, init)` when the caller already ran it (a command
        line checks the run before it starts); None runs it here.
      init: pretrained weights and tokenizer to start from (`init_from.load_source`;
        `run.model` must be `init_from.model_config` of it). A resumed run continues
        from its checkpoint instead.

    Raises:
      ValueError: from `prepare`, before anything is written.
      NonFiniteLossError: the loss became NaN/inf (the message names the step and the
        last good checkpoint).
    """
    if prepared is None:
        prepared = prepare(run, resume, init)
    ckpt_dir = os.path.join(run.run_dir, 'checkpoints')
    tokenizer, plan = prepared.tokenizer, prepared.plan
    ckpt = Checkpointer(ckpt_dir, max_to_keep=run.max_to_keep)
    ckpt.save_tokenizer(tokenizer)
    if gin_config:
        with open(os.path.join(run.run_dir, 'config.gin'), 'w', encoding='utf-8') as f:
            f.write(gin_config)
    writer = metrics_lib.MetricsWriter(run.run_dir)
    if plan is not None:
        log(f'mesh {dict(plan.mesh.shape)} strategy {run.mesh.strategy!r} over '
            f'{plan.mesh.size} devices ({jax.process_count()} process(es))')
    context = plan.activate() if plan is not None else contextlib.nullcontext()
    with context:
        return _train(run, resume, gin_config, log, stop_at_step, tokenizer, ckpt, writer,
                      plan, prepared.phase_data, init)


def _train(run, resume, gin_config, log, stop_at_step, tokenizer, ckpt, writer, plan,
           all_phase_data, init=None):
    restored = _restore_or_none(run, ckpt, tokenizer, plan) if resume else None
    state, step, resume_phase, resume_iter = None, 0, None, None
    if restored is not None:
        state, resume_phase, resume_iter = restored
        step = int(state.step)
        log(f'resuming {run.run_dir} at step {step} (phase {run.phases[resume_phase].name!r})')
    loop = _Loop(run, ckpt, writer, tokenizer, gin_config, log, stop_at_step, plan)
    try:
        start = 0
        for index, phase in enumerate(run.phases):
            end = start + phase.steps
            if step < end:
                tx = optim.make_optimizer(phase.optimizer)
                if state is None:
                    if init is not None:
                        state = init_from.initial_state(run.model, tx, run.seed,
                                                        phase.batch_size, phase.seq_len,
                                                        init.params)
                        log(f'initialised from {init.path}')
                    else:
                        state = create_train_state(run.model, tx, run.seed, phase.batch_size,
                                                   phase.seq_len)
                    summary = architecture_summary(run.model)
                    log(f'{summary}\nparameters built: {count_params(state.params):,}')
                    writer.write_text('architecture', summary)
                elif resume_phase != index:
                    # A new phase starts a fresh optimizer (moments and schedule).
                    state = state.replace(tx=tx, opt_state=jax.jit(tx.init)(state.params))
                if plan is not None:
                    state = plan.place_state(state)
                phase_data = all_phase_data[index]
                if resume_phase == index:
                    phase_data.train.restore(resume_iter)
                log(f'phase {phase.name!r} ({phase.kind}): {phase_data.description}; '
                    f'steps {step}..{end}')
                state, step = loop.run_phase(state, step, start, phase, phase_data)
                if loop.stopped_early:
                    break
            start = end
    finally:
        loop.close()
        writer.close()
        ckpt.close()
    return TrainResult(state=state, step=step, train_losses=loop.train_losses,
                       validation=loop.validation, tokenizer=tokenizer, run_dir=run.run_dir,
                       stopped_early=loop.stopped_early)


class _Loop:
    """Per-run mutable bookkeeping shared by the phases."""

    def __init__(self, run: RunConfig, ckpt: Checkpointer, writer, tokenizer, gin_config, log,
                 stop_at_step: Optional[int] = None, plan: Optional[ShardingPlan] = None):
        self.run, self.ckpt, self.writer, self.log = run, ckpt, writer, log
        self.plan = plan
        self.stop_at_step = stop_at_step
        self.meta = make_meta(run.model, tokenizer, gin_config)
        self.eval_step = steps.make_eval_step(run.model)
        self.train_losses: dict[int, float] = {}
        self.validation: Optional[dict] = None
        self.stopped_early = False
        self.t_start = time.perf_counter()
        self.bar = tqdm(total=run.total_steps, disable=not run.progress, dynamic_ncols=True)

    def close(self):
        self.bar.close()

    def _check(self, step: int, phase_name: str, metrics: dict) -> dict:
        """Host copy of one step's metrics; raises on a non-finite loss or gradient."""
        host = jax.device_get(metrics)
        loss, grad_norm = float(host['loss']), float(host['grad_norm'])
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            last = self.ckpt.latest_step()
            where = (f'the last good checkpoint is step {last} in {self.ckpt.directory}'
                     if last is not None else 'no checkpoint had been saved yet')
            raise NonFiniteLossError(
                f'non-finite training loss {loss} (gradient norm {grad_norm}) at step {step} '
                f'of phase {phase_name!r}; the run stopped without saving this state; {where}')
        self.train_losses[step] = loss
        return host

    def run_phase(self, state: TrainState, step: int, start: int, phase, phase_data):
        """Trains global steps step+1 .. start+phase.steps; returns (state, step)."""
        run = self.run
        end = start + phase.steps
        schedule = optim.learning_rate_schedule(phase.optimizer)
        shardings = None
        if self.plan is not None:
            shardings = (self.plan.state_prefix(state), self.plan.batch)
        train_step = steps.make_train_step(
            run.model, phase.accum_steps, schedule=lambda s: schedule(s - start),
            shardings=shardings)
        tokens_per_step = phase.batch_size * phase.accum_steps * phase.seq_len
        self.bar.n = step
        self.bar.refresh()
        pending = None  # (step, device metrics): checked one step late to keep dispatch async
        t_log, steps_since_log = time.perf_counter(), 0
        while step < end:
            batch = data_setup.as_device_batch(next(phase_data.train))
            if self.plan is not None:
                batch = self.plan.global_batch(batch)
            state, metrics = train_step(state, batch)
            step += 1
            steps_since_log += 1
            if pending is not None:
                self._check(pending[0], phase.name, pending[1])
            pending = (step, metrics)
            if step == self.stop_at_step:
                self._check(step, phase.name, metrics)
                self.stopped_early = True
                break
            over_budget = (run.time_budget_s is not None
                           and time.perf_counter() - self.t_start > run.time_budget_s)
            if step % run.log_every == 0 or step == end or over_budget:
                host = self._check(step, phase.name, metrics)
                pending = None
                now = time.perf_counter()
                tok_s = tokens_per_step * steps_since_log / max(now - t_log, 1e-9)
                t_log, steps_since_log = now, 0
                values = {'loss': host['loss'], 'grad_norm': host['grad_norm'],
                          'learning_rate': host['learning_rate'], 'tokens_per_s': tok_s}
                values.update(adaptive_glue.summarize_intermediates(host['intermediates']))
                self.writer.write(step, 'train', values)
                self.bar.set_postfix(loss=f'{float(host["loss"]):.4f}', tok_s=f'{tok_s:,.0f}')
            self.bar.update(step - self.bar.n)
            if step % run.checkpoint_every == 0 or step == end or over_budget:
                if pending is not None:
                    self._check(pending[0], phase.name, pending[1])
                    pending = None
                final = step == run.total_steps or over_budget
                self.evaluate_and_save(state, step, phase, phase_data, final)
            if over_budget:
                self.log(f'time budget of {run.time_budget_s:.0f} s reached at step {step}')
                self.stopped_early = True
                break
        return state, step

    def evaluate_and_save(self, state: TrainState, step: int, phase, phase_data,
                          final: bool = False) -> None:
        """Evaluates (the run's last evaluation: the whole validation split), logs, saves."""
        batches = phase_data.validation.whole() if final else phase_data.validation
        self.validation = steps.evaluate(self.eval_step, state, batches)
        self.writer.write(step, 'val', {'loss': self.validation['loss'],
                                        'perplexity': self.validation['perplexity']})
        scope = (f'whole validation split, {self.validation["tokens"]:,.0f} tokens' if final
                 else f'{len(batches)} of {batches.total_batches} batches, '
                      f'{self.validation["tokens"]:,.0f} tokens')
        self.bar.write(f'step {step}: validation loss {self.validation["loss"]:.4f} '
                       f'(perplexity {self.validation["perplexity"]:.2f}; {scope})')
        data_state = {'phase': phase.name, 'iterator': phase_data.train.state()}
        self.ckpt.save(step, state.checkpoint_tree(), data_state,
                       {**self.meta, 'phase': phase.name}, val_loss=self.validation['loss'])
