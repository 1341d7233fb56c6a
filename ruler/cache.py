"""Generated sample sets on disk, one JSON file per set, named by a hash of what made it."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .corpora import data_dir


def path_for(key: dict[str, Any], cache_dir: Path | str | None) -> Path:
    """The file for the set described by `key` in `cache_dir` (default: <data dir>/ruler-cache)."""
    directory = Path(cache_dir) if cache_dir is not None else data_dir() / "ruler-cache"
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return directory / f"{digest}.json"


def load(path: Path, key: dict[str, Any]) -> list[dict] | None:
    """The cached samples, or None when there is no file or it was made for another key."""
    try:
        with open(path, encoding="utf-8") as file:
            stored = json.load(file)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return stored["samples"] if stored.get("key") == key else None


def store(path: Path, key: dict[str, Any], samples: list[dict]) -> None:
    write_atomically(path, json.dumps({"key": key, "samples": samples}, ensure_ascii=False).encode("utf-8"))


def write_atomically(path: Path, content: bytes) -> None:
    """Write to a temporary file beside `path`, then rename it into place, so that a reader never
    sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(content)
        os.chmod(temporary, 0o644)  # mkstemp makes it private; these files are plain data
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
