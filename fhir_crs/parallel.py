"""`grade --workers N`: the flat-memory path (spill.py) with its three stages split across N
worker processes — the output is byte for byte the one-process output.

1. map: the input is cut into units (a JSON file, or a byte range of a plain NDJSON file that
   starts at a line, `sources.ndjson_cuts`); each unit is read and mapped in a worker, which
   spills its copies to Type/id partitions of its own and its source-level skips to a log per
   unit. Input positions are (unit number << 32) + position in the unit, so every ordering by
   input position is the one-process ordering.
2. settle: Type/id partitions across the workers (each worker writes its own patient-partition
   files);
3. grade: patient partitions across the workers (`grading.case.grade_events`, the pure
   per-patient step of core.py), each writing its cases as finished JSON; the parent streams them in patient order.

Workers are forked (the mapping tables, the settings and the Medications read in stage 1 are
inherited, not pickled). Where a forked worker is not available (no `fork` start method) or the
input has more than one copy of a Medication (a MedicationAdministration mapped between two
versions would depend on the input order across units), the one-process path runs instead.
Stage costs: map O(resources), settle O(copies), grade as `grade_events`; the parent's own
work is O(patients + skips) besides streaming the output.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .events import Skipped
from .mapping_files import CodeMap
from .settings import GradingSettings

# a unit of the map stage: about this many bytes of NDJSON (or one whole JSON / gzip file)
UNIT_BYTES = 16_000_000
UNIT_SEQ_SHIFT = 32  # input position = (unit << 32) + position in the unit


def default_workers() -> int:
    """The machine's cores available to this process."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def can_fork() -> bool:
    return "fork" in multiprocessing.get_all_start_methods()


@dataclass(frozen=True, slots=True)
class Unit:
    path_index: int
    file: Path
    start: int = 0
    end: int = -1
    lines_before: int = 0
    whole: bool = True  # read with the file reader (JSON, gzip, or an NDJSON whose head is not text)


def plan_units(paths: list[Path], unit_bytes: int) -> list[Unit]:
    from .sources import _files, _is_ndjson, ndjson_cuts, ndjson_head_ok

    units: list[Unit] = []
    for i, p in enumerate(paths):
        for f in _files(p):
            if _is_ndjson(f) and f.stat().st_size > unit_bytes and ndjson_head_ok(f):
                units += [Unit(i, f, a, b, n, False) for a, b, n in ndjson_cuts(f, unit_bytes)]
            else:
                units.append(Unit(i, f))
    return units


@dataclass(slots=True)
class _Job:
    work: Path
    partitions: int
    code_map: CodeMap
    settings: GradingSettings
    series: bool
    units: list[Unit]
    store: Any = None
    mapper: Any = None


_JOB: _Job | None = None  # the forked workers' copy of the parent's job (set by the pool initializer)


def _init(job: _Job) -> None:
    global _JOB
    _JOB = job


@dataclass(slots=True)
class _UnitResult:
    count: int
    resources: int
    medications: dict[str, dict[str, Any]]  # the unit's Medications (by Type/id and fullUrl)
    medication_refs: list[str]
    medication_copies: bool  # a Medication came more than once within the unit


def _map_unit(index: int) -> _UnitResult:
    from .mappers import ResourceMapper
    from .sources import _iter_file, iter_ndjson_range
    from .spill import SkipLog, SpillStore

    job = _JOB
    assert job is not None
    unit = job.units[index]
    store = SpillStore(job.work, job.partitions, tag=f"-m{os.getpid()}")
    store.skipped = SkipLog(job.work / f"source-skips-{index:06d}.pickle")
    mapper = ResourceMapper(job.code_map, store, spill=store.spill_kept)
    mapper._seq = index << UNIT_SEQ_SHIFT
    items = _iter_file(unit.file) if unit.whole else iter_ndjson_range(unit.file, unit.start, unit.end, unit.lines_before)
    resources = 0
    for item in items:
        if not isinstance(item, Skipped):
            resources += 1
        mapper.add(item)
        store.maybe_spill()
    mapper.finish()
    store._spill_copies()
    store._spill_patients()
    store.skipped.spill()
    return _UnitResult(mapper.count, resources, mapper.medications, list(mapper._kept), bool(mapper._superseded))


