"""The tokenizer stored in GGUF metadata, re-implemented to match llama.cpp's ids.

Two models (`tokenizer.ggml.model`):
  'llama': SentencePiece-style pieces with scores (llama.cpp `llm_tokenizer_spm`): spaces
    become '▁', a leading space is added when `add_space_prefix`, adjacent symbols merge
    greedily by the highest piece score (ties: leftmost), and a symbol that is not a piece
    falls back to its UTF-8 bytes as `<0xNN>` tokens.
  'gpt2': byte-level BPE (llama.cpp `llm_tokenizer_bpe`): a pre-tokenizer regex splits the
    text into words, each word's bytes are mapped to printable characters (GPT-2's
    bytes_to_unicode), and pairs merge by the lowest merge rank.
In both, control / user-defined / unknown tokens are split out of the text first (control
and unknown ones only when `special=True`), longest first, as `tokenizer_st_partition` does.
"""

from __future__ import annotations

import functools
import heapq
from typing import Optional, Sequence

import numpy as np

from rustgpt_jax.data.errors import DataError
from rustgpt_jax.data.tokenizer_base import Tokenizer

# gguf.TokenType
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = '\u2581'  # '▁'
# llama.cpp LLAMA_VOCAB_PRE_TYPE_GPT2 (and the same split for pre-tokenizers it treats alike).
GPT2_PATTERN = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
LLAMA3_PATTERN = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
                  r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_PATTERNS = {'gpt-2': GPT2_PATTERN, 'gpt2': GPT2_PATTERN, 'llama-bpe': LLAMA3_PATTERN,
                'llama3': LLAMA3_PATTERN}


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable character table (byte-level BPE vocabularies use it)."""
    keep = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
            + list(range(ord('®'), ord('ÿ') + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _utf8_len(first_byte: int) -> int:
    """llama.cpp `unicode_len_utf8`: sequence length from the first byte."""
    return (1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4)[first_byte >> 4]


class GGUFTokenizer(Tokenizer):
    """A llama (SentencePiece) or gpt2 (BPE) vocabulary from GGUF metadata.

    Args:
      model: 'llama' or 'gpt2'.
      tokens: the pieces, id order.
      scores: (V,) float32 piece scores (llama), or None.
      token_types: (V,) int token types (gguf.TokenType), or None (all NORMAL).
      merges: 'left right' strings in rank order (gpt2), or None.
      bos_id, eos_id, unk_id, pad_id: special ids or None.
      add_bos, add_eos: whether `encode` adds BOS / EOS by default.
      add_space_prefix: llama only; prepend a space before text that starts a fragment.
      pre: the gpt2 pre-tokenizer name (`tokenizer.ggml.pre`).
      chat_template: the Jinja chat template (`tokenizer.chat_template`), or None; it
        does not change what an id means, so it is not part of the fingerprint.
    """

    kind = 'gguf'

    def __init__(self, model: str, tokens: Sequence[str], scores=None, token_types=None,
                 merges: Optional[Sequence[str]] = None, bos_id=None, eos_id=None,
                 unk_id=None, pad_id=None, add_bos: Optional[bool] = None,
                 add_eos: bool = False, add_space_prefix: Optional[bool] = None,
                 pre: Optional[str] = None, chat_template: Optional[str] = None):
        if model not in ('llama', 'gpt2'):
            raise DataError(f"tokenizer.ggml.model {model!r} is not supported (expected "
                            "'llama' or 'gpt2')")
        n = len(tokens)
        if n == 0:
            raise DataError('tokenizer.ggml.tokens is empty')
        self.model, self.tokens, self.pre = model, list(tokens), pre
        self.chat_template = chat_template
        self.scores = np.zeros(n, np.float32) if scores is None else np.asarray(scores, np.float32)
        self.token_types = (np.full(n, NORMAL, np.int32) if token_types is None
                            else np.asarray(token_types, np.int32))
        if self.scores.shape != (n,) or self.token_types.shape != (n,):
            raise DataError(f'tokenizer scores {self.scores.shape} / token_type '
                            f'{self.token_types.shape} must both have {n} entries')
        for name, value in (('bos_id', bos_id), ('eos_id', eos_id), ('unk_id', unk_id),
                            ('pad_id', pad_id)):
            if value is not None and not 0 <= int(value) < n:
                raise DataError(f'tokenizer {name}={value} is outside the vocabulary [0, {n})')
        self.bos_id, self.eos_id, self.unk_id = bos_id, eos_id, unk_id
        self.pad_id = pad_id if pad_id is not None else eos_id
        self.add_bos = (model == 'llama') if add_bos is None else bool(add_bos)
        self.add_bos = self.add_bos and bos_id is not None
        self.add_eos = bool(add_eos) and eos_id is not None
        self.add_space_prefix = (model == 'llama') if add_space_prefix is None else bool(
            add_space_prefix)
        self.merges = list(merges or [])
        # llama.cpp's token_to_id: the last id wins for a repeated piece.
        self._to_id = {t.encode('utf-8', 'surrogateescape'): i for i, t in enumerate(self.tokens)}
        special = [i for i in range(n) if self.token_types[i] in (CONTROL, USER_DEFINED, UNKNOWN)
                   and self.tokens[i]]
        self._special = sorted(special, key=lambda i: -len(self.tokens[i].encode(
            'utf-8', 'surrogateescape')))
        if model == 'gpt2':
            if not self.merges:
                raise DataError('a gpt2 GGUF tokenizer needs tokenizer.ggml.merges')
            self._ranks = {}
            for rank, merge in enumerate(self.merges):
                left, sep, right = merge.partition(' ')
                if not sep:
                    raise DataError(f'tokenizer.ggml.merges[{rank}] = {merge!r} is not "a b"')
                self._ranks.setdefault((left, right), rank)
            import regex
            self._split = regex.compile(PRE_PATTERNS.get(pre or 'gpt-2', GPT2_PATTERN))
            self._byte_char = bytes_to_unicode()
            self._char_byte = {c: b for b, c in self._byte_char.items()}

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    # -- encode ----------------------------------------------------------------

    def encode(self, text: str, add_special: Optional[bool] = None,
               special: bool = False) -> list[int]:
        """Token ids of `text`, as llama.cpp's `llama_tokenize(text, add_special, special)`.

        Args:
          text: the string.
          add_special: add BOS/EOS as the vocabulary asks (`add_bos` / `add_eos`); default
            False, matching the Tokenizer interface (no EOS appended).
          special: recognise control tokens written in the text (e.g. '</s>').
        """
        add_special = bool(add_special)
        out = [self.bos_id] if add_special and self.add_bos else []
        prev_special = True
        for fragment in self._partition(text.encode('utf-8'), special):
            if isinstance(fragment, int):
                out.append(fragment)
                prev_special = True
                continue
            if self.model == 'llama':
                if self.add_space_prefix and prev_special:
                    fragment = b' ' + fragment
                out.extend(self._spm(fragment.replace(b' ', SPACE.encode('utf-8'))))
            else:
                out.extend(self._bpe(fragment))
            prev_special = False
        if add_special and self.add_eos:
            out.append(self.eos_id)
        return out

    def _partition(self, raw: bytes, special: bool) -> list:
        """Splits out special tokens, longest first: a list of bytes and int ids."""
        parts = [raw] if raw else []
        for tid in self._special:
            if not special and self.token_types[tid] in (CONTROL, UNKNOWN):
                continue
            piece = self.tokens[tid].encode('utf-8', 'surrogateescape')
            new = []
            for part in parts:
                if isinstance(part, int):
                    new.append(part)
                    continue
                pieces = part.split(piece)
                for j, chunk in enumerate(pieces):
                    if j:
                        new.append(tid)
                    if chunk:
                        new.append(chunk)
            parts = new
        return parts

    def _byte_token(self, b: int) -> int:
        tid = self._to_id.get(b'<0x%02X>' % b, self._to_id.get(bytes([b])))
        return self.unk_id if tid is None else tid

    def _spm(self, text: bytes) -> list[int]:
        """llm_tokenizer_spm_session::tokenize on escaped UTF-8 bytes."""
        starts, i = [], 0
        while i < len(text):
            starts.append(i)
            i += min(_utf8_len(text[i]), len(text) - i)
        n = len(starts)
        start, size = starts, [min(_utf8_len(text[s]), len(text) - s) for s in starts]
        prev, nxt = list(range(-1, n - 1)), list(range(1, n)) + [-1]
        heap = []

        def add(left, right):
            if left < 0 or right < 0:
                return
            piece = text[start[left]:start[left] + size[left] + size[right]]
            tid = self._to_id.get(piece)
            if tid is not None:
                # Max-heap on score, ties to the leftmost pair (llm_bigram_spm::comparator).
                heapq.heappush(heap, (-float(self.scores[tid]), left, right, len(piece)))

        for k in range(1, n):
            add(k - 1, k)
        while heap:
            _, left, right, length = heapq.heappop(heap)
            if size[left] == 0 or size[right] == 0 or size[left] + size[right] != length:
                continue
            size[left] += size[right]
            size[right] = 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            add(prev[left], left)
            add(left, nxt[left])
        out, k = [], 0 if n else -1
        while k != -1:
            piece = text[start[k]:start[k] + size[k]]
            tid = self._to_id.get(piece)
            out.extend([tid] if tid is not None else [self._byte_token(b) for b in piece])
            k = nxt[k]
        return out

    def _bpe(self, raw: bytes) -> list[int]:
        """Pre-tokenizer split, then byte-level BPE merges by rank on each word."""
        out = []
        for word in self._split.findall(raw.decode('utf-8')):
            symbols = [self._byte_char[b] for b in word.encode('utf-8')]
            while len(symbols) > 1:
                ranks = [self._ranks.get(pair, None) for pair in zip(symbols, symbols[1:])]
                best = min((r, k) for k, r in enumerate(ranks) if r is not None) if any(
                    r is not None for r in ranks) else None
                if best is None:
                    break
                k = best[1]
                symbols[k:k + 2] = [symbols[k] + symbols[k + 1]]
            for sym in symbols:
                tid = self._to_id.get(sym.encode('utf-8'))
                if tid is None:
                    out.extend(self._to_id.get(c.encode('utf-8'), self.unk_id) for c in sym)
                else:
                    out.append(tid)
        return [t for t in out if t is not None]

    # -- decode ----------------------------------------------------------------

    def piece_bytes(self, tid: int, special: bool = False) -> bytes:
        """llama.cpp `token_to_piece`: the bytes one id renders to."""
        ttype, text = int(self.token_types[tid]), self.tokens[tid]
        if ttype in (CONTROL, UNKNOWN, UNUSED):
            return text.encode('utf-8', 'surrogateescape') if special else b''
        if ttype == USER_DEFINED:
            return text.encode('utf-8', 'surrogateescape')
        if ttype == BYTE:
            return bytes([int(text[3:5], 16)]) if self.model == 'llama' else bytes(
                [self._char_byte.get(text, 0)])
        if self.model == 'llama':
            return text.replace(SPACE, ' ').encode('utf-8', 'surrogateescape')
        return bytes(self._char_byte[c] for c in text if c in self._char_byte)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(t) for t in ids]
        self.check_ids(ids)
        raw = b''.join(self.piece_bytes(t, special=not skip_special_tokens) for t in ids)
        # SentencePiece drops the space it added in front of the first word.
        if self.model == 'llama' and self.add_space_prefix and raw.startswith(b' '):
            raw = raw[1:]
        return raw.decode('utf-8', 'replace')

    # -- persistence (rustgpt_jax.data.tokenizer_base) --------------------------

    def _vocab_identity(self):
        return {'model': self.model, 'tokens': self.tokens,
                'types': self.token_types.tolist(), 'merges': self.merges}

    def _payload(self, directory: str) -> dict:
        return {'model': self.model, 'tokens': self.tokens, 'scores': self.scores.tolist(),
                'token_types': self.token_types.tolist(), 'merges': self.merges,
                'bos_id': self.bos_id, 'eos_id': self.eos_id, 'unk_id': self.unk_id,
                'pad_id': self.pad_id, 'add_bos': self.add_bos, 'add_eos': self.add_eos,
                'add_space_prefix': self.add_space_prefix, 'pre': self.pre,
                'chat_template': self.chat_template}

    @classmethod
    def _from_payload(cls, payload: dict, directory: str) -> 'GGUFTokenizer':
        return cls(**payload)
