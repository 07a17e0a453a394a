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
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from .changefeed import (
    SHARED_TYPES,
    ChangeFeed,
    FeedEntry,
    FeedRead,
    iter_cart_entries,
    minus,
    parse_instant,
    version_id,
    version_newer,
    version_newer_or_same,
)
from .errors import ConfigError, FhirCrsError
from .grading.result import iso
from .interrupt import Interrupted, StopSignal
from .logs import note_patient, note_patient_id
from .mapping_files import CodeMap, cart_codes, load_code_map
from .ownoutput import is_own_output
from .pipeline import fetch_patient, grade_resources, write_case
from .retraction import CaseRecord, retract_case
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
CREATE TABLE IF NOT EXISTS feed_state (
    server TEXT NOT NULL, scope TEXT NOT NULL, high_water TEXT NOT NULL, last_full TEXT, conventions TEXT,
    PRIMARY KEY (server, scope)
);
CREATE TABLE IF NOT EXISTS feed_retry (
    server TEXT NOT NULL, scope TEXT NOT NULL, high_water TEXT NOT NULL, last_full TEXT, conventions TEXT,
    patients TEXT NOT NULL,
    PRIMARY KEY (server, scope)
);
CREATE TABLE IF NOT EXISTS graded_refs (
    server TEXT NOT NULL, ref TEXT NOT NULL, patient TEXT NOT NULL, version TEXT,
    PRIMARY KEY (server, ref)
);
CREATE INDEX IF NOT EXISTS graded_refs_patient ON graded_refs (server, patient);
CREATE TABLE IF NOT EXISTS written_cases (
    server TEXT NOT NULL, patient TEXT NOT NULL, infusion TEXT NOT NULL, identifiers TEXT NOT NULL,
    infusion_refs TEXT NOT NULL,
    PRIMARY KEY (server, patient, infusion)
);
CREATE TABLE IF NOT EXISTS medication_refs (
    server TEXT NOT NULL, medication TEXT NOT NULL, patient TEXT NOT NULL, version TEXT,
    PRIMARY KEY (server, medication, patient)
);
CREATE INDEX IF NOT EXISTS medication_refs_patient ON medication_refs (server, patient);
CREATE TABLE IF NOT EXISTS cohort (
    server TEXT NOT NULL, scope TEXT NOT NULL, patient TEXT NOT NULL, last_infusion TEXT NOT NULL,
    PRIMARY KEY (server, scope, patient)
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

    @contextmanager
    def _write_txn(self) -> Iterator[None]:
        """One SQLite write transaction under the store's lock: committed when the block ends,
        rolled back (and the error raised) when it fails or is interrupted."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def put(self, patient: str, high_water: str | None, result_hash: str, grades: str,
            refs: dict[str, str | None] | None = None, medications: dict[str, str | None] | None = None,
            cases: list[CaseRecord] | None = None) -> None:
        """The patient's state after a successful write: its per-patient high-water mark, result
        hash and grades, (`refs`) the `Type/id` -> version of every resource graded — what the
        change feed is de-duplicated against — (`medications`, with `refs`) the
        `Medication/id` -> version its graded MedicationAdministrations reference (None: it
        could not be read), and (`cases`) the cases written on the server (what a vanished
        infusion retracts), all in one SQLite transaction."""
        now = iso(datetime.now(UTC))
        with self._write_txn():
            if cases is not None:
                self.db.execute("DELETE FROM written_cases WHERE server=? AND patient=?", (self.server, patient))
                self.db.executemany(
                    "INSERT INTO written_cases (server, patient, infusion, identifiers, infusion_refs) VALUES (?,?,?,?,?)",
                    [(self.server, patient, c.infusion, json.dumps(c.identifiers, sort_keys=True), json.dumps(list(c.infusion_refs)))
                     for c in cases])
            self.db.execute(
                "INSERT INTO patient_state (server, patient, last_success, high_water, result_hash, grades) "
                "VALUES (?,?,?,?,?,?) ON CONFLICT(server, patient) DO UPDATE SET last_success=excluded.last_success, "
                "high_water=excluded.high_water, result_hash=excluded.result_hash, grades=excluded.grades",
                (self.server, patient, now, high_water, result_hash, grades),
            )
            if refs is not None:
                self.db.execute("DELETE FROM graded_refs WHERE server=? AND patient=?", (self.server, patient))
                self.db.executemany(
                    "INSERT INTO graded_refs (server, ref, patient, version) VALUES (?,?,?,?) "
                    "ON CONFLICT(server, ref) DO UPDATE SET patient=excluded.patient, version=excluded.version",
                    [(self.server, ref, patient, version) for ref, version in refs.items()])
                self.db.execute("DELETE FROM medication_refs WHERE server=? AND patient=?", (self.server, patient))
                self.db.executemany(
                    "INSERT INTO medication_refs (server, medication, patient, version) VALUES (?,?,?,?)",
                    [(self.server, ref, patient, version) for ref, version in (medications or {}).items()])

    def medication_users(self, refs: Iterable[str]) -> dict[str, list[tuple[str, str | None]]]:
        """`Medication/id` -> [(patient, version graded; None: referenced but not read)] for
        those of `refs` a graded MedicationAdministration references."""
        out: dict[str, list[tuple[str, str | None]]] = {}
        todo = sorted(set(refs))
        with self._lock:
            for i in range(0, len(todo), 500):
                chunk = todo[i:i + 500]
                rows = self.db.execute(
                    "SELECT medication, patient, version FROM medication_refs WHERE server=? AND medication IN "
                    f"({','.join('?' * len(chunk))}) ORDER BY medication, patient", (self.server, *chunk)).fetchall()
                for med, patient, version in rows:
                    out.setdefault(med, []).append((patient, version))
        return out

    def cases(self, patient: str) -> dict[str, CaseRecord]:
        """The cases written for `patient` (infusion start -> record)."""
        with self._lock:
            rows = self.db.execute("SELECT infusion, identifiers, infusion_refs FROM written_cases WHERE server=? AND patient=?",
                                   (self.server, patient)).fetchall()
        return {r[0]: CaseRecord(patient, r[0], json.loads(r[1]), tuple(json.loads(r[2]))) for r in rows}

    def case_patients(self, not_before: datetime | None = None) -> set[str]:
        """Patients with a written case whose infusion is on or after `not_before` (all: None)."""
        with self._lock:
            rows = self.db.execute("SELECT patient, infusion FROM written_cases WHERE server=?", (self.server,)).fetchall()
        out = set()
        for patient, when in rows:
            at = parse_instant(when)
            if not_before is None or (at is not None and at >= not_before):
                out.add(patient)
        return out

    def stage_refs(self, rows: list[tuple[str, str, str | None]], meds: Iterable[tuple[str, str]] = ()) -> None:
        """(`Type/id`, patient, version) of resources a bulk export streamed, and (`Medication/id`,
        patient) its administrations reference, kept in temporary tables on disk (memory stays
        flat) until their patient's state is put (`staged_refs`, `staged_medications`)."""
        with self._lock:
            self.db.execute("CREATE TEMP TABLE IF NOT EXISTS staged_refs (ref TEXT PRIMARY KEY, patient TEXT NOT NULL, version TEXT)")
            self.db.execute("CREATE INDEX IF NOT EXISTS temp.staged_refs_patient ON staged_refs (patient)")
            self.db.execute("CREATE TEMP TABLE IF NOT EXISTS staged_meds (medication TEXT NOT NULL, patient TEXT NOT NULL, "
                            "PRIMARY KEY (patient, medication))")
            self.db.executemany("INSERT INTO staged_refs (ref, patient, version) VALUES (?,?,?) "
                                "ON CONFLICT(ref) DO UPDATE SET patient=excluded.patient, version=excluded.version", rows)
            self.db.executemany("INSERT OR IGNORE INTO staged_meds (medication, patient) VALUES (?,?)", list(meds))

    def staged_refs(self, patient: str) -> dict[str, str | None]:
        with self._lock:
            try:
                rows = self.db.execute("SELECT ref, version FROM staged_refs WHERE patient=?", (patient,)).fetchall()
            except sqlite3.OperationalError:  # nothing was staged
                return {}
        return {r[0]: r[1] for r in rows}

    def staged_medications(self, patient: str) -> list[str]:
        with self._lock:
            try:
                rows = self.db.execute("SELECT medication FROM staged_meds WHERE patient=?", (patient,)).fetchall()
            except sqlite3.OperationalError:
                return []
        return [r[0] for r in rows]

    def graded(self, refs: Iterable[str]) -> dict[str, tuple[str, str | None]]:
        """`Type/id` -> (patient, version graded) for those of `refs` that were graded."""
        out: dict[str, tuple[str, str | None]] = {}
        todo = sorted(set(refs))
        with self._lock:
            for i in range(0, len(todo), 500):
                chunk = todo[i:i + 500]
                rows = self.db.execute(
                    f"SELECT ref, patient, version FROM graded_refs WHERE server=? AND ref IN ({','.join('?' * len(chunk))})",
                    (self.server, *chunk)).fetchall()
                out.update((r[0], (r[1], r[2])) for r in rows)
        return out

    def known(self, patients: Iterable[str]) -> set[str]:
        """Those of `patients` with a state row (graded by an earlier run)."""
        return self._patients_with_row(patients, "")

    def pending(self, patients: Iterable[str]) -> set[str]:
        """Those of `patients` whose last write may not have finished (`write_pending`, no `put` after it)."""
        return self._patients_with_row(patients, " AND result_hash IS NULL")

    def _patients_with_row(self, patients: Iterable[str], condition: str) -> set[str]:
        todo = sorted(set(patients))
        out: set[str] = set()
        with self._lock:
            for i in range(0, len(todo), 500):
                chunk = todo[i:i + 500]
                rows = self.db.execute(
                    f"SELECT patient FROM patient_state WHERE server=?{condition} AND patient IN ({','.join('?' * len(chunk))})",
                    (self.server, *chunk)).fetchall()
                out.update(r[0] for r in rows)
        return out

    def feed(self, scope: str) -> tuple[str | None, str | None, str | None]:
        """(cohort high-water mark by the server's clock, when the last full re-read was, the
        conventions hash the cohort was graded with) of `scope`."""
        with self._lock:
            row = self.db.execute("SELECT high_water, last_full, conventions FROM feed_state WHERE server=? AND scope=?",
                                  (self.server, scope)).fetchone()
        return (row[0], row[1], row[2]) if row else (None, None, None)

    def set_feed(self, scope: str, high_water: str, last_full: str | None, conventions: str | None) -> None:
        """Advance the cohort high-water mark of `scope` (every changed patient was written):
        the retry record of an unfinished night, if any, is done with it (one transaction)."""
        with self._write_txn():
            self.db.execute(
                "INSERT INTO feed_state (server, scope, high_water, last_full, conventions) VALUES (?,?,?,?,?) "
                "ON CONFLICT(server, scope) DO UPDATE SET high_water=excluded.high_water, last_full=excluded.last_full, "
                "conventions=excluded.conventions",
                (self.server, scope, high_water, last_full, conventions))
            self.db.execute("DELETE FROM feed_retry WHERE server=? AND scope=?", (self.server, scope))

    def retry(self, scope: str) -> Retry | None:
        """The unfinished night of `scope` (some changed patients were not written), if any."""
        with self._lock:
            row = self.db.execute("SELECT high_water, last_full, conventions, patients FROM feed_retry "
                                  "WHERE server=? AND scope=?", (self.server, scope)).fetchone()
        if row is None:
            return None
        try:
            patients = json.loads(row[3])
        except ValueError:
            patients = None
        if not isinstance(patients, list) or not all(isinstance(p, str) for p in patients):
            return None  # unreadable: as if there were none, so the next night reads from the official mark
        return Retry(row[0], row[1], row[2], frozenset(patients))

    def set_retry(self, scope: str, retry: Retry) -> None:
        with self._lock:
            self.db.execute(
                "INSERT INTO feed_retry (server, scope, high_water, last_full, conventions, patients) VALUES (?,?,?,?,?,?) "
                "ON CONFLICT(server, scope) DO UPDATE SET high_water=excluded.high_water, last_full=excluded.last_full, "
                "conventions=excluded.conventions, patients=excluded.patients",
                (self.server, scope, retry.high_water, retry.last_full, retry.conventions, json.dumps(sorted(retry.patients))))

    def cohort(self, scope: str, not_before: datetime) -> dict[str, str]:
        """The stored discovered cohort: patient -> last CAR-T administration, those on or after `not_before`."""
        with self._lock:
            rows = self.db.execute("SELECT patient, last_infusion FROM cohort WHERE server=? AND scope=?",
                                   (self.server, scope)).fetchall()
        out = {}
        for patient, when in rows:
            at = parse_instant(when)
            if at is not None and at >= not_before:
                out[patient] = when
        return out

    def has_cohort(self, scope: str) -> bool:
        with self._lock:
            return self.db.execute("SELECT 1 FROM cohort WHERE server=? AND scope=? LIMIT 1", (self.server, scope)).fetchone() is not None

    def set_cohort(self, scope: str, members: dict[str, str], replace: bool) -> None:
        with self._write_txn():
            if replace:
                self.db.execute("DELETE FROM cohort WHERE server=? AND scope=?", (self.server, scope))
            self.db.executemany(
                "INSERT INTO cohort (server, scope, patient, last_infusion) VALUES (?,?,?,?) "
                "ON CONFLICT(server, scope, patient) DO UPDATE SET last_infusion=MAX(last_infusion, excluded.last_infusion)",
                [(self.server, scope, p, when) for p, when in members.items()])

    def write_pending(self, patient: str) -> None:
        """Before the patient's writes: its stored result hash is no longer what the server holds
        (a run killed after the server committed a write but before `put` would otherwise leave
        the old hash, and a later night whose result equals it would skip the write, leaving the
        killed night's grade on the server). Cleared, the next run writes (or finds the server's
        copy unchanged) whatever its result."""
        with self._write_txn():
            self.db.execute("UPDATE patient_state SET result_hash=NULL WHERE server=? AND patient=?", (self.server, patient))

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


@dataclass(frozen=True, slots=True)
class Retry:
    """A night that did not write every changed patient (errors, or interrupted by a signal). The
    cohort high-water mark stays where it was (it says: every change before it is written), but
    the next night need not re-read everything that night re-read: it reads the change feed from
    this night's own mark (`high_water`) and re-reads `patients` in full, the ones that failed or
    were not reached. `last_full` and `conventions` are what a successful night would have stored."""

    high_water: str
    last_full: str | None
    conventions: str | None
    patients: frozenset[str]


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
    changed_patients: int = 0  # patients the change feed (or a full re-read) sent to be re-read and re-graded
    deleted_resources: int = 0  # deletions of graded resources of cohort patients seen in the change feed
    high_water: str | None = None  # the cohort high-water mark after this run (server clock)
    change_feed: str = "per-patient"  # "history" | "search" | "mixed" | "per-patient" | "full"
    reconciliation: dict[str, Any] | None = None  # a full re-read: why, and what it found
    retracted_cases: int = 0  # written cases retracted: their CAR-T infusion was deleted, entered-in-error or moved
    retry_patients: int = 0  # patients this night did not write, re-read in full by the next (errors, interruption)

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
            "changed_patients": self.changed_patients, "deleted_resources": self.deleted_resources,
            "high_water": self.high_water, "change_feed": self.change_feed,
            "reconciliation": self.reconciliation,
            "retracted_cases": self.retracted_cases,
            "retry_patients": self.retry_patients,
        }
        if self.dry_run:
            out["would_write"] = self.would_write
        if self.interrupted is not None:
            out["signal"] = self.interrupted
            out["not_done"] = self.not_done
        return out


