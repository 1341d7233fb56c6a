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


class OutputFolderError(ValueError):
    """An output folder that cannot hold results; the message names the argument."""


def check_output_folder(folder: Path, argument: str) -> None:
    """Makes sure results can be written into `folder` before any work is done for them: it is
    created if missing, must not be a file, and must take a new file. Raises OutputFolderError
    naming `argument` (the option that gave the folder)."""
    if folder.exists() and not folder.is_dir():
        raise OutputFolderError(f"{argument} {folder} is a file, not a folder; give a folder for the results")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise OutputFolderError(f"{argument} {folder} cannot hold the results: {error.strerror or error}") from None
