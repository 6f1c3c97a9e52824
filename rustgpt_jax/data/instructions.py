"""Instruction data: JSONL `{"prompt": ..., "response": ...}` records -> ids + loss masks.

An example is encoded as

    ids  = encode(PROMPT_TEMPLATE.format(prompt=p)) + encode(r) + [eos]
    mask =   0 ... 0 (prompt, template included)  + 1 ... 1    + [1]

so the loss covers only the response and the EOS that ends it. Prompt and response are
encoded separately, which is also how the chat CLI feeds the prompt and lets the model
continue, so training and generation see the same boundary ids.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from rustgpt_jax.data.errors import DataError
from rustgpt_jax.data.tokenizer_base import Tokenizer

PROMPT_TEMPLATE = 'User: {prompt}\nAssistant: '
# PROMPT_TEMPLATE as a Hugging Face chat template (Jinja), exported with our models so
# other tools render the format they were trained on. One user turn with
# add_generation_prompt renders exactly `format_prompt`; an answer ends at the next
# 'User:' line (the chat CLI's stop string), as the model never saw a system role.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + '\\n' }}"
    "{% else %}{{ raise_exception('this model knows only user and assistant turns') }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}")
OWN_KINDS = ('char', 'word', 'bpe')


def format_prompt(prompt: str) -> str:
    """The text the model sees before its answer (shared with the chat CLI)."""
    return PROMPT_TEMPLATE.format(prompt=prompt)


def chat_template_of(tokenizer) -> str | None:
    """The chat template to export with a model: its own, or CHAT_TEMPLATE for ours.

    Our tokenizer kinds (char, word, bpe) mean a model trained here, which `rustgpt-chat`
    prompts with PROMPT_TEMPLATE; a pretrained tokenizer carries its template (or none).
    """
    own = getattr(tokenizer, 'chat_template', None)
    if own:
        return own
    return CHAT_TEMPLATE if getattr(tokenizer, 'kind', None) in OWN_KINDS else None


@dataclasses.dataclass(frozen=True)
class InstructionExample:
    prompt: str
    response: str


@dataclasses.dataclass(frozen=True)
class EncodedExample:
    """One tokenized example.

    Attributes:
      ids: (n,) int32 token ids, EOS last.
      loss_mask: (n,) float32, 1.0 on response tokens and the final EOS.
    """
    ids: np.ndarray
    loss_mask: np.ndarray

    def __post_init__(self):
        if self.ids.shape != self.loss_mask.shape or self.ids.ndim != 1:
            raise DataError(f'ids {self.ids.shape} and loss_mask {self.loss_mask.shape} must '
                            f'be 1-D of equal length')

    def __len__(self) -> int:
        return int(self.ids.shape[0])


_KEYS = ('prompt', 'response')


def parse_instruction_line(line: str, where: str) -> InstructionExample:
    """Parses one JSONL record; `where` ("file:line") prefixes every error."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f'{where}: invalid JSON at column {e.colno}: {e.msg}') from None
    if not isinstance(record, dict):
        raise DataError(f'{where}: expected a JSON object with keys "prompt" and "response", '
                        f'got {type(record).__name__}')
    for key in _KEYS:
        if key not in record:
            raise DataError(f'{where}: missing key {key!r}')
        if not isinstance(record[key], str):
            raise DataError(f'{where}: {key!r} must be a string, got '
                            f'{type(record[key]).__name__}')
    extra = sorted(set(record) - set(_KEYS))
    if extra:
        raise DataError(f'{where}: unexpected keys {extra} (allowed: "prompt", "response")')
    if not record['response']:
        raise DataError(f'{where}: "response" is empty, so the example has nothing to learn')
    return InstructionExample(record['prompt'], record['response'])


def load_instructions(path: str) -> list[InstructionExample]:
    """Reads a JSONL file of `{"prompt": str, "response": str}`; blank lines are skipped.

    Raises:
      DataError: missing or empty file, or a malformed line (the message names the
        file and the 1-based line number).
    """
    if not os.path.isfile(path):
        raise DataError(f'instruction file {path!r} does not exist')
    examples = []
    # Binary lines, decoded one by one, so a bad byte is reported on its own line.
    with open(path, 'rb') as f:
        for lineno, raw in enumerate(f, start=1):
            where = f'{path}:{lineno}'
            try:
                # utf-8-sig drops a byte-order mark that some editors put on line 1.
                line = raw.decode('utf-8-sig' if lineno == 1 else 'utf-8')
            except UnicodeDecodeError as e:
                raise DataError(f'{where}: not UTF-8 (bad byte at column {e.start + 1})') from None
            if line.strip():
                examples.append(parse_instruction_line(line, where))
    if not examples:
        raise DataError(f'{path}: no instruction records (the file is empty)')
    return examples


def encode_instruction(tokenizer: Tokenizer, example: InstructionExample) -> EncodedExample:
    """Token ids and loss mask of one example (see the module docstring)."""
    if tokenizer.eos_id is None:
        raise DataError(f'{type(tokenizer).__name__} has no EOS token')
    prompt = tokenizer.encode(format_prompt(example.prompt))
    response = tokenizer.encode(example.response) + [tokenizer.eos_id]
    ids = np.asarray(prompt + response, dtype=np.int32)
    mask = np.concatenate([np.zeros(len(prompt), np.float32),
                           np.ones(len(response), np.float32)])
    return EncodedExample(ids, mask)
