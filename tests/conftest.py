"""Test settings shared by the codec and session tests.

One Hypothesis profile: no per-example deadline (CI machines stall), a modest number of examples
so the property tests stay fast, and derandomized so every run tries the same examples.
Set ``HYPOTHESIS_PROFILE=thorough`` for a longer, randomized search.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "sipgen",
    deadline=None,
    max_examples=60,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    deadline=None,
    max_examples=2000,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "sipgen"))
