"""Flat-memory grading of large inputs (a Bulk export of thousands of patients).

The mappers' events go to patient-hash partitions on disk instead of one in-memory dict
(`SpillingResult`); the skip list goes to a log on disk as it grows (`SkipLog`). Grading then
reads one partition at a time — a bounded number of patients' events — and writes each patient's
cases as finished JSON to a per-partition file; `write_grade_json` streams the grade contract
from those files in patient order. What stays in memory for the whole run is per patient a few
bytes of index (file, offset, length) and its flag set, never its events.

Partition files are pickles of (patient, event) batches written by this process for itself in a
private temporary directory, read back only by it (or its worker processes) and deleted at exit.
"""

from __future__ import annotations

import dataclasses
import operator
import pickle
import zlib
from collections.abc import Iterable, Iterator
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
        self.types: list[type] = []
        self._get: dict[type, tuple[int, Any]] = {}

    def encode(self, e: Any) -> tuple[int, tuple[Any, ...]]:
        entry = self._get.get(type(e))
        if entry is None:
            cls = type(e)
            names = [f.name for f in dataclasses.fields(cls)]
            entry = self._get[cls] = (len(self.types), operator.attrgetter(*names))
            self.types.append(cls)
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

    def spill(self) -> None:
        if self._tail:
            _append_pickle(self.path, self._tail)
            self._on_disk += len(self._tail)
            self._tail = []

    def __iter__(self) -> Iterator[Skipped]:
        for batch in _read_pickles(self.path):
            yield from batch
        yield from self._tail


class SpillingResult:
    """A `MappingResult` whose events live in patient-hash partition files."""

    def __init__(self, directory: Path, partitions: int, tag: str = ""):
        self.directory = directory
        self.partitions = partitions
        self.tag = tag
        self.skipped = SkipLog(directory / f"skipped{tag}.pickle")
        self.flags: dict[str, set[str]] = {}
        self.patients: set[str] = set()  # patients with at least one event
        self._buffers: dict[int, list[tuple[str, Event]]] = {}
        self._buffered = 0
        self._part_cache: dict[str, int] = {}
        self.codec = _Codec()

    def partition_path(self, part: int, tag: str | None = None) -> Path:
        return self.directory / f"events-{part:04d}{self.tag if tag is None else tag}.pickle"

    def partition_of(self, patient: str) -> int:
        part = self._part_cache.get(patient)
        return partition_of(patient, self.partitions) if part is None else part

    def add(self, patient: str, event: Event) -> None:
        part = self._part_cache.get(patient)
        if part is None:
            part = self._part_cache[patient] = partition_of(patient, self.partitions)
            self.patients.add(patient)
        self._buffers.setdefault(part, []).append((patient, event))
        self._buffered += 1

    def flag(self, patient: str, name: str) -> None:
        self.flags.setdefault(patient, set()).add(name)

    def maybe_spill(self) -> None:
        """Between resources: write buffered events / skips once the buffers are full."""
        if self._buffered >= SPILL_EVENTS:
            self.spill_events()
        if len(self.skipped._tail) >= SPILL_SKIPS:
            self.skipped.spill()

    def spill_events(self) -> None:
        enc = self.codec.encode
        for part, items in self._buffers.items():
            _append_pickle(self.partition_path(part), [(patient, *enc(e)) for patient, e in items])
        self._buffers.clear()
        self._buffered = 0

    def spill(self) -> None:
        self.spill_events()
        self.skipped.spill()


def load_partition(paths: Iterable[Path], types: list[type]) -> dict[str, list[Event]]:
    """The events of one partition grouped by patient, each patient's in input order (the files
    are given in input order); `types` is the writer's codec table (`SpillingResult.codec.types`)."""
    out: dict[str, list[Event]] = {}
    for path in paths:
        for batch in _read_pickles(path):
            for patient, code, values in batch:
                events = out.get(patient)
                if events is None:
                    events = out[patient] = []
                events.append(types[code](*values))
    return out


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
                     resources: int, settings: dict[str, Any]) -> None:
    """The grade contract, byte for byte what `orjson.dumps(run.to_json(), OPT_INDENT_2)` + a
    newline prints, written piece by piece: `cases` are cases rendered by `nested_json(c, 2)`."""
    out.write(b"{\n")
    _write_list(out, "cases", cases)
    _write_list(out, "skipped", (nested_json(s, 2) for s in skipped))
    out.write(b'  "resources_read": ' + orjson.dumps(resources) + b",\n")
    out.write(b'  "settings": ' + nested_json(settings, 1) + b"\n}\n")
