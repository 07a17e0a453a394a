"""The one place that joins the stages:

    FHIR JSON (files or server) -> mappers (events + skips) -> timeline -> grading -> JSON / write-back

`grade_paths()` is the offline path behind `fhir-crs grade`; `grade_resources()` grades
resources already in memory (the server path hands its search results here).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .core import grade_mapped, grade_patient
from .events import MappingResult, Skipped, iso
from .grading.case import GradedCase
from .logs import note_patient
from .mappers import ResourceMapper
from .mapping_files import CodeMap, cart_codes, load_code_map
from .settings import GradingSettings, load_settings
from .sources import SourceResource, iter_paths


@dataclass(slots=True)
class GradeRun:
    cases: list[GradedCase]
    skipped: list[Skipped]
    settings: GradingSettings
    resources: int
    patients: int = 0  # patients with at least one mapped resource (graded or not)

    def to_json(self, series: bool = False) -> dict[str, Any]:
        return {
            "cases": [c.to_json(self.settings, series) for c in self.cases],
            "skipped": [skip_json(s) for s in self.skipped],
            "resources_read": self.resources,
            "resources_used": self.resources - len(self.skipped),
            "settings": self.settings.as_dict(),
        }


def skip_json(s: Skipped) -> dict[str, str]:
    return {"resource": s.resource, "reason": s.reason, "code": s.code}


def grade_mapping(result: MappingResult, settings: GradingSettings, resources: int) -> GradeRun:
    cases, skipped = grade_mapped(result, settings)
    return GradeRun(cases, skipped, settings, resources, len(result.events))


def map_items(items: Iterable[SourceResource | Skipped], code_map: CodeMap) -> tuple[MappingResult, int]:
    mapper = ResourceMapper(code_map)
    for item in items:
        mapper.add(item)
    return mapper.finish(), mapper.count


def run_paths(paths: list[Path], settings: GradingSettings | None = None, mappings_dir: Path | None = None) -> GradeRun:
    code_map = load_code_map(mappings_dir)
    settings = settings or load_settings(code_map.directory)
    graded = grade_patient(iter_paths(paths), code_map, settings)  # the pure core (core.py)
    return GradeRun(graded.cases, graded.skipped, settings, graded.read, graded.patients)


def grade_paths(paths: list[Path | str], settings: GradingSettings | None = None, mappings_dir: Path | None = None) -> dict[str, Any]:
    """Exactly the object `fhir-crs grade PATH... --json` prints."""
    return run_paths([Path(p) for p in paths], settings, mappings_dir).to_json()


def grade_resources(resources: Iterable[dict[str, Any]], settings: GradingSettings | None = None,
                    mappings_dir: Path | None = None, origin: str = "server") -> GradeRun:
    """Grades resources in memory. When `resources` is a `FetchedResources` (the server path),
    the page entries that held no resource are counted as skips too."""
    code_map = load_code_map(mappings_dir)
    settings = settings or load_settings(code_map.directory)
    unusable: list[Skipped] = list(getattr(resources, "unusable", ()))
    items: Iterable[SourceResource | Skipped] = [
        *unusable, *(SourceResource(r, f"{origin}#{i}") for i, r in enumerate(resources))]
    graded = grade_patient(items, code_map, settings)  # the pure core (core.py)
    return GradeRun(graded.cases, graded.skipped, settings, graded.read, graded.patients)


# ---- server path: fetch -> map -> timeline -> grade -> write back ---------------------------

@dataclass(slots=True)
class WriteOutcome:
    """What happened to one case on the server."""

    patient: str
    infusion: str
    status: str  # "created" | "updated" | "unchanged" | "dry-run" | "refused" (dry run: conventions differ)
    written: dict[str, str]  # identifier name -> "Type/id" (or the conditional URL in a dry run)
    transaction: dict[str, Any] | None = None
    # what the transaction writes (or would): resource, create/update, old -> new ASTCT grade
    changes: list[dict[str, Any]] = field(default_factory=list)
    message: str | None = None  # why a dry run would be refused


@dataclass(slots=True)
class PullResult:
    run: GradeRun
    writes: list[WriteOutcome]
    requests: int


class FetchedResources(list[dict[str, Any]]):
    """What `fetch_patient` read: every match copy in page order (the same Type/id twice when
    pages or searches overlap — the mappers keep one version and name the others as skips), and
    `unusable`, one skip per page entry that held no resource."""

    unusable: list[Skipped]

    def __init__(self, resources: Iterable[dict[str, Any]] = (), unusable: Iterable[Skipped] = ()):
        super().__init__(resources)
        self.unusable = list(unusable)


def _copies(result: Any) -> list[dict[str, Any]]:
    """Every match copy a search read (its de-duplicated `matches` from a client that keeps none)."""
    return list(getattr(result, "copies", None) or result.matches)


def _unusable(*results: Any) -> list[Skipped]:
    return [Skipped(where, why, "no_resource") for r in results for where, why in getattr(r, "unusable", ())]


def read_many(client: Any, calls: list[tuple[str, list[tuple[str, str]] | None]]) -> list[Any]:
    """Reads (`("Patient/1", None)`) and searches (`("Observation", params)`, no-cache) in one
    `batch` Bundle where the client offers `batch_get` (it falls back to one by one for a server
    refusing batches), else one by one (issue 13: <= 6 requests per patient)."""
    batch = getattr(client, "batch_get", None)
    if batch is not None:
        return list(batch(calls))
    return [client.read(*path.split("/", 1)) if params is None else client.search(path, params, no_cache=True)
            for path, params in calls]


def fetch_window(cfg: Any, settings: GradingSettings | None) -> tuple[float, float]:
    """(days before the first infusion, days after the last) that `pull`, `sync` and the bedside
    read: the configured window, widened to what the grading settings look at, so that a setting
    never loses data online that the same grading reads offline (a late-ICAHT window past
    `window_after_days` would otherwise be under-called without a word): at least
    `home_baseline_lookback_days` (and the 2 days the timeline keeps) before, at least
    `icaht_late_end_day` after."""
    before, after = float(cfg.window_before_days), float(cfg.window_after_days)
    if settings is not None:
        before = max(before, float(settings.home_baseline_lookback_days), 2.0)
        after = max(after, float(settings.icaht_late_end_day))
    return before, after


def fetch_patient(client: Any, patient_id: str, cfg: Any, code_map: CodeMap,
                  settings: GradingSettings | None = None) -> FetchedResources:
    """Everything graded for one patient, fetched in date windows around the CAR-T infusions.

    1. the Patient; 2. the CAR-T administrations, searched by the site's CAR-T codes (Procedure
    `code`, MedicationAdministration `code`) — when none is found that way (local codes, a
    contained product Medication) all the patient's Procedures and MedicationAdministrations are
    read once instead; 3. within [first infusion - window_before_days, last infusion +
    window_after_days], widened to what `settings` grade (`fetch_window`): Procedures (`date`),
    MedicationAdministrations (`effective-time`, with `_include` of their Medications) and
    Observations (`date`); and all the patient's Conditions
    (problem-list and encounter-diagnosis findings are often undated or dated long before).

    Every search sends `Cache-Control: no-cache`: HAPI otherwise answers an identical search
    within 60 s from its stored result, which would miss data charted since (seen on a real HAPI).
    The reads of each step go in one `batch` Bundle where the client offers `batch_get` (two
    requests for the three steps, plus the further pages of long searches).
    """
    from datetime import timedelta

    from .timeline import find_infusions

    def many(calls: list[tuple[str, list[tuple[str, str]] | None]]) -> list[Any]:
        return read_many(client, calls)

    proc_codes, drug_codes = cart_codes(code_map)
    calls: list[tuple[str, list[tuple[str, str]] | None]] = [(f"Patient/{patient_id}", None)]
    for rtype, codes in (("Procedure", proc_codes), ("MedicationAdministration", drug_codes)):
        for chunk in range(0, len(codes), 20):
            calls.append((rtype, [("patient", patient_id), ("code", ",".join(codes[chunk:chunk + 20]))]))
    first = many(calls)
    patient = first[0]
    note_patient(patient)  # its names, MRN and birth date never reach a log line (logs.py)

    def infusions_in(resources: list[dict[str, Any]]) -> list[Any]:
        result, _ = map_items((SourceResource(r, f"server#{i}") for i, r in enumerate(resources)), code_map)
        return find_infusions([e for evs in result.events.values() for e in evs])

    found: list[dict[str, Any]] = [r for res in first[1:] for r in res.matches]
    infusions = infusions_in([patient, *found])
    if not infusions:  # CAR-T charted only with local codes or a contained product: read everything once
        procs, meds = many([("Procedure", [("patient", patient_id)]),
                            ("MedicationAdministration", [("patient", patient_id), ("_include", "MedicationAdministration:medication")])])
        everything = [patient, *_copies(procs), *_copies(meds), *meds.includes]
        if not infusions_in(everything):
            return FetchedResources(everything, _unusable(procs, meds))  # graded as "no CAR-T infusion found" (a named skip)
        infusions = infusions_in(everything)
    before, after = fetch_window(cfg, settings)
    lo = iso(infusions[0][0] - timedelta(days=before))
    hi = iso(infusions[-1][0] + timedelta(days=after))
    procs, meds, obs, conditions = many([
        ("Procedure", [("patient", patient_id), ("date", f"ge{lo}"), ("date", f"le{hi}")]),
        ("MedicationAdministration", [("patient", patient_id), ("effective-time", f"ge{lo}"), ("effective-time", f"le{hi}"),
                                      ("_include", "MedicationAdministration:medication")]),
        ("Observation", [("patient", patient_id), ("date", f"ge{lo}"), ("date", f"le{hi}")]),
        # every Condition, undated ones too: problem-list seizures, oedema, HLH, and the reasons
        # Procedures and fluids name (fhir-crs's own grade Conditions are named skips, own_output)
        ("Condition", [("patient", patient_id)]),
    ])
    resources = [patient, *_copies(procs), *_copies(meds), *meds.includes, *_copies(obs), *_copies(conditions)]
    seen = {f"{r.get('resourceType')}/{r.get('id')}" for r in resources}
    # the infusion record itself is kept even if a server's date search misses it
    resources += [r for r in found if f"{r.get('resourceType')}/{r.get('id')}" not in seen]
    return FetchedResources(resources, _unusable(procs, meds, obs, conditions))


WRITTEN_TYPES = {"crs": "Condition", "icans": "Condition", "summary": "Bundle"}  # what a case writes, by identifier name


def find_written(client: Any, ids: dict[str, dict[str, str]]) -> tuple[dict[str, tuple[str, str | None]], dict[str, dict[str, Any]]]:
    """What the server holds under a case's identifiers (`ids`: name -> {"system", "value"}):
    (name -> (id, If-Match ETag or None), name -> the resource), the look-ups in one `batch`
    (a server refusing batches: one by one). More than one match is a data-quality error that
    is reported and never retried (DuplicateTargetError)."""
    from .errors import DuplicateTargetError

    existing: dict[str, tuple[str, str | None]] = {}
    stored: dict[str, dict[str, Any]] = {}
    looked_up = read_many(client, [(WRITTEN_TYPES[name], [("identifier", f"{ident['system']}|{ident['value']}")])
                                   for name, ident in ids.items()])
    for (name, ident), result in zip(ids.items(), looked_up, strict=True):
        found = result.matches
        if len(found) > 1:
            raise DuplicateTargetError(
                f"{len(found)} {WRITTEN_TYPES[name]} resources on the server carry identifier {ident['system']}|{ident['value']}: "
                "a data-quality problem to fix on the server (not retried)."
            )
        if found:
            r = found[0]
            version = (r.get("meta") or {}).get("versionId")
            existing[name] = (r["id"], f'W/"{version}"' if version else None)
            stored[name] = r
    return existing, stored


def location_ref(entry: dict[str, Any]) -> str:
    """`Type/id` of what a transaction response entry's `location` names (its `_history` part dropped)."""
    loc = ((entry.get("response") or {}).get("location") or "")
    parts = loc.split("/_history")[0].rsplit("/", 2)
    return "/".join(parts[-2:]) if len(parts) >= 2 else loc


