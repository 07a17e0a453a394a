"""Stage 4: grading systems. `CRS_SYSTEMS` / `ICANS_SYSTEMS` map the contract's keys to graders
with one interface, `grade(timeline, settings) -> SystemResult`; `adjacent()` reports carHLH,
IEC-HS and ICAHT beside them."""

from __future__ import annotations

from collections.abc import Callable

from ..settings import GradingSettings
from ..timeline import CaseTimeline
from .adjacent import adjacent
from .cres import grade_cres
from .crs import grade_crs_astct
from .icans import grade_icans_astct
from .result import SystemResult
from .systems import grade_cartox, grade_ctcae5, grade_lee2014, grade_mskcc, grade_penn

Grader = Callable[[CaseTimeline, GradingSettings], SystemResult]

CRS_SYSTEMS: dict[str, Grader] = {
    "astct": grade_crs_astct,
    "lee2014": grade_lee2014,
    "penn": grade_penn,
    "mskcc": grade_mskcc,
    "cartox": grade_cartox,
    "ctcae5": grade_ctcae5,
}
ICANS_SYSTEMS: dict[str, Grader] = {"astct": grade_icans_astct, "cartox_cres": grade_cres}

__all__ = ["CRS_SYSTEMS", "ICANS_SYSTEMS", "SystemResult", "adjacent"]
