"""`fhir-crs grade PATH... --engine spark`: registry-scale grading on Apache Spark, running the
same pure per-patient core (core.py) as the local engine, in the executors.

    read (one task per file or per 64 MiB split of a plain NDJSON file)
      -> key each resource by its Type/id  --shuffle 1 (sorted)-->  one version per Type/id
      -> key each winner by its patient    --shuffle 2 (sorted)-->  core.grade_patient per patient
      -> cases and skips, sorted as the local engine lists them  ->  --json | --out DIR

Same answer as the local engine: the reading is sources.py's own code (one file's items, or one
split's lines, with the same origins and line numbers); the version rule is the mappers' rule
(highest numeric versionId, then meta.lastUpdated, then input position); every patient's winning
resources reach `core.grade_patient` in input order; Medications (nobody's patient data, a
formulary's worth) are collected once, settled by a `ResourceMapper` on the driver exactly as the
local engine settles them, and broadcast; every skip carries its place in the local engine's list
(input-level skips, superseded copies, each resource's own skip by input position, then the
patients without a CAR-T infusion by patient) and the output is sorted by it.

One difference, by design: a MedicationAdministration is resolved against the winning version of
its Medication. The local engine resolves one read after an older version and before the newer
one of that Medication against the older version (what it had seen so far).

Memory bound (executors). No step holds more than one patient's data: a patient's resources are
never collected as a list; they arrive from Spark's external sort (spilled to disk beyond
`spark.python.worker.memory`) in input order and are mapped one at a time, so a Python worker
holds the patient's compact events (~0.3-0.5 KiB each: 100,000 Observations ~ 50 MiB), its
graded cases, and at most `spark.python.worker.memory` of sort buffer. Reading holds one NDJSON
line at a time for local files (one file for a Hadoop URI, which is read whole); a JSON Bundle
is parsed whole.

Paths: a path without a scheme is a local path, listed on the driver as the local engine lists it
and read by the executors from the same path (on a cluster: a shared file system); a URI
(`hdfs://`, `s3a://`, `file://`, ...) is read through Hadoop (`binaryFiles`: a file, a folder's
files or a glob).
"""

from __future__ import annotations

import os
import resource
import shutil
import sys
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

import orjson

from .core import grade_patient
from .errors import EngineError, InputError, OutputError
from .events import NOT_A_DATA_PROBLEM, Skipped
from .mappers import ResourceMapper, resource_ref, version_of
from .mappers.common import SAFE_ID, reference_target
from .mapping_files import CodeMap
from .settings import GradingSettings
from .sources import (
    SUFFIXES_JSON,
    SUFFIXES_NDJSON,
    SourceResource,
    _files,
    _iter_file,
    iter_blob,
    iter_ndjson_split,
    iter_path,
)

__all__ = ["SPLIT_BYTES", "SparkRun", "grade_spark", "spark_available"]

SPLIT_BYTES = 64 * 1024 * 1024  # plain NDJSON files larger than this are read by several tasks
SHUFFLE_BYTES = 32 * 1024 * 1024  # input bytes per shuffle partition (~60-100 patients of full ICU courses)
_SKIP = "\x00skip:"  # group keys of skips travelling through the shuffles (never a Type/id or Patient/id)
_ALONE = "\x00alone:"  # a resource that belongs to no patient: mapped on its own
_SKIP_BUCKETS = 256
_SUBJECT_TYPES = frozenset({"Observation", "MedicationAdministration", "Procedure", "Condition"})

# phases of the local engine's skip list (core.grade_patient / ResourceMapper.finish)
_INPUT, _SUPERSEDED, _RESOURCE, _NO_INFUSION = 0, 1, 2, 3


def spark_available() -> str | None:
    """None when `--engine spark` can start here, else the reason (one line)."""
    try:
        import pyspark  # noqa: F401
    except ImportError:
        return "pyspark is not installed (pip install 'fhir-crs[spark]')"
    if not (shutil.which("java") or (os.environ.get("JAVA_HOME") and Path(os.environ["JAVA_HOME"], "bin", "java").exists())):
        return "Java 17 is missing (no java on PATH and JAVA_HOME is not set)"
    return None


# ---- executors: pure functions of their records (top level, so they pickle by reference) ------

@dataclass(frozen=True, slots=True)
class FilePiece:
    """A local file, or a byte range of a large plain NDJSON file."""

    path_index: int
    file_index: int
    name: str  # as the local engine names it in origins and skips
    start: int = 0
    end: int = -1  # -1: the whole file