@dataclass(slots=True)
class _SettleResult:
    flags: dict[str, set[str]]
    patient_parts: set[int]
    runs: dict[str, list[Path]]


def _settle_part(part: int) -> _SettleResult:
    job = _JOB
    assert job is not None
    store = job.store
    store.tag = f"-s{os.getpid()}"
    store.flags, store._patient_parts, store._runs = {}, set(), {"superseded": [], "winners": []}
    store.settle_partition(job.mapper, part)
    store._spill_patients()
    return _SettleResult(store.flags, store._patient_parts, store._runs)


def _grade_part(part: int) -> tuple[dict[str, tuple[int, int]], list[tuple[str, list[Skipped]]], int]:
    from .spill import grade_partition

    job = _JOB
    assert job is not None
    return grade_partition(job.store, part, job.settings, job.series, job.work / f"cases-{part:04d}.json")


class _Chained:
    """The source-level skips of every unit, in unit order."""

    def __init__(self, logs: list[Any]):
        self.logs = logs

    def __iter__(self) -> Iterator[Skipped]:
        for log in self.logs:
            yield from log


def _pool(workers: int, job: _Job) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"),
                               initializer=_init, initargs=(job,))


@dataclass(slots=True)
class ParallelRun:
    """What the three stages left for the output: the store (skips), each patient's cases
    (file, offset, length), the no-infusion skips, counts."""

    store: Any
    where: dict[str, tuple[Path, int, int]] = field(default_factory=dict)
    no_infusion: list[tuple[str, list[Skipped]]] = field(default_factory=list)
    cases: int = 0
    count: int = 0


def run_parallel(paths: list[Path], work: Path, partitions: int, code_map: CodeMap, settings: GradingSettings,
                 series: bool, workers: int, unit_bytes: int | None = None) -> ParallelRun | None:
    """The three stages on `workers` processes; None when the input needs the one-process path
    (a Medication in more than one copy)."""
    from .mappers import ResourceMapper
    from .sources import iter_path
    from .spill import SkipLog, SpillStore

    units = plan_units(paths, unit_bytes or UNIT_BYTES)
    job = _Job(work, partitions, code_map, settings, series, units)
    results: list[_UnitResult] = []
    with _pool(workers, job) as pool:
        done = iter(pool.map(_map_unit, range(len(units))))
        for i, p in enumerate(paths):  # in input order: the first error is the one-process run's
            mine = [next(done) for u in units if u.path_index == i]
            if not any(r.resources for r in mine):
                for _ in iter_path(p):  # raises InputError naming the path and why (sources.iter_path)
                    pass
            results += mine
    medications: dict[str, dict[str, Any]] = {}
    refs: set[str] = set()
    for r in results:
        if r.medication_copies or refs.intersection(r.medication_refs) or medications.keys() & r.medications.keys():
            return None
        refs.update(r.medication_refs)
        medications.update(r.medications)
    store = SpillStore(work, partitions)
    store.skipped = _Chained([SkipLog(work / f"source-skips-{i:06d}.pickle") for i in range(len(units))])
    mapper = ResourceMapper(code_map, store, spill=store.spill_kept)
    mapper.medications = medications
    job.store, job.mapper = store, mapper
    with _pool(workers, job) as pool:
        for s in pool.map(_settle_part, range(partitions)):
            for patient, flags in s.flags.items():
                store.flags.setdefault(patient, set()).update(flags)
            store._patient_parts |= s.patient_parts
            for kind, runs in s.runs.items():
                store._runs[kind] += runs
    run = ParallelRun(store, count=sum(r.count for r in results))
    parts = store.patient_partitions()
    with _pool(workers, job) as pool:
        for part, (index, skips, n) in zip(parts, pool.map(_grade_part, parts), strict=True):
            out_path = work / f"cases-{part:04d}.json"
            run.where.update((p, (out_path, off, length)) for p, (off, length) in index.items())
            run.no_infusion += skips
            run.cases += n
    return run
