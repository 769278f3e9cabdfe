"""Files written whole or not at all: a reader (or a run resumed after a crash) sees the old text or the new."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_text_atomically(path: Path, text: str) -> None:
    """Writes `text` to a hidden file beside `path`, flushes it to disk, and renames it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    with open(staging, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(staging, path)


def write_json_atomically(path: Path, value: Any) -> None:
    """`value` as indented JSON (non-ASCII kept), written with `write_text_atomically`."""
    write_text_atomically(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")
