"""Command line: `python -m rustgpt_jax.experiments.sweep SPEC.gin|json --storage URL
--workers 2 --trials N`.

An Optuna study over gin parameters. Every trial trains in a child process
(`python -m rustgpt_jax.train`); its worker reads the run's metrics.csv while it trains,
reports each validation loss with `trial.report` and kills the child when the pruner
says so. The objective is the run's best validation loss (minimised).

Storage is Optuna's RDB storage: a SQLite file by default; a PostgreSQL URL
(`postgresql+psycopg://user:pass@host:port/db`, with psycopg 3, the `test` extra) lets
workers on many machines share one study the same way, each machine running this
command (tests/test_sweep_postgres.py runs it on a real server).
`--trials N` is the study's total of finished (complete or pruned) trials, so running
the same command again resumes: the study is loaded, trials of dead workers (no
heartbeat for `2 x --heartbeat_s`) are marked FAIL and re-enqueued with their parameters,
and the workers go on until N trials have finished.

The spec, the trained run's configuration at every parameter's candidate values and
the storage are checked before any trial starts; a user error is one line,
`rustgpt-sweep: error: <message>`, exit status 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import warnings
from typing import Optional, Sequence

import gin
import optuna
import sqlalchemy.exc

from rustgpt_jax import cli_errors
from rustgpt_jax import train as train_cli
from rustgpt_jax.experiments.plots import read_metrics
from rustgpt_jax.training import loop

SAMPLERS = ('grid', 'random', 'tpe')
PARAM_TYPES = ('float', 'int', 'categorical')
SPEC_KEYS = ('name', 'base_files', 'params', 'fixed', 'sampler', 'seed', 'pruner')
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


@gin.configurable
def sweep(name: str = gin.REQUIRED, base_files: Sequence[str] = gin.REQUIRED,
          params: dict = gin.REQUIRED, fixed: Sequence[str] = (), sampler: str = 'tpe',
          seed: int = 0, pruner: Optional[dict] = None) -> dict:
    """A sweep spec from gin bindings (the same keys as the JSON form; see `check_spec`)."""
    return dict(name=name, base_files=list(base_files), params=dict(params), fixed=list(fixed),
                sampler=sampler, seed=seed, pruner=pruner)


def check_spec(spec: dict) -> dict:
    """Validates a spec and fills defaults.

    Keys: name, base_files (gin files of the trained run), params ({gin binding target:
    {'type': 'float'|'int', 'low', 'high', 'log'?} or {'type': 'categorical', 'choices'}}),
    fixed (bindings of every trial), sampler ('grid' needs every parameter categorical),
    seed, pruner (None: median pruner defaults; {'n_startup_trials', 'n_warmup_steps'};
    or the string 'none').

    Raises:
      ValueError: a missing key, an unknown sampler or parameter type, or a bad range.
    """
    if not isinstance(spec, dict):
        raise ValueError(f'a sweep spec is a mapping of keys, got {type(spec).__name__}')
    for key in ('name', 'base_files', 'params'):
        if not spec.get(key):
            raise ValueError(f'sweep spec needs a non-empty {key!r}')
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f'sweep spec has unknown keys {unknown}; known: {list(SPEC_KEYS)}')
    out = {'fixed': [], 'sampler': 'tpe', 'seed': 0, 'pruner': None, **spec}
    if not isinstance(out['name'], str):
        raise ValueError(f"sweep spec 'name' must be a string, got {out['name']!r}")
    for key in ('base_files', 'fixed'):
        if isinstance(out[key], str) or not all(isinstance(v, str) for v in out[key]):
            raise ValueError(f'sweep spec {key!r} must be a list of strings, got {out[key]!r}')
    if out['sampler'] not in SAMPLERS:
        raise ValueError(f'sweep sampler must be one of {SAMPLERS}, got {out["sampler"]!r}')
    if not isinstance(out['seed'], int) or isinstance(out['seed'], bool):
        raise ValueError(f"sweep spec 'seed' must be an integer, got {out['seed']!r}")
    pruner = out['pruner']
    if not (pruner is None or pruner == 'none' or (
            isinstance(pruner, dict) and set(pruner) <= {'n_startup_trials', 'n_warmup_steps'})):
        raise ValueError("sweep pruner must be None, 'none' or a dict of n_startup_trials / "
                         f'n_warmup_steps, got {pruner!r}')
    if not isinstance(out['params'], dict):
        raise ValueError(f"sweep spec 'params' must map gin binding targets to ranges, "
                         f"got {out['params']!r}")
    for target, p in out['params'].items():
        kind = p.get('type') if isinstance(p, dict) else None
        if kind not in PARAM_TYPES:
            raise ValueError(f'parameter {target!r}: type must be one of {PARAM_TYPES}, '
                             f'got {kind!r}')
        if kind == 'categorical':
            if not p.get('choices') or isinstance(p['choices'], (str, dict)):
                raise ValueError(f'parameter {target!r}: categorical needs non-empty choices')
        else:
            number = int if kind == 'int' else (int, float)
            ends = [p.get('low'), p.get('high')]
            if not all(isinstance(v, number) and not isinstance(v, bool) for v in ends) or not (
                    p['low'] < p['high']):
                raise ValueError(f'parameter {target!r}: {kind} needs low < high, got {p}')
            if p.get('log') and p['low'] <= 0:
                raise ValueError(f'parameter {target!r}: a log range needs low > 0, got {p}')
        if out['sampler'] == 'grid' and kind != 'categorical':
            raise ValueError(f'grid sampler: parameter {target!r} must be categorical '
                             '(list its grid points as choices)')
    return out


def candidate_bindings(spec: dict) -> list[list[str]]:
    """Bindings that together give every parameter each of its candidate values (every
    choice, both ends of a range) once, the other parameters at their first value."""
    first = {t: (p['choices'][0] if p['type'] == 'categorical' else p['low'])
             for t, p in spec['params'].items()}
    out = []
    for target, p in spec['params'].items():
        values = list(p['choices']) if p['type'] == 'categorical' else [p['low'], p['high']]
        for value in values:
            out.append([f'{t} = {(value if t == target else v)!r}' for t, v in first.items()])
    return out


def check_trainable(spec: dict, runs_dir: str) -> None:
    """Loads the trained run's configuration at every candidate value and checks its data
    (`loop.prepare`, once): a misspelt target or an impossible choice fails here, before a
    study or a trial exists, rather than as failed trials.

    Raises:
      ValueError: naming the parameter value and the problem.
    """
    missing = [f for f in spec['base_files'] if not os.path.isfile(f)]
    if missing:
        raise ValueError(f'sweep base_files not found: {missing}')
    run_dir = os.path.join(runs_dir, spec['name'], 'check')  # never written
    run = None
    for bindings in candidate_bindings(spec):
        try:
            run = train_cli.load_run_config(spec['base_files'], list(spec['fixed']) + bindings
                                            + [f'run_config.run_dir = {run_dir!r}'])
        except (ValueError, TypeError, SyntaxError, RuntimeError) as e:
            raise ValueError(f'sweep {spec["name"]!r} with {"; ".join(bindings)}: '
                             f'{cli_errors.one_line(e)}') from e
    loop.prepare(run)


def load_spec(path: str) -> dict:
    """Reads a `.json` spec or a `.gin` file of `sweep.*` bindings; see `check_spec`."""
    if not os.path.isfile(path):
        raise ValueError(f'sweep spec not found: {path}')
    if path.endswith('.json'):
        with open(path, encoding='utf-8') as f:
            try:
                spec = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f'{path}: not valid JSON ({e})') from None
        return check_spec(spec)
    gin.clear_config()
    gin.parse_config_file(path)
    return check_spec(sweep())


def make_sampler(spec: dict) -> optuna.samplers.BaseSampler:
    if spec['sampler'] == 'grid':
        space = {k: list(p['choices']) for k, p in spec['params'].items()}
        return optuna.samplers.GridSampler(space, seed=spec['seed'])
    if spec['sampler'] == 'random':
        return optuna.samplers.RandomSampler(seed=spec['seed'])
    return optuna.samplers.TPESampler(seed=spec['seed'], n_startup_trials=4)


def make_pruner(spec: dict) -> optuna.pruners.BasePruner:
    if spec['pruner'] == 'none':
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(**(spec['pruner'] or {}))


def make_storage(url: str, heartbeat_s: int) -> optuna.storages.RDBStorage:
    """RDB storage with heartbeats; a dead worker's RUNNING trial is failed and retried."""
    kwargs = {'connect_args': {'timeout': 60}} if url.startswith('sqlite') else {}
    with warnings.catch_warnings():  # heartbeats are Optuna-"experimental"; used on purpose
        warnings.simplefilter('ignore', optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url, engine_kwargs=kwargs, heartbeat_interval=heartbeat_s,
            grace_period=2 * heartbeat_s,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback())


