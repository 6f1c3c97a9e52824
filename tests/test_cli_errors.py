"""Every command line answers a user error with one line, `prog: error: <message>`, exit
status 2, and writes nothing: rustgpt-train, rustgpt-generate, rustgpt-chat, the
experiments runner and the sweep, each driven in-process with 20+ bad inputs."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys

import pytest
from test_experiments import write_toy_experiment
from test_sweep import toy_spec
from test_training_helpers import write_corpus

from rustgpt_jax import cli_errors
from rustgpt_jax import train as train_cli
from rustgpt_jax.decoding import cli as decoding_cli
from rustgpt_jax.experiments import runner, sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_GIN = os.path.join(REPO, 'configs', 'demo.gin')

# (binding, a word the message must contain). Each is one --gin_param over a valid toy run.
BAD_BINDINGS = [
    ('ModelConfig.num_kv_heads = 3', 'num_kv_heads'),
    ("ModelConfig.norm = 'batch_norm'", 'batch_norm'),
    ('pretrain/PhaseConfig.batch_size = 0', 'batch_size'),
    ('DataConfig.validation_fraction = 1.5', 'validation_fraction'),
    ("DataConfig.corpus = '/nonexistent/file.txt'", '/nonexistent/file.txt'),
    ('ModelConfig.embed_dimm = 64', 'embed_dimm'),
    ('pretrain/PhaseConfig.stepz = 3', 'stepz'),
    ('ModelConfig.num_layers = ', 'ModelConfig.num_layers'),
    ('ModelConfig.num_layers = [1', 'parse'),
    ('ModelConfig.vocab_size = 8', 'vocab_size'),
    ('pretrain/PhaseConfig.seq_len = 4096', 'seq_len'),
    ("pretrain/PhaseConfig.kind = 'rl'", 'kind'),
    ('pretrain/OptimizerConfig.learning_rate = -1.0', 'learning_rate'),
    ('pretrain/OptimizerConfig.warmup_steps = -1', 'warmup_steps'),
    ('run_config.checkpoint_every = 0', 'checkpoint_every'),
    ("run_config.time_budget_s = 'soon'", 'time_budget_s'),
    ("DataConfig.tokenizer = 'sentencepiece'", 'tokenizer'),
    ('DataConfig.max_chars = 1', 'max_chars'),
    ('DataConfig.validation_fraction = 0.0001', 'validation_fraction'),
    ('run_config.phases = []', 'phases'),
    ('run_config.model = @Nope()', 'Nope'),
    ('pretrain/PhaseConfig.eval_batches = 0', 'eval_batches'),
    ('pretrain/PhaseConfig.optimizer = 3', 'optimizer'),
    ('run_config.seed = %MISSING', 'MISSING'),
    ('import no_such_module_xyz', 'no_such_module_xyz'),
    ("include 'no_such_file.gin'", 'no_such_file.gin'),
    ("MeshConfig.strategy = 'zero3'", 'strategy'),
    ('MeshConfig.shape = (7, 1)', 'mesh'),
]


def _toy_params(tmp_path) -> list[str]:
    corpus = write_corpus(tmp_path)
    return [f"run_config.run_dir = '{tmp_path / 'run'}'", f"DataConfig.corpus = '{corpus}'",
            'ModelConfig.vocab_size = 48', 'ModelConfig.embed_dim = 32',
            'ModelConfig.hidden_dim = 64', 'ModelConfig.max_seq_len = 16',
            'ModelConfig.window_size = 8', 'pretrain/PhaseConfig.seq_len = 16',
            'pretrain/PhaseConfig.batch_size = 2', 'pretrain/PhaseConfig.steps = 2',
            'pretrain/PhaseConfig.eval_batches = 1', 'run_config.progress = False',
            'run_config.time_budget_s = None']


def _flags(params) -> list[str]:
    return sum((['--gin_param', p] for p in params), [])


def _tree(root) -> dict:
    """Every path under `root` with its size and modification time."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.stat(path)
            out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns)
    return out


