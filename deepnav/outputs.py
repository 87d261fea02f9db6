"""Where a command writes, checked before it works.

Light on purpose (no numpy, torch or SimpleITK): the command lines import it when they start.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from deepnav.errors import InputError


def require_writable_folder(folder: str | Path, what: str = "output folder") -> Path:
    """Create the folder if it is missing and prove that a file can be written in it, before any
    work: otherwise a read-only or impossible output is found only when the results are written,
    after minutes of compute. Every command that writes calls this first; InputError (exit 2)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise InputError(f"cannot write to the {what} {folder}: {exc.strerror or exc}") from None
    return folder