def send_transaction(client: Any, tx: dict[str, Any], before_write: Callable[[], None] | None = None,
                     ) -> tuple[dict[str, Any] | None, Exception | None]:
    """Send one write transaction (`before_write` runs right before: the sync raises there when a
    stop was requested): (response, None), or (None, the conflict) when a version conflict
    (HAPI 409 / spec 412) says re-read and retry; more than one match for a conditional
    identifier raises DuplicateTargetError (a data-quality error, never retried)."""
    from .errors import DuplicateTargetError
    from .fhir.client import PreconditionFailed, VersionConflict

    if before_write is not None:
        before_write()
    try:
        return client.transaction(tx), None
    except VersionConflict as exc:
        return None, exc
    except PreconditionFailed as exc:
        if exc.multiple_matches:
            raise DuplicateTargetError(f"conditional write matched more than one resource: {exc}") from exc
        return None, exc


def write_case(client: Any, case: GradedCase, settings: GradingSettings, identifier_system: str,
               dry_run: bool = False, attempts: int = 3, mappings_dir: Path | None = None,
               allow_convention_change: bool = False, before_write: Callable[[], None] | None = None) -> WriteOutcome:
    """Idempotent write-back of one case in ONE transaction (all or nothing).

    Existing Conditions/Bundle are found by identifier (the three look-ups in one `batch` where
    the client offers it, one by one otherwise); if the stored content hash matches,
    nothing is written. A stored Condition graded with other settings or mapping tables (the
    conventions extension, conventions.py) is not overwritten unless `allow_convention_change`
    (ConventionChangeError naming what differs; a dry run reports it as "refused"). Otherwise
    existing resources are updated with If-Match on their version and absent ones created by
    conditional update, with a Provenance of the write in the same transaction; a version
    conflict (HAPI 409 / spec 412) re-reads and re-applies up to `attempts` times; more than one
    match for an identifier is a data-quality error that is reported and never retried.
    `before_write` runs right before the transaction is sent (sync: raises when a stop was
    requested, so no new write starts after a signal).
    """
    from datetime import UTC, datetime

    from .conventions import ConventionChangeError, Conventions, current_conventions
    from .errors import FhirServerError
    from .writeback import build_case_write, identifiers, stored_grade, stored_hash, transaction_for

    ids = identifiers(case, identifier_system)
    types = WRITTEN_TYPES
    tl = case.timeline
    infusion = iso(tl.infusion) or ""
    conventions = current_conventions(settings, mappings_dir or load_code_map(None).directory)
    last_error: Exception | None = None
    for _ in range(attempts):
        existing, stored = find_written(client, ids)
        recorded = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        write = build_case_write(case, settings, identifier_system, include_icans_if_zero="icans" in existing,
                                 recorded=recorded, conventions=conventions)
        new_hash = stored_hash(write.resources["crs"])
        if case.crs["astct"].grade == 0 and "crs" not in existing:
            write.resources.pop("crs")  # no CRS, and nothing written before: nothing to refute
            if "icans" not in write.resources:
                return WriteOutcome(tl.patient, infusion, "unchanged", {})
        if "crs" in stored and stored_hash(stored["crs"]) == new_hash and "summary" in existing and (
            ("icans" in stored) == ("icans" in write.resources)
        ) and not _retracted(stored):
            return WriteOutcome(tl.patient, infusion, "unchanged", {n: f"{types[n]}/{existing[n][0]}" for n in existing})
        tx = transaction_for(write, existing)
        changes = []
        for name, entry in zip(write.resources, tx["entry"], strict=False):
            grade = {"crs": case.crs["astct"].grade, "icans": case.icans["astct"].grade}.get(name)
            changes.append({"resource": f"{types[name]}/{existing[name][0]}" if name in existing else types[name],
                            "kind": name, "action": "update" if name in existing else "create",
                            "old_grade": stored_grade(stored[name]) if name in stored and grade is not None else None,
                            "new_grade": grade, "request": f"{entry['request']['method']} {entry['request']['url']}"})
        if len(tx["entry"]) > len(write.resources):
            changes.append({"resource": "Provenance", "kind": "provenance", "action": "create",
                            "old_grade": None, "new_grade": None, "request": "POST Provenance"})
        refusal = None
        if not allow_convention_change:
            for name in ("crs", "icans"):
                if name in stored and (diff := conventions.differences(Conventions.from_resource(stored[name]))):
                    refusal = (f"{tl.patient} (infusion {infusion}): not overwriting Condition/{existing[name][0]}: it was graded "
                               f"with other conventions ({'; '.join(diff)}); rerun with --allow-convention-change to replace it")
                    break
        if dry_run:
            return WriteOutcome(tl.patient, infusion, "refused" if refusal else "dry-run",
                                {e["resource"]["resourceType"] + ":" + n: e["request"]["url"] for n, e in zip(write.resources, tx["entry"], strict=False)},
                                tx, changes, refusal)
        if refusal:
            raise ConventionChangeError(refusal)
        response, conflict = send_transaction(client, tx, before_write)
        if response is None:
            last_error = conflict
            continue
        written = {}
        names = [*write.resources, "provenance"]
        for name, entry in zip(names, response.get("entry") or [], strict=False):
            written[name] = location_ref(entry)
        return WriteOutcome(tl.patient, infusion, "updated" if existing else "created", written, changes=changes)
    raise FhirServerError(f"could not write {tl.patient} after {attempts} version conflicts: {last_error}")


