"""The output folder of `fhir-crs demo --out DIR`: the tool deletes only what it created itself.

A folder the demo writes into carries a marker file (`.fhir-crs-demo`) naming the entries the
demo owns there. A rerun clears exactly those entries (from the fixed list below, whatever the
marker says) and nothing else; a user's own files beside them stay. A folder that exists, is not
empty and has no marker belongs to someone else: it is refused with one line and nothing in it is
touched. A missing or empty folder is taken over (created, marker written).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from . import __version__
from .errors import ConfigError
from .private import DIR_MODE, POSIX, private_dir, write_private_text

MARKER = ".fhir-crs-demo"
# Everything `fhir-crs demo` writes into its folder (the state store's WAL side files included).
DEMO_ENTRIES = ("server", "report", "report.csv", "cibmtr-4100.csv",
                "state.sqlite", "state.sqlite-wal", "state.sqlite-shm", "state.sqlite-journal")


def _owned(marker: Path) -> list[str]:
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
        listed = data.get("entries", []) if isinstance(data, dict) else []
    except (OSError, ValueError):
        listed = []
    return [name for name in DEMO_ENTRIES if name in listed] if listed else list(DEMO_ENTRIES)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()  # a symlink is removed, never followed
    elif path.is_dir():
        shutil.rmtree(path)


def prepare_demo_dir(out: Path) -> None:
    """Make `out` ready for a demo run, or refuse (ConfigError, exit 2) before touching anything."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder; choose a new or empty folder.")
    marker = out / MARKER
    if out.is_dir():
        if not marker.is_file() and any(out.iterdir()):
            raise ConfigError(
                f"--out {out}: the folder is not empty and was not created by fhir-crs demo (no {MARKER} marker); "
                "nothing was deleted — choose a new or empty folder."
            )
        if marker.is_file():
            for name in _owned(marker):
                _remove(out / name)
    # The demo folder holds (synthetic) patient data, its state store and reports: owner-only.
    private_dir(out)
    if POSIX:
        os.chmod(out, DIR_MODE)  # a folder the user made empty for us is tightened too
    write_private_text(marker, json.dumps({"created_by": "fhir-crs demo", "version": __version__,
                                           "entries": list(DEMO_ENTRIES)}, indent=1) + "\n")
