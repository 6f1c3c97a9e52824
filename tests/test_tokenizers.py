"""Tokenizers: literal encodings, round trips, fingerprints, save/load, bad input."""

import hashlib
import json
import os

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer

from rustgpt_jax.data import (
    TOKENIZER_KINDS,
    ByteBPETokenizer,
    CharTokenizer,
    DataError,
    WordTokenizer,
    build_tokenizer,
    load_tokenizer,
    shakespeare_text,
)
from rustgpt_jax.data.tokenizer_base import META_FILE
from rustgpt_jax.data.vocab_tokenizers import split_words

# Small slices keep BPE training in the tens of milliseconds.
SLICE = 100_000


@pytest.fixture(scope='module')
def corpus():
    return shakespeare_text()[:SLICE]


@pytest.fixture(scope='module')
def bpe(corpus):
    return ByteBPETokenizer.train(corpus, vocab_size=400)


# -- char ----------------------------------------------------------------------


def test_char_vocabulary_and_literal_ids():
    tok = CharTokenizer.from_text('hello world')
    assert tok.chars == (' ', 'd', 'e', 'h', 'l', 'o', 'r', 'w')
    assert (tok.pad_id, tok.eos_id, tok.unk_id, tok.bos_id) == (0, 1, 2, None)
    assert tok.vocab_size == 11
    assert tok.encode('hello world') == [6, 5, 7, 7, 8, 3, 10, 8, 9, 7, 4]
    assert tok.decode([6, 5, 7, 7, 8, 1, 0]) == 'hello'
    assert tok.decode([6, 1, 0], skip_special_tokens=False) == 'h<eos><pad>'


def test_char_round_trip_and_vectorised_encode_matches_loop(corpus):
    tok = CharTokenizer.from_text(corpus)
    ids = tok.encode_array(corpus)
    assert ids.dtype == np.int32
    index = {c: i + 3 for i, c in enumerate(sorted(set(corpus)))}
    np.testing.assert_array_equal(ids[:5000], [index[c] for c in corpus[:5000]])
    assert tok.decode(ids) == corpus


def test_char_unknown_maps_to_unk_or_raises_with_index():
    tok = CharTokenizer.from_text('abc')
    assert tok.encode('abzc') == [3, 4, 2, 5]
    assert tok.decode(tok.encode('abzc')) == 'ab\ufffdc'
    strict = CharTokenizer.from_text('abc', on_unknown='error')
    with pytest.raises(DataError, match=r"'z' \(U\+007A\) at index 2"):
        strict.encode('abzc')
    with pytest.raises(DataError, match=r"'é' \(U\+00E9\) at index 0"):
        tok.encode('é', on_unknown='error')
    with pytest.raises(DataError, match='on_unknown'):
        CharTokenizer.from_text('abc', on_unknown='drop')


# -- word ----------------------------------------------------------------------


def test_word_split_punctuation_literal():
    assert split_words("Hello, world!  Don't\tstop--now.\n(Aside) 3rd_x") == [
            'Hello', ',', 'world', '!', 'Don', "'", 't', 'stop', '-', '-', 'now', '.',
            '(', 'Aside', ')', '3rd', '_', 'x']


def test_word_vocabulary_order_limits_and_unknowns():
    tok = WordTokenizer.from_text('b a b c b a')
    assert tok.words == ('b', 'a', 'c')  # by count, ties alphabetical
    assert WordTokenizer.from_text('b a b c b a', min_count=2).words == ('b', 'a')
    assert WordTokenizer.from_text('b a b c b a', max_size=4).words == ('b',)
    # unknown words and punctuation map to <unk> = 2, never dropped
    assert tok.encode('a dog, b') == [4, 2, 2, 3]
    assert tok.decode([4, 2, 2, 3]) == 'a <unk> <unk> b'


def test_word_decode_attaches_punctuation():
    text = "Hello, world! Don't o'er-look (aside) this."
    tok = WordTokenizer.from_text(text)
    assert tok.decode(tok.encode(text)) == text


def test_word_round_trip_on_corpus(corpus):
    tok = WordTokenizer.from_text(corpus)
    ids = tok.encode(corpus)
    assert tok.unk_id not in ids
    assert tok.encode(tok.decode(ids)) == ids


# -- byte-level BPE -------------------------------------------------------------


def test_bpe_round_trip_including_unseen_unicode(bpe, corpus):
    assert bpe.vocab_size == 400
    assert (bpe.pad_id, bpe.eos_id, bpe.bos_id, bpe.unk_id) == (0, 1, None, None)
    ids = bpe.encode(corpus[:20_000])
    assert len(ids) < 20_000  # merges compress
    assert bpe.decode(ids) == corpus[:20_000]
    for text in ('naïve café ☃ 日本\n', '  leading spaces\t\ttabs\r\n', ''):
        assert bpe.decode(bpe.encode(text)) == text


