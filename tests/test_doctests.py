"""The examples in docstrings (``>>>``) are tests too: every module of the four packages and the benchmarks."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("loraloop", "services", "learner", "feedback")


def _modules() -> list[str]:
    names = []
    for package in PACKAGES:
        names.append(package)
        names += [m.name for m in pkgutil.walk_packages([str(ROOT / package)], prefix=f"{package}.")]
    names += [f"benchmarks:{p.stem}" for p in sorted((ROOT / "benchmarks").glob("*.py"))]
    return names


def _import(name: str):
    if name.startswith("benchmarks:"):  # scripts, importable from their own folder (they import _common)
        sys.path.insert(0, str(ROOT / "benchmarks"))
        try:
            return importlib.import_module(name.split(":", 1)[1])
        finally:
            sys.path.remove(str(ROOT / "benchmarks"))
    return importlib.import_module(name)


def _examples(module) -> list[doctest.DocTest]:
    return [t for t in doctest.DocTestFinder().find(module, module.__name__) if t.examples]


@pytest.mark.parametrize("name", [n for n in _modules() if not n.endswith("__main__")])
def test_docstring_examples(name: str) -> None:
    module = _import(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in _examples(module):
        runner.run(test)
    assert runner.failures == 0, f"{runner.failures} docstring example(s) of {name} failed (run pytest -s to see)"


def test_the_pure_decision_modules_carry_examples() -> None:
    for name in ("services.batching", "feedback.join", "learner.dataset", "learner.gate", "learner.trigger",
                 "loraloop.buffer.replay"):
        assert _examples(_import(name)), f"{name} lost its docstring examples"
