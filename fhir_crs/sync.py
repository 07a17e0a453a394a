"""The nightly job: `fhir-crs sync` over the CAR-T cohort of a FHIR server.

    cohort (Procedure/MedicationAdministration codes in mappings/, a patient list, or a Group)
      -> per patient: cheap change check (_lastUpdated > high-water mark) -> pull -> grade
      -> write back only when the graded result changed -> record state (SQLite)

Incremental: a small local state store keeps, per patient, the last successful run, the
`_lastUpdated` high-water mark of the data it graded and the hash of the graded result; a night
with no new data for a patient costs four `_summary=count` requests and writes nothing.
Resumable and safe: each case is written in one atomic transaction (pipeline.write_case), the
state row is committed only after the write succeeded, so a run killed at any point leaves no
partial case and the next run redoes exactly what was not finished. Reads run concurrently on a
bounded worker pool; all writes for one patient happen on one worker, one after the other
(HAPI can create duplicates under parallel conditional creates, hapi-fhir#3141).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from .errors import ConfigError, FhirCrsError
from .grading.result import iso
from .interrupt import Interrupted, StopSignal
from .logs import note_patient, note_patient_id
from .mapping_files import CodeMap, cart_codes, load_code_map
from .pipeline import fetch_patient, grade_resources, write_case
from .settings import GradingSettings

log = logging.getLogger("fhir_crs.sync")
CHANGE_TYPES = ("Observation", "MedicationAdministration", "Procedure")
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"

SCHEMA = """
CREATE TABLE IF NOT EXISTS patient_state (
    server TEXT NOT NULL, patient TEXT NOT NULL,
    last_success TEXT, high_water TEXT, result_hash TEXT, grades TEXT,
    PRIMARY KEY (server, patient)
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, server TEXT NOT NULL, started TEXT NOT NULL,
    finished TEXT, status TEXT NOT NULL, summary TEXT
);
CREATE TABLE IF NOT EXISTS bulk_state (
    server TEXT NOT NULL, scope TEXT NOT NULL, transaction_time TEXT NOT NULL,
    PRIMARY KEY (server, scope)
);
"""


def default_state_path() -> Path:
    """`state.sqlite` in the per-user data folder (e.g. ~/.local/share/fhir-crs on Linux), not the
    current folder, so that runs from different folders share one state."""
    import platformdirs

    return platformdirs.user_data_path("fhir-crs", appauthor=False) / "state.sqlite"


class StateStore:
    """SQLite state of the nightly sync (one file; safe to delete: the next run starts over).

    `read_only` (sync --dry-run): the file is read once into memory (opened immutable, so not
    even a lock or WAL file is written) and every change stays in that copy; a missing file is
    not created, nor its folder."""

    def __init__(self, path: Path, server: str, read_only: bool = False):
        from .private import create_private_file

        if not read_only:
            # Owner-only (0600 file in a 0700 folder if we create it); SQLite gives its -wal/-shm
            # and -journal files the database file's mode.
            try:
                create_private_file(path)
            except OSError as exc:
                raise ConfigError(f"cannot create sync state store {path}: {exc.strerror or exc}") from exc
        self.server = server
        self._lock = threading.Lock()
        try:
            if read_only:
                self.db = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
                if path.is_file():
                    src = sqlite3.connect(path.resolve().as_uri() + "?mode=ro&immutable=1", uri=True)
                    try:
                        src.backup(self.db)
                    finally:
                        src.close()
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
                self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open sync state store {path}: {exc}") from exc

    def get(self, patient: str) -> dict[str, Any] | None:
        with self._lock:
            row = self.db.execute(
                "SELECT last_success, high_water, result_hash, grades FROM patient_state WHERE server=? AND patient=?",
                (self.server, patient),
            ).fetchone()
        if row is None:
            return None
        return {"last_success": row[0], "high_water": row[1], "result_hash": row[2], "grades": row[3]}

    def put(self, patient: str, high_water: str | None, result_hash: str, grades: str) -> None:
        now = iso(datetime.now(UTC))
        with self._lock:
            self.db.execute(
                "INSERT INTO patient_state (server, patient, last_success, high_water, result_hash, grades) "
                "VALUES (?,?,?,?,?,?) ON CONFLICT(server, patient) DO UPDATE SET last_success=excluded.last_success, "
                "high_water=excluded.high_water, result_hash=excluded.result_hash, grades=excluded.grades",
                (self.server, patient, now, high_water, result_hash, grades),
            )

    def touch(self, patient: str) -> None:
        with self._lock:
            self.db.execute("UPDATE patient_state SET last_success=? WHERE server=? AND patient=?",
                            (iso(datetime.now(UTC)), self.server, patient))

    def start_run(self) -> tuple[int, bool]:
        """(run id, whether the previous run was interrupted: killed while `running`, or stopped by a signal)."""
        with self._lock:
            prev = self.db.execute("SELECT status FROM runs WHERE server=? ORDER BY id DESC LIMIT 1", (self.server,)).fetchone()
            cur = self.db.execute("INSERT INTO runs (server, started, status) VALUES (?,?, 'running')",
                                  (self.server, iso(datetime.now(UTC))))
        return int(cur.lastrowid or 0), bool(prev and prev[0] in ("running", "interrupted"))

    def finish_run(self, run_id: int, status: str, summary: dict[str, Any]) -> None:
        with self._lock:
            self.db.execute("UPDATE runs SET finished=?, status=?, summary=? WHERE id=?",
                            (iso(datetime.now(UTC)), status, json.dumps(summary), run_id))

    def bulk_since(self, scope: str) -> str | None:
        with self._lock:
            row = self.db.execute("SELECT transaction_time FROM bulk_state WHERE server=? AND scope=?", (self.server, scope)).fetchone()
        return row[0] if row else None

    def set_bulk_since(self, scope: str, transaction_time: str) -> None:
        with self._lock:
            self.db.execute(
                "INSERT INTO bulk_state (server, scope, transaction_time) VALUES (?,?,?) "
                "ON CONFLICT(server, scope) DO UPDATE SET transaction_time=excluded.transaction_time",
                (self.server, scope, transaction_time),
            )

    def close(self) -> None:
        self.db.close()


@dataclass(slots=True)
class SyncSummary:
    patients: int = 0
    graded: int = 0
    changed: int = 0
    written: Counter[str] = field(default_factory=Counter)
    unchanged: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    errors: list[dict[str, str]] = field(default_factory=list)
    requests: int = 0
    seconds: float = 0.0
    resumed: bool = False
    cases: list[dict[str, Any]] = field(default_factory=list)
    graded_cases: list[Any] = field(default_factory=list)  # GradedCase objects (report / HTML)
    dry_run: bool = False
    would_write: list[dict[str, Any]] = field(default_factory=list)  # dry run: what a real run would write
    interrupted: str | None = None  # the signal that stopped the run ("SIGINT", "SIGTERM")
    not_done: int = 0  # patients left for the next run by the interruption

    def to_json(self) -> dict[str, Any]:
        out = {
            "patients": self.patients, "graded": self.graded, "changed": self.changed,
            "written": {"Condition": self.written.get("Condition", 0), "Bundle": self.written.get("Bundle", 0)},
            "provenance_written": self.written.get("Provenance", 0),
            "unchanged": self.unchanged, "skipped": dict(sorted(self.skipped.items())),
            "errors": self.errors, "requests": self.requests, "seconds": round(self.seconds, 3),
            "resumed_after_interruption": self.resumed,
            "dry_run": self.dry_run,
            "interrupted": self.interrupted is not None,
        }
        if self.dry_run:
            out["would_write"] = self.would_write
        if self.interrupted is not None:
            out["signal"] = self.interrupted
            out["not_done"] = self.not_done
        return out


def discover_cohort(client: Any, code_map: CodeMap, lookback_days: float, now: datetime | None = None) -> list[str]:
    """Patients with a CAR-T Procedure or product administration inside the look-back window."""
    now = now or datetime.now(UTC)
    since = "ge" + (iso(now - timedelta(days=lookback_days)) or "")
    procs, drugs = cart_codes(code_map)
    found: set[str] = set()
    for rtype, date_param, codes in (("Procedure", "date", procs), ("MedicationAdministration", "effective-time", drugs)):
        if not codes:
            continue
        for chunk in range(0, len(codes), 20):  # keep URLs short
            result = client.search(rtype, [("code", ",".join(codes[chunk:chunk + 20])), (date_param, since)], no_cache=True)
            for r in result.matches:
                ref = (r.get("subject") or {}).get("reference", "")
                if ref.startswith("Patient/"):
                    found.add(ref.split("/", 1)[1])
    return sorted(found)


def read_patient_list(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read patient list {path}: {exc.strerror or exc}") from exc
    out = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line.removeprefix("Patient/"))
    return out


def group_members(client: Any, group_id: str) -> list[str]:
    group = client.read("Group", group_id)
    out = []
    for m in group.get("member") or []:
        ref = ((m or {}).get("entity") or {}).get("reference", "")
        if ref.startswith("Patient/"):
            out.append(ref.split("/", 1)[1])
    return out


def select_patients(client: Any, cfg: Any, patients_file: Path | None, group_id: str | None) -> list[str]:
    """The cohort: an explicit list, a Group's members, or discovery by CAR-T codes."""
    if patients_file:
        return read_patient_list(patients_file)
    if group_id:
        return group_members(client, group_id)
    return discover_cohort(client, load_code_map(Path(cfg.mappings) if cfg.mappings else None), cfg.lookback_days)


