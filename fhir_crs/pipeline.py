"""The one place that joins the stages:

    FHIR JSON (files or server) -> mappers (events + skips) -> timeline -> grading -> JSON / write-back

`grade_paths()` is the offline path behind `fhir-crs grade`; `grade_resources()` grades
resources already in memory (the server path hands its search results here).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .events import MappingResult, PatientInfo, Skipped
from .grading import CRS_SYSTEMS, ICANS_SYSTEMS, adjacent
from .grading.result import SystemResult, iso
from .mapping_files import CodeMap, load_code_map
from .mappers import ResourceMapper
from .settings import GradingSettings, load_settings
from .sources import SourceResource, iter_paths
from .timeline import CaseTimeline, build_timelines, display_events


@dataclass(slots=True)
class GradedCase:
    timeline: CaseTimeline
    crs: dict[str, SystemResult]
    icans: dict[str, SystemResult]
    adjacent: dict[str, Any]

    def to_json(self, settings: GradingSettings) -> dict[str, Any]:
        tl = self.timeline
        return {
            "patient": tl.patient,
            "infusion": iso(tl.infusion),
            "infusion_evidence": tl.infusion_refs,
            "age_years": tl.age_years,
            "matched_by_text": sorted(tl.text_matched),
            "crs": {k: v.to_json(tl.infusion, settings) for k, v in self.crs.items()},
            "icans": {k: v.to_json(tl.infusion, settings) for k, v in self.icans.items()},
            "adjacent": self.adjacent,
            "timeline": display_events(tl, settings),
        }


@dataclass(slots=True)
class GradeRun:
    cases: list[GradedCase]
    skipped: list[Skipped]
    settings: GradingSettings
    resources: int

    def to_json(self) -> dict[str, Any]:
        return {
            "cases": [c.to_json(self.settings) for c in self.cases],
            "skipped": [{"resource": s.resource, "reason": s.reason} for s in self.skipped],
            "resources_read": self.resources,
            "settings": self.settings.as_dict(),
        }


def grade_case(tl: CaseTimeline, settings: GradingSettings) -> GradedCase:
    crs = {name: g(tl, settings) for name, g in CRS_SYSTEMS.items()}
    case = GradedCase(
        tl, crs,
        {name: g(tl, settings) for name, g in ICANS_SYSTEMS.items()},
        adjacent(tl, settings, crs["astct"].resolved),
    )
    for result in [*case.crs.values(), *case.icans.values()]:
        # Local codes: evidence that was recognised by its text, not a configured code, is flagged.
        if tl.text_matched.intersection(result.evidence):
            result.flag("matched_by_text")
    return case


def grade_mapping(result: MappingResult, settings: GradingSettings, resources: int) -> GradeRun:
    cases: list[GradedCase] = []
    skipped = list(result.skipped)
    for patient in sorted(result.events):
        events = result.events[patient]
        timelines = build_timelines(patient, events, result.flags.get(patient, set()), settings)
        if not timelines:
            n = sum(1 for e in events if not isinstance(e, PatientInfo))
            skipped.append(Skipped(patient, f"no CAR-T infusion (day 0) found; {n} mapped events for this patient not graded"))
        cases.extend(grade_case(tl, settings) for tl in timelines)
    return GradeRun(cases, skipped, settings, resources)


def map_items(items: Iterable[SourceResource | Skipped], code_map: CodeMap) -> tuple[MappingResult, int]:
    mapper = ResourceMapper(code_map)
    for item in items:
        mapper.add(item)
    return mapper.finish(), mapper.count


def run_paths(paths: list[Path], settings: GradingSettings | None = None, mappings_dir: Path | None = None) -> GradeRun:
    code_map = load_code_map(mappings_dir)
    settings = settings or load_settings(code_map.directory)
    result, n = map_items(iter_paths(paths), code_map)
    return grade_mapping(result, settings, n)


def grade_paths(paths: list[Path | str], settings: GradingSettings | None = None, mappings_dir: Path | None = None) -> dict[str, Any]:
    """Exactly the object `fhir-crs grade PATH... --json` prints."""
    return run_paths([Path(p) for p in paths], settings, mappings_dir).to_json()


def grade_resources(resources: Iterable[dict[str, Any]], settings: GradingSettings | None = None,
                    mappings_dir: Path | None = None, origin: str = "server") -> GradeRun:
    code_map = load_code_map(mappings_dir)
    settings = settings or load_settings(code_map.directory)
    items = (SourceResource(r, f"{origin}#{i}") for i, r in enumerate(resources))
    result, n = map_items(items, code_map)
    return grade_mapping(result, settings, n)
