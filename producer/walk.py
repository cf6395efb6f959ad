"""Finding the documents under the submitted paths: regular files of accepted types, nothing outside."""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from worker.extract import MEDIA_TYPES


@dataclass(frozen=True)
class Found:
    path: Path  # where to read it
    name: str  # as recorded: relative to the submitted root, prefixed by the root's own name
    media_type: str


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


def walk(roots: list[Path]) -> tuple[list[Found], list[Skipped]]:
    """Every accepted file under `roots`, in a stable order, and what was passed over and why.

    Symlinks are followed only when they resolve inside the root they were found under; FIFOs,
    sockets and devices are never opened. Unknown extensions are reported, not silently dropped.
    """
    found: list[Found] = []
    skipped: list[Skipped] = []
    for root in roots:
        if not root.exists():
            skipped.append(Skipped(root, "does not exist"))
            continue
        real_root = root.resolve()
        if real_root.is_file():
            _consider(root, real_root.parent, root.name, found, skipped)
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames.sort()
            here = Path(dirpath)
            for dirname in list(dirnames):
                if (here / dirname).is_symlink():
                    dirnames.remove(dirname)
                    skipped.append(Skipped(here / dirname, "symlinked folder (not followed)"))
            for filename in sorted(filenames):
                path = here / filename
                name = f"{root.name}/{path.relative_to(root).as_posix()}" if root.name else path.as_posix()
                _consider(path, real_root, name, found, skipped)
    return found, skipped


def _consider(path: Path, real_root: Path, name: str, found: list[Found], skipped: list[Skipped]) -> None:
    real = path.resolve()
    if path.is_symlink() and not real.is_relative_to(real_root):
        skipped.append(Skipped(path, f"symlink leaves the submitted folder (to {real})"))
        return
    try:
        mode = real.stat().st_mode
    except OSError as e:
        skipped.append(Skipped(path, f"cannot stat: {e.strerror}"))
        return
    if not stat.S_ISREG(mode):
        skipped.append(Skipped(path, "not a regular file (FIFO, socket or device)"))
        return
    media_type = MEDIA_TYPES.get(path.suffix.lower())
    if media_type is None:
        skipped.append(Skipped(path, f"unsupported extension {path.suffix or '(none)'!r}"))
        return
    found.append(Found(path, name, media_type))
