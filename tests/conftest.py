"""Hypothesis profiles: "ci", the default (30 examples for each of the 32 fuzz tests,
one per function), and "long" (``pytest --hypothesis-profile=long``: 20,000 per test)."""
from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                     HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=30, **_COMMON)
settings.register_profile("long", max_examples=20000, **_COMMON)
settings.load_profile("ci")
