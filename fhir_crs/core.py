"""The pure per-patient core: one patient's FHIR resources in, graded cases and named skips out.

    resources (dicts / SourceResource) -> mappers (events + skips) -> timeline -> grading

`grade_patient(resources, code_map, settings)` is the whole of it: no I/O, no globals, and every
input is picklable (plain dicts, frozen dataclasses, the loaded `CodeMap` and `GradingSettings`),
so the same function runs in the CLI (`fhir-crs grade`, `pull`, `sync`: pipeline.py) and in Spark
executors (spark.py), and gives the same answer. It accepts any resources, not only one
patient's: the local engine hands it a whole input, the Spark engine one patient's group.

Layering: this module sits on mappers -> timeline -> grading and is imported by pipeline.py and
spark.py; it imports neither.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .events import MappingResult, Skipped
from .grading.case import GradedCase, grade_events
from .mappers import ResourceMapper
from .mapping_files import CodeMap
from .settings import GradingSettings
from .sources import SourceResource

__all__ = ["PatientGrade", "grade_mapped", "grade_patient", "map_resources"]


@dataclass(slots=True)
class PatientGrade:
    """What `grade_patient` returns: the cases (by patient, then infusion), every skip in the
    order the local engine lists them, and how many items were read (resources and unreadable
    entries: `read == used + len(skipped)`)."""

    cases: list[GradedCase]
    skipped: list[Skipped]
    read: int
    patients: int = 0  # patients with at least one mapped resource (graded or not)


def map_resources(items: Iterable[SourceResource | Skipped | dict[str, Any]], code_map: CodeMap,
                  medications: Mapping[str, dict[str, Any]] | None = None) -> tuple[MappingResult, int]:
    """Mapped events and skips of `items`, and how many were read. `medications` (Type/id or
    fullUrl -> Medication) are known in advance: the Spark engine's Medications, which are
    nobody's patient data and are broadcast to every patient group."""
    mapper = ResourceMapper(code_map)
    if medications:
        mapper.medications.update(medications)
    for i, item in enumerate(items):
        mapper.add(item if isinstance(item, SourceResource | Skipped) else SourceResource(item, f"resource#{i}"))
    return mapper.finish(), mapper.count


def grade_mapped(result: MappingResult, settings: GradingSettings) -> tuple[list[GradedCase], list[Skipped]]:
    """Every patient of a mapping result graded, in patient order; the mapping skips first, then
    one `no_infusion` skip per resource of each patient without a CAR-T infusion."""
    cases: list[GradedCase] = []
    skipped = list(result.skipped)
    for patient in sorted(result.events):
        graded, skips = grade_events(patient, result.events[patient], result.flags.get(patient, set()),
                                     result.sources.get(patient, []), settings)
        skipped.extend(skips)
        cases.extend(graded)
    return cases, skipped


def grade_patient(resources: Iterable[SourceResource | Skipped | dict[str, Any]], code_map: CodeMap,
                  settings: GradingSettings, medications: Mapping[str, dict[str, Any]] | None = None) -> PatientGrade:
    """Grade one patient's resources (or any set of resources): the core every engine runs."""
    result, read = map_resources(resources, code_map, medications)
    cases, skipped = grade_mapped(result, settings)
    return PatientGrade(cases, skipped, read, len(result.events))
