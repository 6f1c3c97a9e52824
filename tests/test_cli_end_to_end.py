"""The generate CLI end to end: a real trained checkpoint and a real GGUF file, no mocks."""

import io

import jax
import numpy as np

from rustgpt_jax.decoding import cli, context_limit, generate, unstack_layers
from rustgpt_jax.interop.gguf import load_gguf, save_gguf
from rustgpt_jax.models import build_model
from rustgpt_jax.training import load_for_inference
from rustgpt_jax.training.loop import train
from tests.test_training_helpers import tiny_run, write_corpus


def _greedy_text(config, params, tokenizer, ids, n):
    config, params = unstack_layers(config, params)
    out = generate(build_model(config), params, np.asarray([ids]), np.asarray([len(ids)]),
                   max_new_tokens=n, eos_id=tokenizer.eos_id, limit=context_limit(config))
    tokens = [int(t) for t in np.asarray(out.tokens)[0][:int(np.asarray(out.lengths)[0])]]
    return tokenizer.decode(tokens)


def test_generate_cli_on_a_trained_checkpoint_and_on_its_gguf_export(tmp_path):
    run = tiny_run(tmp_path, write_corpus(tmp_path), steps=4)
    train(run, log=lambda *_: None)
    config, params, tokenizer = load_for_inference(run.run_dir)

    out, err = io.StringIO(), io.StringIO()
    code = cli.generate_main(['--checkpoint', run.run_dir, '--prompt', 'To be', '--temperature',
                              '0', '--max_new_tokens', '12'], out=out, err=err)
    assert code == 0, err.getvalue()
    expected = _greedy_text(config, params, tokenizer, tokenizer.encode('To be'), 12)
    assert out.getvalue() == expected + '\n'

    path = str(tmp_path / 'model.gguf')
    save_gguf(path, config, jax.device_get(params), tokenizer)
    g_config, g_params, g_tokenizer = load_gguf(path)
    out, err = io.StringIO(), io.StringIO()
    code = cli.generate_main(['--gguf', path, '--prompt', 'To be', '--temperature', '0',
                              '--max_new_tokens', '12'], out=out, err=err)
    assert code == 0, err.getvalue()
    ids = g_tokenizer.encode('To be')
    if g_tokenizer.bos_id is not None:
        ids = [g_tokenizer.bos_id] + ids
    assert out.getvalue() == _greedy_text(g_config, g_params, g_tokenizer, ids, 12) + '\n'
