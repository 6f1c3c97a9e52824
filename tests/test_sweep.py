"""Optuna sweeps: spec checks, and a 4-trial SQLite study with two worker processes that
is killed mid-run and resumed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import optuna
import pytest
from test_experiments import write_toy_experiment

from rustgpt_jax.experiments import sweep
from rustgpt_jax.experiments.plots import read_metrics

State = optuna.trial.TrialState


def toy_spec(tmp_path, steps: int = 9, **overrides) -> dict:
    """A sweep spec over the toy experiment in `tmp_path` (`write_toy_experiment`)."""
    write_toy_experiment(tmp_path, steps=steps)
    spec = dict(name='toy_sweep', base_files=[str(tmp_path / 'model.gin'),
                                              str(tmp_path / 'run.gin')],
                fixed=['run_config.checkpoint_every = 3'],
                params={'pretrain/OptimizerConfig.learning_rate':
                        {'type': 'float', 'low': 1e-3, 'high': 1e-2, 'log': True},
                        'ModelConfig.num_kv_heads': {'type': 'categorical',
                                                     'choices': [1, 2, 4]}},
                sampler='random', seed=0, pruner='none')
    spec.update(overrides)
    return spec


def write_spec(tmp_path, **overrides) -> str:
    path = tmp_path / 'spec.json'
    path.write_text(json.dumps(toy_spec(tmp_path, **overrides)))
    return str(path)


def test_spec_validation_and_gin_form(tmp_path):
    base = json.loads(open(write_spec(tmp_path)).read())
    with pytest.raises(ValueError, match='sampler must be one of'):
        sweep.check_spec(dict(base, sampler='cma'))
    with pytest.raises(ValueError, match='must be categorical'):
        sweep.check_spec(dict(base, sampler='grid'))
    with pytest.raises(ValueError, match='low < high'):
        sweep.check_spec(dict(base, params={'x.y': {'type': 'float', 'low': 1, 'high': 1}}))
    with pytest.raises(ValueError, match="non-empty 'params'"):
        sweep.check_spec(dict(base, params={}))
    gin_file = tmp_path / 'spec.gin'
    gin_file.write_text(
        "sweep.name = 'toy_sweep'\n"
        f"sweep.base_files = {base['base_files']!r}\n"
        "sweep.fixed = ['run_config.checkpoint_every = 3']\n"
        f"sweep.params = {base['params']!r}\n"
        "sweep.sampler = 'random'\nsweep.pruner = 'none'\n")
    assert sweep.load_spec(str(gin_file)) == sweep.load_spec(str(tmp_path / 'spec.json'))
    grid = sweep.check_spec(dict(base, sampler='grid', params={
        'ModelConfig.num_kv_heads': {'type': 'categorical', 'choices': [1, 2]}}))
    assert isinstance(sweep.make_sampler(grid), optuna.samplers.GridSampler)


def _trials(storage_url):
    """The study's trials, or [] while the sweep has not created it yet.

    Checked read-only first: `load_study` on a fresh SQLite file initialises Optuna's
    schema, and doing that while the launcher initialises it too races on the schema
    stamp (an IntegrityError in either process). Only the sweep may create the storage.
    """
    path = storage_url[len('sqlite:///'):]
    try:
        with contextlib.closing(sqlite3.connect(f'file:{path}?mode=ro', uri=True)) as db:
            found = db.execute('SELECT 1 FROM studies WHERE study_name = ?',
                               ('toy_sweep',)).fetchone()
    except sqlite3.OperationalError:  # no file or no schema yet
        return []
    if not found:
        return []
    study = optuna.load_study(study_name='toy_sweep', storage=storage_url)
    return study.get_trials(deepcopy=False)


def test_two_workers_killed_and_resumed(tmp_path):
    spec = write_spec(tmp_path)
    db = tmp_path / 'study.db'
    url = f'sqlite:///{db}'
    cmd = [sys.executable, '-m', 'rustgpt_jax.experiments.sweep', spec, '--storage', url,
           '--workers', '2', '--trials', '4', '--runs_dir', str(tmp_path / 'runs'),
           '--heartbeat_s', '1']
    launcher = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    # Crash the whole sweep (launcher, both workers, their trainers) once one trial has
    # finished and another is mid-training: it has its parameters (a trial killed between
    # Optuna's ask and its suggestions has none to retry with; seen once in CI).
    deadline = time.time() + 150
    while time.time() < deadline:
        trials = _trials(url)
        if (any(t.state == State.COMPLETE for t in trials)
                and any(t.state == State.RUNNING and t.params for t in trials)):
            break
        assert launcher.poll() is None, 'the sweep ended before it could be killed'
        time.sleep(0.5)
    else:
        pytest.fail('no trial completed in time')
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
    before = _trials(url)
    killed = [t for t in before if t.state == State.RUNNING]
    assert any(t.params for t in killed) and sum(t.state == State.COMPLETE for t in before) < 4

    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = _trials(url)
    complete = [t for t in after if t.state == State.COMPLETE]
    assert len(complete) == 4
    assert not [t for t in after if t.state == State.RUNNING]
    for dead in killed:  # failed as stale, then retried with the same parameters
        assert after[dead.number].state == State.FAIL
        retries = [t for t in complete if t.system_attrs.get('failed_trial') == dead.number]
        assert len(retries) == 1
        if dead.params:  # one killed before its suggestions is retried with fresh ones
            assert retries[0].params == dead.params
    assert len({t.user_attrs['worker_pid'] for t in complete}) >= 2
    for t in complete:  # reported intermediate values are the run's validation losses
        val = read_metrics(t.user_attrs['run_dir'])[('val', 'loss')]
        reported = sorted(t.intermediate_values.items())
        assert [s for s, _ in reported] == [s for s, _ in val]
        assert [v for _, v in reported] == pytest.approx([v for _, v in val])
        assert t.value == pytest.approx(min(v for _, v in val))
        assert [s for s, _ in val] == [3, 6, 9]


def test_pruned_trial_stops_its_training(tmp_path):
    # A long run (2000 steps) that a threshold pruner stops at its first evaluation: the
    # worker must report that loss, mark the trial PRUNED and kill the trainer early.
    spec = sweep.load_spec(write_spec(tmp_path, fixed=[
        'run_config.checkpoint_every = 3', 'pretrain/PhaseConfig.steps = 2000']))
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0))
    study.optimize(sweep.Objective(spec, str(tmp_path / 'runs'), poll_s=0.1), n_trials=1)
    trial = study.trials[0]
    assert trial.state == State.PRUNED
    val = read_metrics(trial.user_attrs['run_dir'])[('val', 'loss')]
    assert list(trial.intermediate_values.items()) == [(3, pytest.approx(val[0][1]))]
    assert val[-1][0] < 2000  # the trainer was killed, not run to the end


def test_surplus_trial_of_a_race_is_failed_before_training():
    """Two workers passing the budget check at once: the later-numbered trial is refused."""
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    for value in (1.0, 2.0):
        study.add_trial(optuna.trial.create_trial(value=value, params={}, distributions={}))
    objective = sweep.Objective({}, 'unused', budget=3)
    first, second = study.ask(), study.ask()  # both RUNNING: 2 finished + 2 running > 3
    objective._check_budget(first)  # 2 ahead of it: within the budget
    with pytest.raises(RuntimeError, match='beyond --trials 3'):
        objective._check_budget(second)
    study.enqueue_trial({})  # a retried trial waiting for a worker also holds a slot
    third = study.ask()
    assert third.number > second.number
    with pytest.raises(RuntimeError, match='beyond --trials 3'):
        objective._check_budget(third)
    sweep.Objective({}, 'unused')._check_budget(third)  # no budget: never refused


def test_a_trial_orphaned_before_its_first_heartbeat_is_failed_and_retried(tmp_path):
    # A worker killed between Optuna's ask and its first heartbeat leaves a RUNNING
    # trial that Optuna never ages; workers waiting for the last trials would hang.
    storage = sweep.make_storage(f'sqlite:///{tmp_path / "study.db"}', heartbeat_s=1)
    study = optuna.create_study(study_name='orphans', storage=storage)
    orphan = study.ask({'x': optuna.distributions.FloatDistribution(0.0, 1.0)})  # no heartbeat
    live = study.ask()
    live.set_user_attr('worker_pid', 123)  # reached its objective: Optuna's heartbeats own it
    assert sweep.fail_orphaned_trials(study, grace_s=60) == []  # too young to judge
    time.sleep(0.05)
    assert sweep.fail_orphaned_trials(study, grace_s=0.01) == [orphan.number]
    states = {t.number: t for t in study.get_trials(deepcopy=False)}
    assert states[orphan.number].state == State.FAIL
    assert states[live.number].state == State.RUNNING
    retry = [t for t in states.values() if t.system_attrs.get('failed_trial') == orphan.number]
    assert len(retry) == 1 and retry[0].state == State.WAITING
    assert retry[0].params == states[orphan.number].params
    assert sweep.fail_orphaned_trials(study, grace_s=0.01) == []  # once only
