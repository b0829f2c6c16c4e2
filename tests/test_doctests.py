"""The examples in the docstrings of every module of infogap.models and infogap.stream, run as tests.

They are imported by their package names (pytest's ``--doctest-modules`` would import ``models/x.py`` as a
second, top-level ``models.x``)."""
from __future__ import annotations

import doctest
import importlib
import pkgutil
import sys

import pytest

import infogap.models
import infogap.stream


def _modules() -> list[str]:
    names = []
    for package in (infogap.models, infogap.stream):
        names.append(package.__name__)
        names += [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    return sorted(names)


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in finder.find(module, name):
        runner.run(test)
    failed, attempted = runner.summarize(verbose=False)
    assert failed == 0, f"{failed} of {attempted} examples failed in {name} (the output above shows which)"
    # an example importing the folders as top-level packages passes only from the repository's root
    assert not {"models", "stream"} & set(sys.modules), f"{name}: an example imports models/stream, not infogap.*"