@dataclass(frozen=True, slots=True)
class ReadTask:
    """What one read task reads: small files packed together up to `TASK_BYTES`, or one split."""

    pieces: tuple[FilePiece, ...]


def _skip_key(pos: tuple[Any, ...]) -> str:
    return f"{_SKIP}{zlib.crc32(repr(pos).encode()) % _SKIP_BUCKETS}"


def _route_item(path_index: int, file_key: Any, split: int, seq: int, item: SourceResource | Skipped) -> tuple[Any, Any]:
    pos = (path_index, file_key, split, seq)
    if isinstance(item, Skipped):
        return (_skip_key(pos), pos), ((_INPUT, pos), (item.resource, item.reason, item.code))
    src = item
    if src.bundle_urls:  # keep only what keys the resource by its patient (not the whole Bundle's map)
        targets = {reference_target(src.resource.get(f)) for f in ("subject", "patient")}
        urls = {t: src.bundle_urls[t] for t in targets if t and t in src.bundle_urls}
        src = SourceResource(src.resource, src.origin, src.full_url, urls or None)
    return (resource_ref(src), pos), src


def read_task(task: ReadTask, seen: Any = None) -> Iterator[tuple[Any, Any]]:
    """The items of one task's files or split, keyed for shuffle 1 (`seen`: an accumulator of
    the input paths that yielded a resource)."""
    for piece in task.pieces:
        f = Path(piece.name)
        items = iter_ndjson_split(f, piece.start, piece.end) if piece.end >= 0 else _iter_file(f)
        found = False
        for seq, item in enumerate(items):
            if not found and not isinstance(item, Skipped):
                found = True
                if seen is not None:
                    seen.add({piece.path_index})
            yield _route_item(piece.path_index, piece.file_index, piece.start, seq, item)


def read_blob(path_index: int, name: str, data: bytes) -> Iterator[tuple[Any, Any]]:
    """The items of one file read through Hadoop, keyed for shuffle 1."""
    for seq, item in enumerate(iter_blob(name, data)):
        yield _route_item(path_index, name, 0, seq, item)


def _cited(ref: str, version: str | None) -> str:
    return f"{ref}/_history/{version}" if version is not None and SAFE_ID.match(version) else ref


def settle_versions(ref: str, copies: Iterable[tuple[tuple[Any, ...], SourceResource]]) -> tuple[tuple[Any, ...], SourceResource, list[tuple[tuple[Any, ...], Skipped]]]:
    """One Type/id's winning copy and a `superseded` skip for each other copy, given its copies
    in input order: the rule and the messages of `ResourceMapper.add`/`finish` (highest numeric
    versionId, then meta.lastUpdated, then the later copy), each skip placed where the local
    engine lists it (at the input position of the copy that superseded it)."""
    cur: tuple[Any, ...] | None = None
    losers: list[tuple[tuple[Any, ...], str | None, str]] = []
    for pos, src in copies:
        version, key = version_of(src.resource)
        entry = ((key[0], key[1], pos), version, _cited(ref, version), pos, src)
        if cur is None:
            cur = entry
        elif cur[0] > entry[0]:
            losers.append((pos, version, entry[2]))
        else:
            losers.append((pos, cur[1], cur[2]))
            cur = entry
    assert cur is not None
    why = f"superseded by version {cur[1]}" if cur[1] is not None else "superseded by a later copy of the same resource in the input"
    return cur[3], cur[4], [(pos, Skipped(cited if version is not None else ref, why, "superseded")) for pos, version, cited in losers]


def _group_of(src: SourceResource, ref: str) -> str:
    """The patient whose group a winning resource joins (as the mappers will assign it), or a
    group of its own when it has none (a Medication, an unused type, an unresolved subject)."""
    rtype = src.resource["resourceType"]
    try:
        if rtype == "Patient":
            return resource_ref(src)
        if rtype in _SUBJECT_TYPES:
            patient, _ = ResourceMapper.patient_of(src)
            if patient is not None:
                return patient
    except (TypeError, ValueError, AttributeError, KeyError, IndexError):
        pass  # malformed: mapped (and skipped as malformed) on its own
    return _ALONE + ref


def settle_partition(records: Iterable[tuple[Any, Any]]) -> Iterator[tuple[Any, Any]]:
    """Shuffle 1's sorted partition ((Type/id, position), copy) -> winners keyed by patient for
    shuffle 2; skips pass through."""
    for ref, group in groupby(records, key=lambda kv: kv[0][0]):
        if ref.startswith(_SKIP):
            yield from group
            continue
        pos, src, superseded = settle_versions(ref, ((k[1], v) for k, v in group))
        for lost_pos, s in superseded:
            yield (_skip_key(lost_pos), lost_pos), ((_SUPERSEDED, lost_pos), (s.resource, s.reason, s.code))
        yield (_group_of(src, ref), pos), src