def discover_cohort(client: Any, code_map: CodeMap, lookback_days: float, now: datetime | None = None) -> list[str]:
    """Patients with a CAR-T Procedure or product administration inside the look-back window."""
    return sorted(discover_members(client, code_map, lookback_days, now)[0])


def discover_members(client: Any, code_map: CodeMap, lookback_days: float,
                     now: datetime | None = None) -> tuple[dict[str, str], str | None]:
    """({patient: its last CAR-T administration in the look-back window}, the server's clock at the
    first answer)."""
    from .changefeed import patient_of

    now = now or datetime.now(UTC)
    not_before = now - timedelta(days=lookback_days)
    since = "ge" + (iso(not_before) or "")
    procs, drugs = cart_codes(code_map)
    found: dict[str, str] = {}
    server_time: str | None = None
    for rtype, date_param, codes in (("Procedure", "date", procs), ("MedicationAdministration", "effective-time", drugs)):
        if not codes:
            continue
        for chunk in range(0, len(codes), 20):  # keep URLs short
            result = client.search(rtype, [("code", ",".join(codes[chunk:chunk + 20])), (date_param, since)], no_cache=True)
            server_time = server_time or result.server_time
            entries = [FeedEntry(f"{rtype}/{r.get('id')}", None, patient_of(r), resource=r) for r in result.matches]
            seen = {e.patient for e in entries if e.patient}
            dated: dict[str, datetime] = {}
            for patient, at in iter_cart_entries(entries, set(procs), set(drugs), datetime.min.replace(tzinfo=UTC)):
                dated[patient] = max(dated.get(patient, at), at)
            for patient in seen:
                # undated or locally coded administrations the server matched: the window start
                when = iso(max(dated[patient], not_before) if patient in dated else now) or ""
                found[patient] = max(found.get(patient, when), when)
    return found, server_time


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


