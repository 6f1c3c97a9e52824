"""Hugging Face `tokenizers` JSON both ways: any `tokenizer.json` as our Tokenizer, and ours as one.

`HFTokenizer` wraps the tokenizer of a pretrained model directory (`tokenizer.json` plus
the special tokens, `add_bos_token` and `chat_template` of `tokenizer_config.json`). It
encodes as `transformers`' `tokenizer(text, add_special_tokens=False)` does: special
tokens written in the text (`<|im_end|>`, `</s>`) are recognised, so rendered chat
templates tokenize as in transformers.

`to_hf_json` maps our own tokenizers onto the same format, so `transformers.AutoTokenizer`
gives our ids:
  char: a WordLevel model over single characters (a regex split into code points);
  word: a WordLevel model behind `split_words`' regex, `[\\p{L}\\p{N}]+|\\S` after a
    whitespace split (Python's `[^\\W_]` is letters and numbers). Python 3.11's Unicode
    tables are older than the regex library's: a letter added since (U+1C89, Unicode 16)
    is punctuation to ours and part of a word there;
  bpe: already a `tokenizers` byte-level BPE; written as is.
In all three, `<pad>`, `<eos>`, `<unk>` are special tokens, so transformers reads those
strings typed in the text as the special ids, where ours encode their characters. That is
the one known difference (our tokenizers never let text produce a special id).
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as RawTokenizer

from rustgpt_jax.data.errors import DataError
from rustgpt_jax.data.tokenizer_base import Tokenizer

TOKENIZER_FILE = 'tokenizer.json'
CONFIG_FILE = 'tokenizer_config.json'
SPECIAL_MAP_FILE = 'special_tokens_map.json'
TEMPLATE_FILE = 'chat_template.jinja'
SPECIAL_NAMES = ('bos_token', 'eos_token', 'unk_token', 'pad_token')


def _content(value) -> Optional[str]:
    """A special token as tokenizer_config.json stores it: a string or {'content': ...}."""
    if isinstance(value, dict):
        value = value.get('content')
    return value if isinstance(value, str) else None


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` with its special tokens and chat template.

    Args:
      raw: the `tokenizers.Tokenizer` (from `tokenizer.json`).
      special_tokens: {'bos_token': '<s>', 'eos_token': '</s>', ...}; names missing or
        None are absent. `pad_token` defaults to the EOS token (for padding batches).
      add_bos: whether `encode(..., add_special=True)` and the CLIs put BOS first.
      chat_template: the model's Jinja chat template, or None.
    """

    kind = 'hf'

    def __init__(self, raw: RawTokenizer, special_tokens: Optional[dict] = None,
                 add_bos: bool = False, chat_template: Optional[str] = None):
        self._tok = raw
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items()
                               if k in SPECIAL_NAMES and v is not None}
        ids = {}
        for name, token in self.special_tokens.items():
            tid = raw.token_to_id(token)
            if tid is None:
                raise DataError(f'tokenizer {name} {token!r} is not in the vocabulary')
            ids[name] = tid
        self.bos_id, self.eos_id = ids.get('bos_token'), ids.get('eos_token')
        self.unk_id = ids.get('unk_token')
        pad = ids.get('pad_token', self.eos_id)
        self.pad_id = 0 if pad is None else pad
        self.add_bos = bool(add_bos) and self.bos_id is not None
        self.chat_template = chat_template

    @classmethod
    def from_directory(cls, directory: str) -> 'HFTokenizer':
        """The tokenizer of a Hugging Face model directory.

        Reads `tokenizer.json` and, when present, `tokenizer_config.json`,
        `special_tokens_map.json` and `chat_template.jinja` (which wins over the config's
        `chat_template`, as in transformers).
        """
        path = os.path.join(directory, TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise DataError(f'{directory}: no {TOKENIZER_FILE} (only fast tokenizers load)')
        raw = RawTokenizer.from_file(path)
        config = _read_json(os.path.join(directory, CONFIG_FILE))
        special = {k: _content(v) for k, v in _read_json(
            os.path.join(directory, SPECIAL_MAP_FILE)).items()}
        special.update({k: _content(config[k]) for k in SPECIAL_NAMES if k in config})
        template = config.get('chat_template')
        if isinstance(template, list):  # named templates: transformers uses 'default'
            template = {t.get('name'): t.get('template') for t in template}.get('default')
        template_path = os.path.join(directory, TEMPLATE_FILE)
        if os.path.isfile(template_path):
            with open(template_path, encoding='utf-8') as f:
                template = f.read()
        add_bos = config.get('add_bos_token')
        if add_bos is None:  # as the post-processor does it (Llama: TemplateProcessing)
            bos = special.get('bos_token')
            probe = raw.encode('a', add_special_tokens=True).ids
            add_bos = bos is not None and probe[:1] == [raw.token_to_id(bos)]
        return cls(raw, special, add_bos=bool(add_bos), chat_template=template)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def raw(self) -> RawTokenizer:
        return self._tok

    def encode(self, text: str, add_special: Optional[bool] = None,
               special: bool = True) -> list[int]:
        """Ids of `text` as `tokenizer(text, add_special_tokens=False)`.

        Args:
          text: the string.
          add_special: put BOS first when the tokenizer adds one (`add_bos`).
          special: recognise special tokens written in the text (transformers does).
        """
        previous = self._tok.encode_special_tokens
        self._tok.encode_special_tokens = not special
        try:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        finally:
            self._tok.encode_special_tokens = previous
        return ([self.bos_id] if add_special and self.add_bos else []) + ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(t) for t in ids]
        self.check_ids(ids)
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def _vocab_identity(self):
        data = json.loads(self._tok.to_str())
        return {'model': data['model'], 'added': data['added_tokens'],
                'pre_tokenizer': data['pre_tokenizer'], 'normalizer': data['normalizer']}

    def _payload(self, directory: str) -> dict:
        self._tok.save(os.path.join(directory, TOKENIZER_FILE))
        return {'file': TOKENIZER_FILE, 'special_tokens': self.special_tokens,
                'add_bos': self.add_bos, 'chat_template': self.chat_template}

    @classmethod
    def _from_payload(cls, payload: dict, directory: str) -> 'HFTokenizer':
        path = os.path.join(directory, payload.get('file', TOKENIZER_FILE))
        if not os.path.isfile(path):
            raise DataError(f'HF tokenizer file {path!r} is missing')
        return cls(RawTokenizer.from_file(path), payload['special_tokens'],
                   add_bos=payload['add_bos'], chat_template=payload.get('chat_template'))


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding='utf-8') as f:
        value = json.load(f)
    if not isinstance(value, dict):
        raise DataError(f'{path}: expected a JSON object')
    return value