def grade_partition(records: Iterable[tuple[Any, Any]], code_map: CodeMap, settings: GradingSettings,
                    medications: dict[str, dict[str, Any]], render: str, series: bool) -> Iterator[tuple[str, Any, Any]]:
    """Shuffle 2's sorted partition ((patient, position), resource) -> ("case", (patient, i), case),
    ("skip", place, (resource, reason, code)) and ("read", None, n) records; the same core per
    patient as the local engine (`core.grade_patient`), fed one resource at a time."""
    from .spill import nested_json

    read = 0
    for key, group in groupby(records, key=lambda kv: kv[0][0]):
        if key.startswith(_SKIP):
            for _, (place, skip) in group:
                yield "skip", place, skip
            continue
        where: dict[str, tuple[Any, ...]] = {}

        def resources(records: Iterable[tuple[Any, Any]], where: dict[str, tuple[Any, ...]] = where) -> Iterator[SourceResource]:
            for (_, pos), src in records:
                ref = resource_ref(src)
                where[ref] = pos
                where[_cited(ref, version_of(src.resource)[0])] = pos
                yield src

        graded = grade_patient(resources(group), code_map, settings, medications)
        read += graded.read
        for i, case in enumerate(graded.cases):
            data = case.to_json(settings, series)
            if render == "contract":
                value: Any = nested_json(data, 2)
            elif render == "parquet":
                crs, icans = data["crs"].get("astct") or {}, data["icans"].get("astct") or {}
                value = (data["patient"], data["infusion"], crs.get("grade"), icans.get("grade"), orjson.dumps(data).decode())
            else:
                value = orjson.dumps(data)
            yield "case", (case.timeline.patient, i), value
        nth = 0
        for s in graded.skipped:
            if s.code == "no_infusion":
                place: tuple[Any, ...] = (_NO_INFUSION, key, nth)
                nth += 1
            else:
                place = (_RESOURCE, where[s.resource])
            yield "skip", place, (s.resource, s.reason, s.code)
    yield "read", None, read
    yield "rss", None, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB: this Python worker's peak


def _partition(key: Any) -> int:
    return zlib.crc32(key[0].encode())


# ---- driver -----------------------------------------------------------------------------------

def _is_uri(p: str) -> bool:
    head = p.split("/", 1)[0]
    return head.endswith(":") and len(head) > 2  # hdfs:, s3a:, file: (not a Windows drive letter)


def plan_reads(paths: list[str]) -> tuple[list[ReadTask], list[tuple[int, str]], int]:
    """Read tasks for the local paths (listed as the local engine lists them; small files packed
    up to `SPLIT_BYTES` per task, large plain NDJSON files split), (index, URI) for the rest, and
    the local input's size. A missing local path is an InputError here, before Spark starts."""
    tasks: list[ReadTask] = []
    uris: list[tuple[int, str]] = []
    for p in paths:
        if not _is_uri(p) and not Path(p).exists():
            raise InputError(f"Input path {p} does not exist.")
    pack: list[FilePiece] = []
    packed = total = 0
    for i, p in enumerate(paths):
        if _is_uri(p):
            uris.append((i, p))
            continue
        for j, f in enumerate(_files(Path(p))):
            name = str(f)
            size = f.stat().st_size
            total += size
            if name.lower().endswith((".ndjson", ".jsonl")) and size > SPLIT_BYTES:
                tasks += [ReadTask((FilePiece(i, j, name, start, min(start + SPLIT_BYTES, size)),))
                          for start in range(0, size, SPLIT_BYTES)]
                continue
            pack.append(FilePiece(i, j, name))
            packed += size
            if packed >= SPLIT_BYTES:
                tasks.append(ReadTask(tuple(pack)))
                pack, packed = [], 0
    if pack:
        tasks.append(ReadTask(tuple(pack)))
    return tasks, uris, total


