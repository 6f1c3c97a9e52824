"""Trainer tests at toy size: loss, steps, accumulation, schedule, errors, gin, CLI."""

from __future__ import annotations

import math
import os
import re
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rustgpt_jax import train as train_cli
from rustgpt_jax.training import (
    NonFiniteLossError,
    OptimizerConfig,
    create_train_state,
    learning_rate_schedule,
    load_for_inference,
    make_optimizer,
    make_train_step,
    masked_cross_entropy_sum,
    train,
)
from tests.test_training_helpers import tiny_model, tiny_run, write_corpus, write_instructions

B, T = 4, 16


def _batch(seed=0, rows=B, vocab=48, mask=None):
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, vocab, (rows, T + 1)).astype(np.int32)
    return {'tokens': toks[:, :-1], 'targets': toks[:, 1:],
            'loss_mask': np.ones((rows, T), np.float32) if mask is None else mask,
            'positions': np.tile(np.arange(T, dtype=np.int32), (rows, 1)),
            'segment_ids': np.ones((rows, T), np.int32)}


def test_masked_cross_entropy_matches_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32) * 3
    targets = rng.integers(0, 5, (2, 3)).astype(np.int32)
    mask = np.array([[1, 0, 1], [1, 1, 0]], np.float32)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    loss_sum, count = masked_cross_entropy_sum(jnp.asarray(logits), targets, mask)
    np.testing.assert_allclose(float(loss_sum), (nll * mask).sum(), rtol=1e-5)
    assert float(count) == 4.0


def test_schedule_warmup_then_cosine():
    cfg = OptimizerConfig(learning_rate=1e-3, warmup_steps=10, decay_steps=110,
                          final_lr_fraction=0.1)
    sched = learning_rate_schedule(cfg)
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(sched(10)), 1e-3, rtol=1e-6)
    # Halfway through the cosine: floor + (peak - floor) * (1 + cos(pi/2)) / 2.
    np.testing.assert_allclose(float(sched(60)), 1e-4 + 9e-4 * 0.5, rtol=1e-5)
    np.testing.assert_allclose(float(sched(110)), 1e-4, rtol=1e-5)


def test_loss_falls_on_a_repeated_batch():
    cfg = tiny_model()
    opt = OptimizerConfig(learning_rate=1e-2, warmup_steps=2, decay_steps=100)
    state = create_train_state(cfg, make_optimizer(opt), 0, B, T)
    step = make_train_step(cfg, schedule=learning_rate_schedule(opt))
    batch = _batch()
    losses = []
    for _ in range(25):
        state, metrics = step(state, batch)
        losses.append(float(metrics['loss']))
    assert abs(losses[0] - math.log(48)) < 0.2  # near-uniform predictions at init
    assert losses[-1] < 0.3 * losses[0], losses
    assert int(state.step) == 25


def test_gradient_accumulation_equals_big_batch_step():
    cfg = tiny_model()
    opt = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, decay_steps=100)
    mask = np.ones((B, T), np.float32)
    mask[0, :10] = 0.0  # micro-batches with unequal scored counts must still weigh tokens
    mask[3, 4:] = 0.0
    batch = _batch(3, mask=mask)
    results = []
    for accum in (1, 4):
        state = create_train_state(cfg, make_optimizer(opt), 0, B // accum, T)
        state, metrics = make_train_step(cfg, accum_steps=accum)(state, batch)
        results.append((float(metrics['loss']), float(metrics['grad_norm']), state.params))
    for loss, gnorm, params in results[1:]:
        np.testing.assert_allclose(loss, results[0][0], rtol=1e-5)
        np.testing.assert_allclose(gnorm, results[0][1], rtol=1e-4)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
                     params, results[0][2])


def test_bf16_compute_keeps_float32_params():
    cfg = tiny_model(dtype='bfloat16')
    opt = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, decay_steps=100)
    state = create_train_state(cfg, make_optimizer(opt), 0, B, T)
    state, metrics = make_train_step(cfg)(state, _batch())
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert metrics['loss'].dtype == jnp.float32
    assert abs(float(metrics['loss']) - math.log(48)) < 0.3


