"""Settings shared by both test tiers."""

import os

# jupyter_core warns (DeprecationWarning) unless the platformdirs layout is chosen;
# pytest turns warnings into errors.
os.environ.setdefault("JUPYTER_PLATFORM_DIRS", "1")