def has_changes(client: Any, patient: str, since: str) -> bool:
    """Any Patient/Observation/MedicationAdministration/Procedure updated after `since`?"""
    for rtype in CHANGE_TYPES:
        res = client.search(rtype, [("patient", patient), ("_lastUpdated", "gt" + since), ("_summary", "count")], no_cache=True)
        if (res.total or 0) > 0 or res.matches:
            return True
    res = client.search("Patient", [("_id", patient), ("_lastUpdated", "gt" + since), ("_summary", "count")], no_cache=True)
    return (res.total or 0) > 0 or bool(res.matches)


def _high_water(resources: Iterable[dict[str, Any]]) -> str | None:
    stamps = [((r.get("meta") or {}).get("lastUpdated")) for r in resources]
    stamps = [s for s in stamps if isinstance(s, str)]
    return max(stamps) if stamps else None


def _result_hash(case_json: list[dict[str, Any]]) -> str:
    keep = [{k: c[k] for k in ("patient", "infusion", "crs", "icans", "adjacent")} for c in case_json]
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()


class Sync:
    def __init__(self, client: Any, cfg: Any, settings: GradingSettings, state: StateStore,
                 dry_run: bool = False, since: str | None = None,
                 progress: Callable[[str, int, int, int], None] | None = None,
                 allow_convention_change: bool = False, stop: StopSignal | None = None):
        self.client, self.cfg, self.settings, self.state = client, cfg, settings, state
        self.code_map = load_code_map(Path(cfg.mappings) if cfg.mappings else None)
        self.dry_run = dry_run
        self.allow_convention_change = allow_convention_change
        self.stop = stop or StopSignal()
        self.since = since
        self.progress = progress or (lambda patient, done, total, errors: None)
        self.summary = SyncSummary(dry_run=dry_run)
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _lock_for(self, patient: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(patient, threading.Lock())

    def run(self, patients: list[str]) -> SyncSummary:
        t0 = time.monotonic()
        run_id, resumed = self.state.start_run()
        self.summary.resumed = resumed
        if resumed:
            log.warning("the previous sync run did not finish; this run completes it")
        self.summary.patients = len(patients)
        note_patient_id(*patients)
        done = 0
        with ThreadPoolExecutor(max_workers=max(1, self.cfg.workers)) as pool:
            futures = {pool.submit(self.sync_patient, p): p for p in patients}
            for fut in as_completed(futures):
                p = futures[fut]
                try:
                    fut.result()
                except Interrupted:
                    self.summary.not_done += 1  # left for the next run (no write was started)
                except FhirCrsError as exc:
                    self.summary.errors.append({"patient": f"Patient/{p}", "error": str(exc)})
                    log.error("Patient/%s: %s", p, exc)
                except Exception as exc:  # a bug must not stop the other patients
                    self.summary.errors.append({"patient": f"Patient/{p}", "error": f"{type(exc).__name__}: {exc}"})
                    log.exception("Patient/%s failed", p)
                done += 1
                self.progress(p, done, len(patients), len(self.summary.errors))
        return self.finish(run_id, t0)

    def finish(self, run_id: int, t0: float) -> SyncSummary:
        """Records the run as ok / failed / interrupted (never left `running`)."""
        self.summary.requests = self.client.requests_made
        self.summary.seconds = time.monotonic() - t0
        if self.stop.is_set():
            self.summary.interrupted = self.stop.name
            status = "interrupted"
        else:
            status = "failed" if self.summary.errors else "ok"
        self.state.finish_run(run_id, status, self.summary.to_json())
        return self.summary

    def sync_patient(self, patient: str, force: bool = False) -> None:
        with self._lock_for(patient):
            self.stop.check()  # a stop was requested: this patient is not started
            prior = self.state.get(patient)
            since = self.since or (prior or {}).get("high_water")
            if not force and since and (prior is not None or self.since) and not has_changes(self.client, patient, since):
                self._count(unchanged=1)
                if not self.dry_run:
                    self.state.touch(patient)
                return
            self.stop.check()
            resources = fetch_patient(self.client, patient, self.cfg, self.code_map)
            self.stop.check()
            run = grade_resources(resources, self.settings, self.code_map.directory, origin=f"Patient/{patient}")
            self.commit(patient, run.cases, run.skipped, _high_water(resources) or since, prior)

    def commit(self, patient: str, cases: list[Any], skipped: list[Any], high_water: str | None,
               prior: dict[str, Any] | None) -> None:
        """Write back one patient's graded cases if the result changed, then record the state.

        The state row is written only after every write succeeded (resumability)."""
        case_json = [c.to_json(self.settings) for c in cases]
        with self._guard:
            self.summary.graded += 1
            self.summary.cases.extend(case_json)
            self.summary.graded_cases.extend(cases)
            for s in skipped:
                self.summary.skipped[s.code] += 1
        new_hash = _result_hash(case_json)
        if prior is not None and prior.get("result_hash") == new_hash:
            self._count(unchanged=1)
            if not self.dry_run:
                self.state.put(patient, high_water, new_hash, prior.get("grades") or "")
            return
        self._count(changed=1)
        for case in cases:
            self.stop.check()
            outcome = write_case(self.client, case, self.settings, self.cfg.identifier_system, dry_run=self.dry_run,
                                 mappings_dir=self.code_map.directory, allow_convention_change=self.allow_convention_change,
                                 before_write=self.stop.check)
            if outcome.status in ("dry-run", "refused"):
                with self._guard:
                    self.summary.would_write.extend(
                        {"patient": outcome.patient, "infusion": outcome.infusion, **change,
                         **({"refused": outcome.message} if outcome.message else {})}
                        for change in outcome.changes)
            if outcome.status in ("created", "updated"):
                with self._guard:
                    for ref in outcome.written.values():
                        self.summary.written[ref.split("/", 1)[0]] += 1
        if not self.dry_run:
            grades = json.dumps({c["infusion"]: {"crs": c["crs"]["astct"]["grade"], "icans": c["icans"]["astct"]["grade"]}
                                 for c in case_json})
            self.state.put(patient, high_water, new_hash, grades)

    def _count(self, changed: int = 0, unchanged: int = 0) -> None:
        with self._guard:
            self.summary.changed += changed
            self.summary.unchanged += unchanged


def run_bulk(client: Any, cfg: Any, settings: GradingSettings, state: StateStore, group_id: str | None = None,
             dry_run: bool = False, console: Any = None, allow_convention_change: bool = False,
             stop: StopSignal | None = None) -> SyncSummary:
    """The Bulk Data path of the nightly sync.

    First run (no previous `transactionTime` for this scope): `$export` everything, stream the
    NDJSON line by line straight into the mappers (only compact events are kept, so memory
    stays flat) and grade and write every CAR-T case. Later runs: `$export?_since=<previous
    transactionTime>`; the patients the export touches are re-fetched in full and re-graded
    through the per-patient path. The new `transactionTime` is stored only after a run without
    errors, so a failed night is repeated.
    """
    from .events import Skipped
    from .fhir.bulk import BulkExport
    from .mappers import ResourceMapper
    from .pipeline import grade_mapping
    from .sources import SourceResource

    scope = f"group:{group_id}" if group_id else "patient"
    since = state.bulk_since(scope)
    t0 = time.monotonic()

    stop = stop or StopSignal()

    def progress(text: str) -> None:
        stop.check()  # a signal while polling: the export job is cancelled (BulkExport cleans up)
        if console is not None:
            console.print(f"fhir-crs sync --bulk: export {text}", highlight=False)

    exporter = BulkExport(client, on_progress=progress, max_poll_interval=cfg.bulk_max_poll,
                          max_file_bytes=int(getattr(cfg, "max_bulk_file_mb", 16384.0) * 1024 * 1024),
                          max_decompression_ratio=getattr(cfg, "max_decompression_ratio", 200.0))
    try:
        manifest, items = exporter.run(group_id=group_id, since=since)
    except Interrupted:
        summary = SyncSummary(dry_run=dry_run, interrupted=stop.name, requests=client.requests_made,
                              seconds=time.monotonic() - t0)
        run_id, summary.resumed = state.start_run()
        state.finish_run(run_id, "interrupted", summary.to_json())
        return summary
    sync = Sync(client, cfg, settings, state, dry_run=dry_run, allow_convention_change=allow_convention_change, stop=stop)
    run_id, resumed = state.start_run()
    sync.summary.resumed = resumed
    for message in exporter.error_messages(manifest):
        sync.summary.errors.append({"patient": "(bulk export)", "error": message})
    done = 0
    try:
        if since is None:
            mapper = ResourceMapper(sync.code_map)
            for rtype, item in items:
                stop.check()
                if rtype is None:
                    mapper.add(Skipped(str(item), "unusable NDJSON line", "invalid_json"))
                else:
                    if rtype == "Patient":
                        note_patient(item)  # its names, MRN and birth date never reach a log line
                    mapper.add(SourceResource(item, f"bulk:{rtype}"))
            for ref in mapper.missing_medications():
                try:
                    mapper.add(SourceResource(client.read(*ref.split("/", 1)), f"read:{ref}"))
                except FhirCrsError as exc:
                    log.warning("%s referenced by a MedicationAdministration could not be read: %s", ref, exc)
            graded = grade_mapping(mapper.finish(), settings, mapper.count)
            for s in graded.skipped:
                sync.summary.skipped[s.code] += 1
            by_patient: dict[str, list[Any]] = {}
            for case in graded.cases:
                by_patient.setdefault(case.timeline.patient.split("/", 1)[1], []).append(case)
            sync.summary.patients = len(by_patient)
            for patient, cases in sorted(by_patient.items()):
                try:
                    sync.commit(patient, cases, [], manifest.transaction_time, state.get(patient))
                except FhirCrsError as exc:
                    sync.summary.errors.append({"patient": f"Patient/{patient}", "error": str(exc)})
                done += 1
        else:
            touched: set[str] = set()
            for rtype, item in items:
                stop.check()
                if rtype is None or not isinstance(item, dict):
                    continue
                if rtype == "Patient" and isinstance(item.get("id"), str):
                    touched.add(item["id"])
                ref = (item.get("subject") or item.get("patient") or {}).get("reference", "") if isinstance(item.get("subject") or item.get("patient"), dict) else ""
                if ref.startswith("Patient/"):
                    touched.add(ref.split("/", 1)[1])
            sync.summary.patients = len(touched)
            for patient in sorted(touched):
                try:
                    sync.sync_patient(patient, force=True)
                except FhirCrsError as exc:
                    sync.summary.errors.append({"patient": f"Patient/{patient}", "error": str(exc)})
                done += 1
    except Interrupted:
        sync.summary.not_done = max(0, sync.summary.patients - done)
    if not sync.summary.errors and not dry_run and not stop.is_set():
        state.set_bulk_since(scope, manifest.transaction_time)
    if manifest.status_url:
        exporter.cancel(manifest.status_url)  # done with the files: let the server release them
    return sync.finish(run_id, t0)