def _retracted(stored: dict[str, dict[str, Any]]) -> bool:
    """A stored case that a sync retracted (its infusion had vanished) is rewritten when it is back."""
    from .writeback.retract import bundle_is_retracted, is_entered_in_error

    return any(is_entered_in_error(r) for n, r in stored.items() if n != "summary") or (
        "summary" in stored and bundle_is_retracted(stored["summary"]))


def pull_patient(client: Any, patient_id: str, cfg: Any, settings: GradingSettings | None = None,
                 write: bool = False, dry_run: bool = False, allow_convention_change: bool = False) -> PullResult:
    code_map = load_code_map(Path(cfg.mappings) if cfg.mappings else None)
    settings = settings or load_settings(code_map.directory)
    resources = fetch_patient(client, patient_id, cfg, code_map, settings)
    run = grade_resources(resources, settings, code_map.directory, origin=f"Patient/{patient_id}")
    writes = []
    if write or dry_run:
        for case in run.cases:
            writes.append(write_case(client, case, settings, cfg.identifier_system, dry_run=dry_run,
                                     mappings_dir=code_map.directory, allow_convention_change=allow_convention_change))
    return PullResult(run, writes, client.requests_made)


# ---- flat-memory offline path: map -> patient-hash partitions on disk -> grade each -> stream JSON

