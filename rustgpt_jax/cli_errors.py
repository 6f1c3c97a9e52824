"""One-line user errors for every command line: `prog: error: <message>`, exit status 2.

A user error is one the person at the terminal can fix: a config or gin error, a data,
checkpoint or GGUF error, or a bad flag. It is printed as one line on stderr, in the
form argparse uses for its own usage errors, and the command exits with status 2;
`--traceback` shows the full stack instead. Any other exception is a bug in this code
and keeps its traceback.

Which exceptions are the user's is decided in two ways:
  * by type, anywhere: `DataError`, `CheckpointError`, `GGUFError`, the training's
    `ConfigError` and `UserError`;
  * by place: inside `config_errors()`, code that only parses flags and gin files and
    builds (validated, frozen) configs turns ValueError, TypeError and gin's own errors
    into a `UserError`. A ValueError raised while training is not blanket-caught, since
    JAX raises ValueError for shape bugs too.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import tokenize
from typing import Callable, Iterator, TextIO

from rustgpt_jax.data.errors import DataError
from rustgpt_jax.interop.gguf.reader import GGUFError
from rustgpt_jax.training.checkpoint import CheckpointError
from rustgpt_jax.training.run_config import ConfigError

EXIT_USER_ERROR = 2  # argparse's status for a usage error


class UserError(ValueError):
    """An error the user can fix; its message names the field, file or flag."""


USER_ERRORS = (UserError, ConfigError, DataError, CheckpointError, GGUFError)
# What configuration code raises for bad values: ValueError / TypeError from validation
# and from gin (unknown or misspelt bindings, a missing file), SyntaxError and
# tokenize.TokenError from gin's parser, RuntimeError for a missing gin.REQUIRED value,
# ImportError for a gin `import` of a missing module.
CONFIG_ERRORS = (ValueError, TypeError, SyntaxError, tokenize.TokenError, RuntimeError,
                 ImportError)

# gin appends where a value came from: "In call to configurable ..." (the message names
# the field already) and "In bindings string line N" / "In file F, line N" followed by
# the offending text (kept: it says which binding).
_GIN_CALL = re.compile(r"^\s*In call to configurable ")
_GIN_WHERE = re.compile(r"^\s*In (bindings string line \d+|file .*)$")


def one_line(error: BaseException) -> str:
    """The message of `error` on a single line, gin's call chain and config dumps removed.

    A gin parse error (SyntaxError) gets its location and text appended, which its own
    message lacks (gin's is e.g. 'Unable to parse value. (line 1)').
    """
    if isinstance(error, SyntaxError) and error.msg:
        where = error.filename or 'bindings'
        text = (error.text or '').strip()
        return f'{error.msg} in {where}' + (f': {text!r}' if text else '')
    if isinstance(error, tokenize.TokenError):
        return f'gin could not parse a binding: {error.args[0]}'
    lines = str(error).splitlines() or [type(error).__name__]
    parts = [lines[0].strip()]
    for i, line in enumerate(lines[1:], start=1):
        match = _GIN_WHERE.match(line)
        if match and not _GIN_CALL.match(line):
            text = lines[i + 1].strip() if i + 1 < len(lines) else ''
            parts.append(f'({match.group(1)}' + (f': {text})' if text else ')'))
    message = ' '.join(p for p in parts if p)
    return message or type(error).__name__


@contextlib.contextmanager
def config_errors() -> Iterator[None]:
    """Inside: configuration only, so a ValueError/TypeError/gin error is the user's."""
    try:
        yield
    except USER_ERRORS:
        raise
    except CONFIG_ERRORS as e:
        raise UserError(one_line(e)) from e


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its usage errors on one line too (argparse prints the usage text
    first; `--help` still shows it)."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f'{self.prog}: error: {message} (see --help)\n')


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse reports a bad one as a usage error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected an integer >= 1, got {text!r}') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be >= 1, got {value}')
    return value


def add_traceback_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--traceback', action='store_true',
                        help='on a user error, show the full stack instead of one line')


def run(prog: str, body: Callable[[], int], traceback: bool = False,
        err: TextIO | None = None) -> int:
    """Runs a command's body; a user error prints `prog: error: <message>` and gives 2.

    Args:
      prog: the command's name (argparse's `prog`).
      body: the command after its flags are parsed; returns the exit status.
      traceback: re-raise user errors (the `--traceback` flag).
      err: where the line goes (default: sys.stderr at call time).
    """
    try:
        return body()
    except USER_ERRORS as e:
        if traceback:
            raise
        print(f'{prog}: error: {one_line(e)}', file=err if err is not None else sys.stderr)
        return EXIT_USER_ERROR
