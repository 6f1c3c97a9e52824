"""The experiment runner on a toy experiment: rows, aggregate table and plots."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
from test_training_helpers import write_corpus

from rustgpt_jax.experiments import plots, runner
from rustgpt_jax.summary import parameter_counts
from rustgpt_jax.train import load_run_config

TOY_MODEL = """
ModelConfig.vocab_size = 48
ModelConfig.embed_dim = 32
ModelConfig.hidden_dim = 64
ModelConfig.num_layers = 2
ModelConfig.num_heads = 4
ModelConfig.num_kv_heads = 4
ModelConfig.max_seq_len = 16
ModelConfig.scan_layers = False
run_config.model = @ModelConfig()
"""

TOY_RUN = """
DataConfig.corpus = '{corpus}'
pretrain/OptimizerConfig.learning_rate = 3e-3
pretrain/OptimizerConfig.warmup_steps = 2
pretrain/OptimizerConfig.decay_steps = 100
pretrain/PhaseConfig.name = 'pretrain'
pretrain/PhaseConfig.kind = 'lm'
pretrain/PhaseConfig.steps = {steps}
pretrain/PhaseConfig.batch_size = 4
pretrain/PhaseConfig.seq_len = 16
pretrain/PhaseConfig.optimizer = @pretrain/OptimizerConfig()
pretrain/PhaseConfig.eval_batches = 2
run_config.data = @DataConfig()
run_config.phases = [@pretrain/PhaseConfig()]
run_config.run_dir = '{tmp}/unused'
run_config.checkpoint_every = 3
run_config.log_every = 2
"""

TOY_EXPERIMENT = """
include '{tmp}/model.gin'
include '{tmp}/run.gin'
experiment.name = 'toy'
experiment.seeds = [0, 1]
experiment.variants = {{
    'mha': [],
    'mqa_swiglu': ['ModelConfig.num_kv_heads = 1', "ModelConfig.feed_forward = 'swiglu'"],
}}
"""


def write_toy_experiment(tmp_path, steps: int = 7) -> str:
    """Writes model.gin, run.gin and toy.gin under tmp_path; returns toy.gin's path."""
    corpus = write_corpus(tmp_path)
    (tmp_path / 'model.gin').write_text(TOY_MODEL)
    (tmp_path / 'run.gin').write_text(TOY_RUN.format(corpus=corpus, steps=steps, tmp=tmp_path))
    path = tmp_path / 'toy.gin'
    path.write_text(TOY_EXPERIMENT.format(tmp=tmp_path))
    return str(path)


def csv_rows(path):
    with open(path, newline='', encoding='utf-8') as f:
        return list(csv.DictReader(f))


def test_runner_rows_match_train_result_and_metrics(tmp_path, monkeypatch):
    exp = write_toy_experiment(tmp_path)
    results = str(tmp_path / 'results' / 'results.csv')
    captured = []
    real_train = runner.loop.train

    def recording_train(run, **kwargs):
        captured.append((run, real_train(run, **kwargs)))
        return captured[-1][1]

    monkeypatch.setattr(runner.loop, 'train', recording_train)
    runner.main([exp, '--variants', 'mha', '--results', results,
                 '--runs_dir', str(tmp_path / 'runs')])
    runner.main([exp, '--variants', 'mqa_swiglu', '--seeds', '0', '--results', results,
                 '--runs_dir', str(tmp_path / 'runs')])

    rows = csv_rows(results)  # both invocations appended to one table
    assert [(r['variant'], r['seed']) for r in rows] == [('mha', '0'), ('mha', '1'),
                                                        ('mqa_swiglu', '0')]
    assert len(captured) == 3
    for row, (run, result) in zip(rows, captured):
        assert row['experiment'] == 'toy'
        assert int(row['seed']) == run.seed
        assert row['run_dir'] == run.run_dir == result.run_dir
        assert int(row['final_step']) == result.step == 7
        assert float(row['final_val_loss']) == pytest.approx(result.validation['loss'])
        metrics = csv_rows(os.path.join(run.run_dir, 'metrics.csv'))
        val = [(int(m['step']), float(m['value'])) for m in metrics
               if m['split'] == 'val' and m['name'] == 'loss']
        assert [s for s, _ in val] == [3, 6, 7]  # every checkpoint_every=3 and the end
        assert float(row['best_val_loss']) == pytest.approx(min(v for _, v in val))
        assert float(row['final_val_loss']) == pytest.approx(val[-1][1], rel=1e-5)
        tok = [float(m['value']) for m in metrics
               if m['split'] == 'train' and m['name'] == 'tokens_per_s']
        assert float(row['tokens_per_s']) == pytest.approx(np.median(tok))
        assert int(row['num_params']) == parameter_counts(run.model)['total']
        assert float(row['wall_s']) > 0
    assert rows[2]['bindings'] == ("ModelConfig.num_kv_heads = 1; "
                                   "ModelConfig.feed_forward = 'swiglu'")
    assert captured[2][0].model.num_kv_heads == 1
    # The two mha seeds differ (seeded init), so the table's std is not trivially 0.
    assert rows[0]['final_val_loss'] != rows[1]['final_val_loss']

    md = (tmp_path / 'results' / 'results.md').read_text()
    best = np.array([float(r['best_val_loss']) for r in rows[:2]])
    assert f'{best.mean():.4f} +- {best.std(ddof=1):.4f}' in md
    assert f'| mqa_swiglu | 1 | {int(rows[2]["num_params"]):,} |' in md
    for name in ('toy_curves.png', 'toy_bars.png'):
        png = tmp_path / 'results' / name
        assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_bad_experiments_raise(tmp_path):
    exp = write_toy_experiment(tmp_path)
    with pytest.raises(ValueError, match='unknown variant'):
        runner.run_experiment(exp, variants=['nope'], results=str(tmp_path / 'r.csv'))
    with pytest.raises(ValueError, match='must be a list of gin binding strings'):
        runner.experiment(name='x', variants={'a': 'ModelConfig.num_layers = 1'})
    with pytest.raises(ValueError, match='empty'):
        runner.experiment(name='x', variants={})
    load_run_config([exp])  # the file itself is a valid root config


def test_aggregate_and_read_metrics(tmp_path):
    rows = [dict(experiment='e', variant=v, seed=s, best_val_loss=b, final_val_loss=b + 1,
                 tokens_per_s=100.0 * s, wall_s=2.0, final_step=10, num_params=5)
            for v, s, b in (('a', 0, 1.0), ('a', 1, 2.0), ('a', 2, 4.0), ('b', 0, 3.0))]
    table = runner.aggregate(rows + [dict(rows[0], experiment='other')], 'e')
    assert [e['variant'] for e in table] == ['a', 'b']
    np.testing.assert_allclose(table[0]['best_val_loss'],
                               (np.mean([1, 2, 4]), np.std([1, 2, 4], ddof=1)))
    assert table[1]['best_val_loss'] == (3.0, 0.0) and table[0]['n'] == 3
    (tmp_path / 'metrics.csv').write_text('step,split,name,value\n1,train,loss,2.5\n'
                                          '2,val,loss,2.25\n4,val,loss,2\n')
    assert plots.read_metrics(str(tmp_path)) == {('train', 'loss'): [(1, 2.5)],
                                                 ('val', 'loss'): [(2, 2.25), (4, 2.0)]}