@dataclass(slots=True)
class SparkRun:
    """The result of a Spark grading run, still on the cluster (cached): counts, and the cases
    and skips as sorted iterators."""

    rdd: Any
    resources_read: int
    skipped: int
    skip_codes: dict[str, int]
    executor_peak_rss_kib: int
    cases: int

    def sorted_cases(self) -> Iterator[Any]:
        return self.rdd.filter(lambda r: r[0] == "case").map(lambda r: (r[1], r[2])).sortByKey().values().toLocalIterator()

    def sorted_skips(self) -> Iterator[dict[str, str]]:
        rows = self.rdd.filter(lambda r: r[0] == "skip").map(lambda r: (r[1], r[2])).sortByKey().values()
        for resource_, reason, code in rows.toLocalIterator():
            yield {"resource": resource_, "reason": reason, "code": code}

    @property
    def strict_count(self) -> int:
        return sum(n for c, n in self.skip_codes.items() if c not in NOT_A_DATA_PROBLEM)


def session(master: str | None = None) -> tuple[Any, bool]:
    """(SparkSession, whether this call started it). An active session (spark-submit, a test
    session) is used as it is; otherwise one is started on `master` (default local[*])."""
    why = spark_available()
    if why:
        raise EngineError(f"--engine spark cannot start: {why}.")
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active, False
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.appName("fhir-crs grade")
    if (master or "local").startswith("local"):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # a local run listens on loopback only
    if master:
        builder = builder.master(master)
    elif "PYSPARK_GATEWAY_PORT" not in os.environ:
        builder = builder.master("local[*]")  # not under spark-submit (which sets the gateway): this machine's cores
    builder = builder.config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
    try:
        spark = builder.getOrCreate()
    except Exception as exc:  # the JVM did not start (Java too old, a bad --master): one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EngineError(f"--engine spark cannot start Spark{f' on {master}' if master else ''}: {first}") from exc
    spark.sparkContext.setLogLevel("ERROR")
    return spark, True


