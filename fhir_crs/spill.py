"""Flat-memory grading of large inputs (a Bulk export of thousands of patients).

The mappers' output goes to partitions on disk instead of memory (`SpillStore`): first by
Type/id (so that the latest version of each resource can be picked one partition at a time),
then by patient. Grading reads one patient partition at a time — a bounded number of patients'
events — and writes each patient's cases as finished JSON to a per-partition file;
`write_grade_json` streams the grade contract from those files in patient order. What stays in
memory for the whole run is per patient a few bytes of index (file, offset, length) and its
flag set, never its events.

Partition files are pickles of (patient, event) batches written by this process for itself in a
private temporary directory, read back only by it (or its worker processes) and deleted at exit.
"""

from __future__ import annotations

import dataclasses
import heapq
import operator
import pickle
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import orjson

from .events import Event, Skipped

# events buffered in memory before a spill; ~0.4 KiB each
SPILL_EVENTS = 20_000
SPILL_SKIPS = 5_000
# input bytes per partition: about 25-40 patients of a full ICU course each
PARTITION_INPUT_BYTES = 12_000_000
MAX_PARTITIONS = 4096


class _Codec:
    """Events as (type number, field values) for the partition files: pickling a frozen slots
    dataclass goes through dataclasses' generic __getstate__ (a fields() walk per object),
    several times slower than taking the values with one attrgetter and calling the class."""

    def __init__(self) -> None:
        from .events import DrugGiven, Finding, Measurement, PatientInfo, ProcedureDone

        self.types: list[type] = []
        self._get: dict[type, tuple[int, Any]] = {}
        for cls in (Measurement, Finding, DrugGiven, ProcedureDone, PatientInfo):  # the same numbers in every process
            self._register(cls)

    def _register(self, cls: type) -> tuple[int, Any]:
        names = [f.name for f in dataclasses.fields(cls)]
        entry = self._get[cls] = (len(self.types), operator.attrgetter(*names))
        self.types.append(cls)
        return entry

    def encode(self, e: Any) -> tuple[int, tuple[Any, ...]]:
        entry = self._get.get(type(e))
        if entry is None:
            entry = self._register(type(e))
        code, getter = entry
        return code, getter(e)

    def decode(self, code: int, values: tuple[Any, ...]) -> Any:
        return self.types[code](*values)


def partition_of(patient: str, partitions: int) -> int:
    """Stable across processes and runs (unlike hash())."""
    return zlib.crc32(patient.encode()) % partitions


