"""Optional test dependencies: the one place that decides when a test skips.

`pip install -e .` plus pytest, pytest-benchmark and hypothesis runs the suite;
a test that needs more carries one of the markers below and skips, with the
reason, when that module is not installed (`pip install -e ".[test]"` installs
them all, and then nothing here skips). A test module that needs one at import
starts with `pytest.importorskip(...)` instead. CI sets
CLIPCORE_REQUIRE_TEST_DEPS=1: then a missing one stops the run instead.

Hypothesis profiles: "ci", the default (30 examples for each fuzz test, one
per function), and "long" (``pytest --hypothesis-profile=long``: 20,000 each).
"""
import importlib.util
import os

import pytest
from hypothesis import HealthCheck, settings


_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                     HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=30, **_COMMON)
settings.register_profile("long", max_examples=20000, **_COMMON)
settings.load_profile("ci")

# marker -> the module the marked test imports
OPTIONAL = {
    "requires_torch": "torch",
    "requires_tf": "tensorflow",
    "requires_mpi": "mpi4py",
    "requires_matplotlib": "matplotlib",
    "requires_threadpoolctl": "threadpoolctl",
    "requires_cython": "Cython",
    "requires_lightning": "lightning",
    "requires_accelerate": "accelerate",
    "requires_opacus": "opacus",
    "requires_jax": "jax",
    "requires_ml_dtypes": "ml_dtypes",
}


def pytest_configure(config):
    for marker, module in OPTIONAL.items():
        config.addinivalue_line("markers", f"{marker}: needs {module}; skipped without it")
    if os.environ.get("CLIPCORE_REQUIRE_TEST_DEPS") == "1":
        missing = [m for m in OPTIONAL.values() if importlib.util.find_spec(m) is None]
        if missing:
            raise pytest.UsageError(f"CLIPCORE_REQUIRE_TEST_DEPS=1 but not installed: "
                                    f"{', '.join(missing)}")


def pytest_runtest_setup(item):
    for marker in item.iter_markers():
        if marker.name in OPTIONAL:
            pytest.importorskip(OPTIONAL[marker.name])


@pytest.fixture
def no_late_backoff():
    """The default thread policy as on a quiet machine: no back-off left by an
    earlier late team (another process may have loaded a core meanwhile)."""
    from clipcore import kernels
    kernels._note_wait(0.0, 1.0)
    yield
    kernels._note_wait(0.0, 1.0)
