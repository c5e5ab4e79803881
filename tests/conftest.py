"""Suite-wide settings.

Hypothesis runs derandomized by default so that the suite gives the same
answer on every run (CI included); `HYPOTHESIS_PROFILE=dev pytest` explores
with fresh random examples instead.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("deterministic", derandomize=True, database=None, deadline=None)
settings.register_profile("dev", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))
