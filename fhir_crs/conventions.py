"""What a write-back was graded with: the grading settings and the site mapping tables.

Every Condition fhir-crs writes carries one complex extension (`EXTENSION`) with
  * `sha256`          — one fingerprint of everything below,
  * `settings-sha256` — sha256 of every grading setting's value (canonical JSON),
  * `settings`        — the settings that differ from fhir-crs's defaults (JSON), so a refusal can
                        name them,
  * `table`           — one per mapping table: `"<file> sha256:<hex>"` of its parsed content
                        (comments and layout do not count),
  * `version`         — the fhir-crs version that wrote it (informational).
The write's Provenance carries the same extension. A rerun compares the stored extension with the
current one: when they differ, the stored Condition is not overwritten unless the user says so
(`--allow-convention-change`), and the refusal names the settings and tables that differ.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from . import __version__
from .errors import ConventionChangeError
from .settings import GradingSettings

__all__ = ["EXTENSION", "ConventionChangeError", "Conventions", "current_conventions", "table_hashes"]

EXTENSION = "urn:fhir-crs:StructureDefinition:conventions"
# files of a mappings folder that are not code tables: grading.toml is covered by the settings
# (its values, after --set), site.example.toml is a run-config example
NOT_TABLES = frozenset({"grading.toml", "site.example.toml"})


def _sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


@lru_cache(maxsize=32)
def _table_hashes(directory: str, stamp: tuple[tuple[str, float, int], ...]) -> tuple[tuple[str, str], ...]:
    out = []
    for name, _mtime, _size in stamp:
        path = Path(directory) / name
        try:
            content: Any = tomllib.loads(path.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            content = path.read_bytes().hex() if path.is_file() else None  # still identifies the file
        out.append((name, _sha(content)))
    return tuple(out)


def table_hashes(directory: Path) -> dict[str, str]:
    """sha256 of the parsed content of every code table (*.toml) in a mappings folder."""
    d = Path(directory).resolve()
    files = sorted(p for p in d.glob("*.toml") if p.name not in NOT_TABLES and p.is_file())
    stamp = tuple((p.name, p.stat().st_mtime, p.stat().st_size) for p in files)
    return dict(_table_hashes(str(d), stamp))


@dataclass(frozen=True, slots=True)
class Conventions:
    settings_sha256: str
    settings: dict[str, Any] = field(default_factory=dict)  # non-default settings
    tables: dict[str, str] = field(default_factory=dict)
    version: str = __version__

    @property
    def sha256(self) -> str:
        return _sha({"settings": self.settings_sha256, "tables": self.tables})

    def extension(self) -> dict[str, Any]:
        sub = [{"url": "sha256", "valueString": self.sha256},
               {"url": "settings-sha256", "valueString": self.settings_sha256},
               {"url": "settings", "valueString": json.dumps(self.settings, sort_keys=True)}]
        sub += [{"url": "table", "valueString": f"{name} sha256:{h}"} for name, h in sorted(self.tables.items())]
        sub.append({"url": "version", "valueString": self.version})
        return {"url": EXTENSION, "extension": sub}

    @classmethod
    def from_resource(cls, resource: dict[str, Any]) -> Conventions | None:
        """The conventions a stored resource records, or None when it records none."""
        for ext in resource.get("extension") or []:
            if not isinstance(ext, dict) or ext.get("url") != EXTENSION:
                continue
            parts: dict[str, Any] = {"tables": {}}
            for sub in ext.get("extension") or []:
                url, value = (sub or {}).get("url"), (sub or {}).get("valueString")
                if not isinstance(value, str):
                    continue
                if url == "settings-sha256":
                    parts["settings_sha256"] = value
                elif url == "settings":
                    try:
                        loaded = json.loads(value)
                    except ValueError:
                        loaded = {}
                    parts["settings"] = loaded if isinstance(loaded, dict) else {}
                elif url == "table" and " sha256:" in value:
                    name, _, h = value.partition(" sha256:")
                    parts["tables"][name] = h
                elif url == "version":
                    parts["version"] = value
            if "settings_sha256" in parts:
                return cls(**parts)
        return None

    def differences(self, stored: Conventions | None) -> list[str]:
        """What differs from `stored`, in words (empty: the same conventions)."""
        if stored is None:
            return ["the stored Condition records no settings or mapping-table hashes (written before fhir-crs recorded them, or not by fhir-crs)"]
        out = []
        if stored.settings_sha256 != self.settings_sha256:
            defaults = GradingSettings().as_dict()
            names = sorted(set(stored.settings) | set(self.settings))
            changed = [f"{n} {stored.settings.get(n, defaults.get(n))!r} -> {self.settings.get(n, defaults.get(n))!r}"
                       for n in names if stored.settings.get(n, defaults.get(n)) != self.settings.get(n, defaults.get(n))]
            out.append("settings: " + (", ".join(changed) if changed else
                                       f"the defaults differ (stored by fhir-crs {stored.version}, this is {self.version})"))
        tables = sorted(n for n in set(stored.tables) | set(self.tables) if stored.tables.get(n) != self.tables.get(n))
        if tables:
            out.append("mapping tables: " + ", ".join(
                f"{n} ({'added' if n not in stored.tables else 'removed' if n not in self.tables else 'changed'})" for n in tables))
        return out


def current_conventions(settings: GradingSettings, mappings_dir: Path) -> Conventions:
    defaults = GradingSettings().as_dict()
    now = settings.as_dict()
    return Conventions(settings.fingerprint(), {k: v for k, v in now.items() if v != defaults[k]}, table_hashes(mappings_dir))
