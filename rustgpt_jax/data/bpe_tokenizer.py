"""Byte-level BPE (GPT-2 style) trained with the Hugging Face `tokenizers` library.

Byte-level means the 256 byte symbols are always in the vocabulary, so every string
encodes without an unknown token and `decode(encode(text)) == text` exactly. Special
tokens: `<pad>` = 0, `<eos>` = 1 (no BOS, no UNK). Saved as the library's own
`tokenizer.json` beside `rustgpt_tokenizer.json`, so other tools can read it too.
"""

from __future__ import annotations

import json
import os
import re
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from rustgpt_jax.data.errors import DataError
from rustgpt_jax.data.tokenizer_base import EOS_TOKEN, PAD_TOKEN, Tokenizer

HF_FILE = 'tokenizer.json'
_SPECIALS = (PAD_TOKEN, EOS_TOKEN)
_MIN_VOCAB = 256 + len(_SPECIALS)


# A newline followed by an ASCII letter or digit: the GPT-2 pre-tokenizer regex always
# ends a pre-token there (a letter/digit run starts a new one), so cutting the text
# there does not change any encoding.
_SAFE_CUT = re.compile(r'\n(?=[A-Za-z0-9])')


def _chunks(text: str, chunk_chars: int = 1 << 16) -> list[str]:
    """Splits `text` into pieces of about `chunk_chars`, cut only at safe points."""
    pieces, start = [], 0
    while start < len(text):
        m = _SAFE_CUT.search(text, start + chunk_chars)
        end = len(text) if m is None else m.end()
        pieces.append(text[start:end])
        start = end
    return pieces


class ByteBPETokenizer(Tokenizer):
    """Wraps a trained `tokenizers.Tokenizer` with a byte-level BPE model.

    Args:
      hf_tokenizer: a `tokenizers.Tokenizer` whose ids 0 and 1 are `<pad>` and `<eos>`
        (as `train` produces).
    """

    kind = 'bpe'

    def __init__(self, hf_tokenizer: HFTokenizer):
        for want_id, token in enumerate(_SPECIALS):
            got = hf_tokenizer.token_to_id(token)
            if got != want_id:
                raise DataError(f'BPE tokenizer must have {token!r} at id {want_id}, '
                                f'found id {got}')
        # Special-token strings typed in the text ("<eos>") stay ordinary bytes, as with
        # the other tokenizers: only the data pipeline inserts EOS, by id.
        hf_tokenizer.encode_special_tokens = True
        self._tok = hf_tokenizer
        self.pad_id = 0
        self.eos_id = 1

    @classmethod
    def train(cls, text: str, vocab_size: int = 1024, min_frequency: int = 2,
              ) -> 'ByteBPETokenizer':
        """Trains on `text`.

        Args:
          text: the training corpus (a slice is enough for small vocabularies).
          vocab_size: target vocabulary size, specials and the 256 bytes included. The
            result is smaller when the corpus runs out of pairs seen `min_frequency` times.
          min_frequency: least count of a pair for it to be merged.
        """
        if not text:
            raise DataError('cannot train a BPE tokenizer on empty text')
        if vocab_size < _MIN_VOCAB:
            raise DataError(f'vocab_size must be >= {_MIN_VOCAB} (256 bytes + '
                            f'{len(_SPECIALS)} special tokens), got {vocab_size}')
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
                vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                special_tokens=list(_SPECIALS),
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(_chunks(text), trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def hf_tokenizer(self) -> HFTokenizer:
        return self._tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        """Encodes a long text in parallel chunks; equal to `encode` (see `_SAFE_CUT`)."""
        encodings = self._tok.encode_batch(_chunks(text), add_special_tokens=False)
        if not encodings:
            return np.zeros((0,), np.int32)
        return np.concatenate([np.asarray(e.ids, dtype=np.int32) for e in encodings])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(t) for t in ids]
        self.check_ids(ids)
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def _vocab_identity(self):
        model = json.loads(self._tok.to_str())['model']
        vocab = sorted(model['vocab'].items(), key=lambda kv: kv[1])
        return {'vocab': vocab, 'merges': model['merges'],
                'added': sorted((i, t.content)
                                for i, t in self._tok.get_added_tokens_decoder().items())}

    def _payload(self, directory: str) -> dict:
        self._tok.save(os.path.join(directory, HF_FILE))
        return {'file': HF_FILE}

    @classmethod
    def _from_payload(cls, payload: dict, directory: str) -> 'ByteBPETokenizer':
        path = os.path.join(directory, payload.get('file', HF_FILE))
        if not os.path.isfile(path):
            raise DataError(f'BPE tokenizer file {path!r} is missing')
        return cls(HFTokenizer.from_file(path))