@dataclass(slots=True)
class StreamSummary:
    """What `stream_grade` wrote, for the CLI's --strict check."""

    cases: int
    skip_codes: list[str]
    resources: int


def stream_grade(paths: list[Path], out: Any, settings: GradingSettings | None = None, mappings_dir: Path | None = None,
                 series: bool = False, workers: int = 1) -> StreamSummary:
    """`fhir-crs grade PATH... --json` in flat memory: byte for byte the output of
    `run_paths(...).to_json()`, written to the binary stream `out`.

    1. map: every mapped copy of every resource goes to a Type/id-hash partition on disk;
    2. settle: per Type/id partition, each resource's winning version (spill.py,
       `ResourceMapper.settle`) goes to a patient-hash partition, skips to sorted runs;
    3. grade: per patient partition (a bounded number of patients), then stream the JSON in
       patient order. Nothing is written to `out` before the whole input was read, so an input
       error leaves no partial output.

    With `workers` > 1 the three stages run on that many processes (parallel.py), same bytes."""
    code_map = load_code_map(mappings_dir)
    settings = settings or load_settings(code_map.directory)
    paths = [Path(p) for p in paths]
    with quiet_gc():
        return _stream_grade(paths, out, code_map, settings, series, workers)


@contextmanager
def quiet_gc(threshold: int = 100_000) -> Iterator[None]:
    """Garbage collection off the hot path: what was loaded before (mapping tables, settings,
    modules) is frozen out of every collection, and a collection runs every `threshold`
    allocations instead of every 700 (the mappers create almost no reference cycles; the events
    buffered at a time are bounded by spill.SPILL_EVENTS). Restored on exit."""
    import gc

    old = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(threshold, old[1], old[2])
    try:
        yield
    finally:
        gc.set_threshold(*old)
        gc.unfreeze()


