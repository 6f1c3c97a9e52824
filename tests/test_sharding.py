"""Sharded training on 8 simulated CPU devices equals the single-device run.

Each case runs `sharding_worker.py` in a fresh process, because the number of host
devices is fixed when JAX starts.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from rustgpt_jax import sharding

WORKER = os.path.join(os.path.dirname(__file__), 'sharding_worker.py')


def _run_worker(*args, timeout=300):
    proc = subprocess.run([sys.executable, WORKER, *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith('RESULT ')][-1]
    return json.loads(line[len('RESULT '):])


@pytest.fixture(scope='module')
def strategies():
    return _run_worker('strategies')


@pytest.mark.parametrize('name', ['dp', 'fsdp', 'tp', 'dp_tp', 'fsdp_tp'])
def test_strategy_matches_single_device(strategies, name):
    np.testing.assert_allclose(strategies[name]['losses'], strategies['reference_losses'],
                               atol=1e-5)
    assert strategies[name]['param_diff'] < 1e-5
    # The loss must actually move, or equality would prove nothing.
    assert strategies['reference_losses'][-1] < strategies['reference_losses'][0] - 0.1


def test_parameter_shardings_follow_the_rules(strategies):
    # Scanned kernels carry a leading layer axis: q_proj is (L, D, N, H), w1 (L, D, F).
    assert strategies['dp']['q_proj_spec'] == 'P(None, None, None, None)'
    assert strategies['fsdp']['q_proj_spec'] == "P(None, 'data', None, None)"
    assert strategies['tp']['q_proj_spec'] == "P(None, None, 'model', None)"
    assert strategies['tp']['w1_spec'] == "P(None, None, 'model')"
    assert strategies['tp']['embedding_spec'] == "P('model', None)"
    assert strategies['fsdp_tp']['w1_spec'] == "P(None, 'data', 'model')"
    assert strategies['fsdp_tp']['embedding_spec'] == "P('model', 'data')"


def test_checkpoint_saved_on_4x2_restores_onto_8x1(tmp_path):
    result = _run_worker('restore', tmp_path)
    assert result['saved_spec'] == "P(None, 'data', 'model')"
    assert result['restored_spec'] == 'P(None, None, None)'
    assert result['diff'] == 0.0


def test_two_process_distributed_run_matches_single_process():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, WORKER, 'distributed', str(i), str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        line = [ln for ln in out.splitlines() if ln.startswith('RESULT ')][-1]
        results.append(json.loads(line[len('RESULT '):]))
    reference = _run_worker('reference')['losses']
    for result in results:
        assert result['global_devices'] == 4 and result['local_devices'] == 2
        np.testing.assert_allclose(result['losses'], reference, atol=1e-5)


def test_rules_and_mesh_errors_are_clear():
    with pytest.raises(ValueError, match='unknown sharding strategy'):
        sharding.logical_axis_rules('zero3')
    with pytest.raises(ValueError, match='does not divide'):
        sharding.mesh.resolve_shape((3, -1), 8)
    with pytest.raises(ValueError, match='needs 6 devices'):
        sharding.mesh.resolve_shape((3, 2), 8)
    assert sharding.mesh.resolve_shape((-1, 2), 8) == (4, 2)


def test_trainer_on_a_mesh_matches_single_device_and_resumes_on_another_mesh(tmp_path):
    result = _run_worker('trainer', tmp_path)
    single = result['single']
    assert list(result['meshed']) == list(single)
    np.testing.assert_allclose(list(result['meshed'].values()), list(single.values()), atol=1e-5)
    # Killed after step 5 on (4, 2) (last checkpoint: step 4), resumed on (8, 1).
    assert list(result['resumed']) == ['5', '6']
    np.testing.assert_allclose([result['resumed'][k] for k in ('5', '6')],
                               [single[k] for k in ('5', '6')], atol=1e-5)
    assert result['meshed_param_diff'] < 1e-5 and result['resumed_param_diff'] < 1e-5
    assert result['meshed_w1_spec'] == "P(None, 'data', 'model')"
    np.testing.assert_allclose(result['validation'], result['validation'][0], atol=1e-5)
    assert single['6'] < single['1'] - 0.1


def test_pallas_attention_runs_per_shard_under_shard_map():
    result = _run_worker('pallas')
    np.testing.assert_allclose(result['pallas'], result['reference'], atol=1e-5)
    assert result['shard_maps'] >= 1 and result['pallas_calls'] >= 1
