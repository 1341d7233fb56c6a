"""Generated sample sets on disk, one JSON file per set, named by a hash of what made it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sb_eval.files import write_atomically

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
