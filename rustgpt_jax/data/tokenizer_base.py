"""The common tokenizer interface, its on-disk format and the vocabulary fingerprint.

Every tokenizer maps text to int ids and back, names its special ids (`pad_id` always,
`eos_id` / `bos_id` / `unk_id` where the kind has them, else None), and saves itself as
one small JSON file in a directory:

    rustgpt_tokenizer.json = {"format": 1, "kind": "char", "fingerprint": "...",
                              "payload": {...kind-specific...}}

Kinds that need more (the byte-level BPE keeps the Hugging Face `tokenizer.json`)
write extra files beside it and name them in the payload. `load_tokenizer` in
`rustgpt_jax.data.tokenizers` reads the kind and restores the right class.

`fingerprint()` is a SHA-256 over the kind and the vocabulary (plus merges for BPE),
so a checkpoint can store it and refuse a tokenizer whose ids mean something else.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
from typing import Any, ClassVar, Optional, Sequence

import numpy as np

from rustgpt_jax.data.errors import DataError

META_FILE = 'rustgpt_tokenizer.json'
FORMAT_VERSION = 1

PAD_TOKEN = '<pad>'
EOS_TOKEN = '<eos>'
UNK_TOKEN = '<unk>'

# Filled by `Tokenizer.__init_subclass__`: kind name -> class.
REGISTRY: dict[str, type['Tokenizer']] = {}

UNKNOWN_POLICIES = ('unk', 'error')


def check_unknown_policy(on_unknown: str) -> str:
    if on_unknown not in UNKNOWN_POLICIES:
        raise DataError(f'on_unknown={on_unknown!r} is not one of {UNKNOWN_POLICIES}')
    return on_unknown


class Tokenizer(abc.ABC):
    """Text <-> token ids. Subclasses set `kind` and implement the abstract methods."""

    kind: ClassVar[str] = ''
    pad_id: int
    eos_id: Optional[int] = None
    bos_id: Optional[int] = None
    unk_id: Optional[int] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.kind:
            REGISTRY[cls.kind] = cls

    # -- the interface ---------------------------------------------------------

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included; ids are 0..vocab_size-1."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no EOS appended)."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Padding / EOS / BOS are dropped when `skip_special_tokens`."""

    @abc.abstractmethod
    def _vocab_identity(self) -> Any:
        """JSON-able value that determines what every id means (hashed by fingerprint)."""

    @abc.abstractmethod
    def _payload(self, directory: str) -> dict:
        """JSON-able state for `save`; may write extra files into `directory`."""

    @classmethod
    @abc.abstractmethod
    def _from_payload(cls, payload: dict, directory: str) -> 'Tokenizer':
        """Inverse of `_payload`."""

    # -- shared behaviour ------------------------------------------------------

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` as a 1-D int32 array (subclasses may provide a faster path)."""
        return np.asarray(self.encode(text), dtype=np.int32)

    def fingerprint(self) -> str:
        """Stable hex SHA-256 of the kind and vocabulary (independent of options such as
        the unknown-character policy, which do not change what an id means)."""
        blob = json.dumps({'kind': self.kind, 'vocab': self._vocab_identity()},
                          sort_keys=True, ensure_ascii=True, separators=(',', ':'))
        return hashlib.sha256(blob.encode('ascii')).hexdigest()

    def save(self, directory: str) -> str:
        """Writes `directory/rustgpt_tokenizer.json` (and kind-specific files).

        Returns:
          the path of the JSON file.
        """
        os.makedirs(directory, exist_ok=True)
        meta = {'format': FORMAT_VERSION, 'kind': self.kind,
                'fingerprint': self.fingerprint(), 'payload': self._payload(directory)}
        path = os.path.join(directory, META_FILE)
        with open(path, 'w', encoding='utf-8') as f:
            json.dump(meta, f, ensure_ascii=False, indent=1)
        return path

    def check_ids(self, ids: Sequence[int]) -> None:
        """Raises DataError naming the first id outside [0, vocab_size)."""
        for i, t in enumerate(ids):
            if not 0 <= int(t) < self.vocab_size:
                raise DataError(f'token id {int(t)} at index {i} is outside the vocabulary '
                                f'[0, {self.vocab_size}) of this {self.kind} tokenizer')

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(vocab_size={self.vocab_size}, '
                f'fingerprint={self.fingerprint()[:12]})')


def read_meta(directory: str) -> dict:
    """Reads and checks `directory/rustgpt_tokenizer.json`."""
    path = os.path.join(directory, META_FILE)
    if not os.path.isfile(path):
        raise DataError(f'no saved tokenizer at {path!r} (expected the file written by '
                        f'Tokenizer.save)')
    try:
        with open(path, encoding='utf-8') as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f'{path}: not valid JSON ({e})') from None
    if not isinstance(meta, dict):
        raise DataError(f'{path}: expected a JSON object, got {type(meta).__name__}')
    for key in ('format', 'kind', 'fingerprint', 'payload'):
        if key not in meta:
            raise DataError(f'{path}: missing key {key!r}')
    if meta['format'] != FORMAT_VERSION:
        raise DataError(f'{path}: format {meta["format"]!r} is not supported '
                        f'(this code reads format {FORMAT_VERSION})')
    return meta
