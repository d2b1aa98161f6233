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
# The adapters whose module or examples import an optional dependency.
NEEDS = {"clipcore.torch": pytest.mark.requires_torch,
         "clipcore._tf": pytest.mark.requires_tf, "clipcore._tf_ops": pytest.mark.requires_tf,
         "clipcore.keras": pytest.mark.requires_tf,
         "clipcore.distributed": pytest.mark.requires_mpi}


@pytest.mark.parametrize("name", [pytest.param(name, marks=NEEDS.get(name, ()))
                                  for name in MODULES])
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_compiled_examples_are_collected():
    # Cython's autotestdict exposes the compiled functions' examples to doctest.
    from clipcore import _lists
    assert doctest.testmod(_lists).attempted >= 8
