"""A model's own chat template, rendered as `transformers`' `apply_chat_template` renders it.

Chat templates are Jinja programs shipped with a model (GGUF `tokenizer.chat_template`,
`tokenizer_config.json` `chat_template`, `chat_template.jinja`). transformers compiles
them in an immutable sandbox with `trim_blocks` and `lstrip_blocks`, the `loopcontrols`
extension, a `{% generation %}` block tag, a `tojson` filter that does not escape HTML,
and the globals `raise_exception`, `strftime_now`, `dict` and `namespace`; it renders
with `messages`, `tools=None`, `documents=None`, `add_generation_prompt` and the
tokenizer's named special tokens (`bos_token`, `eos_token`, ...). `render` does the same
(transformers 5.x `utils/chat_template_utils._cached_compile_jinja_template`), so the
same messages give the same string (tests/test_chat_template.py checks it).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
from typing import Mapping, Optional, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """A template that does not compile, or refuses the conversation (raise_exception)."""


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body (transformers marks the
    assistant span there for training masks; rendering is unchanged)."""
    tags = {'generation'}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(['name:endgeneration'], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method('_render'), [], [], body).set_lineno(
            lineno)

    def _render(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """transformers' TemplateNamespace: no underscore attributes (sandbox escapes)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith('_'):
            raise jinja2.exceptions.SecurityError(
                f'chat templates cannot set underscore attributes on a namespace: {name!r}')


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    """The compiled template (cached); raises ChatTemplateError on a syntax error."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters['tojson'] = _tojson
    env.globals['raise_exception'] = _raise_exception
    env.globals['strftime_now'] = lambda fmt: datetime.datetime.now().strftime(fmt)
    env.globals['dict'] = dict
    env.globals['namespace'] = _Namespace
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f'chat template does not compile: {e}') from None


def render(template: str, messages: Sequence[Mapping[str, str]], *,
           add_generation_prompt: bool = True,
           special_tokens: Optional[Mapping[str, str]] = None) -> str:
    """The prompt text of `messages`, as `apply_chat_template(..., tokenize=False)`.

    Args:
      template: the Jinja chat template.
      messages: [{'role': 'system' | 'user' | 'assistant', 'content': str}, ...].
      add_generation_prompt: end with the assistant header, ready for the answer.
      special_tokens: {'bos_token': '<s>', 'eos_token': '</s>', ...}.

    Raises:
      ChatTemplateError: the template rejects the conversation (its message).
    """
    try:
        return compile_template(template).render(
            messages=[dict(m) for m in messages], tools=None, documents=None,
            add_generation_prompt=add_generation_prompt, **dict(special_tokens or {}))
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f'chat template: {e}') from None


def special_tokens_of(tokenizer) -> dict:
    """Named special tokens a template may use ({'bos_token': '<s>', ...})."""
    named = getattr(tokenizer, 'special_tokens', None)
    if named is not None:  # data.HFTokenizer keeps them by name
        return dict(named)
    pieces = getattr(tokenizer, 'tokens', None)  # a GGUF vocabulary: the pieces of the ids
    out = {}
    for name in ('bos', 'eos', 'unk', 'pad'):
        tid = getattr(tokenizer, f'{name}_id', None)
        if pieces is not None and tid is not None:
            out[f'{name}_token'] = pieces[tid]
    return out


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """A template bound to a tokenizer's special tokens.

    Attributes:
      template: the Jinja source.
      special_tokens: the names the template renders with.
    """
    template: str
    special_tokens: Mapping[str, str]

    def render(self, messages: Sequence[Mapping[str, str]],
               add_generation_prompt: bool = True) -> str:
        return render(self.template, messages, add_generation_prompt=add_generation_prompt,
                      special_tokens=self.special_tokens)

    def after_assistant(self) -> str:
        """What the template writes right after an assistant message's content."""
        marker = '\x00ANSWER\x00'
        text = self.render([{'role': 'user', 'content': 'hi'},
                            {'role': 'assistant', 'content': marker}],
                           add_generation_prompt=False)
        return text.split(marker, 1)[1] if marker in text else ''

    def supports_system(self) -> bool:
        """Whether a system message's content reaches the rendered prompt."""
        marker = 'SYSTEM\x01MESSAGE'
        try:
            text = self.render([{'role': 'system', 'content': marker},
                                {'role': 'user', 'content': 'hi'}])
        except ChatTemplateError:
            return False
        return marker in text


def end_of_turn_id(chat: ChatFormat, tokenizer) -> Optional[int]:
    """The special token that closes an assistant turn ('</s>', '<|im_end|>'), or None.

    It is the first token of what the template writes after an answer, when that token
    is a special one (it decodes to nothing with special tokens skipped). Our own
    format ends a turn with a newline, which is no special token: None.

    Args:
      chat: the template.
      tokenizer: a tokenizer whose `encode(text, special=True)` parses special tokens
        (data.HFTokenizer, interop.gguf.GGUFTokenizer).
    """
    tail = chat.after_assistant().lstrip()
    if not tail:
        return None
    ids = tokenizer.encode(tail, special=True)
    if ids and tokenizer.decode(ids[:1], skip_special_tokens=True) == '':
        return int(ids[0])
    return None
