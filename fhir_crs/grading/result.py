"""Grades with their reasons: `Criterion` (one met criterion, with the resources behind it) and
`SystemResult` (one system's per-infusion grade, onset, time of maximum, resolution, flags,
evidence and the conventions that decided it). The JSON shape is the `fhir-crs grade --json`
contract (../shared/contracts/grade.schema.json)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from ..events import iso
from ..settings import GradingSettings

__all__ = ["Criterion", "EpisodeResult", "SystemResult", "iso"]

_REF = re.compile(r"^[A-Z][A-Za-z]+/[A-Za-z0-9.\-]{1,64}(/_history/[A-Za-z0-9.\-]{1,64})?$")


@dataclass(slots=True)
class Criterion:
    """One criterion met at a time, the grade it supports, and its source resources."""

    time: datetime
    grade: int
    text: str
    refs: list[str]
    settings: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()


@dataclass(slots=True)
class EpisodeResult:
    onset: datetime
    resolved: datetime | None
    grade: int
    max_at: datetime | None
    counted: bool
    flags: list[str]
    criteria: list[Criterion]


@dataclass(slots=True)
class SystemResult:
    system: str
    grade: int = 0
    onset: datetime | None = None
    max_at: datetime | None = None
    resolved: datetime | None = None
    flags: list[str] = field(default_factory=list)
    evidence: list[str] = field(default_factory=list)
    settings_used: set[str] = field(default_factory=set)
    criteria: list[Criterion] = field(default_factory=list)
    episodes: list[EpisodeResult] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def flag(self, *names: str) -> None:
        for n in names:
            if n and n not in self.flags:
                self.flags.append(n)

    def cite(self, refs: list[str]) -> None:
        for r in refs:
            if _REF.match(r) and r not in self.evidence:
                self.evidence.append(r)

    def to_json(self, infusion: datetime, settings: GradingSettings) -> dict[str, Any]:
        def rel(t: datetime | None) -> float | None:
            return None if t is None else round((t - infusion) / timedelta(hours=1), 2)

        out: dict[str, Any] = {
            "grade": self.grade,
            "onset": iso(self.onset),
            "max_at": iso(self.max_at),
            "resolved": iso(self.resolved),
            "flags": list(self.flags),
            "evidence": list(self.evidence),
        }
        out.update(self.extra)
        out["hours"] = {"onset": rel(self.onset), "max_at": rel(self.max_at), "resolved": rel(self.resolved)}
        out["criteria"] = [
            {"at": iso(c.time), "hour": rel(c.time), "grade": c.grade, "criterion": c.text,
             "evidence": [r for r in c.refs if _REF.match(r)]}
            for c in self.criteria
        ]
        out["episodes"] = [
            {"onset": iso(e.onset), "max_at": iso(e.max_at), "resolved": iso(e.resolved), "grade": e.grade,
             "counted": e.counted, "flags": e.flags}
            for e in self.episodes
        ]
        out["conventions"] = [settings.describe(n) for n in sorted(self.settings_used)]
        return out