def suggest(trial: optuna.Trial, spec: dict) -> dict:
    values = {}
    for target, p in spec['params'].items():
        if p['type'] == 'categorical':
            values[target] = trial.suggest_categorical(target, list(p['choices']))
        elif p['type'] == 'int':
            values[target] = trial.suggest_int(target, p['low'], p['high'], log=p.get('log', False))
        else:
            values[target] = trial.suggest_float(target, p['low'], p['high'],
                                                 log=p.get('log', False))
    return values


# Runs `rustgpt_jax.train` in the child after asking Linux to SIGKILL it when its worker
# dies (PR_SET_PDEATHSIG), so a killed worker leaves no orphan training on. Done in the
# child's own code rather than a `preexec_fn`: the worker is multithreaded (Optuna's
# heartbeat thread), and running Python between fork and exec there can deadlock. A
# worker that died before the prctl took effect is caught by the parent-pid check.
_CHILD_BOOTSTRAP = """
import ctypes, os, runpy, signal, sys
try:
    ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGKILL)
except (OSError, AttributeError):
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit('sweep trainer: its worker is gone')
sys.argv = ['rustgpt_jax.train'] + sys.argv[2:]
runpy.run_module('rustgpt_jax.train', run_name='__main__', alter_sys=True)
"""


def _val_losses(run_dir: str) -> list:
    try:
        return read_metrics(run_dir).get(('val', 'loss'), [])
    except (FileNotFoundError, ValueError, KeyError):
        return []  # not written yet, or a row half-written: read again at the next poll


