"""PHI at rest: files fhir-crs writes are owner-only, and secret files must be (docs/SECURITY.md).

* `private_dir` creates missing folders 0700; `write_private_text` / `write_private_bytes` /
  `create_private_file` create files 0600. Modes are set explicitly (``fchmod``/``chmod`` after
  creation), so they do not depend on the user's umask. Existing folders the user made are
  left as they are (fhir-crs does not chmod a home or working directory); files it writes are
  tightened to 0600 even when they already existed.
* `check_secret_file` refuses a token, password or private-key file that group or others can
  read or write (the ssh rule): the error names the file and the fix (``chmod 600``).

On Windows (no POSIX modes) these are plain writes.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import ConfigError

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "check_secret_file",
    "create_private_file",
    "private_dir",
    "write_private_bytes",
    "write_private_text",
]

FILE_MODE = 0o600
DIR_MODE = 0o700
POSIX = os.name == "posix"


def private_dir(path: Path) -> Path:
    """Create `path` and any missing parents as 0700 folders; returns `path`."""
    path = Path(path)
    missing: list[Path] = []
    cur = path
    while not cur.exists():
        missing.append(cur)
        if cur.parent == cur:
            break
        cur = cur.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=DIR_MODE)
        except FileExistsError:
            continue
        if POSIX:
            os.chmod(folder, DIR_MODE)
    return path


def tighten_tree(root: Path) -> Path:
    """Make every folder under `root` (itself included) 0700 and every file 0600: for trees
    another writer filled with its own umask's modes (Spark writes its Parquet part files,
    `_SUCCESS` and `.crc` files 0644). Symbolic links are neither followed nor changed."""
    root = Path(root)
    if not POSIX:
        return root
    for folder, dirs, files in os.walk(root):
        os.chmod(folder, DIR_MODE)
        for name in files:
            p = os.path.join(folder, name)
            if not os.path.islink(p):
                os.chmod(p, FILE_MODE)
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(folder, d))]
    return root


def create_private_file(path: Path) -> Path:
    """Make sure `path` exists as a 0600 file (created empty if absent, tightened if not),
    e.g. before SQLite opens it — its -wal/-shm/-journal files copy the database's mode."""
    path = Path(path)
    private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), FILE_MODE)
    try:
        if POSIX:
            os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
    return path


def write_private_bytes(path: Path, data: bytes) -> Path:
    """Write `data` to `path` as a 0600 file (its folder created 0700 if missing)."""
    path = Path(path)
    private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), FILE_MODE)
    with os.fdopen(fd, "wb") as fh:
        if POSIX:
            os.fchmod(fh.fileno(), FILE_MODE)
        fh.write(data)
    return path


def write_private_text(path: Path, text: str) -> Path:
    return write_private_bytes(path, text.encode("utf-8"))


def check_secret_file(path: Path, key: str) -> None:
    """Refuse a secret file that group or others may read or write."""
    if not POSIX:
        return
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # the read that follows reports it
    if stat.S_IMODE(mode) & 0o077:
        raise ConfigError(
            f"{key} {path} is accessible by other users (mode {stat.S_IMODE(mode):04o}); it holds a "
            f"secret, so it is refused: run chmod 600 {path}."
        )