def scope_of(explicit: list[str] | None, group_id: str | None) -> str:
    """The state-store key of a cohort's high-water mark: each cohort has its own, so a run over
    another cohort never advances it past changes this one has not seen."""
    if group_id:
        return f"group:{group_id}"
    if explicit is not None:
        return "patients:" + hashlib.sha256("\n".join(sorted(set(explicit))).encode()).hexdigest()[:16]
    return "discover"


def has_changes(client: Any, patient: str, since: str) -> bool:
    """Any Patient/Observation/MedicationAdministration/Procedure/Condition updated after
    `since`? Conditions last, read rather than counted: the grade Conditions fhir-crs itself
    wrote are not changes (a count would re-read every written patient every night)."""
    for rtype in CHANGE_TYPES:
        res = client.search(rtype, [("patient", patient), ("_lastUpdated", "gt" + since), ("_summary", "count")], no_cache=True)
        if (res.total or 0) > 0 or res.matches:
            return True
    res = client.search("Patient", [("_id", patient), ("_lastUpdated", "gt" + since), ("_summary", "count")], no_cache=True)
    if (res.total or 0) > 0 or res.matches:
        return True
    res = client.search("Condition", [("patient", patient), ("_lastUpdated", "gt" + since)], no_cache=True)
    return any(not is_own_output(r) for r in res.matches)


