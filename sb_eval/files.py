"""Files written so that a reader never sees half of one, and output folders checked before work
is done for them."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


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


def check_output_folder(folder: Path, argument: str, error: type[Exception] = ValueError) -> None:
    """Makes sure results can be written into `folder` before any work is done for them: it is
    created if missing, must not be a file, and must take a new file. Raises `error` (the
    command's own argument error) naming `argument`, the option that gave the folder."""
    if folder.exists() and not folder.is_dir():
        raise error(f"{argument} {folder} is a file, not a folder; give a folder for the results")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as problem:
        raise error(f"{argument} {folder} cannot hold the results: {problem.strerror or problem}") from None
