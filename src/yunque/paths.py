"""Where yunque keeps what outlives a run: the model catalogue and the feedback people give. The only module that
reads $YUNQUE_HOME; everything else takes the directory as an argument."""

from __future__ import annotations

import os
from pathlib import Path


def yunque_home() -> Path:
    """$YUNQUE_HOME, else the user's cache ($XDG_CACHE_HOME/yunque or ~/.cache/yunque)."""
    home = os.environ.get("YUNQUE_HOME")
    if home:
        return Path(home).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(cache) if cache and os.path.isabs(cache) else Path.home() / ".cache"  # XDG: relative paths are ignored
    return base / "yunque"