def _stream_grade(paths: list[Path], out: Any, code_map: CodeMap, settings: GradingSettings, series: bool,
                  workers: int) -> StreamSummary:
    import tempfile

    from . import parallel
    from .errors import InputError
    from .parallel import can_fork, run_parallel
    from .sources import input_bytes
    from .spill import SpillStore, grade_partition, partitions_for, write_grade_json

    for p in paths:  # fail fast on a missing path before doing any work
        if not p.exists():
            raise InputError(f"Input path {p} does not exist.")
    size = input_bytes(paths)
    partitions = partitions_for(size)
    with tempfile.TemporaryDirectory(prefix="fhir-crs-grade-") as tmp:
        work = Path(tmp)
        run = None
        if workers > 1 and can_fork() and size > parallel.UNIT_BYTES:  # one unit of input: one process
            run = run_parallel(paths, work, partitions, code_map, settings, series, workers)
            if run is None:  # the input needs the one-process path (parallel.py): start afresh
                for f in work.iterdir():
                    f.unlink()
        if run is not None:
            store, where, no_infusion, cases, count = run.store, run.where, run.no_infusion, run.cases, run.count
        else:
            store = SpillStore(work, partitions)
            mapper = ResourceMapper(code_map, store, spill=store.spill_kept)
            for item in iter_paths(paths):
                mapper.add(item)
                store.maybe_spill()
            mapper.finish()
            store.settle(mapper)
            where = {}
            no_infusion = []
            cases = 0
            for part in store.patient_partitions():
                out_path = work / f"cases-{part:04d}.json"
                index, skips, n = grade_partition(store, part, settings, series, out_path)
                where.update((p, (out_path, off, length)) for p, (off, length) in index.items())
                no_infusion += skips
                cases += n
            count = mapper.count
        no_infusion.sort(key=lambda x: x[0])

        def rendered() -> Iterable[bytes]:
            for patient in sorted(where):
                path, off, length = where[patient]
                if length:
                    with path.open("rb") as fh:
                        fh.seek(off)
                        yield fh.read(length)

        codes: list[str] = []

        def skipped() -> Iterable[dict[str, str]]:
            for s in store.skips(s for _, group in no_infusion for s in group):
                codes.append(s.code)
                yield skip_json(s)

        write_grade_json(out, rendered(), skipped(), lambda n_skipped: {
            "resources_read": count, "resources_used": count - n_skipped, "settings": settings.as_dict()})
    return StreamSummary(cases, codes, count)
