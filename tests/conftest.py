"""Shared pytest configuration: Hypothesis profiles.

``HYPOTHESIS_PROFILE=dev`` gives random exploration without deadlines; the
default, ``ci``, is derandomized so a failure replays exactly.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=100, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