def test_bpe_special_token_text_is_plain_bytes(bpe):
    ids = bpe.encode('<eos>')
    assert bpe.eos_id not in ids and bpe.decode(ids) == '<eos>'
    assert bpe.decode(bpe.encode('ab') + [bpe.eos_id, bpe.pad_id]) == 'ab'


def test_bpe_chunked_encode_equals_whole_encode(bpe):
    text = shakespeare_text()[:200_000]  # several 64k chunks
    np.testing.assert_array_equal(bpe.encode_array(text), bpe.encode(text))


def test_bpe_training_is_deterministic(bpe, corpus):
    assert ByteBPETokenizer.train(corpus, vocab_size=400).fingerprint() == bpe.fingerprint()


# -- fingerprints -----------------------------------------------------------------


def test_fingerprint_formula_and_sensitivity(bpe, corpus):
    tok = CharTokenizer.from_text('abc')
    blob = json.dumps({'kind': 'char', 'vocab': ['<pad>', '<eos>', '<unk>', 'a', 'b', 'c']},
                      sort_keys=True, separators=(',', ':'))
    assert tok.fingerprint() == hashlib.sha256(blob.encode()).hexdigest()
    # a literal, so the hash cannot drift between versions unnoticed
    assert tok.fingerprint() == ('3f7cdab320a92f72ce7edf7d36b1218a'
                                 '02d89bf6245a8b750c672393e1e27697')
    assert CharTokenizer(['c', 'a', 'b'], on_unknown='error').fingerprint() == tok.fingerprint()
    assert CharTokenizer.from_text('abd').fingerprint() != tok.fingerprint()
    assert WordTokenizer(['a', 'b', 'c']).fingerprint() != tok.fingerprint()
    assert WordTokenizer(['a', 'b']).fingerprint() != WordTokenizer(['b', 'a']).fingerprint()
    other = ByteBPETokenizer.train(corpus, vocab_size=420)
    assert other.fingerprint() != bpe.fingerprint()


# -- save / load --------------------------------------------------------------------


@pytest.mark.parametrize('kind', TOKENIZER_KINDS)
def test_save_load_round_trip(kind, corpus, tmp_path):
    options = {'bpe': {'vocab_size': 300}, 'char': {'on_unknown': 'error'}}.get(kind, {})
    tok = build_tokenizer(kind, corpus[:30_000], **options)
    tok.save(str(tmp_path))
    back = load_tokenizer(str(tmp_path))
    assert type(back) is type(tok)
    assert back.fingerprint() == tok.fingerprint()
    assert back.vocab_size == tok.vocab_size
    sample = corpus[30_000:32_000]
    if kind == 'char':
        sample = ''.join(c for c in sample if c in tok.chars)
        assert back.on_unknown == 'error'
    assert back.encode(sample) == tok.encode(sample)
    if kind == 'bpe':
        # the Hugging Face file is usable on its own
        hf = HFTokenizer.from_file(os.path.join(tmp_path, 'tokenizer.json'))
        assert hf.get_vocab_size() == tok.vocab_size


def test_load_detects_edited_vocabulary(tmp_path):
    CharTokenizer.from_text('abc').save(str(tmp_path))
    path = tmp_path / META_FILE
    meta = json.loads(path.read_text())
    meta['payload']['chars'] = 'abd'
    path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match='fingerprint'):
        load_tokenizer(str(tmp_path))
    meta['kind'] = 'sentencepiece'
    path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="kind 'sentencepiece' is unknown"):
        load_tokenizer(str(tmp_path))


def test_load_missing_directory_names_path(tmp_path):
    missing = str(tmp_path / 'nope')
    with pytest.raises(DataError, match='nope'):
        load_tokenizer(missing)


# -- bad input ------------------------------------------------------------------------


def test_unknown_kind_lists_kinds():
    with pytest.raises(DataError, match="unknown tokenizer kind 'sentencepiece'.*char, bpe, word"):
        build_tokenizer('sentencepiece', 'abc')
    with pytest.raises(ValueError):  # DataError is a ValueError
        build_tokenizer('', 'abc')


def test_bad_options_and_ids():
    with pytest.raises(DataError, match="kind 'word'.*vocab_size"):
        build_tokenizer('word', 'abc', vocab_size=10)
    with pytest.raises(DataError, match='vocab_size must be >= 258'):
        build_tokenizer('bpe', 'abc', vocab_size=100)
    with pytest.raises(DataError, match='empty'):
        build_tokenizer('char', '')
    tok = CharTokenizer.from_text('abc')
    with pytest.raises(DataError, match='token id 6 at index 1'):
        tok.decode([3, 6])