def test_run_two_phases_writes_checkpoints_metrics_and_inference_bundle(tmp_path):
    run = tiny_run(tmp_path, write_corpus(tmp_path), steps=4,
                   instruct=write_instructions(tmp_path))
    result = train(run, log=lambda s: None)
    assert result.step == 8 and sorted(result.train_losses) == list(range(1, 9))
    assert all(math.isfinite(v) for v in result.train_losses.values())
    assert os.path.isfile(os.path.join(run.run_dir, 'metrics.csv'))
    assert any(n.startswith('events.out.tfevents')
               for n in os.listdir(os.path.join(run.run_dir, 'tensorboard')))
    config, params, tokenizer = load_for_inference(run.run_dir, which='latest')
    assert config == run.model
    assert tokenizer.fingerprint() == result.tokenizer.fingerprint()
    jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(result.state.params))


def test_final_evaluation_covers_the_whole_validation_split(tmp_path):
    from rustgpt_jax.training import data_setup
    run = tiny_run(tmp_path, write_corpus(tmp_path), steps=4)  # eval_batches=2 per eval
    result = train(run, log=lambda s: None)
    phase_data = data_setup.build_phase_data(run.phases[0], run.data, result.tokenizer, run.seed)
    split = phase_data.validation
    assert split.total_batches > len(split) == 2  # periodic evaluations use a sample
    # The last evaluation scored every prediction of the held-out tokens once.
    assert result.validation['tokens'] == len(split.tokens) - 1


def test_non_finite_loss_stops_with_step_and_last_good_checkpoint(tmp_path):
    run = tiny_run(tmp_path, write_corpus(tmp_path), steps=6, checkpoint_every=1, log_every=1)
    # An absurd learning rate (no clipping) overflows the parameters after one update.
    opt = OptimizerConfig(learning_rate=1e30, warmup_steps=0, decay_steps=100,
                          weight_decay=0.0, grad_clip_norm=None)
    run = replace(run, phases=(replace(run.phases[0], optimizer=opt),))
    with pytest.raises(NonFiniteLossError, match=r'at step (\d+).*last good checkpoint is '
                                                 r'step (\d+)') as err:
        train(run, log=lambda s: None)
    bad, good = map(int, re.search(r'at step (\d+).*step (\d+) in', str(err.value)).groups())
    assert good == bad - 1
    ckpt_steps = sorted(int(n) for n in os.listdir(os.path.join(run.run_dir, 'checkpoints'))
                        if n.isdigit())
    assert ckpt_steps[-1] == good


@pytest.mark.parametrize('case', ['missing', 'empty', 'jsonl', 'vocab'])
def test_bad_inputs_raise_clear_errors(tmp_path, case):
    corpus = write_corpus(tmp_path)
    kwargs = {}
    if case == 'missing':
        corpus, pattern = str(tmp_path / 'nope.txt'), r"nope\.txt' does not exist"
    elif case == 'empty':
        (tmp_path / 'empty.txt').write_text('')
        corpus, pattern = str(tmp_path / 'empty.txt'), 'empty'
    elif case == 'jsonl':
        path = tmp_path / 'bad.jsonl'
        path.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "a", "response"\n')
        kwargs['instruct'], pattern = str(path), r'bad\.jsonl:3: invalid JSON'
    else:
        kwargs['model'], pattern = tiny_model(vocab_size=8), r'ModelConfig\.vocab_size=8'
    run = tiny_run(tmp_path, corpus, steps=2, **kwargs)
    if case == 'jsonl':
        run = replace(run, phases=run.phases[1:])
    with pytest.raises(ValueError, match=pattern):
        train(run, log=lambda s: None)


def test_gin_misspelt_binding_fails_fast():
    with pytest.raises(ValueError, match='embed_dimm'):
        train_cli.load_run_config(['configs/demo.gin'], ['ModelConfig.embed_dimm = 64'])
    with pytest.raises(ValueError, match='stepz'):
        train_cli.load_run_config(['configs/demo.gin'], ['pretrain/PhaseConfig.stepz = 3'])


