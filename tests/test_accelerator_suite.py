"""benchmarks/accelerator_suite.py runs end to end at toy sizes on CPU (so it cannot rot)."""

import importlib.util
import json
import pathlib

import pytest

from rustgpt_jax.summary import attended_pairs

SUITE = pathlib.Path(__file__).resolve().parent.parent / 'benchmarks' / 'accelerator_suite.py'


@pytest.fixture(scope='module')
def suite():
    spec = importlib.util.spec_from_file_location('accelerator_suite', SUITE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize('t, window', [(64, None), (64, 16), (64, 64), (100, 7)])
def test_flop_count_uses_the_pairs_the_mask_allows(suite, t, window):
    assert suite.visible_pairs(t, window) == attended_pairs(t, window)


def test_per_row_windows_average_their_pairs(suite):
    assert suite.visible_pairs(64, [8, 16]) == (attended_pairs(64, 8)
                                                + attended_pairs(64, 16)) / 2


def test_tiny_suite_writes_every_section(suite, tmp_path):
    result = suite.main(['--tiny', '--out', str(tmp_path)])
    saved = json.loads((tmp_path / 'accelerator_suite.json').read_text())
    assert saved['tiny'] and saved['backend'] == 'cpu'
    assert saved['tests']['returncode'] == 0 and 'passed' in saved['tests']['summary']
    rows = {(r['impl'], r['window']): r for r in saved['attention']}
    for impl in ('pallas', 'reference'):
        assert rows[impl, 'causal']['fwd_tflops'] > 0
        assert rows[impl, 'adaptive']['fwd_bwd_tflops'] > 0
    assert 'cuDNN is not detected' in rows['cudnn', 'causal']['fwd_error']
    assert 'per-row window' in rows['cudnn', 'adaptive']['fwd_error']
    assert saved['training']['tokens_per_s'] > 0 and saved['training']['mfu'] is None
    assert saved['training']['attention'].startswith('auto -> blocked (cpu')
    assert [r['batch'] for r in saved['decode']] == [1, 8]
    assert all(r['tokens_per_s'] > 0 for r in saved['decode'])
    table = (tmp_path / 'accelerator_suite.md').read_text()
    assert '| impl | seq | window | batch | fwd TFLOP/s | fwd+bwd TFLOP/s |' in table
    assert result['seconds'] == saved['seconds']
