"""Tokenizer factory and loader: `build_tokenizer(kind, text, **kwargs)`, `load_tokenizer(dir)`.

Kinds: 'char' (default; `CharTokenizer`), 'bpe' (`ByteBPETokenizer`), 'word'
(`WordTokenizer`). `HFTokenizer` ('hf', a pretrained model's `tokenizer.json`) is not
built from a corpus but loads like the others once saved. See `tokenizer_base` for the
interface and the saved format.
"""

from __future__ import annotations

import inspect

from rustgpt_jax.data.bpe_tokenizer import ByteBPETokenizer
from rustgpt_jax.data.errors import DataError
from rustgpt_jax.data.hf_tokenizer import HFTokenizer
from rustgpt_jax.data.tokenizer_base import REGISTRY, Tokenizer, read_meta
from rustgpt_jax.data.vocab_tokenizers import CharTokenizer, WordTokenizer

DEFAULT_KIND = 'char'

_BUILDERS = {
        'char': CharTokenizer.from_text,
        'bpe': ByteBPETokenizer.train,
        'word': WordTokenizer.from_text,
}
TOKENIZER_KINDS = tuple(_BUILDERS)


def build_tokenizer(kind: str, text: str, **kwargs) -> Tokenizer:
    """Builds (or trains) a tokenizer of `kind` on `text`.

    Args:
      kind: one of TOKENIZER_KINDS.
      text: the corpus the vocabulary comes from.
      **kwargs: options of the kind: char `on_unknown`; bpe `vocab_size`,
        `min_frequency`; word `min_count`, `max_size`.
    """
    if kind not in _BUILDERS:
        raise DataError(f'unknown tokenizer kind {kind!r}; known kinds: '
                        f'{", ".join(TOKENIZER_KINDS)}')
    builder = _BUILDERS[kind]
    try:
        inspect.signature(builder).bind(text, **kwargs)
    except TypeError as e:
        raise DataError(f'bad option for tokenizer kind {kind!r}: {e}') from None
    return builder(text, **kwargs)


def load_tokenizer(directory: str) -> Tokenizer:
    """Restores the tokenizer saved by `Tokenizer.save(directory)`, whatever its kind.

    Raises:
      DataError: no saved tokenizer, unknown kind, or a fingerprint that no longer
        matches the restored vocabulary (an edited or corrupted file).
    """
    meta = read_meta(directory)
    kind = meta['kind']
    if kind not in REGISTRY:
        raise DataError(f'{directory}: saved tokenizer kind {kind!r} is unknown; known '
                        f'kinds: {", ".join(sorted(REGISTRY))}')
    try:
        tok = REGISTRY[kind]._from_payload(meta['payload'], directory)
    except (KeyError, TypeError) as e:
        raise DataError(f'{directory}: malformed {kind!r} tokenizer payload ({e!r})') from None
    if tok.fingerprint() != meta['fingerprint']:
        raise DataError(f'{directory}: the restored {kind!r} vocabulary has fingerprint '
                        f'{tok.fingerprint()[:12]}..., the file records '
                        f'{str(meta["fingerprint"])[:12]}... (edited or corrupted files)')
    return tok


__all__ = ['DEFAULT_KIND', 'TOKENIZER_KINDS', 'ByteBPETokenizer', 'CharTokenizer',
           'HFTokenizer', 'Tokenizer', 'WordTokenizer', 'build_tokenizer', 'load_tokenizer']
