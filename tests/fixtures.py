"""Where the parity tests read the upstream fixtures from: LOWVRAM_REFERENCE_DIR, else tests/reference/."""

import os
from pathlib import Path


def reference_dir() -> Path:
    env = os.environ.get("LOWVRAM_REFERENCE_DIR")
    return Path(env) if env else Path(__file__).parent / "reference"