def partitions_for(input_bytes: int) -> int:
    return max(1, min(MAX_PARTITIONS, input_bytes // PARTITION_INPUT_BYTES + 1))


def _append_pickle(path: Path, value: Any) -> None:
    with path.open("ab") as fh:
        pickle.dump(value, fh, protocol=pickle.HIGHEST_PROTOCOL)


def _read_pickles(path: Path) -> Iterator[Any]:
    if not path.exists():
        return
    with path.open("rb") as fh:
        while True:
            try:
                yield pickle.load(fh)
            except EOFError:
                return


_FIRST = operator.itemgetter(0)
_NO_TIME = float("-inf")  # the lastUpdated part of the version key of a resource without one


def _usual(rec: tuple[str, int, str]) -> tuple[Any, ...]:
    """The five-field copy record of a three-field one (no versionId, no lastUpdated)."""
    ref, seq, patient = rec
    return ref, (-1, _NO_TIME, seq), None, ref, patient


class SkipLog:
    """The list of skips, kept on disk past `SPILL_SKIPS` entries. Supports what the mappers do
    with a list (append, len, dropping the entries of the resource being mapped) and iteration
    in order. `spill()` is called between resources only, so a rollback never reaches the disk."""

    def __init__(self, path: Path):
        self.path = path
        self._tail: list[Skipped] = []
        self._on_disk = 0

    def append(self, s: Skipped) -> None:
        self._tail.append(s)

    def __len__(self) -> int:
        return self._on_disk + len(self._tail)

    def __delitem__(self, key: slice) -> None:
        if not isinstance(key, slice) or key.step is not None or (key.stop is not None and key.stop < len(self)):
            raise TypeError("SkipLog only drops its newest entries")
        start = key.start or 0
        if start < self._on_disk:
            raise IndexError("entries already written to disk")
        del self._tail[start - self._on_disk:]

    def extend(self, items: Iterable[Skipped]) -> None:
        self._tail.extend(items)

    def spill(self) -> None:
        if self._tail:
            _append_pickle(self.path, self._tail)
            self._on_disk += len(self._tail)
            self._tail = []

    def __iter__(self) -> Iterator[Skipped]:
        for batch in _read_pickles(self.path):
            yield from batch
        yield from self._tail


class SpillStore:
    """The flat-memory path's mapping result: every mapped copy of every resource goes to a
    Type/id-hash partition as the mapper hands it over (`spill_kept`); `settle()` then reads one
    Type/id partition at a time, lets the mapper pick each resource's winning version, and moves
    the winners' events to patient-hash partitions, the skips to runs sorted by input position.
    Only the patients' flag sets, and the source-level skips up to `SPILL_SKIPS`, stay in memory."""

    def __init__(self, directory: Path, partitions: int, tag: str = ""):
        """`tag` is added to the names of the copies / patients files this store writes: worker
        processes (parallel.py) each write their own, readers read every file of a partition."""
        self.directory = directory
        self.partitions = partitions
        self.tag = tag
        self.skipped = SkipLog(directory / "source-skips.pickle")  # what ResourceMapper.finish() extends
        self.flags: dict[str, set[str]] = {}
        self.codec = _Codec()
        self._copies: dict[int, list[tuple[str, Any]]] = {}
        self._buffered = 0
        self._patients: dict[int, list[tuple[Any, ...]]] = {}
        self._parts: dict[str, int] = {}  # patient -> partition (a patient's resources come together)
        self._lost: dict[int, list[int]] = {}  # patient partition -> input positions of copies struck from it
        self._patient_parts: set[int] = set()
        self._runs: dict[str, list[Path]] = {"superseded": [], "winners": []}

    def _path(self, kind: str, part: int, tag: str = "") -> Path:
        return self.directory / f"{kind}-{part:04d}{tag}.pickle"

    def _inputs(self, kind: str, part: int) -> list[Path]:
        """Every file of one partition, whichever process wrote it."""
        return sorted(self.directory.glob(f"{kind}-{part:04d}*.pickle"))

    # -- 1. map ---------------------------------------------------------------------------------
    def spill_kept(self, ref: str, kept: Any) -> None:
        """A mapped copy: its events go straight to its patient's partition (most copies are
        their resource's only one, so they never move again); what settling needs — version,
        skip, flags, a deferred MedicationAdministration — goes to its Type/id partition.
        A copy that later loses to another version is struck from the patient partition
        (`_lost`), never copied there again."""
        patient = kept.patient
        written = patient is not None and kept.skipped is None and kept.deferred is None
        if written:
            self._add_patient(kept)
        key = kept.key
        if written and not kept.flags:  # the usual copy: five fields (the rest are known)
            if kept.version is None and key[0] == -1 and key[1] == _NO_TIME and kept.ref == ref:
                rec: tuple[Any, ...] = (ref, key[2], patient)  # and without meta: three
            else:
                rec = (ref, key, kept.version, kept.ref, patient)
        else:
            enc = self.codec.encode
            rec = (ref, kept.key, kept.version, kept.ref, patient, [] if written else [enc(e) for e in kept.events],
                   kept.skipped, kept.flags or None, kept.deferred, written)
        part = zlib.crc32(ref.encode()) % self.partitions  # partition_of(ref, ...), inline
        copies = self._copies.get(part)
        if copies is None:
            self._copies[part] = [rec]
        else:
            copies.append(rec)
        self._buffered += 1

    def maybe_spill(self) -> None:
        """Between resources: write buffered copies / skips once the buffers are full."""
        if self._buffered >= SPILL_EVENTS:
            self._spill_copies()
            self._spill_patients()
        if len(self.skipped._tail) >= SPILL_SKIPS:
            self.skipped.spill()

    def _spill_copies(self) -> None:
        """Copy records: (ref, input position, patient) for a copy already in its patient partition
        with no flags and no version, (ref, key, version, cited, patient) for one with a version,
        else (..., events, skip, flags, deferred, in a patient partition)."""
        for part, items in self._copies.items():
            _append_pickle(self._path("copies", part, self.tag), items)
        self._copies.clear()
        self._buffered = 0

    # -- 2. settle ------------------------------------------------------------------------------
    def settle(self, mapper: Any) -> None:
        """Each Type/id's winner (`mapper.settle`), one Type/id partition at a time."""
        self._spill_copies()
        self._spill_patients()
        self.skipped.spill()
        for part in range(self.partitions):
            self.settle_partition(mapper, part)
        self._spill_patients()

    def settle_partition(self, mapper: Any, part: int) -> None:
        """One Type/id partition: O(copies); the events stay encoded (only a deferred
        MedicationAdministration is mapped here, its new events encoded in `_add_patient`)."""
        from .mappers import _Kept

        groups: dict[str, list[Any]] = {}
        paths = self._inputs("copies", part)
        for path in paths:
            for batch in _read_pickles(path):
                for rec in batch:
                    group = groups.get(rec[0])
                    if group is None:
                        groups[rec[0]] = [rec]
                    else:
                        group.append(rec)
            path.unlink(missing_ok=True)
        superseded: list[tuple[int, Skipped]] = []
        winners: list[tuple[int, Skipped]] = []
        flags = self.flags
        for ref, recs in groups.items():
            if len(recs) == 1 and len(recs[0]) <= 5:  # the usual copy: its resource's only one, in its patient partition
                mapper.mapped += 1
                continue
            recs = [r if len(r) > 5 else (*(r if len(r) == 5 else _usual(r)), [], None, None, None, True) for r in recs]
            if len(recs) == 1 and recs[0][8] is None:  # one copy, nothing deferred: it wins as it is
                _, key, _, _, patient, _, skipped, fl, _, written = recs[0]
                if skipped is None:
                    mapper.mapped += 1
                    if patient is not None and not written:
                        self._add_patient(_Kept(key, recs[0][2], recs[0][3], patient, recs[0][5]))
                else:
                    winners.append((key[2], skipped))
                if patient is not None and fl:
                    flags.setdefault(patient, set()).update(fl)
                continue
            if len(recs) > 1 and len(paths) > 1:  # copies from several processes: back in input order
                recs.sort(key=lambda r: r[1][2])
            copies = [_Kept(key, version, cited, patient, events, skipped, set(fl) if fl else set(), deferred)
                      for _, key, version, cited, patient, events, skipped, fl, deferred, _ in recs]
            written = {r[1][2]: r[4] for r in recs if r[9]}  # input position -> patient, of copies already in a patient partition
            w, lost = mapper.settle(ref, copies)
            superseded += lost
            for k in copies:  # (`lost` names each skip at its place in the input, not always the loser's)
                seq = k.key[2]
                if seq in written and (k is not w or w.skipped is not None):
                    self._lost.setdefault(partition_of(written[seq], self.partitions), []).append(seq)
            if w.patient is not None and w.flags:
                flags.setdefault(w.patient, set()).update(w.flags)
            if w.skipped is not None:
                winners.append((w.key[2], w.skipped))
            elif w.patient is not None and w.key[2] not in written:
                self._add_patient(w)
        self._write_run("superseded", part, superseded)
        self._write_run("winners", part, winners)
        if self._buffered >= SPILL_EVENTS:
            self._spill_patients()

    def _add_patient(self, w: Any) -> None:
        patient, events = w.patient, w.events
        part = self._parts.get(patient)
        if part is None:
            if len(self._parts) >= 65_536:
                self._parts.clear()
            part = self._parts[patient] = partition_of(patient, self.partitions)
        if len(events) == 1 and type(events[0]) is not tuple:  # the usual copy: one event
            encoded = [self.codec.encode(events[0])]
        else:
            enc = self.codec.encode
            encoded = [e if type(e) is tuple else enc(e) for e in events]
        records = self._patients.get(part)
        if records is None:
            records = self._patients[part] = []
        records.append((w.key[2], patient, w.ref, encoded))
        self._buffered += 1 + len(events)

    def _spill_patients(self) -> None:
        for part, items in self._patients.items():
            _append_pickle(self._path("patients", part, self.tag), items)
            self._patient_parts.add(part)
        self._patients.clear()
        for part, seqs in self._lost.items():
            _append_pickle(self._path("lost", part, self.tag), seqs)
        self._lost.clear()
        self._buffered = 0

    def _write_run(self, kind: str, part: int, items: list[tuple[int, Skipped]]) -> None:
        if not items:
            return
        items.sort(key=_FIRST)
        path = self._path(kind, part)
        for i in range(0, len(items), SPILL_SKIPS):
            _append_pickle(path, items[i:i + SPILL_SKIPS])
        self._runs[kind].append(path)

    # -- 3. grade -------------------------------------------------------------------------------
    def patient_partitions(self) -> list[int]:
        """The patient partitions on disk, whichever process wrote them (the map stage writes
        its copies' events there, settling only what it maps or moves itself)."""
        self._patient_parts.update(int(p.name[9:13]) for p in self.directory.glob("patients-*.pickle"))
        return sorted(self._patient_parts)

    def load_patients(self, part: int) -> tuple[dict[str, list[Event]], dict[str, list[str]]]:
        """The events and resource refs of one patient partition, each patient's in input order."""
        types = self.codec.types
        lost = {seq for path in self._inputs("lost", part) for batch in _read_pickles(path) for seq in batch}
        records = [r for path in self._inputs("patients", part) for batch in _read_pickles(path) for r in batch]
        if lost:
            records = [r for r in records if r[0] not in lost]
        records.sort(key=_FIRST)
        events: dict[str, list[Event]] = {}
        sources: dict[str, list[str]] = {}
        for _seq, patient, ref, evs in records:
            refs = sources.get(patient)
            if refs is None:
                refs = sources[patient] = []
            refs.append(ref)
            if evs:  # a patient is graded when it has events (as in MappingResult.events)
                mine = events.get(patient)
                if mine is None:
                    mine = events[patient] = []
                for c, v in evs:
                    mine.append(types[c](*v))
        return events, sources

    def drop_patients(self, part: int) -> None:
        for path in self._inputs("patients", part) + self._inputs("lost", part):
            path.unlink(missing_ok=True)

    def skips(self, tail: Iterable[Skipped]) -> Iterator[Skipped]:
        """Every skip in the order ResourceMapper.finish() + grade_mapping() list them: source
        level, superseded copies, the winners' own skips (each by input position), then `tail`."""
        yield from self.skipped
        for kind in ("superseded", "winners"):
            runs = [(s for batch in _read_pickles(p) for s in batch) for p in self._runs[kind]]
            for _, s in heapq.merge(*runs, key=lambda x: x[0]):
                yield s
        yield from tail


def grade_partition(store: SpillStore, part: int, settings: Any, series: bool,
                     out_path: Path) -> tuple[dict[str, tuple[int, int]], list[tuple[str, list[Skipped]]], int]:
    """Grade one patient partition; its cases go to `out_path` as JSON rendered for the `cases`
    list. Returns ({patient: (offset, length)}, [(patient, no-infusion skips)], cases)."""
    from .grading.case import grade_events

    events, sources = store.load_patients(part)
    index: dict[str, tuple[int, int]] = {}
    skips: list[tuple[str, list[Skipped]]] = []
    n = 0
    with out_path.open("wb") as fh:
        for patient, evs in events.items():
            graded, none_found = grade_events(patient, evs, store.flags.get(patient, set()), sources.get(patient, []), settings)
            if none_found:
                skips.append((patient, none_found))
            chunk = b",\n    ".join(nested_json(c.to_json(settings, series), 2) for c in graded)
            index[patient] = (fh.tell(), len(chunk))
            fh.write(chunk)
            n += len(graded)
    store.drop_patients(part)
    return index, skips, n

def nested_json(value: Any, level: int) -> bytes:
    """`value` as orjson OPT_INDENT_2 prints it `level` levels deep inside a larger document."""
    return orjson.dumps(value, option=orjson.OPT_INDENT_2).replace(b"\n", b"\n" + b"  " * level)


def _write_list(out: IO[bytes], key: str, chunks: Iterable[bytes], last: bool = False) -> None:
    """`"key": [...]` of an indent-2 object, from items already rendered at level 2."""
    out.write(b'  "' + key.encode() + b'": [')
    empty = True
    for chunk in chunks:
        out.write(b"\n    " if empty else b",\n    ")
        out.write(chunk)
        empty = False
    out.write(b"]" if empty else b"\n  ]")
    out.write(b"\n" if last else b",\n")


def write_grade_json(out: IO[bytes], cases: Iterable[bytes], skipped: Iterable[dict[str, Any]],
                     rest: Callable[[int], dict[str, Any]]) -> None:
    """The grade contract, byte for byte what `orjson.dumps(run.to_json(), OPT_INDENT_2)` + a
    newline prints, written piece by piece: `cases` are cases rendered by `nested_json(c, 2)`;
    `rest(number of skips)` gives the keys that follow the skip list, in order."""
    out.write(b"{\n")
    _write_list(out, "cases", cases)
    n = 0

    def counted() -> Iterator[bytes]:
        nonlocal n
        for s in skipped:
            n += 1
            yield nested_json(s, 2)

    _write_list(out, "skipped", counted())
    tail = rest(n)
    for i, (key, value) in enumerate(tail.items()):
        out.write(b'  "' + key.encode() + b'": ' + nested_json(value, 1) + (b"\n" if i == len(tail) - 1 else b",\n"))
    out.write(b"}\n")
