"""The sweep on a real PostgreSQL server, the multi-machine path: two worker processes on
one study, one killed mid-trial and restarted; the study ends with exactly the requested
complete trials and its best trial recorded.

A throwaway server is made with initdb and pg_ctl in a temporary directory, listening on
a loopback port. PostgreSQL refuses to run as root, so as root it runs as the
unprivileged `nobody` (through runuser) in a directory handed to that user; nothing is
created system-wide. The server is stopped and its directory removed even on failure.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import optuna
import pytest
from test_sweep import write_spec

from rustgpt_jax.experiments import sweep
from rustgpt_jax.experiments.plots import read_metrics

State = optuna.trial.TrialState
TRIALS = 4
UNPRIVILEGED = 'nobody'


def _postgres_bin() -> str:
    """The folder of initdb and pg_ctl (Debian keeps them out of PATH)."""
    found = sorted(glob.glob('/usr/lib/postgresql/*/bin/pg_ctl'))
    if found:
        return os.path.dirname(found[-1])
    pg_ctl = shutil.which('pg_ctl')
    if pg_ctl is None:
        pytest.fail('PostgreSQL server binaries (initdb, pg_ctl) not found in '
                    '/usr/lib/postgresql/*/bin or on PATH; install PostgreSQL 15')
    return os.path.dirname(pg_ctl)


def _as_server_user() -> list[str]:
    """The command prefix that runs a PostgreSQL binary as an unprivileged user."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(UNPRIVILEGED)
    except KeyError:
        pytest.fail(f'running as root and there is no unprivileged user {UNPRIVILEGED!r} '
                    'to run PostgreSQL as (it refuses to run as root)')
    runuser = shutil.which('runuser')
    if runuser is None:
        pytest.fail('running as root and `runuser` is missing: cannot start PostgreSQL as '
                    f'{UNPRIVILEGED!r}')
    return [runuser, '-u', UNPRIVILEGED, '--']


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url():
    """A fresh PostgreSQL server on 127.0.0.1; yields its SQLAlchemy URL."""
    bin_dir, prefix = _postgres_bin(), _as_server_user()
    root = tempfile.mkdtemp(prefix='rgj-postgres-')
    data, log = os.path.join(root, 'data'), os.path.join(root, 'server.log')
    if prefix:  # hand the directory to the server's user
        user = pwd.getpwnam(UNPRIVILEGED)
        os.chown(root, user.pw_uid, user.pw_gid)

    def run(*args, check=True):
        return subprocess.run(prefix + list(args), cwd=root, capture_output=True, text=True,
                              timeout=120, check=check)

    port = _free_port()
    started = False
    try:
        run(os.path.join(bin_dir, 'initdb'), '-D', data, '-U', 'postgres', '-A', 'trust',
            '--no-sync', '-E', 'UTF8')
        options = (f'-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={root}'
                   ' -c fsync=off -c max_connections=50')
        start = run(os.path.join(bin_dir, 'pg_ctl'), '-D', data, '-l', log, '-w', '-t', '60',
                    '-o', options, 'start', check=False)
        started = start.returncode == 0
        if not started:
            with open(log, encoding='utf-8', errors='replace') as f:
                pytest.fail(f'pg_ctl start failed: {start.stderr}\n{f.read()[-2000:]}')
        yield f'postgresql+psycopg://postgres@127.0.0.1:{port}/postgres'
    finally:
        if started or os.path.exists(os.path.join(data, 'postmaster.pid')):
            run(os.path.join(bin_dir, 'pg_ctl'), '-D', data, '-m', 'immediate', '-w', 'stop',
                check=False)
        shutil.rmtree(root, ignore_errors=True)


def _worker(spec, url, runs_dir) -> subprocess.Popen:
    cmd = [sys.executable, '-m', 'rustgpt_jax.experiments.sweep', spec, '--storage', url,
           '--trials', str(TRIALS), '--runs_dir', runs_dir, '--heartbeat_s', '1', '--worker']
    return subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_postgres_two_workers_one_killed_mid_trial_and_restarted(tmp_path, postgres_url):
    spec_path = write_spec(tmp_path)
    spec = json.loads(open(spec_path).read())
    runs_dir = str(tmp_path / 'runs')
    # The launcher's part: the study (and Optuna's schema) exists before any worker starts.
    study = sweep.open_study(spec, postgres_url, heartbeat_s=1)
    assert study.study_name == 'toy_sweep' and study.trials == []

    first, second = _worker(spec_path, postgres_url, runs_dir), None
    restarted = None
    try:
        second = _worker(spec_path, postgres_url, runs_dir)
        # Kill the first worker (and its trainer) once it trains a trial with parameters.
        deadline = time.time() + 240
        victim = None
        while victim is None:
            assert time.time() < deadline, 'the first worker never started a trial'
            assert first.poll() is None, first.stdout.read()
            for t in study.get_trials(deepcopy=False, states=(State.RUNNING,)):
                if t.params and t.user_attrs.get('worker_pid') == first.pid:
                    victim = t
            time.sleep(0.3)
        _kill(first)

        restarted = _worker(spec_path, postgres_url, runs_dir)
        for proc in (second, restarted):
            out, _ = proc.communicate(timeout=400)
            assert proc.returncode == 0, out[-3000:]
    finally:
        for proc in (first, second, restarted):
            if proc is not None:
                _kill(proc)

    trials = optuna.load_study(study_name='toy_sweep', storage=postgres_url).get_trials()
    complete = [t for t in trials if t.state == State.COMPLETE]
    assert len(complete) == TRIALS
    assert not [t for t in trials if t.state in (State.RUNNING, State.WAITING)]
    # The killed trial went stale, was failed, and was retried once with its parameters.
    assert trials[victim.number].state == State.FAIL
    retries = [t for t in complete if t.system_attrs.get('failed_trial') == victim.number]
    assert len(retries) == 1 and retries[0].params == victim.params
    # Each value is its run's best validation loss; the study's best is the lowest.
    for t in complete:
        val = [v for _, v in read_metrics(t.user_attrs['run_dir'])[('val', 'loss')]]
        assert t.value == pytest.approx(min(val))
    best = optuna.load_study(study_name='toy_sweep', storage=postgres_url).best_trial
    assert best.value == min(t.value for t in complete)
    assert best.number in {t.number for t in complete}
    pids = {t.user_attrs['worker_pid'] for t in complete}
    assert second.pid in pids and pids <= {first.pid, second.pid, restarted.pid}
