"""Finding the documents under the submitted paths: every regular file, nothing outside the roots.

File types are decided later from the content, so a scan without an extension is still read and a
`.docx` still shows up as a failed job (`unsupported_type`) instead of vanishing. What can never be
opened safely becomes a `Reject` with a reason code; hidden files are passed over and listed.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from schemas.states import ErrorCode
from schemas.sql.store import Reject


@dataclass(frozen=True)
class Found:
    path: Path  # where to read it
    name: str  # as recorded: relative to the submitted root, prefixed by the root's own name
    size_bytes: int


@dataclass(frozen=True)
class Walk:
    found: list[Found]
    rejects: list[Reject]
    skipped: list[Path]  # hidden files and folders, and symlinked folders (not followed)


def walk(roots: list[Path]) -> Walk:
    """Every regular file under `roots`, in a stable order; FIFOs, devices and symlinks that leave the
    root they were found under are rejected without being opened."""
    result = Walk([], [], [])
    for root in roots:
        if not root.exists() and not root.is_symlink():
            result.rejects.append(Reject(str(root), ErrorCode.UNREADABLE, "does not exist"))
            continue
        real_root = root.resolve()
        if not root.is_dir():
            _consider(root, real_root.parent, root.name, result)
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            here = Path(dirpath)
            for dirname in sorted(dirnames):
                if dirname.startswith(".") or (here / dirname).is_symlink():
                    dirnames.remove(dirname)
                    result.skipped.append(here / dirname)
            dirnames.sort()
            for filename in sorted(filenames):
                path = here / filename
                if filename.startswith("."):
                    result.skipped.append(path)
                    continue
                _consider(path, real_root, f"{root.name}/{path.relative_to(root).as_posix()}", result)
    return result


def _consider(path: Path, real_root: Path, name: str, result: Walk) -> None:
    real = path.resolve()
    if path.is_symlink() and not real.is_relative_to(real_root):
        result.rejects.append(Reject(name, ErrorCode.SYMLINK_ESCAPE, f"symlink leaves the submitted folder (to {real})"))
        return
    try:
        status = real.stat()
    except OSError as e:
        result.rejects.append(Reject(name, ErrorCode.UNREADABLE, f"cannot stat: {e.strerror}"))
        return
    if not stat.S_ISREG(status.st_mode):
        result.rejects.append(Reject(name, ErrorCode.NOT_REGULAR_FILE, "not a regular file (FIFO, socket or device)"))
        return
    result.found.append(Found(path, name, status.st_size))
