"""Toy-sized run configs shared by the training and checkpoint tests."""

from __future__ import annotations

import json

from rustgpt_jax.config import ModelConfig
from rustgpt_jax.training import DataConfig, OptimizerConfig, PhaseConfig, RunConfig

TEXT = ('To be, or not to be, that is the question:\n'
        'Whether tis nobler in the mind to suffer\n'
        'The slings and arrows of outrageous fortune,\n'
        'Or to take arms against a sea of troubles\n') * 20


def tiny_model(**overrides) -> ModelConfig:
    values = dict(vocab_size=48, embed_dim=32, hidden_dim=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, max_seq_len=40)
    values.update(overrides)
    return ModelConfig(**values)


def write_corpus(tmp_path, text: str = TEXT) -> str:
    path = tmp_path / 'corpus.txt'
    path.write_text(text, encoding='utf-8')
    return str(path)


def write_instructions(tmp_path, n: int = 12) -> str:
    path = tmp_path / 'instruct.jsonl'
    with open(path, 'w', encoding='utf-8') as f:
        for i in range(n):
            f.write(json.dumps({'prompt': f'be {i}?', 'response': 'or not.'}) + '\n')
    return str(path)


def tiny_run(tmp_path, corpus: str, steps: int = 8, name: str = 'run', instruct: str = None,
             model: ModelConfig = None, **run_overrides) -> RunConfig:
    opt = OptimizerConfig(learning_rate=3e-3, warmup_steps=2, decay_steps=100)
    phases = [PhaseConfig(name='pretrain', kind='lm', steps=steps, batch_size=4, seq_len=16,
                          optimizer=opt, eval_batches=2)]
    if instruct:
        phases.append(PhaseConfig(name='instruct', kind='instruct', steps=steps, batch_size=2,
                                  seq_len=40, optimizer=opt, data_path=instruct,
                                  eval_batches=2, validation_fraction=0.25))
    values = dict(model=model or tiny_model(), data=DataConfig(corpus=corpus), phases=tuple(phases),
                  run_dir=str(tmp_path / name), checkpoint_every=2, log_every=2, progress=False)
    values.update(run_overrides)
    return RunConfig(**values)
