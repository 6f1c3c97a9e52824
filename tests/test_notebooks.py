"""Every notebook under notebooks/ runs top to bottom headless (nbclient) and is stored
without outputs."""

from __future__ import annotations

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parent.parent / 'notebooks').glob(
    '*.ipynb'))


def test_there_are_four_notebooks():
    assert [p.name[:3] for p in NOTEBOOKS] == ['01_', '02_', '03_', '04_']


@pytest.mark.parametrize('path', NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path):
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get('outputs') and c.get('execution_count') is None
               for c in nb.cells if c.cell_type == 'code'), 'store notebooks without outputs'
    # Each cell's errors propagate as CellExecutionError, which fails the test.
    NotebookClient(nb, timeout=240, kernel_name='python3',
                   resources={'metadata': {'path': str(path.parent)}}).execute()
    assert any(c.get('outputs') for c in nb.cells if c.cell_type == 'code')
