"""Sphinx configuration for clipcore's documentation.

Build (warnings are errors, as CI builds it):

    python -m pip install -e ".[docs]"
    python -m sphinx -W --keep-going -b html docs docs/_build/html

The API pages are generated from the numpydoc docstrings of the installed
(built) clipcore; the optional frameworks are mocked, so the docs build
without PyTorch, TensorFlow, Keras, mpi4py or JAX.
"""
import clipcore

project = "clipcore"
author = "the clipcore developers"
copyright = "2026, the clipcore developers"
version = release = clipcore.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "numpydoc",
]

# The adapters import these at module level or on use; none is needed to build.
autodoc_mock_imports = ["torch", "tensorflow", "keras", "mpi4py", "jax"]
autosummary_generate = False
# Cython embeds each compiled function's signature as its docstring's first line.
autodoc_docstring_signature = True

numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

intersphinx_mapping = {}

exclude_patterns = ["_build"]
html_theme = "alabaster"
html_theme_options = {"description": "Tensor and gradient clipping on fused Cython/OpenMP kernels"}
