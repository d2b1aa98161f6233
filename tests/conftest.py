"""Optional test dependencies: the one place that decides when a test skips.

`pip install -e .` plus pytest, pytest-benchmark and hypothesis runs the suite;
a test that needs more carries one of the markers below and skips, with the
reason, when that module is not installed (`pip install -e ".[test]"` installs
them all, and then nothing here skips). A test module that needs one at import
starts with `pytest.importorskip(...)` instead. CI sets
CLIPCORE_REQUIRE_TEST_DEPS=1: then a missing one stops the run instead.

The suite also runs against an installed wheel, from a copy of tests/ alone
(CI's wheel stage). A test that needs the repository around tests/ (the
examples/ and benchmarks/ scripts, .gitignore, setup.py) carries
`requires_source_tree` and skips there; SOURCE_ROOT says where that tree is.

Hypothesis profiles: "ci", the default (30 examples for each fuzz test, one
per function), and "long" (``pytest --hypothesis-profile=long``: 20,000 each).
"""
import importlib.util
import os
from pathlib import Path

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



def _source_root():
    """The repository that holds these tests, or None for a copy of tests/ alone."""
    root = Path(__file__).resolve().parent.parent
    wanted = ("setup.py", "src/clipcore/kernels.pyx", "examples", "benchmarks", ".gitignore")
    return root if all((root / name).exists() for name in wanted) else None


SOURCE_ROOT = _source_root()


def pytest_configure(config):
    for marker, module in OPTIONAL.items():
        config.addinivalue_line("markers", f"{marker}: needs {module}; skipped without it")
    config.addinivalue_line("markers", "requires_source_tree: needs the repository around "
                                       "tests/ (examples/, benchmarks/, setup.py); skipped "
                                       "when tests/ was copied out to test an installed wheel")
    if os.environ.get("CLIPCORE_REQUIRE_TEST_DEPS") == "1":
        missing = [m for m in OPTIONAL.values() if importlib.util.find_spec(m) is None]
        if missing:
            raise pytest.UsageError(f"CLIPCORE_REQUIRE_TEST_DEPS=1 but not installed: "
                                    f"{', '.join(missing)}")


def pytest_runtest_setup(item):
    for marker in item.iter_markers():
        if marker.name in OPTIONAL:
            pytest.importorskip(OPTIONAL[marker.name])
        elif marker.name == "requires_source_tree" and SOURCE_ROOT is None:
            pytest.skip("needs the source tree around tests/ (here tests/ was copied out "
                        "to test an installed clipcore)")


@pytest.fixture
def no_late_backoff():
    """The default thread policy as on a quiet machine: no back-off left by an
    earlier late team (another process may have loaded a core meanwhile)."""
    from clipcore import kernels
    kernels._forget_late_teams()
    yield
    kernels._forget_late_teams()


@pytest.fixture(params=[True, False], ids=["twins", "generic"])
def twins(request):
    """Run with the hand-written AVX-512 loops and with the generic (cloned) ones."""
    from clipcore import kernels
    saved = kernels.get_tuning()["twins"]
    kernels.set_tuning(twins=request.param)
    yield request.param
    kernels.set_tuning(twins=saved)
