"""
Hypothesis profiles, chosen with the HYPOTHESIS_PROFILE environment variable:
"ci" (the default) keeps the whole unit run quick; "fuzz" (make fuzz) runs
the property tests long enough to find rare inputs.
"""

import os

from hypothesis import settings

settings.register_profile("ci", max_examples=100, deadline=None)
settings.register_profile("fuzz", max_examples=200_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
