"""Hypothesis settings for the property tests of our codecs.

The "ci" profile is the default: bounded example counts so the whole directory runs in well
under a minute on a busy two-core machine, no per-example deadline (a loaded machine stretches
single examples), derandomized so a failure in CI reproduces anywhere, and no example
database, so runs write nothing into the checkout. `INFERMESH_HYPOTHESIS_PROFILE=deep` runs
ten times as many random examples when hunting for bugs locally.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "deep",
    max_examples=2000,
    deadline=None,
    derandomize=False,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("INFERMESH_HYPOTHESIS_PROFILE", "ci"))