def _call(main, argv, capsys, **streams):
    """(exit status, stdout, stderr) of `main(argv)` run in-process."""
    try:
        code = main(argv, **streams)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out, err = capsys.readouterr()
    for name, stream in streams.items():
        if name in ('out', 'err'):
            out, err = (out + stream.getvalue(), err) if name == 'out' else (
                out, err + stream.getvalue())
    return code, out, err


def _assert_one_line(code, err, prog, word):
    assert code == 2, err
    assert err.startswith(f'{prog}: error: '), err
    assert err.endswith('\n') and err.count('\n') == 1, err
    assert 'Traceback' not in err
    assert word in err, err


# -- rustgpt-train ---------------------------------------------------------------------

def _instruct_params(path: str) -> list[str]:
    return ["instruct/PhaseConfig.name = 'instruct'", "instruct/PhaseConfig.kind = 'instruct'",
            'instruct/PhaseConfig.steps = 2', 'instruct/PhaseConfig.batch_size = 2',
            'instruct/PhaseConfig.seq_len = 16', f"instruct/PhaseConfig.data_path = '{path}'",
            'run_config.phases = [@pretrain/PhaseConfig(), @instruct/PhaseConfig()]']


def _train_cases(tmp_path) -> list[tuple[list[str], str]]:
    """(argv, word) pairs: every bad binding, bad files and bad flags."""
    base = ['--gin_file', DEMO_GIN] + _flags(_toy_params(tmp_path))
    cases = [(base + ['--gin_param', b], word) for b, word in BAD_BINDINGS]
    (tmp_path / 'empty.txt').write_text('')
    bad_jsonl = tmp_path / 'bad.jsonl'
    bad_jsonl.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response"\n')
    mesh = ['--gin_param', 'run_config.mesh = @MeshConfig()']
    cases = [(argv + mesh if 'MeshConfig' in argv[-1] else argv, word) for argv, word in cases]
    cases += [
        (base + _flags([f"DataConfig.corpus = '{tmp_path / 'empty.txt'}'"]), 'empty'),
        (base + _flags(_instruct_params('/nonexistent/instruct.jsonl')), 'instruct.jsonl'),
        (base + _flags(_instruct_params(str(bad_jsonl))), 'bad.jsonl:2'),
        (['--gin_file', 'no_such_root.gin'], 'no_such_root.gin'),
        (base + ['--num_processes', '0'], '--num_processes'),
        (base + ['--no_such_flag'], '--no_such_flag'),
        (['--gin_param', 'ModelConfig.num_layers = 2'], '--gin_file'),
    ]
    return cases


def test_train_cli_bad_inputs_are_one_line_and_write_nothing(tmp_path, capsys):
    fixtures = tmp_path / 'fixtures'
    fixtures.mkdir()
    cases = _train_cases(fixtures)
    assert len(cases) >= 22
    before = _tree(tmp_path)
    for argv, word in cases:
        code, out, err = _call(train_cli.main, argv, capsys)
        _assert_one_line(code, err, 'rustgpt-train', word)
        assert out == ''
        assert not (fixtures / 'run').exists(), argv[-1]
    assert _tree(tmp_path) == before


def test_train_cli_traceback_flag_and_real_bugs(tmp_path, capsys, monkeypatch):
    argv = ['--gin_file', DEMO_GIN] + _flags(_toy_params(tmp_path))
    with pytest.raises(ValueError, match='num_kv_heads'):  # --traceback: the full stack
        train_cli.main(argv + ['--gin_param', 'ModelConfig.num_kv_heads = 3', '--traceback'])

    def broken(*args, **kwargs):
        raise ValueError('a bug deep in training')
    monkeypatch.setattr(train_cli.loop, 'train', broken)
    with pytest.raises(ValueError, match='a bug deep in training'):  # not a user error
        train_cli.main(argv)