def _word_level(pieces: Sequence[str], pre_tokenizer: Any) -> RawTokenizer:
    """A WordLevel tokenizer over `pieces` (id = position), specials registered."""
    raw = RawTokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)},
                                        unk_token='<unk>'))
    raw.pre_tokenizer = pre_tokenizer
    raw.decoder = decoders.Fuse()
    return raw


def to_hf_json(tokenizer: Tokenizer) -> tuple[RawTokenizer, dict]:
    """Our tokenizer as a `tokenizers.Tokenizer` and its special tokens.

    Args:
      tokenizer: a char, word, bpe or hf tokenizer.

    Returns:
      (raw tokenizer, {'eos_token': ..., 'pad_token': ..., ...}).

    Raises:
      DataError: for a kind with no `tokenizers` equivalent (e.g. a GGUF vocabulary).
    """
    kind = tokenizer.kind
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.raw, dict(tokenizer.special_tokens)
    if kind not in ('char', 'word', 'bpe'):
        raise DataError(f"tokenizer kind {kind!r} has no tokenizers-JSON mapping (char, word, "
                        "bpe and hf do); export this model to GGUF instead")
    pieces = list(tokenizer._vocab_identity()) if kind != 'bpe' else None
    if kind == 'char':
        # One piece per code point; [\s\S] (not '.') so newlines split too.
        raw = _word_level(pieces, pre_tokenizers.Split(Regex(r'[\s\S]'), behavior='isolated'))
    elif kind == 'word':
        raw = _word_level(pieces, pre_tokenizers.Sequence([
            # Python's str.isspace also counts \x1c-\x1f, which Rust's whitespace does not.
            pre_tokenizers.Split(Regex(r'[\s\x1c-\x1f]+'), behavior='removed'),
            pre_tokenizers.Split(Regex(r'[\p{L}\p{N}]+|\S'), behavior='isolated')]))
    else:
        raw = RawTokenizer.from_str(tokenizer.hf_tokenizer.to_str())
    specials = {'pad_token': '<pad>', 'eos_token': '<eos>'}
    if tokenizer.unk_id is not None:
        specials['unk_token'] = '<unk>'
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in specials.values()])
    for name, token in specials.items():
        want = getattr(tokenizer, name.replace('_token', '_id'))
        if raw.token_to_id(token) != want:
            raise DataError(f'{token} maps to id {raw.token_to_id(token)}, expected {want}')
    return raw, specials