def _shared(entry: FeedEntry) -> bool:
    """A feed entry of a type outside the patient compartment (Medication)."""
    return entry.ref.split("/", 1)[0] in SHARED_TYPES


def _later(a: FeedEntry, b: FeedEntry) -> bool:
    """Is feed entry `a` a later version of its resource than `b` (numeric versionIds, else the
    time it was written; a deletion wins a tie)?"""
    if a.version and b.version and a.version.isdigit() and b.version.isdigit() and a.version != b.version:
        return int(a.version) > int(b.version)
    if a.last_updated and b.last_updated and a.last_updated != b.last_updated:
        return a.last_updated > b.last_updated
    return a.deleted and not b.deleted


def _high_water(resources: Iterable[dict[str, Any]]) -> str | None:
    stamps = [((r.get("meta") or {}).get("lastUpdated")) for r in resources]
    stamps = [s for s in stamps if isinstance(s, str)]
    return max(stamps) if stamps else None


def _fates(record: CaseRecord, fetched: list[dict[str, Any]] | None) -> dict[str, str]:
    """What became of each infusion record of a vanished case, from what tonight read (`fetched`)."""
    from .mappers.status import normalise

    by_ref = {f"{r.get('resourceType')}/{r.get('id')}": r for r in fetched or () if isinstance(r, dict)}
    out = {}
    for ref in record.infusion_refs:
        r = by_ref.get(ref)
        if fetched is None:
            out[ref] = "is no longer found as a CAR-T infusion on the server"
        elif r is None:
            out[ref] = "was deleted (no longer found on the server)"
        elif normalise(str(r.get("status") or "")) == "entered-in-error":
            out[ref] = "was marked entered-in-error"
        else:
            out[ref] = "no longer starts a CAR-T infusion at that time (moved to another time, or its status or code changed)"
    return out


def _result_hash(case_json: list[dict[str, Any]]) -> str:
    keep = [{k: c[k] for k in ("patient", "infusion", "crs", "icans", "adjacent")} for c in case_json]
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()


def _medication_refs(resources: Iterable[dict[str, Any]]) -> dict[str, str | None]:
    """`Medication/id` -> meta.versionId ("" without one; None when it was not read: deleted or
    missing) of every server Medication a graded MedicationAdministration references
    (`medicationReference`; contained `#id` ones are part of the administration)."""
    from .mappers.common import split_reference

    resources = list(resources)
    read: dict[str, str] = {}
    for r in resources:
        if r.get("resourceType") == "Medication" and isinstance(r.get("id"), str):
            read[f"Medication/{r['id']}"] = version_id(r) or ""
    out: dict[str, str | None] = {}
    for r in resources:
        if r.get("resourceType") != "MedicationAdministration":
            continue
        ref = (r.get("medicationReference") or {}).get("reference") if isinstance(r.get("medicationReference"), dict) else None
        target = split_reference(ref) if isinstance(ref, str) and not ref.startswith("#") else None
        if target is not None and target[0] == "Medication":
            key = f"Medication/{target[1]}"
            out[key] = read.get(key)
    return out


def _refs(resources: Iterable[dict[str, Any]]) -> dict[str, str | None]:
    """`Type/id` -> meta.versionId of what was graded (the change feed's de-duplication key)."""
    out: dict[str, str | None] = {}
    for r in resources:
        rtype, rid = r.get("resourceType"), r.get("id")
        if isinstance(rtype, str) and isinstance(rid, str) and rid:
            out[f"{rtype}/{rid}"] = version_id(r)
    return out


@dataclass(slots=True)
class NightPlan:
    """What one night re-reads: `targets` None = every patient gets the per-patient change check."""

    patients: list[str]
    targets: set[str] | None
    high_water: str | None  # the new cohort high-water mark (server clock, taken before any read)
    full_reason: str | None = None
    feed: FeedRead | None = None
    deleted: int = 0
    members: dict[str, str] = field(default_factory=dict)  # discovered cohort members to store
    retried: int = 0  # patients carried over from an unfinished night (re-read in full)