@pytest.mark.parametrize('module, args', [
    ('rustgpt_jax.train', ['--gin_file', 'configs/demo.gin', '--gin_param',
                           "include 'no_such_file.gin'"]),
    ('rustgpt_jax.experiments.sweep', ['{spec}', '--trials', '2', '--storage',
                                       'postgresql+psycopg://u:pw@127.0.0.1:1/db']),
])
def test_a_real_process_prints_exactly_one_line(tmp_path, module, args):
    """Out of process, where gin's search logging and Optuna's warnings would show."""
    spec = tmp_path / 'spec.json'
    spec.write_text(json.dumps(_spec(tmp_path)))
    argv = [a.format(spec=spec) for a in args]
    proc = subprocess.run([sys.executable, '-m', module] + argv, cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    prog = 'rustgpt-train' if module.endswith('train') else 'rustgpt-sweep'
    _assert_one_line(proc.returncode, proc.stderr, prog,
                     'no_such_file.gin' if prog == 'rustgpt-train' else 'Connection refused')


def test_one_line_keeps_the_binding_of_a_gin_error():
    try:
        train_cli.load_run_config([DEMO_GIN], ['ModelConfig.embed_dimm = 3'])
    except ValueError as e:
        line = cli_errors.one_line(e)
    assert line == ("Configurable 'ModelConfig' doesn't have a parameter named 'embed_dimm'. "
                    '(bindings string line 1: ModelConfig.embed_dimm = 3)')


# -- rustgpt-generate and rustgpt-chat ---------------------------------------------------

def _gguf_files(tmp_path) -> dict:
    text = tmp_path / 'text.gguf'
    text.write_text('not a gguf file')
    truncated = tmp_path / 'truncated.gguf'
    truncated.write_bytes(b'GGUF' + struct.pack('<I', 3))
    huge = tmp_path / 'huge.gguf'  # claims 2**60 tensors in a 24-byte file
    huge.write_bytes(b'GGUF' + struct.pack('<IQQ', 3, 1 << 60, 0))
    return {'text': str(text), 'truncated': str(truncated), 'huge': str(huge)}


def _decoding_common_cases(tmp_path) -> list[tuple[list[str], str]]:
    ggufs = _gguf_files(tmp_path)
    empty = tmp_path / 'empty_run'
    empty.mkdir()
    a_file = tmp_path / 'a_file'
    a_file.write_text('x')
    ckpt = ['--checkpoint', str(empty)]
    return [
        ([], 'required'),
        (['--checkpoint', 'a', '--gguf', 'b'], '--gguf'),
        (ckpt + ['--which', 'first'], '--which'),
        (ckpt + ['--max_new_tokens', '0'], '--max_new_tokens'),
        (ckpt + ['--max_new_tokens', 'many'], '--max_new_tokens'),
        (ckpt + ['--context', '0'], '--context'),
        (ckpt + ['--seed', 'abc'], '--seed'),
        (ckpt + ['--temperature', '-1'], 'temperature'),
        (ckpt + ['--top_k', '-1'], 'top_k'),
        (ckpt + ['--top_p', '0'], 'top_p'),
        (ckpt + ['--top_p', '1.5'], 'top_p'),
        (ckpt + ['--wakeup_latency_us', '-1'], 'max_us'),
        (['--checkpoint', '/nonexistent/run'], '/nonexistent/run'),
        (ckpt, 'no finished checkpoint'),
        (['--checkpoint', str(a_file)], 'a_file'),
        (['--gguf', '/nonexistent/model.gguf'], '/nonexistent/model.gguf'),
        (['--gguf', ggufs['text']], 'text.gguf'),
        (['--gguf', ggufs['truncated']], 'truncated.gguf'),
        (['--gguf', ggufs['huge']], 'huge.gguf'),
        (['--gguf', ggufs['huge'], '--dequantize'], 'huge.gguf'),
        (ckpt + ['--dequantize'], '--dequantize applies to --gguf'),
    ]


def test_generate_cli_bad_inputs_are_one_line_and_write_nothing(tmp_path, capsys):
    fixtures = tmp_path / 'fixtures'
    fixtures.mkdir()
    prompt = ['--prompt', 'ROMEO:']
    cases = [(argv + prompt if argv else argv, word)
             for argv, word in _decoding_common_cases(fixtures)]
    ckpt = ['--checkpoint', str(fixtures / 'empty_run')] + prompt
    cases += [
        (['--checkpoint', str(fixtures / 'empty_run')], '--prompt'),
        (ckpt + ['--beam', '--beam_width', '0'], 'width'),
        (ckpt + ['--beam', '--min_width', '5', '--max_width', '2'], 'width'),
        (ckpt + ['--beam', '--alpha', '-1'], 'alpha'),
        (ckpt + ['--template', 'chat'], '--template'),
    ]
    assert len(cases) >= 20
    before = _tree(tmp_path)
    for argv, word in cases:
        out, err = io.StringIO(), io.StringIO()
        code, out, err = _call(decoding_cli.generate_main, argv, capsys, out=out, err=err)
        _assert_one_line(code, err, 'rustgpt-generate', word)
        assert out == ''
    assert _tree(tmp_path) == before


def test_chat_cli_bad_inputs_are_one_line_and_write_nothing(tmp_path, capsys):
    fixtures = tmp_path / 'fixtures'
    fixtures.mkdir()
    cases = _decoding_common_cases(fixtures)
    ckpt = ['--checkpoint', str(fixtures / 'empty_run')]
    cases += [
        (ckpt + ['--template', 'instruct'], '--template'),
        (ckpt + ['--prompt', 'hi'], '--prompt'),
        (ckpt + ['--beam'], '--beam'),
    ]
    assert len(cases) >= 20
    before = _tree(tmp_path)
    for argv, word in cases:
        streams = dict(stdin=io.StringIO('hi\nexit\n'), out=io.StringIO(), err=io.StringIO())
        code, out, err = _call(decoding_cli.chat_main, argv, capsys, **streams)
        _assert_one_line(code, err, 'rustgpt-chat', word)
        assert out == ''
    assert _tree(tmp_path) == before


# -- the experiments runner ------------------------------------------------------------

def test_runner_bad_inputs_are_one_line_and_write_nothing(tmp_path, capsys):
    fixtures = tmp_path / 'fixtures'
    fixtures.mkdir()
    exp = write_toy_experiment(fixtures, steps=2)
    results = str(tmp_path / 'results' / 'results.csv')
    outputs = ['--results', results, '--runs_dir', str(tmp_path / 'runs')]
    no_variants = fixtures / 'no_variants.gin'
    no_variants.write_text(f"include '{fixtures}/model.gin'\ninclude '{fixtures}/run.gin'\n"
                           "experiment.name = 'x'\nexperiment.variants = {}\n")
    no_name = fixtures / 'no_name.gin'
    no_name.write_text(f"include '{fixtures}/model.gin'\ninclude '{fixtures}/run.gin'\n"
                       "experiment.variants = {'a': []}\n")
    bad_variant = fixtures / 'bad_variant.gin'
    bad_variant.write_text(
        f"include '{fixtures}/model.gin'\ninclude '{fixtures}/run.gin'\n"
        "experiment.name = 'x'\nexperiment.variants = {'good': [], "
        "'bad': ['ModelConfig.num_kv_heads = 3']}\n")
    cases = [([exp, '--gin_param', b] + outputs, word) for b, word in BAD_BINDINGS
             if 'MeshConfig' not in b]
    cases += [
        (['/nonexistent/exp.gin'] + outputs, '/nonexistent/exp.gin'),
        ([exp, '--seeds', 'abc'] + outputs, '--seeds'),
        ([exp, '--variants', 'nope'] + outputs, 'nope'),
        ([exp, '--budget_s', '-5'] + outputs, 'budget'),
        ([str(no_variants)] + outputs, 'empty'),
        ([str(no_name)] + outputs, 'name'),
        ([str(bad_variant)] + outputs, "variant 'bad'"),
        (outputs, 'experiment_file'),
    ]
    assert len(cases) >= 20
    before = _tree(tmp_path)
    for argv, word in cases:
        code, out, err = _call(runner.main, argv, capsys)
        _assert_one_line(code, err, 'rustgpt-experiment', word)
    assert _tree(tmp_path) == before  # no results CSV, no run directory


# -- the sweep ---------------------------------------------------------------------------

def _spec(fixtures, **overrides) -> dict:
    return toy_spec(fixtures, steps=2, **{'fixed': ['run_config.checkpoint_every = 1'],
                                          **overrides})


def _sweep_cases(fixtures) -> list[tuple[list[str], str]]:
    specs = {}

    def spec_file(name, spec):
        path = fixtures / f'{name}.json'
        path.write_text(spec if isinstance(spec, str) else json.dumps(spec))
        specs[name] = str(path)
        return str(path)

    good = spec_file('good', _spec(fixtures))
    base = _spec(fixtures)
    bad_specs = [
        ('invalid_json', '{"name": "x", ', 'invalid_json.json'),
        ('no_params', {k: v for k, v in base.items() if k != 'params'}, 'params'),
        ('cma', dict(base, sampler='cma'), 'sampler'),
        ('grid', dict(base, sampler='grid'), 'categorical'),
        ('low_high', dict(base, params={'x.y': {'type': 'float', 'low': 1, 'high': 1}}),
         'low < high'),
        ('bool_type', dict(base, params={'x.y': {'type': 'bool'}}), 'type'),
        ('no_choices', dict(base, params={'x.y': {'type': 'categorical', 'choices': []}}),
         'choices'),
        ('log_zero', dict(base, params={'x.y': {'type': 'float', 'low': 0, 'high': 1,
                                                'log': True}}), 'low > 0'),
        ('unknown_key', dict(base, prunner='none'), 'prunner'),
        ('pruner', dict(base, pruner='median'), 'pruner'),
        ('fixed_str', dict(base, fixed='run_config.seed = 1'), 'fixed'),
        ('params_list', dict(base, params=['ModelConfig.num_layers']), 'params'),
        ('missing_base', dict(base, base_files=['/nonexistent/model.gin']),
         '/nonexistent/model.gin'),
        ('misspelt_target', dict(base, params={'ModelConfig.num_kv_headz': {
            'type': 'categorical', 'choices': [1, 2]}}), 'num_kv_headz'),
        ('bad_choice', dict(base, params={'ModelConfig.num_kv_heads': {
            'type': 'categorical', 'choices': [1, 3]}}), 'num_kv_heads'),
        ('bad_fixed', dict(base, fixed=['pretrain/PhaseConfig.batch_size = 0']), 'batch_size'),
        ('bad_corpus', dict(base, fixed=["DataConfig.corpus = '/nonexistent/corpus.txt'"]),
         '/nonexistent/corpus.txt'),
    ]
    trials = ['--trials', '2']
    cases = [([spec_file(name, spec)] + trials, word) for name, spec, word in bad_specs]
    cases += [
        (['/nonexistent/spec.json'] + trials, '/nonexistent/spec.json'),
        ([good, '--trials', '0'], '--trials'),
        ([good, '--trials', '2', '--workers', '0'], '--workers'),
        ([good, '--trials', '2', '--heartbeat_s', 'abc'], '--heartbeat_s'),
        ([good], '--trials'),
        ([good, '--trials', '2', '--storage', 'nosuchdialect://x/y'], '--storage'),
        ([good, '--trials', '2', '--storage', 'not a url'], '--storage'),
        ([good, '--trials', '2', '--storage',
          'postgresql+psycopg://user:s3cret@127.0.0.1:1/db'], '127.0.0.1:1'),
    ]
    return cases


def test_sweep_bad_inputs_are_one_line_and_write_nothing(tmp_path, capsys):
    fixtures = tmp_path / 'fixtures'
    fixtures.mkdir()
    cases = _sweep_cases(fixtures)
    assert len(cases) >= 20
    before = _tree(tmp_path)
    for argv, word in cases:
        code, out, err = _call(sweep.main, argv + ['--runs_dir', str(tmp_path / 'runs')],
                               capsys)
        _assert_one_line(code, err, 'rustgpt-sweep', word)
        assert 's3cret' not in err  # a storage URL is shown without its password
    assert _tree(tmp_path) == before  # no study database, no trial directory
