"""Notebooks stay paired with their jupytext .py files and are committed without outputs.

(The notebooks themselves are executed by ``pytest --nbmake notebooks`` in ``make test``.)"""

import glob
import os

import jupytext
import pytest

NOTEBOOKS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "notebooks", "*.ipynb")))


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_paired_and_stripped(path):
    nb = jupytext.read(path)
    py = jupytext.read(path[: -len(".ipynb")] + ".py")
    code = lambda book: [(c.cell_type, c.source.strip()) for c in book.cells]
    assert code(nb) == code(py), "the .ipynb and its .py differ: run `jupytext --sync` on the notebook"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.get("outputs"), "commit notebooks with outputs stripped"
    first = nb.cells[0].source
    assert "colab.research.google.com" in first, "open with a Colab badge"
