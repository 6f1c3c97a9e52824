"""`rustgpt-export` on a trained run: transformers and llama.cpp load what it writes.

Oracles: `AutoModelForCausalLM` logits and `AutoTokenizer` ids for the HF directory,
llama.cpp logits (`Llama.scores`) and its tokenizer for the GGUF file.
"""

import jax
import numpy as np
import pytest
import torch
import transformers
from test_gguf_llamacpp import _llama, _llama_logits, _rel
from test_training_helpers import tiny_run, write_corpus

from rustgpt_jax import export
from rustgpt_jax.data import CHAT_TEMPLATE
from rustgpt_jax.interop.gguf import load_gguf
from rustgpt_jax.models import build_model
from rustgpt_jax.training import load_for_inference, loop


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('export')
    run = tiny_run(tmp, write_corpus(tmp), steps=2)
    loop.train(run, log=lambda *_: None)
    return run.run_dir


def test_export_hf_directory_matches_in_transformers(run_dir, tmp_path, capsys):
    assert export.main(['--checkpoint', run_dir, '--hf', str(tmp_path / 'hf')]) == 0
    assert 'wrote' in capsys.readouterr().out
    config, params, tokenizer = load_for_inference(run_dir)
    text = 'To be, or not to be: café?'
    ids = np.asarray([tokenizer.encode(text)])
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / 'hf', attn_implementation='eager', dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.tensor(ids)).logits.numpy()
    ours = build_model(config).apply({'params': jax.device_get(params)}, ids)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / 'hf')
    assert hf_tok(text, add_special_tokens=False)['input_ids'] == ids[0].tolist()
    assert hf_tok.chat_template == CHAT_TEMPLATE


def test_export_gguf_runs_in_llama_cpp(run_dir, tmp_path):
    path = str(tmp_path / 'run.gguf')
    assert export.main(['--checkpoint', run_dir, '--gguf', path]) == 0
    g_config, g_params, g_tok = load_gguf(path)
    assert g_tok.chat_template == CHAT_TEMPLATE
    config, params, tokenizer = load_for_inference(run_dir)
    tokens = np.asarray(tokenizer.encode('Whether tis nobler in the mind'))
    ours = np.asarray(build_model(g_config).apply({'params': g_params}, tokens[None]))[0]
    assert _rel(ours, _llama_logits(path, tokens)) <= 1e-3
    llm = _llama(path)
    assert llm.tokenize(b'the mind', add_bos=False) == tokenizer.encode('the mind')
    llm.close()
    with pytest.raises(SystemExit):
        export.main(['--checkpoint', run_dir, '--hf', str(tmp_path / 'x'), '--ftype', 'q8_0'])
