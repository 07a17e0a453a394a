"""Stage 4: grading systems. `CRS_SYSTEMS` / `ICANS_SYSTEMS` map the contract's keys to graders
with one interface: `grade(timeline, settings) -> SystemResult`."""

from __future__ import annotations

from collections.abc import Callable

from ..settings import GradingSettings
from ..timeline import CaseTimeline
from .crs import grade_crs_astct
from .icans import grade_icans_astct
from .result import SystemResult

Grader = Callable[[CaseTimeline, GradingSettings], SystemResult]

CRS_SYSTEMS: dict[str, Grader] = {"astct": grade_crs_astct}
ICANS_SYSTEMS: dict[str, Grader] = {"astct": grade_icans_astct}

__all__ = ["CRS_SYSTEMS", "ICANS_SYSTEMS", "SystemResult"]
