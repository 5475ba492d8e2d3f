"""``import moec`` shows a curated set of names, and the user guide lists each of them."""

from __future__ import annotations

import re
from pathlib import Path

import moec

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "guide.md"


def test_every_public_name_exists_and_the_guide_names_it():
    section = GUIDE.read_text().split("## Public names", 1)
    assert len(section) == 2, "docs/guide.md has no '## Public names' section"
    listed = set(re.findall(r"`([A-Za-z_]+)`", section[1].split("\n## ", 1)[0]))
    assert all(hasattr(moec, name) for name in moec.__all__)
    assert set(moec.__all__) <= listed, f"missing from docs/guide.md: {sorted(set(moec.__all__) - listed)}"
