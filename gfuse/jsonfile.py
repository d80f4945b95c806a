"""Small JSON records on disk, written so that a crash leaves either the old or the new file, whole."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any


def write_atomic(path: Path, data: dict[str, Any]) -> None:
    """Temp file beside ``path``, fsync, rename over it."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read(path: Path) -> dict[str, Any] | None:
    """The record, or None when there is none (or it is not an object); ValueError when it is corrupt."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    return data if isinstance(data, dict) else None
