"""`rustgpt-train --init_from`: fine-tuning from an HF directory, a GGUF file and a run.

Oracle: the first step's training loss (computed before the update) must equal the
source model's loss on that same batch: transformers' own forward pass for the HF
source, the dequantized GGUF model and the saved run's best params for the others.
"""

import numpy as np
import pytest
import torch
from test_gguf_format import random_params
from test_gguf_llamacpp import small_llama_vocab
from test_hf_parity import _hf_model
from test_training_helpers import TEXT, tiny_run, write_corpus, write_instructions

from rustgpt_jax import train as train_cli
from rustgpt_jax.config import ModelConfig
from rustgpt_jax.data import CharTokenizer, load_tokenizer
from rustgpt_jax.interop import hf_files
from rustgpt_jax.interop.gguf import save_gguf
from rustgpt_jax.models import build_model
from rustgpt_jax.training import data_setup, init_from, load_for_inference, loop

RUN_GIN = """
DataConfig.corpus = '{corpus}'
pretrain/OptimizerConfig.learning_rate = 1e-3
pretrain/OptimizerConfig.warmup_steps = 1
pretrain/PhaseConfig.name = 'pretrain'
pretrain/PhaseConfig.steps = 3
pretrain/PhaseConfig.batch_size = 2
pretrain/PhaseConfig.seq_len = 16
pretrain/PhaseConfig.optimizer = @pretrain/OptimizerConfig()
pretrain/PhaseConfig.eval_batches = 1
instruct/PhaseConfig.name = 'instruct'
instruct/PhaseConfig.kind = 'instruct'
instruct/PhaseConfig.steps = 2
instruct/PhaseConfig.batch_size = 2
instruct/PhaseConfig.seq_len = 32
instruct/PhaseConfig.optimizer = @pretrain/OptimizerConfig()
instruct/PhaseConfig.data_path = '{instruct}'
instruct/PhaseConfig.eval_batches = 1
run_config.data = @DataConfig()
run_config.phases = {phases}
run_config.run_dir = '{run_dir}'
run_config.checkpoint_every = 2
run_config.log_every = 1
run_config.progress = False
ModelConfig.dropout_rate = 0.0
ModelConfig.attention_impl = 'blocked'
"""


def _gin(tmp_path, name, phases='[@pretrain/PhaseConfig()]'):
    path = tmp_path / f'{name}.gin'
    path.write_text(RUN_GIN.format(corpus=write_corpus(tmp_path), run_dir=tmp_path / name,
                                   instruct=write_instructions(tmp_path), phases=phases))
    return str(path)


def _fine_tune(gin_file, source, **kwargs):
    init = init_from.load_source(source)
    run = train_cli.load_run_config([gin_file], init=init)
    assert run.model == init.config.replace(attention_impl='blocked')
    phase = run.phases[0]
    batch = next(data_setup.build_phase_data(phase, run.data, init.tokenizer, run.seed).train)
    result = loop.train(run, log=lambda *_: None, init=init, **kwargs)
    return init, run, batch, result


def _loss(logits, batch):
    logits = np.asarray(logits, np.float64)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, batch['targets'][..., None], -1)[..., 0]
    mask = batch['loss_mask']
    return float(((log_z - picked) * mask).sum() / mask.sum())


def _our_loss(config, params, batch):
    return _loss(build_model(config).apply({'params': params}, batch['tokens']), batch)


def test_init_from_hf_directory_starts_at_the_transformers_loss(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    model = _hf_model('llama', vocab_size=tok.vocab_size, num_key_value_heads=2,
                      max_position_embeddings=64)
    source = tmp_path / 'hf'
    model.save_pretrained(source)
    hf_files.write_tokenizer(str(source), tok, None, 64)
    init, run, batch, result = _fine_tune(_gin(tmp_path, 'hf_run'), str(source))
    with torch.no_grad():
        logits = model(torch.tensor(batch['tokens'], dtype=torch.long)).logits.numpy()
    assert result.train_losses[1] == pytest.approx(_loss(logits, batch), abs=1e-4)
    assert result.step == 3 and result.validation is not None
    saved = load_tokenizer(str(tmp_path / 'hf_run' / 'checkpoints' / 'tokenizer'))
    assert saved.kind == 'hf' and saved.encode(TEXT[:50]) == tok.encode(TEXT[:50])


def test_init_from_gguf_dequantizes_and_trains_both_phases(tmp_path):
    vocab = small_llama_vocab()
    config = ModelConfig(vocab_size=vocab.vocab_size, embed_dim=64, hidden_dim=64,
                         num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64)
    path = save_gguf(tmp_path / 'q8.gguf', config, random_params(config, seed=4), vocab,
                     ftype='q8_0')
    gin_file = _gin(tmp_path, 'gguf_run', '[@pretrain/PhaseConfig(), @instruct/PhaseConfig()]')
    init, run, batch, result = _fine_tune(gin_file, str(path))
    assert result.train_losses[1] == pytest.approx(
        _our_loss(init.config, init.params, batch), abs=1e-4)
    assert result.step == 5 and set(result.train_losses) == {1, 2, 3, 4, 5}
    # The run's saved GGUF tokenizer reloads (what --resume and the CLIs read).
    config_out, _, tokenizer = load_for_inference(run.run_dir, which='latest')
    assert tokenizer.kind == 'gguf' and tokenizer.fingerprint() == vocab.fingerprint()
    assert config_out == run.model


def test_init_from_run_directory_and_refused_bindings(tmp_path):
    source = tiny_run(tmp_path, write_corpus(tmp_path), steps=2, name='source',
                      model=ModelConfig(vocab_size=48, embed_dim=32, hidden_dim=64,
                                        num_layers=2, num_heads=4, num_kv_heads=2,
                                        max_seq_len=40))
    loop.train(source, log=lambda *_: None)
    init, run, batch, result = _fine_tune(_gin(tmp_path, 'run_run'), source.run_dir)
    config, params, _ = load_for_inference(source.run_dir)
    assert result.train_losses[1] == pytest.approx(_our_loss(config, params, batch), abs=1e-5)
    with pytest.raises(init_from.InitFromError, match=r'gin binds ModelConfig\.num_layers'):
        train_cli.load_run_config([_gin(tmp_path, 'bad')], ['ModelConfig.num_layers = 4'],
                                  init=init)
    with pytest.raises(init_from.InitFromError, match='not a .gguf file'):
        init_from.load_source(str(tmp_path / 'nothing.bin'))
