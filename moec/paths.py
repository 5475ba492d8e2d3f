"""Paths as users give them: a leading ``~`` names the user's home, as in a shell, also where no shell
expanded it (a quoted path, one read from a config file, or one passed in Python)."""

from __future__ import annotations

import os
from pathlib import Path


def user_path(path: str | os.PathLike) -> Path:
    """``path`` with a leading ``~`` or ``~user`` expanded to that home folder (kept as is if unknown)."""
    return Path(os.path.expanduser(path))