class Sync:
    def __init__(self, client: Any, cfg: Any, settings: GradingSettings, state: StateStore,
                 dry_run: bool = False, since: str | None = None,
                 progress: Callable[[str, int, int, int], None] | None = None,
                 allow_convention_change: bool = False, stop: StopSignal | None = None, full: bool = False):
        self.client, self.cfg, self.settings, self.state = client, cfg, settings, state
        self.code_map = load_code_map(Path(cfg.mappings) if cfg.mappings else None)
        self.full = full
        from .conventions import current_conventions

        # a night graded with other settings or tables re-reads everyone (the stored results are stale)
        self.conventions = current_conventions(settings, self.code_map.directory).sha256
        self.dry_run = dry_run
        self.allow_convention_change = allow_convention_change
        self.stop = stop or StopSignal()
        self.since = since
        self.progress = progress or (lambda patient, done, total, errors: None)
        self.summary = SyncSummary(dry_run=dry_run)
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._unwritten: set[str] = set()  # patients of this run that failed or were not reached

    def _lock_for(self, patient: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(patient, threading.Lock())

    # ------------------------------------------------------------------ the nightly run

    def plan(self, explicit: list[str] | None, scope: str) -> NightPlan:
        """Which patients tonight re-reads, from the cohort-level change feed (issue 13).

        `explicit`: the --patients / --group members; None: the discovered cohort, kept in the
        state store (re-discovered on full nights; new CAR-T administrations in the feed add
        patients in between). Full re-read (every patient fetched): the first run of `scope`,
        `--full`, or the periodic reconciliation (`reconcile_days`). Otherwise one feed read since
        the stored high-water mark minus `sync_overlap_seconds`, de-duplicated against the
        versions graded last time; a server without a feed gets the per-patient check."""
        cfg = self.cfg
        lookback = float(getattr(cfg, "lookback_days", 120.0))
        now = datetime.now(UTC)
        feed = ChangeFeed(self.client, getattr(cfg, "change_feed", "auto"))
        high_water, last_full, graded_with = self.state.feed(scope)
        retry = self.state.retry(scope) if self.since is None else None
        if retry is not None:  # an unfinished night: continue from it (its mark, its settings)
            high_water, last_full, graded_with = retry.high_water, retry.last_full, retry.conventions
        reconcile_days = float(getattr(cfg, "reconcile_days", 7.0))
        due = bool(reconcile_days and last_full and (parse_instant(last_full) or now) <= now - timedelta(days=reconcile_days))
        full_reason = ("--full" if self.full else "first run" if high_water is None
                       else "settings or mapping tables changed" if graded_with != self.conventions
                       else f"periodic reconciliation (every {reconcile_days:g} days)" if due else None)
        not_before = now - timedelta(days=lookback)
        if not feed.available():
            patients = explicit if explicit is not None else self._with_written(
                discover_cohort(self.client, self.code_map, lookback), not_before)
            return NightPlan(patients, set(patients) if self.full else None, None, "--full" if self.full else None)
        if self.since and not self.full:
            full_reason = None  # --since: the changes after that instant, whatever the stored state
            if explicit is None and not self.state.has_cohort(scope):
                members, _ = discover_members(self.client, self.code_map, lookback, now)
                if not self.dry_run:
                    self.state.set_cohort(scope, members, replace=True)
                cohort_now = set(members)
            else:
                cohort_now = set(explicit) if explicit is not None else set(self.state.cohort(scope, now - timedelta(days=lookback)))
            read = feed.read(self.since)
            if explicit is None:
                cohort_now = set(self._with_written(cohort_now, not_before))
            patients = sorted(cohort_now) if explicit is None else explicit
            compartment = [e for e in read.entries if not _shared(e)]
            graded = self.state.graded(e.ref for e in compartment if e.patient is None)
            targets = {e.patient or graded.get(e.ref, ("",))[0] for e in compartment} & cohort_now
            med_targets, med_deleted = self._medication_changes(read.entries, cohort_now)
            targets |= self.state.pending(cohort_now)  # a write that may not have finished
            return NightPlan(patients, targets | med_targets, None, None, read,
                             sum(1 for e in compartment if e.deleted and e.ref in graded) + len(med_deleted))
        if full_reason is not None or (explicit is None and not self.state.has_cohort(scope)):
            full_reason = full_reason or "first run"
            if explicit is None:
                members, server_time = discover_members(self.client, self.code_map, lookback, now)
                patients = self._with_written(members, not_before)
            else:
                members, patients = {}, explicit
                server_time = self._server_now()
            return NightPlan(patients, set(patients), server_time, full_reason, members=members)
        since = minus(high_water or "", float(getattr(cfg, "sync_overlap_seconds", 300.0)))
        read = feed.read(since)
        members = {}
        if explicit is None:
            procs, drugs = cart_codes(self.code_map)
            for patient, at in iter_cart_entries(read.entries, set(procs), set(drugs), now - timedelta(days=lookback)):
                members[patient] = max(members.get(patient, iso(at) or ""), iso(at) or "")
            cohort = self.state.cohort(scope, not_before)
            patients = self._with_written(set(cohort) | set(members), not_before)
        else:
            patients = explicit
        in_cohort = set(patients)
        graded = self.state.graded(e.ref for e in read.entries)
        targets: set[str] = set()
        deleted: set[str] = set()
        for e in read.entries:
            if _shared(e):
                continue  # Medication: below, through the administrations that reference it
            held = graded.get(e.ref)
            patient = e.patient or (held[0] if held else None)
            if patient is None or patient not in in_cohort:
                continue  # another patient's data, or a deletion of something never graded
            if e.deleted:
                if held is not None and version_newer(held[1], e.version):
                    # deleted, then created again under the same id, and that later version was
                    # graded; strictly later: a server that gives a deletion no version of its own
                    # names the last live one, which may be the one graded
                    continue
                if held is not None or e.ref.startswith("Patient/"):
                    deleted.add(e.ref)
                    targets.add(patient)
                    log.debug("re-read: %s deleted (version %s; graded %s)", e.ref, e.version, held)
                continue
            if held is not None and held[0] == patient and version_newer_or_same(held[1], e.version):
                continue  # this version was graded (the overlap re-reads the previous night's end)
            targets.add(patient)
            log.debug("re-read: %s version %s (graded %s)", e.ref, e.version, held)
        med_targets, med_deleted = self._medication_changes(read.entries, in_cohort)
        targets |= med_targets
        deleted |= med_deleted
        targets |= in_cohort - self.state.known(in_cohort)  # new to the cohort, or never finished
        targets |= self.state.pending(in_cohort)  # a write that may not have finished
        retried = (retry.patients & in_cohort) if retry is not None else set()
        if retried:
            log.info("%d patient(s) the last run did not write are re-read in full", len(retried))
        targets |= retried
        return NightPlan(patients, targets, read.server_time, None, read, len(deleted), members, len(retried))

    def _with_written(self, discovered: Iterable[str], not_before: datetime) -> list[str]:
        """The discovered cohort plus the patients with a written case whose infusion is inside
        the look-back window: discovery no longer finds a patient whose only CAR-T infusion was
        deleted or entered-in-error, but that patient must still be re-read, so that what was
        written for the vanished case is retracted."""
        found = set(discovered)
        extra = self.state.case_patients(not_before) - found
        if extra:
            log.info("%d patient(s) with written cases are no longer found by CAR-T discovery: re-read for retraction",
                     len(extra))
        return sorted(found | extra)

    def _medication_changes(self, entries: list[FeedEntry], cohort: set[str] | None) -> tuple[set[str], set[str]]:
        """(cohort patients to re-read, deleted Medications that count) for the Medication entries
        of the feed: a changed or new version re-reads every cohort patient whose graded
        administrations reference it, unless that version was what they graded (the overlap); a
        deletion re-reads those that graded it while it existed (not those that already graded
        its absence). `cohort` None: every patient the state store knows (the Bulk path)."""
        latest: dict[str, FeedEntry] = {}
        for e in entries:  # each Medication's latest state in the feed (a PUT then a DELETE: deleted)
            if _shared(e) and (e.ref not in latest or _later(e, latest[e.ref])):
                latest[e.ref] = e
        users = self.state.medication_users(latest)
        targets: set[str] = set()
        deleted: set[str] = set()
        for e in latest.values():
            for patient, held in users.get(e.ref, ()):
                if cohort is not None and patient not in cohort:
                    continue
                if e.deleted:
                    if held is not None:
                        targets.add(patient)
                        deleted.add(e.ref)
                elif not version_newer_or_same(held, e.version):
                    targets.add(patient)
        return targets, deleted

    def _server_now(self) -> str | None:
        """The server's clock, from one tiny search (never the client's clock)."""
        return self.client.search("Patient", [("_count", "1"), ("_summary", "count")], no_cache=True).server_time

    def night(self, explicit: list[str] | None, scope: str) -> SyncSummary:
        """One nightly run: plan (cohort + change feed), re-read and re-grade the changed
        patients, then advance the cohort high-water mark — only when every changed patient was
        written (no error, no interruption, not a dry run), so nothing is skipped. A night that
        failed or was stopped records a Retry instead: the next night reads the feed from this
        night's mark and re-reads in full the patients it did not write (not the whole cohort,
        which a failed first run would otherwise cost every night until one ran clean). A night
        killed outright records nothing: the next one starts from the stored state."""
        plan = self.plan(explicit, scope)
        s = self.summary
        s.change_feed = "full" if plan.full_reason else (plan.feed.mode if plan.feed else "per-patient")
        s.deleted_resources = plan.deleted
        s.changed_patients = len(plan.targets) if plan.targets is not None else 0
        if plan.feed is not None:
            log.info("change feed (%s) since the last run: %d entries, %d patient(s) to re-read, %d deletion(s)",
                     plan.feed.mode, len(plan.feed.entries), len(plan.targets or ()), plan.deleted)
        summary = self.run(plan.patients, plan.targets)
        if plan.full_reason:
            s.reconciliation = {"reason": plan.full_reason, "patients": len(plan.patients),
                                "found_changed": s.changed}
            if plan.full_reason.startswith("periodic"):
                log.warning("periodic full reconciliation: %d of %d patient(s) had a changed result the change feed "
                            "had not reported", s.changed, len(plan.patients))
        last_full = iso(datetime.now(UTC)) if plan.full_reason else self.state.feed(scope)[1]
        ok = not s.errors and not self.stop.is_set() and not self.dry_run
        if plan.members and not self.dry_run:
            self.state.set_cohort(scope, plan.members, replace=plan.full_reason is not None and explicit is None)
        if ok and plan.high_water and self.since is None:
            self.state.set_feed(scope, plan.high_water, last_full, self.conventions)
            s.high_water = plan.high_water
        else:
            s.high_water = self.state.feed(scope)[0]
            if plan.high_water and not ok and self.since is None and not self.dry_run:
                unwritten = frozenset(self._unwritten)
                self.state.set_retry(scope, Retry(plan.high_water, last_full, self.conventions, unwritten))
                s.retry_patients = len(unwritten)
                log.warning("the cohort high-water mark is not advanced (%s): the next run reads the changes since this "
                            "run started and re-reads in full the %d patient(s) not written tonight",
                            "interrupted" if self.stop.is_set() else "errors", len(unwritten))
            elif plan.high_water and not ok:
                log.warning("the cohort high-water mark is not advanced (%s)", "dry run" if self.dry_run else "--since")
        self.state.finish_run(self._run_id, self._status(), s.to_json())
        return summary

    def run(self, patients: list[str], targets: set[str] | None = None) -> SyncSummary:
        """Sync `patients`: those in `targets` are re-read and re-graded, the others counted
        unchanged without a request; `targets` None: each gets the per-patient change check."""
        t0 = time.monotonic()
        run_id, resumed = self.state.start_run()
        self._run_id = run_id
        self.summary.resumed = resumed
        if resumed:
            log.warning("the previous sync run did not finish; this run completes it")
        self.summary.patients = len(patients)
        note_patient_id(*patients)
        done = 0
        todo = patients if targets is None else [p for p in patients if p in targets]
        if targets is not None:
            self._count(unchanged=len(patients) - len(todo))
            done = len(patients) - len(todo)
        with ThreadPoolExecutor(max_workers=max(1, self.cfg.workers)) as pool:
            futures = {pool.submit(self.sync_patient, p, targets is not None): p for p in todo}
            for fut in as_completed(futures):
                p = futures[fut]
                try:
                    fut.result()
                except Interrupted:
                    self.summary.not_done += 1  # left for the next run (no write was started)
                    self._unwritten.add(p)
                except FhirCrsError as exc:
                    self.summary.errors.append({"patient": f"Patient/{p}", "error": str(exc)})
                    self._unwritten.add(p)
                    log.error("Patient/%s: %s", p, exc)
                except Exception as exc:  # a bug must not stop the other patients
                    self.summary.errors.append({"patient": f"Patient/{p}", "error": f"{type(exc).__name__}: {exc}"})
                    self._unwritten.add(p)
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
        self.state.finish_run(run_id, self._status(), self.summary.to_json())
        return self.summary

    def _status(self) -> str:
        if self.stop.is_set():
            return "interrupted"
        return "failed" if self.summary.errors else "ok"

    def sync_patient(self, patient: str, force: bool = False) -> None:
        with self._lock_for(patient):
            self.stop.check()  # a stop was requested: this patient is not started
            prior = self.state.get(patient)
            since = self.since or (prior or {}).get("high_water")
            unfinished = prior is not None and prior.get("result_hash") is None  # a write that may not have finished
            if not force and not unfinished and since and (prior is not None or self.since) \
                    and not has_changes(self.client, patient, since):
                self._count(unchanged=1)
                if not self.dry_run:
                    self.state.touch(patient)
                return
            self.stop.check()
            resources = fetch_patient(self.client, patient, self.cfg, self.code_map, self.settings)
            self.stop.check()
            run = grade_resources(resources, self.settings, self.code_map.directory, origin=f"Patient/{patient}")
            self.commit(patient, run.cases, run.skipped, _high_water(resources) or since, prior, _refs(resources),
                        _medication_refs(resources), fetched=resources)

    def commit(self, patient: str, cases: list[Any], skipped: list[Any], high_water: str | None,
               prior: dict[str, Any] | None, refs: dict[str, str | None] | None = None,
               medications: dict[str, str | None] | None = None,
               fetched: Iterable[dict[str, Any]] | None = None) -> None:
        """Write back one patient's graded cases if the result changed, retract the written cases
        that no longer exist (their infusion vanished: `fetched`, what was read, says how), then
        record the state.

        The state row is written only after every write succeeded (resumability)."""
        from .writeback import identifiers

        case_json = [c.to_json(self.settings) for c in cases]
        with self._guard:
            self.summary.graded += 1
            self.summary.cases.extend(case_json)
            self.summary.graded_cases.extend(cases)
            for s in skipped:
                self.summary.skipped[s.code] += 1
        new_hash = _result_hash(case_json)
        gone = self._gone(patient, prior, {c["infusion"] for c in case_json})
        if prior is not None and prior.get("result_hash") == new_hash and not gone:
            self._count(unchanged=1)
            if not self.dry_run:
                self.state.put(patient, high_water, new_hash, prior.get("grades") or "", refs, medications)
            return
        self._count(changed=1)
        if prior is not None and prior.get("result_hash") and not self.dry_run:
            self.state.write_pending(patient)
        written_cases: list[CaseRecord] = []
        for case, cj in zip(cases, case_json, strict=True):
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
            if outcome.written and outcome.status in ("created", "updated", "unchanged"):
                written_cases.append(CaseRecord(patient, cj["infusion"], identifiers(case, self.cfg.identifier_system),
                                                tuple(dict.fromkeys(r.split("/_history", 1)[0]
                                                                    for r in cj.get("infusion_evidence") or ()))))
        fetched = list(fetched) if fetched is not None else None
        for record in gone:  # after the new cases: a moved infusion's new case is written first
            self.stop.check()
            outcome = retract_case(self.client, record, self.settings, self.code_map.directory, _fates(record, fetched),
                                   dry_run=self.dry_run, before_write=self.stop.check)
            with self._guard:
                if outcome.status == "dry-run":
                    self.summary.would_write.extend({"patient": outcome.patient, "infusion": outcome.infusion, **change}
                                                    for change in outcome.changes)
                elif outcome.status == "retracted":
                    self.summary.retracted_cases += 1
                    for ref in outcome.written.values():
                        self.summary.written[ref.split("/", 1)[0]] += 1
            if outcome.status == "retracted":
                log.warning("Patient/%s: the case of the CAR-T infusion at %s is gone from the server; what was written for "
                            "it is retracted (entered-in-error): %s", patient, record.infusion,
                            ", ".join(v for k, v in outcome.written.items() if k != "provenance"))
        if not self.dry_run:
            grades = json.dumps({c["infusion"]: {"crs": c["crs"]["astct"]["grade"], "icans": c["icans"]["astct"]["grade"]}
                                 for c in case_json})
            self.state.put(patient, high_water, new_hash, grades, refs, medications, cases=written_cases)

    def _gone(self, patient: str, prior: dict[str, Any] | None, infusions: set[str]) -> list[CaseRecord]:
        """The written cases of `patient` whose infusion is not among tonight's `infusions`. A
        state store from before cases were recorded: the infusions of its stored grades (their
        identifiers from the patient and the infusion start)."""
        from .writeback.build import case_identifiers

        recorded = self.state.cases(patient)
        if not recorded and prior is not None and prior.get("grades"):
            try:
                old = json.loads(prior["grades"])
            except ValueError:
                old = {}
            for inf in old if isinstance(old, dict) else ():
                at = parse_instant(inf)
                if at is not None:
                    recorded[inf] = CaseRecord(patient, inf, case_identifiers(patient, at, self.cfg.identifier_system))
        return [r for inf, r in sorted(recorded.items()) if inf not in infusions]

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
    sync.summary.change_feed = "bulk"
    run_id, resumed = state.start_run()
    sync.summary.resumed = resumed
    for message in exporter.error_messages(manifest):
        sync.summary.errors.append({"patient": "(bulk export)", "error": message})
    done = 0
    try:
        if since is None:
            from .changefeed import patient_of

            mapper = ResourceMapper(sync.code_map)
            # what each patient's grading read (Type/id -> version), staged on disk as it streams by,
            # so that a later run's history DELETEs or deleted[] files find what they delete
            staged: list[tuple[str, str, str | None]] = []
            staged_meds: list[tuple[str, str]] = []
            med_versions: dict[str, str] = {}  # Medication/id -> versionId ("" without one), as read
            exported: set[str] = set()
            for rtype, item in items:
                stop.check()
                if rtype is None:
                    mapper.add(Skipped(str(item), "unusable NDJSON line", "invalid_json"))
                else:
                    if rtype == "Patient":
                        note_patient(item)  # its names, MRN and birth date never reach a log line
                    owner = patient_of(item) if isinstance(item, dict) else None
                    vid = version_id(item) if isinstance(item, dict) else None
                    if rtype == "Medication" and isinstance(item.get("id"), str):
                        med_versions[f"Medication/{item['id']}"] = vid or ""
                    if owner is not None and isinstance(item.get("id"), str) and not is_own_output(item):
                        exported.add(owner)
                        staged.append((f"{rtype}/{item['id']}", owner, vid))
                        if rtype == "MedicationAdministration":
                            staged_meds += [(m, owner) for m in _medication_refs([item])]
                        if len(staged) >= 5000:
                            state.stage_refs(staged, staged_meds)
                            staged, staged_meds = [], []
                    mapper.add(SourceResource(item, f"bulk:{rtype}"))
            if staged or staged_meds:
                state.stage_refs(staged, staged_meds)
            for ref in mapper.missing_medications():
                try:
                    med = client.read(*ref.split("/", 1))
                    med_versions[ref] = version_id(med) or ""
                    mapper.add(SourceResource(med, f"read:{ref}"))
                except FhirCrsError as exc:
                    log.warning("%s referenced by a MedicationAdministration could not be read: %s", ref, exc)
            graded = grade_mapping(mapper.finish(), settings, mapper.count)
            for s in graded.skipped:
                sync.summary.skipped[s.code] += 1
            by_patient: dict[str, list[Any]] = {}
            for case in graded.cases:
                by_patient.setdefault(case.timeline.patient.split("/", 1)[1], []).append(case)
            # a patient of the export with a case written earlier but none tonight: its infusion
            # vanished (deleted or entered-in-error), so what was written is retracted
            for patient in sorted((state.case_patients() & exported) - set(by_patient)):
                by_patient[patient] = []
            sync.summary.patients = len(by_patient)
            for patient, cases in sorted(by_patient.items()):
                try:
                    sync.commit(patient, cases, [], manifest.transaction_time, state.get(patient),
                                refs=state.staged_refs(patient),
                                medications={m: med_versions.get(m) for m in state.staged_medications(patient)})
                except FhirCrsError as exc:
                    sync.summary.errors.append({"patient": f"Patient/{patient}", "error": str(exc)})
                done += 1
        else:
            touched: set[str] = set()
            med_entries: list[FeedEntry] = []  # Medications: through the administrations that graded them
            for rtype, item in items:
                stop.check()
                if rtype is None or not isinstance(item, dict):
                    continue
                if rtype == "Patient" and isinstance(item.get("id"), str):
                    touched.add(item["id"])
                if rtype == "Medication" and isinstance(item.get("id"), str):
                    med_entries.append(FeedEntry(f"Medication/{item['id']}", version_id(item), None, resource=item))
                    continue
                if is_own_output(item):
                    continue  # a grade this sync wrote: not a change of the data
                ref = (item.get("subject") or item.get("patient") or {}).get("reference", "") if isinstance(item.get("subject") or item.get("patient"), dict) else ""
                if ref.startswith("Patient/"):
                    touched.add(ref.split("/", 1)[1])
            # Bulk Data 2.0 `deleted[]`: a deletion of a graded resource re-grades its patient
            deleted_refs: list[str] = []
            for rtype, rid in exporter.iter_deleted(manifest):
                if rtype is None:
                    sync.summary.errors.append({"patient": "(bulk export)", "error": f"deleted[] file: {rid}"})
                elif rtype == "Medication":
                    med_entries.append(FeedEntry(f"Medication/{rid}", None, None, deleted=True))
                else:
                    deleted_refs.append(f"{rtype}/{rid}")
            # a patient-level export carries no Medication (outside the Patient compartment): its
            # changes and deletions since the last export come from the server's Medication feed
            # (one history or _lastUpdated read), so a re-coded or deleted Medication re-grades
            # exactly the patients whose administrations graded it
            med_entries += ChangeFeed(client, getattr(cfg, "change_feed", "auto")).read_shared(
                minus(since, float(getattr(cfg, "sync_overlap_seconds", 300.0))))
            med_targets, med_deleted = sync._medication_changes(med_entries, None)
            touched |= med_targets
            sync.summary.deleted_resources += len(med_deleted)
            graded = state.graded(deleted_refs)
            for ref in deleted_refs:
                if ref in graded:
                    touched.add(graded[ref][0])
                    sync.summary.deleted_resources += 1
                elif ref.startswith("Patient/"):
                    touched.add(ref.split("/", 1)[1])
                    sync.summary.deleted_resources += 1
            sync.summary.patients = len(touched)
            sync.summary.changed_patients = len(touched)
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