def test_gin_required_instruction_data():
    with pytest.raises(ValueError, match='data_path'):
        train_cli.load_run_config(['configs/model/rustgpt_modern.gin', 'configs/run/demo.gin',
                                   'configs/run/instruct.gin'])


@pytest.mark.parametrize('root', ['configs/demo.gin', 'configs/shakespeare_instruct.gin'])
def test_gin_roots_build_the_expected_run(root):
    run = train_cli.load_run_config([root])
    assert run.model.num_kv_heads == 4 and run.model.window_size == 32
    assert run.phases[0].kind == 'lm' and run.data.corpus == 'shakespeare'
    if 'instruct' in root:
        assert [p.kind for p in run.phases] == ['lm', 'instruct']


def test_cli_trains_and_resumes(tmp_path, capsys):
    corpus = write_corpus(tmp_path)
    params = [f"run_config.run_dir = '{tmp_path / 'cli'}'", f"DataConfig.corpus = '{corpus}'",
              'ModelConfig.vocab_size = 48', 'ModelConfig.embed_dim = 32',
              'ModelConfig.hidden_dim = 64', 'ModelConfig.max_seq_len = 16',
              'ModelConfig.window_size = 8', 'pretrain/PhaseConfig.seq_len = 16',
              'pretrain/PhaseConfig.batch_size = 2', 'pretrain/PhaseConfig.steps = 3',
              'pretrain/PhaseConfig.eval_batches = 1', 'run_config.progress = False',
              'run_config.time_budget_s = None']
    argv = ['--gin_file', 'configs/demo.gin'] + sum((['--gin_param', p] for p in params), [])
    assert train_cli.main(argv) == 0
    assert 'validation loss' in capsys.readouterr().out
    # A second run into the same directory is a user error: one line, status 2; the
    # --traceback flag raises it as before.
    assert train_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith('rustgpt-train: error: ') and '--resume' in err
    assert err.count('\n') == 1
    with pytest.raises(ValueError, match='--resume'):
        train_cli.main(argv + ['--traceback'])
    more = argv + ['--gin_param', 'pretrain/PhaseConfig.steps = 4', '--resume']
    assert train_cli.main(more) == 0
    assert 'resuming' in capsys.readouterr().out
    with open(tmp_path / 'cli' / 'config.gin') as f:
        assert 'ModelConfig.embed_dim = 32' in f.read()


def test_demo_vocab_restriction_keeps_the_first_logits():
    from rustgpt_jax.demo import restrict_vocab
    from rustgpt_jax.models import build_model
    from rustgpt_jax.training.state import init_variables
    cfg = tiny_model()
    params = init_variables(cfg, 0, 1, 8)['params']
    small_cfg, small = restrict_vocab(cfg, params, 20)
    tokens = np.array([[1, 5, 19, 3, 7, 0, 2, 11]], np.int32)
    full = build_model(cfg).apply({'params': params}, tokens)
    cut = build_model(small_cfg).apply({'params': small}, tokens)
    assert cut.shape == (1, 8, 20)
    np.testing.assert_allclose(cut, full[..., :20], rtol=1e-6, atol=1e-6)


def test_train_step_feeds_the_loss_to_the_perplexity_window():
    """The step threads the 'adaptive' collection and calls adaptive.observe_loss: the
    EMA is the first loss, then (1 - alpha) * EMA + alpha * loss (SPEC section 2)."""
    cfg = tiny_model(window_strategy='perplexity', min_window=2, max_window=16,
                     window_ema_alpha=0.2)
    opt = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, decay_steps=100)
    state = create_train_state(cfg, make_optimizer(opt), 0, B, T)
    step = make_train_step(cfg)
    state, m1 = step(state, _batch())
    state, m2 = step(state, _batch())
    ema = np.asarray(state.adaptive['layers']['window']['ema'])  # (L,)
    expected = 0.8 * float(m1['loss']) + 0.2 * float(m2['loss'])
    np.testing.assert_allclose(ema, [expected] * cfg.num_layers, rtol=1e-6)
