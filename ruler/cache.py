"""Generated sample sets on disk, one JSON file per set, named by a hash of what made it.

A file holds the key that made it (generator and its version, parameters, tokenizer, corpus) and a
checksum of its samples: a file that does not parse, was made for another key, or whose samples
were edited is not used; it is made again, with one warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from sb_eval.files import write_atomically

from .corpora import data_dir

logger = logging.getLogger(__name__)


def path_for(key: dict[str, Any], cache_dir: Path | str | None) -> Path:
    """The file for the set described by `key` in `cache_dir` (default: <data dir>/ruler-cache)."""
    directory = Path(cache_dir) if cache_dir is not None else data_dir() / "ruler-cache"
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return directory / f"{digest}.json"


def load(path: Path, key: dict[str, Any]) -> list[dict] | None:
    """The cached samples, or None when there is no file or it does not verify (then with a
    warning naming the file and why)."""
    try:
        with open(path, encoding="utf-8") as file:
            stored = json.load(file)
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return _unusable(path, f"it is not JSON ({type(error).__name__})")
    if not isinstance(stored, dict) or not isinstance(stored.get("samples"), list):
        return _unusable(path, "it is not a sample set")
    if stored.get("key") != key:
        return _unusable(path, "it was made for another key")
    if stored.get("checksum") != checksum(stored["samples"]):
        return _unusable(path, "its samples do not match their checksum (edited or damaged)")
    return stored["samples"]


def _unusable(path: Path, reason: str) -> None:
    logger.warning("the cached sample set %s is not used: %s; making it again", path, reason)
    return None


def store(path: Path, key: dict[str, Any], samples: list) -> None:
    document = {"key": key, "checksum": checksum(samples), "samples": samples}
    write_atomically(path, json.dumps(document, ensure_ascii=False).encode("utf-8"))


def checksum(samples: list) -> str:
    """sha256 of the samples' canonical JSON."""
    return hashlib.sha256(json.dumps(samples, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()
