"""Every Examples block in clipcore's docstrings runs, compiled modules included."""
import doctest
import importlib
import pkgutil

import pytest

import clipcore

MODULES = sorted(
    name for _, name, _ in pkgutil.iter_modules(clipcore.__path__, "clipcore.")
    if name not in ("clipcore.__main__",)
) + ["clipcore"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    try:
        module = importlib.import_module(name)
    except ImportError as exc:          # an optional dependency's adapter
        pytest.skip(f"{name}: {exc}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_compiled_examples_are_collected():
    # Cython's autotestdict exposes the compiled functions' examples to doctest.
    from clipcore import _lists
    assert doctest.testmod(_lists).attempted >= 8