class Objective:
    """Trains one trial in a child process and reports its validation losses."""

    def __init__(self, spec: dict, runs_dir: str, poll_s: float = 0.5,
                 budget: Optional[int] = None):
        self.spec, self.runs_dir, self.poll_s, self.budget = spec, runs_dir, poll_s, budget

    def _check_budget(self, trial: optuna.Trial) -> None:
        """Fails a trial that two workers started for the study's last slot.

        Each worker checks the study's count before it starts a trial, but two can pass
        that check at once; the trial that a later number gives away is then surplus. It
        is counted against every earlier trial that is finished, running or enqueued, and
        failed before any training when `budget` of those are ahead of it.
        """
        if self.budget is None:
            return
        live = FINISHED + (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
        ahead = [t for t in trial.study.get_trials(deepcopy=False, states=live)
                 if t.number < trial.number]
        if len(ahead) >= self.budget:
            raise RuntimeError(f'trial {trial.number} is beyond --trials {self.budget} '
                               f'(another worker took the last slot); not run')

    def __call__(self, trial: optuna.Trial) -> float:
        self._check_budget(trial)
        values = suggest(trial, self.spec)
        run_dir = os.path.abspath(os.path.join(self.runs_dir, self.spec['name'],
                                               f'trial_{trial.number}'))
        bindings = list(self.spec['fixed']) + [f'{k} = {v!r}' for k, v in values.items()] + [
            f"run_config.run_dir = '{run_dir}'", 'run_config.progress = False']
        trial.set_user_attr('run_dir', run_dir)
        trial.set_user_attr('worker_pid', os.getpid())
        cmd = [sys.executable, '-c', _CHILD_BOOTSTRAP, str(os.getpid())]
        for f in self.spec['base_files']:
            cmd += ['--gin_file', f]
        for b in bindings:
            cmd += ['--gin_param', b]
        os.makedirs(run_dir, exist_ok=True)
        log_path = os.path.join(run_dir, 'train.log')
        with open(log_path, 'w', encoding='utf-8') as log:
            child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            reported = 0
            try:
                while True:
                    done = child.poll() is not None
                    losses = _val_losses(run_dir)
                    for step, loss in losses[reported:]:
                        trial.report(loss, step)
                        if trial.should_prune():
                            raise optuna.TrialPruned(f'pruned at step {step} (loss {loss:.4f})')
                    reported = len(losses)
                    if done:
                        break
                    time.sleep(self.poll_s)
            finally:
                if child.poll() is None:
                    child.kill()
                    child.wait()
        if child.returncode != 0:
            with open(log_path, encoding='utf-8') as f:
                tail = f.read()[-2000:]
            raise RuntimeError(f'trial {trial.number} training exited with {child.returncode}:'
                               f'\n{tail}')
        losses = [v for _, v in _val_losses(run_dir)]
        if not losses:
            raise RuntimeError(f'trial {trial.number} finished without a validation loss')
        trial.set_user_attr('final_val_loss', losses[-1])
        return min(losses)


def open_study(spec: dict, storage_url: str, heartbeat_s: int) -> optuna.Study:
    return optuna.create_study(study_name=spec['name'], storage=make_storage(storage_url,
                                                                             heartbeat_s),
                               sampler=make_sampler(spec), pruner=make_pruner(spec),
                               direction='minimize', load_if_exists=True)


# A RUNNING trial this old that never reached its objective (no `worker_pid`) lost its
# worker between Optuna's ask and the first heartbeat.
ORPHAN_GRACE_S = 30


def fail_orphaned_trials(study: optuna.Study, grace_s: float) -> list[int]:
    """Fails (and queues a retry of) RUNNING trials whose worker died before their first
    heartbeat; returns their numbers.

    Optuna ages only trials that have a heartbeat (`RDBStorage._get_stale_trial_ids`), so
    a worker killed between `ask` and the heartbeat thread's first record leaves a trial
    RUNNING forever, and workers waiting for the study's last trials would wait forever
    (tests/test_sweep.py saw it under load). The objective sets `worker_pid` after the
    heartbeat thread has started, so a trial without it, older than `grace_s`, is one.
    """
    storage = study._storage  # as optuna.storages.fail_stale_trials uses it
    now = datetime.datetime.now()  # Optuna stores naive local start times
    orphans = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        started = trial.datetime_start
        if 'worker_pid' in trial.user_attrs or started is None:
            continue
        if (now - started).total_seconds() < grace_s:
            continue
        try:
            if not storage.set_trial_state_values(trial._trial_id,
                                                  state=optuna.trial.TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker failed it first
        callback = storage.get_heartbeat_stale_trial_callback()
        if callback is not None:
            callback(study, storage.get_trial(trial._trial_id))
        orphans.append(trial.number)
    return orphans


def work(spec: dict, storage_url: str, n_trials: int, runs_dir: str, heartbeat_s: int,
         log=print) -> None:
    """One worker: runs trials until the study holds `n_trials` finished ones.

    While the remaining trials run in other workers it waits rather than leaving: should
    one of those workers die, its trial goes stale and this worker retries it.

    Raises:
      RuntimeError: more failed trials than `n_trials` (a broken configuration).
    """
    study = open_study(spec, storage_url, heartbeat_s)
    objective = Objective(spec, runs_dir, budget=n_trials)
    while True:
        optuna.storages.fail_stale_trials(study)
        fail_orphaned_trials(study, grace_s=max(ORPHAN_GRACE_S, 4 * heartbeat_s))
        states = [t.state for t in study.get_trials(deepcopy=False)]
        finished = sum(s in FINISHED for s in states)
        running = states.count(optuna.trial.TrialState.RUNNING)
        waiting = states.count(optuna.trial.TrialState.WAITING)
        failed = states.count(optuna.trial.TrialState.FAIL)
        if finished >= n_trials:
            return
        if failed > n_trials:
            raise RuntimeError(f'study {spec["name"]!r}: {failed} failed trials; see the '
                               f'train.log files under {runs_dir}')
        if finished + running >= n_trials and not waiting:
            time.sleep(heartbeat_s)
            continue
        study.optimize(objective, n_trials=1, catch=(RuntimeError,),
                       callbacks=[lambda _, t: log(f'[worker {os.getpid()}] trial {t.number}: '
                                                   f'{t.state.name} {t.value}')])


def run_sweep(spec_path: str, storage_url: str, n_trials: int, workers: int = 1,
              runs_dir: str = 'runs/sweeps', heartbeat_s: int = 5) -> optuna.Study:
    """Creates (or loads) the study and runs `workers` local worker processes on it.

    Returns:
      the study after the workers have exited.
    """
    spec = load_spec(spec_path)
    study = open_study(spec, storage_url, heartbeat_s)  # created once, before any worker
    if workers == 1:
        work(spec, storage_url, n_trials, runs_dir, heartbeat_s)
        return study
    base = [sys.executable, '-m', 'rustgpt_jax.experiments.sweep', spec_path, '--storage',
            storage_url, '--trials', str(n_trials), '--runs_dir', runs_dir,
            '--heartbeat_s', str(heartbeat_s), '--worker']
    procs = [subprocess.Popen(base) for _ in range(workers)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f'sweep workers exited with {codes}')
    return study


def _storage_error(url: str, error: Exception) -> cli_errors.UserError:
    """A storage that cannot be opened, its URL shown without the password."""
    try:
        shown = sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        shown = url.split('@')[-1]
    return cli_errors.UserError(f'--storage {shown}: {cli_errors.one_line(error)}')


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = cli_errors.ArgumentParser(prog='rustgpt-sweep', description=__doc__.splitlines()[0])
    parser.add_argument('spec', help='sweep spec: .json, or .gin with sweep.* bindings')
    parser.add_argument('--storage', default='sqlite:///runs/sweeps/optuna.db',
                        help='Optuna RDB URL (sqlite:///file.db or '
                             'postgresql+psycopg://user:pw@host:port/db)')
    parser.add_argument('--trials', type=cli_errors.positive_int, required=True,
                        help='finished (complete + pruned) trials the study should reach')
    parser.add_argument('--workers', type=cli_errors.positive_int, default=1,
                        help='local worker processes')
    parser.add_argument('--runs_dir', default='runs/sweeps', help='root of trial run dirs')
    parser.add_argument('--heartbeat_s', type=cli_errors.positive_int, default=5,
                        help='heartbeat interval; a trial silent for twice this is stale')
    parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    cli_errors.add_traceback_flag(parser)
    args = parser.parse_args(argv)

    def body() -> int:
        with cli_errors.config_errors():
            spec = load_spec(args.spec)
            if not args.worker:  # the launcher checked it for its workers
                check_trainable(spec, args.runs_dir)
        if args.storage.startswith('sqlite:///'):
            folder = os.path.dirname(args.storage[len('sqlite:///'):])
            if folder:
                os.makedirs(folder, exist_ok=True)
        try:
            study = open_study(spec, args.storage, args.heartbeat_s)
        except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as e:
            # a malformed URL, an unknown dialect or missing driver, a server that refuses
            raise _storage_error(args.storage, e) from e
        if args.worker:
            work(spec, args.storage, args.trials, args.runs_dir, args.heartbeat_s)
            return 0
        run_sweep(args.spec, args.storage, args.trials, args.workers, args.runs_dir,
                  args.heartbeat_s)
        done = [t for t in study.get_trials(deepcopy=False)
                if t.state == optuna.trial.TrialState.COMPLETE]
        if done:
            best = study.best_trial
            print(f'best trial {best.number}: value {best.value:.4f} params {best.params}')
        return 0

    return cli_errors.run(parser.prog, body, traceback=args.traceback)


if __name__ == '__main__':
    sys.exit(main())