def grade_spark(spark: Any, paths: list[str], code_map: CodeMap, settings: GradingSettings,
                render: str = "contract", series: bool = False, partitions: int | None = None) -> SparkRun:
    """Grade `paths` on the cluster; the result stays cached there until `run.rdd.unpersist()`."""
    from pyspark import StorageLevel
    from pyspark.accumulators import AccumulatorParam

    class _Union(AccumulatorParam):  # type: ignore[type-arg]
        def zero(self, value: set[int]) -> set[int]:
            return set()

        def addInPlace(self, a: set[int], b: set[int]) -> set[int]:  # Spark's name
            a |= b
            return a

    sc = spark.sparkContext
    tasks, uris, size = plan_reads(paths)
    seen = sc.accumulator(set(), _Union())

    def mark(path_index: int, items: Iterator[tuple[Any, Any]]) -> Iterator[tuple[Any, Any]]:
        found = False
        for kv in items:
            if not found and not kv[0][0].startswith(_SKIP):
                found = True
                seen.add({path_index})
            yield kv

    parts = []
    if tasks:
        parts.append(sc.parallelize(tasks, len(tasks)).flatMap(lambda t: read_task(t, seen)))
    for i, uri in uris:
        try:
            blobs = sc.binaryFiles(uri)
        except Exception as exc:
            raise InputError(f"Input path {uri} cannot be read: {str(exc).strip().splitlines()[0]}") from exc
        parts.append(blobs.filter(lambda nb: nb[0].lower().endswith(SUFFIXES_JSON + SUFFIXES_NDJSON))
                     .flatMap(lambda nb, i=i: mark(i, read_blob(i, nb[0], nb[1]))))
    if not parts:
        raise InputError("no input paths")
    reads = parts[0] if len(parts) == 1 else sc.union(parts)
    # shuffle partitions: ~SHUFFLE_BYTES of input each, at least one per core
    n = partitions or max(sc.defaultParallelism, min(4096, size // SHUFFLE_BYTES + len(uris)))

    winners = reads.repartitionAndSortWithinPartitions(n, _partition).mapPartitions(settle_partition)
    # Medications: nobody's patient data; their winners are settled on the driver by the mappers'
    # own code, as the local engine settles them, and broadcast (this job writes shuffle 1, which
    # the grading job below reuses: the input is read once)
    meds = sorted(winners.filter(lambda kv: kv[0][0].startswith(_ALONE + "Medication/"))
                  .map(lambda kv: (kv[0][1], kv[1])).collect(), key=lambda pv: pv[0])
    med_mapper = ResourceMapper(code_map)
    for _, src in meds:
        med_mapper.add(src)
    medications = sc.broadcast(dict(med_mapper.medications))

    cm, st, rnd, ser = code_map, settings, render, series
    graded = (winners.repartitionAndSortWithinPartitions(n, _partition)
              .mapPartitions(lambda recs: grade_partition(recs, cm, st, medications.value, rnd, ser)))
    graded.persist(StorageLevel.MEMORY_AND_DISK)
    stats = graded.filter(lambda r: r[0] in ("read", "skip")).flatMap(_stats).reduceByKey(lambda a, b: a + b).collectAsMap()
    rss = graded.filter(lambda r: r[0] == "rss").map(lambda r: r[2]).max()
    cases = graded.filter(lambda r: r[0] == "case").count()
    for i, p in enumerate(paths):  # a path that yielded no resource at all: the local engine's error
        if i in seen.value:
            continue
        graded.unpersist()
        if not _is_uri(p):
            for _ in iter_path(Path(p)):  # raises the local engine's InputError for this path
                pass
        raise InputError(f"{p}: no usable FHIR resource.")
    codes = {k[1]: v for k, v in stats.items() if k[0] == "code"}
    read = stats.get(("read",), 0) + stats.get(("phase", _INPUT), 0) + stats.get(("phase", _SUPERSEDED), 0)
    return SparkRun(graded, read, sum(codes.values()), codes, int(rss), cases)


def _stats(r: tuple[str, Any, Any]) -> list[tuple[tuple[Any, ...], int]]:
    if r[0] == "read":
        return [(("read",), r[2])]
    return [(("code", r[2][2]), 1), (("phase", r[1][0]), 1)]


# ---- output -----------------------------------------------------------------------------------

def write_contract(run: SparkRun, out: Any, settings: GradingSettings) -> None:
    """`--json`: the grade contract, byte for byte what the local engine prints."""
    from .spill import write_grade_json

    write_grade_json(out, run.sorted_cases(), run.sorted_skips(), lambda n_skipped: {
        "resources_read": run.resources_read, "resources_used": run.resources_read - n_skipped,
        "settings": settings.as_dict()})


def prepare_out_dir(out: Path) -> Path:
    """The folder for `--out`: absent or empty (a user's files are never overwritten), checked
    before Spark starts. Returns a private (0700) temporary sibling the results are written to
    and then renamed from, so a failed run leaves no partial output."""
    from .private import private_dir

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputError(f"--out {out}: exists and is not an empty folder; give a new or empty folder.")
    if not out.parent.is_dir():
        raise OutputError(f"--out {out}: folder {out.parent} does not exist.")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    return private_dir(tmp)


def write_out_dir(run: SparkRun, spark: Any, tmp: Path, out: Path, fmt: str, settings: GradingSettings) -> dict[str, Any]:
    """`--out DIR`: cases (one JSON line each, or Parquet), skips, and summary.json."""
    from .private import create_private_file, tighten_tree, write_private_bytes

    summary = {"resources_read": run.resources_read, "resources_used": run.resources_read - run.skipped,
               "cases": run.cases, "skipped": run.skipped, "skip_codes": dict(sorted(run.skip_codes.items())),
               "format": fmt, "settings": settings.as_dict()}
    try:
        if fmt == "parquet":
            from pyspark.sql.types import IntegerType, StringType, StructField, StructType

            case_rows = run.rdd.filter(lambda r: r[0] == "case").map(lambda r: (r[1], r[2])).sortByKey().values()
            schema = StructType([StructField("patient", StringType()), StructField("infusion", StringType()),
                                 StructField("crs_astct_grade", IntegerType()), StructField("icans_astct_grade", IntegerType()),
                                 StructField("case_json", StringType())])
            spark.createDataFrame(case_rows, schema).write.parquet(str((tmp / "cases.parquet").resolve()))
            skip_rows = run.rdd.filter(lambda r: r[0] == "skip").map(lambda r: (r[1], r[2])).sortByKey().values()
            skip_schema = StructType([StructField(k, StringType()) for k in ("resource", "reason", "code")])
            spark.createDataFrame(skip_rows, skip_schema).write.parquet(str((tmp / "skipped.parquet").resolve()))
        else:
            for name, rows in (("cases.ndjson", run.sorted_cases()), ("skipped.ndjson", (orjson.dumps(s) for s in run.sorted_skips()))):
                with create_private_file(tmp / name).open("wb") as fh:
                    for row in rows:
                        fh.write(row + b"\n")
        write_private_bytes(tmp / "summary.json", orjson.dumps(summary, option=orjson.OPT_INDENT_2) + b"\n")
        tighten_tree(tmp)  # Spark's Parquet part files come with the umask's modes (0644): owner-only, as the rest
        if out.exists():
            out.rmdir()  # empty, checked before the run
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary
