"""Tokenizers with an explicit vocabulary list: characters (the default) and words (the seed's).

Both put the special tokens first: `<pad>` = 0, `<eos>` = 1, `<unk>` = 2; the vocabulary
follows in a deterministic order, so the same corpus always gives the same ids and the
same fingerprint. Neither has a BOS token (`bos_id` is None).
"""

from __future__ import annotations

import collections
import re
from typing import Optional, Sequence

import numpy as np

from rustgpt_jax.data.errors import DataError
from rustgpt_jax.data.tokenizer_base import (
    EOS_TOKEN,
    PAD_TOKEN,
    UNK_TOKEN,
    Tokenizer,
    check_unknown_policy,
)

SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)
_NUM_SPECIAL = len(SPECIAL_TOKENS)


class _SpecialIds:
    pad_id = 0
    eos_id = 1
    unk_id = 2
    bos_id = None


class CharTokenizer(_SpecialIds, Tokenizer):
    """One id per Unicode character: specials, then the sorted character set.

    Args:
      chars: the vocabulary characters (any order, no duplicates); stored sorted by code
        point, so id `3 + i` is the i-th smallest character.
      on_unknown: what `encode` does with a character outside the vocabulary: 'unk' maps it
        to `<unk>`; 'error' raises DataError naming the character and its index.
    """

    kind = 'char'

    def __init__(self, chars: Sequence[str], on_unknown: str = 'unk'):
        chars = list(chars)
        if not chars:
            raise DataError('CharTokenizer needs at least one character')
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise DataError(f'CharTokenizer vocabulary entries must be single characters, '
                                f'got {c!r}')
        if len(set(chars)) != len(chars):
            dup = next(c for c, n in collections.Counter(chars).items() if n > 1)
            raise DataError(f'CharTokenizer vocabulary has the character {dup!r} twice')
        self.on_unknown = check_unknown_policy(on_unknown)
        # Python orders 1-character strings by code point, so this is code-point order.
        self.chars = tuple(sorted(chars))
        self._codepoints = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        # decode table: specials render as their token strings; <unk> as U+FFFD so a
        # decoded string keeps one character per id.
        self._id_to_str = [PAD_TOKEN, EOS_TOKEN, '\ufffd', *self.chars]

    @classmethod
    def from_text(cls, text: str, on_unknown: str = 'unk') -> 'CharTokenizer':
        """Vocabulary = the sorted set of characters of `text`."""
        if not text:
            raise DataError('cannot build a CharTokenizer from empty text')
        return cls(sorted(set(text)), on_unknown=on_unknown)

    @property
    def vocab_size(self) -> int:
        return _NUM_SPECIAL + len(self.chars)

    def encode_array(self, text: str, on_unknown: Optional[str] = None) -> np.ndarray:
        """Vectorised encode (a 5M-character corpus takes well under a second).

        Args:
          text: the string to encode.
          on_unknown: overrides the tokenizer's policy for this call.

        Returns:
          (len(text),) int32 ids.
        """
        policy = check_unknown_policy(on_unknown or self.on_unknown)
        # 'surrogatepass' keeps lone surrogates as their own code points (then unknown).
        cps = np.frombuffer(text.encode('utf-32-le', 'surrogatepass'), dtype='<u4')
        idx = np.searchsorted(self._codepoints, cps)
        idx = np.minimum(idx, len(self._codepoints) - 1)
        known = self._codepoints[idx] == cps
        ids = (idx + _NUM_SPECIAL).astype(np.int32)
        if not known.all():
            if policy == 'error':
                first = int(np.argmin(known))
                ch = text[first]
                raise DataError(f'character {ch!r} (U+{ord(ch):04X}) at index {first} is not '
                                f'in the CharTokenizer vocabulary of {len(self.chars)} characters')
            ids[~known] = self.unk_id
        return ids

    def encode(self, text: str, on_unknown: Optional[str] = None) -> list[int]:
        return self.encode_array(text, on_unknown).tolist()

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(t) for t in ids]
        self.check_ids(ids)
        table = self._id_to_str
        if skip_special_tokens:
            return ''.join(table[t] for t in ids if t not in (self.pad_id, self.eos_id))
        return ''.join(table[t] for t in ids)

    def _vocab_identity(self):
        return [*SPECIAL_TOKENS, *self.chars]

    def _payload(self, directory: str) -> dict:
        return {'chars': ''.join(self.chars), 'on_unknown': self.on_unknown}

    @classmethod
    def _from_payload(cls, payload: dict, directory: str) -> 'CharTokenizer':
        return cls(list(payload['chars']), on_unknown=payload.get('on_unknown', 'unk'))


# A word is a maximal run of letters/digits (`str.isalnum`); every other non-space
# character (punctuation, symbols, '_') is a token of its own. `[^\W_]` = alnum.
_WORD_RE = re.compile(r'[^\W_]+|\S')
# decode joins tokens with one space, except around these (so "don't", "o'er",
# "well-favour'd", "end." and "(aside)" come back unspaced). Other symbols keep spaces.
_NO_SPACE_BEFORE = frozenset(".,!?;:)]}'-")
_NO_SPACE_AFTER = frozenset("([{'-")


def split_words(text: str) -> list[str]:
    """Whitespace split, then every non-alphanumeric character is its own token.

    >>> split_words("Hello, world! Don't.")
    ['Hello', ',', 'world', '!', 'Don', "'", 't', '.']
    """
    return _WORD_RE.findall(text)


class WordTokenizer(_SpecialIds, Tokenizer):
    """Word-level tokenizer (the seed's): `split_words`, unknown words map to `<unk>`.

    Args:
      words: vocabulary in id order (ids 3, 4, ...); each must be one `split_words` token.
    """

    kind = 'word'

    def __init__(self, words: Sequence[str]):
        words = list(words)
        for w in words:
            if not isinstance(w, str) or _WORD_RE.fullmatch(w) is None:
                raise DataError(f'WordTokenizer vocabulary entry {w!r} is not a single word '
                                f'or punctuation character')
        if len(set(words)) != len(words):
            dup = next(w for w, n in collections.Counter(words).items() if n > 1)
            raise DataError(f'WordTokenizer vocabulary has the word {dup!r} twice')
        self.words = tuple(words)
        self._index = {w: i + _NUM_SPECIAL for i, w in enumerate(self.words)}
        self._id_to_str = [*SPECIAL_TOKENS, *self.words]

    @classmethod
    def from_text(cls, text: str, min_count: int = 1,
                  max_size: Optional[int] = None) -> 'WordTokenizer':
        """Vocabulary of the words of `text`, most frequent first (ties alphabetical).

        Args:
          text: the corpus.
          min_count: drop words seen fewer times.
          max_size: largest vocab_size, the 3 special tokens included (None = no cap).
        """
        if min_count < 1:
            raise DataError(f'min_count must be >= 1, got {min_count}')
        if max_size is not None and max_size <= _NUM_SPECIAL:
            raise DataError(f'max_size must be > {_NUM_SPECIAL} (the special tokens), '
                            f'got {max_size}')
        counts = collections.Counter(split_words(text))
        if not counts:
            raise DataError('cannot build a WordTokenizer from text without words')
        ranked = sorted((w for w, n in counts.items() if n >= min_count),
                        key=lambda w: (-counts[w], w))
        if max_size is not None:
            ranked = ranked[:max_size - _NUM_SPECIAL]
        return cls(ranked)

    @property
    def vocab_size(self) -> int:
        return _NUM_SPECIAL + len(self.words)

    def encode(self, text: str) -> list[int]:
        index, unk = self._index, self.unk_id
        return [index.get(w, unk) for w in split_words(text)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(t) for t in ids]
        self.check_ids(ids)
        if skip_special_tokens:
            ids = [t for t in ids if t not in (self.pad_id, self.eos_id)]
        pieces: list[str] = []
        prev = None
        for t in ids:
            tok = self._id_to_str[t]
            if prev is not None and prev not in _NO_SPACE_AFTER and tok not in _NO_SPACE_BEFORE:
                pieces.append(' ')
            pieces.append(tok)
            prev = tok
        return ''.join(pieces)

    def _vocab_identity(self):
        return [*SPECIAL_TOKENS, *self.words]

    def _payload(self, directory: str) -> dict:
        return {'words': list(self.words)}

    @classmethod
    def _from_payload(cls, payload: dict, directory: str) -> 'WordTokenizer':
        return cls(payload['words'])
