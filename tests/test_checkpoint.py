"""Checkpoint tests: exact resumption, retention, config / tokenizer checks, kill safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import jax
import numpy as np
import pytest

from rustgpt_jax.data import CharTokenizer
from rustgpt_jax.nn.packing import pack_projections
from rustgpt_jax.training import (
    Checkpointer,
    CheckpointError,
    OptimizerConfig,
    create_train_state,
    load_for_inference,
    make_optimizer,
    train,
)
from rustgpt_jax.training.checkpoint import make_meta
from tests.test_training_helpers import tiny_model, tiny_run, write_corpus, write_instructions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kill_and_resume_equals_uninterrupted_run(tmp_path):
    """Two phases, dropout on (the RNG must resume too), gradient accumulation and the
    PerplexityBased window (its 'adaptive' EMA state must resume too); the interrupted
    run is killed after step 7 (its last checkpoint is step 6, the first step of phase
    two), resumed, and must reproduce every loss of the straight run."""
    corpus, jsonl = write_corpus(tmp_path), write_instructions(tmp_path)
    model = tiny_model(dropout_rate=0.1, window_strategy='perplexity', min_window=2,
                       max_window=16)
    straight = tiny_run(tmp_path, corpus, steps=5, name='straight', instruct=jsonl, model=model)
    straight = replace(straight, phases=(
        replace(straight.phases[0], accum_steps=2, batch_size=2), straight.phases[1]))
    interrupted = replace(straight, run_dir=str(tmp_path / 'interrupted'))
    full = train(straight, log=lambda s: None)
    first = train(interrupted, stop_at_step=7, log=lambda s: None)
    assert first.stopped_early and max(first.train_losses) == 7
    second = train(interrupted, resume=True, log=lambda s: None)
    assert min(second.train_losses) == 7  # resumed from the step-6 checkpoint
    assert sorted(full.train_losses) == list(range(1, 11))
    for step, loss in full.train_losses.items():
        got = first.train_losses[step] if step < 7 else second.train_losses[step]
        assert got == loss, (step, got, loss)
    assert first.train_losses[7] == second.train_losses[7]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(full.state.params),
                 jax.device_get(second.state.params))
    assert full.validation == second.validation
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(full.state.adaptive),
                 jax.device_get(second.state.adaptive))


def _state_and_tokenizer(model=None):
    model = model or tiny_model()
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-3, warmup_steps=1, decay_steps=10))
    return model, create_train_state(model, tx, 0, 2, 8), CharTokenizer.from_text('abc de')


def test_restore_into_other_config_names_the_fields(tmp_path):
    model, state, tok = _state_and_tokenizer()
    ckpt = Checkpointer(str(tmp_path / 'ck'))
    ckpt.save(1, state.checkpoint_tree(), {'phase': 'p'}, make_meta(model, tok), val_loss=1.0)
    other = model.replace(embed_dim=64, num_kv_heads=4)
    with pytest.raises(CheckpointError, match=r"embed_dim: checkpoint 32, config 64; "
                                              r"num_kv_heads: checkpoint 2, config 4"):
        ckpt.restore(1, state.checkpoint_tree(), other, tok)
    # Another tokenizer (ids mean other characters) is refused as well.
    with pytest.raises(CheckpointError, match='another tokenizer'):
        ckpt.restore(1, state.checkpoint_tree(), model, CharTokenizer.from_text('xyz'))
    # Implementation choices are not model differences.
    tree, data, _ = ckpt.restore(1, state.checkpoint_tree(),
                                 model.replace(attention_impl='blocked'), tok)
    assert data == {'phase': 'p'}
    ckpt.close()


def test_keeps_last_n_and_best(tmp_path):
    model, state, tok = _state_and_tokenizer()
    ckpt = Checkpointer(str(tmp_path / 'ck'), max_to_keep=2)
    ckpt.save_tokenizer(tok)
    for step, val in zip(range(1, 7), [5.0, 1.0, 4.0, 3.0, 3.5, 2.0]):
        ckpt.save(step, state.checkpoint_tree(), {}, make_meta(model, tok), val_loss=val)
    assert sorted(ckpt.all_steps()) == [2, 5, 6]
    assert ckpt.best_step() == 2 and ckpt.latest_step() == 6
    ckpt.close()
    config, params, tokenizer = load_for_inference(str(tmp_path / 'ck'))
    assert config == model and tokenizer.fingerprint() == tok.fingerprint()
    jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(state.params))


def test_checkpoints_written_before_the_runtime_layer_still_load(tmp_path):
    """Earlier versions stored packed_projections / matvec_* in the model config and, with
    packed_projections=True, packed params. Such a checkpoint loads for inference (params
    unpacked to the standard layout) and refuses only to resume training, saying why."""
    model, state, tok = _state_and_tokenizer()
    legacy_meta = make_meta(model, tok)
    legacy_meta['model_config'].update(packed_projections=True, matvec_impl='cpu_gemv',
                                       matvec_row_blocks=[['w2', 2]])
    packed_state = state.replace(params=pack_projections(state.params))
    ckpt = Checkpointer(str(tmp_path / 'ck'))
    ckpt.save_tokenizer(tok)
    ckpt.save(1, packed_state.checkpoint_tree(), {}, legacy_meta, val_loss=1.0)
    with pytest.raises(CheckpointError, match='packed params .*load_for_inference'):
        ckpt.restore(1, packed_state.checkpoint_tree(), model, tok)
    ckpt.close()
    config, params, _ = load_for_inference(str(tmp_path / 'ck'))
    assert config == model
    jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(state.params))


def test_dropped_steps_leave_through_a_rename(tmp_path):
    """Steps the keep policy drops are renamed into TRASH_SUBDIR (one atomic step) and
    then removed; what a killed run left there is removed on open and never lists."""
    from rustgpt_jax.training.checkpoint import TRASH_SUBDIR
    model, state, tok = _state_and_tokenizer()
    directory = tmp_path / 'ck'
    ckpt = Checkpointer(str(directory), max_to_keep=1)
    for step in (1, 2, 3):
        ckpt.save(step, state.checkpoint_tree(), {'step': step}, make_meta(model, tok))
    assert ckpt.all_steps() == [3]
    assert sorted(os.listdir(directory)) == ['3']  # dropped steps 1, 2 and the trash: gone
    ckpt.close()
    # A run killed while removing step 2: half of it is still in the trash.
    (directory / TRASH_SUBDIR / '2' / 'state').mkdir(parents=True)
    ckpt = Checkpointer(str(directory), max_to_keep=1)
    assert ckpt.all_steps() == [3] and not (directory / TRASH_SUBDIR).exists()
    tree, data, _ = ckpt.restore(3, state.checkpoint_tree(), model, tok)
    assert data == {'step': 3} and int(tree['step']) == int(state.checkpoint_tree()['step'])
    ckpt.close()


_SAVER = r'''
import sys
from rustgpt_jax.training import Checkpointer, OptimizerConfig, create_train_state, make_optimizer
from rustgpt_jax.training.checkpoint import make_meta
from rustgpt_jax.data import CharTokenizer
from rustgpt_jax.nn.packing import pack_projections
from tests.test_training_helpers import tiny_model
model = tiny_model()
tx = make_optimizer(OptimizerConfig(learning_rate=1e-3, warmup_steps=1, decay_steps=10))
state = create_train_state(model, tx, 0, 2, 8)
tok = CharTokenizer.from_text('abc de')
ckpt = Checkpointer(sys.argv[1], max_to_keep=2)
ckpt.save_tokenizer(tok)
step = 0
while True:
    step += 1
    state = state.replace(step=state.step + 1)
    ckpt.save(step, state.checkpoint_tree(), {'step': step}, make_meta(model, tok), 1.0 / step)
    print(step, flush=True)
'''


def test_kill_during_saves_leaves_restorable_checkpoints(tmp_path):
    directory = str(tmp_path / 'ck')
    proc = subprocess.Popen([sys.executable, '-c', _SAVER, directory], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for _ in range(3):  # wait for three finished saves, then kill mid-stream
            assert proc.stdout.readline(), 'the saver process died'
        time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    model, state, tok = _state_and_tokenizer()
    ckpt = Checkpointer(directory, max_to_keep=2)
    steps = ckpt.all_steps()
    assert steps and max(steps) >= 3
    for step in steps:
        tree, data, _ = ckpt.restore(step, state.checkpoint_tree(), model, tok)
        assert data == {'step': step} and int(tree['step']) == step
    ckpt.close()
    assert load_for_inference(directory, which='latest')[0] == model
