"""The CLIs over a tiny model + char tokenizer (the checkpoint loader is monkeypatched)."""

import io
import os

import pytest
from test_decoding_support import init_params, tiny_config
from test_decoding_wakeup import one_request_test_at_a_time

from rustgpt_jax.data import CharTokenizer, format_prompt
from rustgpt_jax.decoding import cli, generate, left_pad, truncate_at_stop
from rustgpt_jax.models import build_model

TEXT = 'abcdefghijklmnopqrstuvwxyz .,:\nUA'
NEW = '6'


@pytest.fixture(scope='module')
def run():
    tok = CharTokenizer.from_text(TEXT)
    config = tiny_config(vocab_size=tok.vocab_size, max_seq_len=24)
    return config, init_params(config, seed=2), tok


@pytest.fixture
def loaded(run, monkeypatch):
    monkeypatch.setattr(cli, 'load_checkpoint', lambda directory, which: run)
    return run


def _greedy_text(run, ids, new=int(NEW)):
    """The library's greedy continuation (one compiled program: padded like the CLI's)."""
    config, params, tok = run
    out = generate(build_model(config), params, *left_pad([ids], multiple=64),
                   max_new_tokens=new, eos_id=tok.eos_id)
    return tok.decode(out.row(0))


def _main(fn, argv, stdin=None):
    out, err = io.StringIO(), io.StringIO()
    kwargs = {} if stdin is None else {'stdin': io.StringIO(stdin)}
    code = fn(argv, out=out, err=err, **kwargs)
    return code, out.getvalue(), err.getvalue()


def test_generate_streams_the_greedy_continuation(loaded):
    code, out, err = _main(cli.generate_main, ['--checkpoint', 'x', '--prompt', 'hello',
                                               '--temperature', '0', '--max_new_tokens', NEW])
    assert code == 0 and out == _greedy_text(loaded, loaded[2].encode('hello')) + '\n'


def test_generate_handles_long_empty_and_unknown_prompts(loaded, monkeypatch):
    config, params, tok = loaded
    long = 'abcdefghijklmnopqrstuvwxyz'  # 26 > max_seq_len 24
    code, out, err = _main(cli.generate_main, ['--checkpoint', 'x', '--prompt', long,
                                               '--temperature', '0', '--max_new_tokens', NEW])
    assert code == 0 and 'cut to its last 18' in err
    assert out == _greedy_text(loaded, tok.encode(long)[-18:]) + '\n'
    code, out, err = _main(cli.generate_main, ['--checkpoint', 'x', '--prompt', '',
                                               '--temperature', '0', '--max_new_tokens', NEW])
    assert code == 0 and out == _greedy_text(loaded, [tok.eos_id]) + '\n'
    code, out, err = _main(cli.generate_main, ['--checkpoint', 'x', '--prompt', 'h\u00e9!',
                                               '--max_new_tokens', NEW])
    assert code == 0 and '2 character(s)' in err
    strict = CharTokenizer.from_text(TEXT, on_unknown='error')
    cli_run = (config, params, strict)
    monkeypatch.setattr(cli, 'load_checkpoint', lambda directory, which: cli_run)
    code, out, err = _main(cli.generate_main, ['--checkpoint', 'x', '--prompt', 'h\u00e9'])
    assert code == 2 and "error: character '\u00e9'" in err and out == ''


def test_generate_beam_reports_the_width_trajectory(loaded):
    code, out, err = _main(cli.generate_main, ['--checkpoint', 'x', '--prompt', 'ab', '--beam',
                                               '--max_new_tokens', NEW])
    widths = eval(err.split('[beam widths]')[1])
    assert code == 0 and len(widths) >= 1 and all(1 <= w <= 8 for w in widths)
    assert len(out) >= 1


def test_chat_answers_with_the_template_and_exits(loaded):
    tok = loaded[2]
    code, out, err = _main(cli.chat_main, ['--checkpoint', 'x', '--temperature', '0',
                                           '--max_new_tokens', NEW],
                           stdin='hi\nexit\nnever read\n')
    expected, _ = truncate_at_stop(_greedy_text(loaded, tok.encode(format_prompt('hi'))),
                                   cli.CHAT_STOP)
    assert code == 0
    assert out == "Type a message; 'exit' quits.\nUser: Assistant: " + expected + '\nUser: '


def test_generate_holds_the_wakeup_request_while_decoding(loaded, monkeypatch):
    from rustgpt_jax.decoding import wakeup
    access = os.access(wakeup.PM_QOS_DEVICE, os.R_OK | os.W_OK)
    seen = []
    stream_text = cli.Session.stream_text

    def recording(self, *args, **kwargs):  # the kernel's latency bound while decoding
        seen.append(wakeup.current_wakeup_latency() if access else None)
        return stream_text(self, *args, **kwargs)
    monkeypatch.setattr(cli.Session, 'stream_text', recording)
    argv = ['--checkpoint', 'x', '--prompt', 'hello', '--temperature', '0',
            '--max_new_tokens', NEW, '--wakeup_latency_us', '0']
    with one_request_test_at_a_time():
        code, out, err = _main(cli.generate_main, argv)
        after = wakeup.current_wakeup_latency() if access else None
    assert code == 0 and out == _greedy_text(loaded, loaded[2].encode('hello')) + '\n'
    if access:
        assert seen == [0] and after > 0
    else:
        assert '[note]' in err and 'cpu_dma_latency' in err
    code, out, err = _main(cli.generate_main, argv[:-1] + ['-1'])
    assert code == 2 and 'max_us' in err and out == ''
