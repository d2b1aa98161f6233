# The one place the version is written: setuptools reads it from here
# (pyproject.toml, [tool.setuptools.dynamic]) without importing the package.
__version__ = "0.1.0"
