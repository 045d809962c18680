"""Where derived data lives: tokenized corpora and trained tokenizers, reused across runs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$MTA_LAB_CACHE``, else ``$XDG_CACHE_HOME/mta-lab``, else ``~/.cache/mta-lab``."""
    if "MTA_LAB_CACHE" in os.environ:
        return Path(os.environ["MTA_LAB_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mta-lab"
