"""Where a command writes, checked before it works.

Light on purpose (no numpy, torch or SimpleITK): the command lines import it when they start.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from deepnav.errors import InputError


def require_writable_folder(folder: str | Path, what: str = "output folder") -> Path:
    """Prove, before any work, that files can be written in `folder`: otherwise a read-only or
    impossible output is found only when the results are written, after minutes of compute.
    A missing folder passes when it can be created (its nearest existing ancestor is a writable
    folder); it is created by whatever writes the results, so input refused later leaves nothing
    behind. Every command that writes calls this first; InputError (exit 2) otherwise."""
    folder = Path(folder)
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"cannot write to the {what} {folder}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise InputError(f"cannot write to the {what} {folder}: {existing}: {exc.strerror or exc}") from None
    return folder


def distinct_names(names: list[str]) -> list[str]:
    """The names, in order, with `_2`, `_3`, ... added to a name already taken: one output per
    input even when inputs from different folders share a file name."""
    used: set[str] = set()
    out = []
    for name in names:
        k, candidate = 1, name
        while candidate in used:
            k += 1
            candidate = f"{name}_{k}"
        used.add(candidate)
        out.append(candidate)
    return out


def image_stem(path: str | Path) -> str:
    """A file's name without its image suffix: us_05.nrrd -> us_05, ct.nii.gz -> ct."""
    return Path(Path(path).name.removesuffix(".gz")).stem
