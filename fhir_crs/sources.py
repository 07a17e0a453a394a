"""Stage 0: reads FHIR R4 JSON from files, directories (recursively), Bundles of any type and
NDJSON, yielding each resource with where it came from. No server involved.

A path that does not exist or cannot be opened raises `InputError` (one clear message, non-zero
exit). Content that is not usable becomes a `Skipped` entry, so nothing is dropped silently, and
always at the smallest level that holds the problem: a file that is not JSON at all is one skip
naming the file; an NDJSON line, one naming the line; a Bundle entry without a resource, one
naming its fullUrl or index; a resource holding a number no double can hold (`1e309`, NaN),
one naming the resource (`jsonread`, skipped by the mappers). A byte-order mark is read and ignored.
"""

from __future__ import annotations

import gzip
import io
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from .errors import InputError
from .events import SKIP_CODES, Skipped
from .jsonread import loads
from .ownoutput import OWN_OUTPUT_REASON, is_own_output

SUFFIXES_JSON = (".json", ".json.gz")
SUFFIXES_NDJSON = (".ndjson", ".jsonl", ".ndjson.gz", ".jsonl.gz")
GZIP_MAGIC = b"\x1f\x8b"


@dataclass(slots=True)
class SourceResource:
    """One resource and its context (the enclosing Bundle's fullUrl index, if any). Not changed
    once made (not `frozen=True`: one is built per resource read, and a frozen __init__ costs more)."""

    resource: dict[str, Any]
    origin: str
    full_url: str | None = None
    bundle_urls: dict[str, tuple[str, str]] | None = None


def _is_ndjson(path: Path) -> bool:
    return path.name.lower().endswith(SUFFIXES_NDJSON)


def _files(path: Path) -> list[Path]:
    if not path.exists():
        raise InputError(f"Input path {path} does not exist.")
    if path.is_dir():
        found = sorted(
            p for p in path.rglob("*")
            if p.is_file() and p.name.lower().endswith(SUFFIXES_JSON + SUFFIXES_NDJSON)
        )
        return found
    return [path]


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"Cannot read {path}: {exc.strerror or exc}.") from exc


def _decompress(path: str | Path, data: bytes) -> bytes | Skipped:
    """The content of a file, gunzipped when it is gzip (by magic bytes, whatever its name)."""
    if not data.startswith(GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        return _bad_gzip(str(path), 0, exc)


def _not_json_text(path: str | Path, data: bytes) -> Skipped | None:
    """An empty or binary file, named as such (not as thousands of 'invalid JSON' lines)."""
    if not data.strip():
        return Skipped(str(path), "empty file", "empty_file")
    head = data[:4096]
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return None  # UTF-16 with a byte order mark: decoded by _json_text
    if b"\x00" in head:
        return Skipped(str(path), "binary content, not JSON text", "binary_file")
    return None


def _json_text(data: bytes) -> bytes:
    """FHIR JSON is UTF-8; a byte order mark (UTF-8 or UTF-16, as some editors write) is accepted."""
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:]
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16").encode("utf-8")
    return data


def _invalid_json(where: str, exc: Exception) -> Skipped:
    text = str(exc)
    hint = " (truncated?)" if "unexpected end" in text.lower() or "eof" in text.lower() else ""
    return Skipped(where, f"not valid JSON{hint} ({text})", "invalid_json")


def _entries(value: Any, origin: str) -> Iterator[SourceResource | Skipped]:
    if isinstance(value, list):
        for i, item in enumerate(value):
            yield from _entries(item, f"{origin}[{i}]")
        return
    if not isinstance(value, dict) or not isinstance(value.get("resourceType"), str):
        yield Skipped(origin, "JSON value is not a FHIR resource (no resourceType)", "not_a_resource")
        return
    if value["resourceType"] != "Bundle":
        yield SourceResource(value, origin)
        return
    if is_own_output(value):  # a summary Bundle fhir-crs wrote: one skip, its entries are not input
        rid = value.get("id")
        yield Skipped(f"Bundle/{rid}" if isinstance(rid, str) and rid else origin, OWN_OUTPUT_REASON, "own_output")
        return
    raw = value.get("entry") or []
    if not isinstance(raw, list):
        yield Skipped(origin, "Bundle.entry is not a list", "not_a_resource")
        return
    urls: dict[str, tuple[str, str]] = {}
    for e in raw:
        if not isinstance(e, dict):
            continue
        r, fu = e.get("resource"), e.get("fullUrl")
        if isinstance(r, dict) and isinstance(fu, str):
            rid = r.get("id") or fu.rsplit(":", 1)[-1].rsplit("/", 1)[-1]
            urls[fu] = (str(r.get("resourceType")), str(rid))
    for i, e in enumerate(raw):
        where = f"{origin}#entry[{i}]"
        if not isinstance(e, dict):
            yield Skipped(where, "Bundle entry is not a JSON object", "not_a_resource")
            continue
        fu = e.get("fullUrl") if isinstance(e.get("fullUrl"), str) and e.get("fullUrl") else None
        r = e.get("resource")
        if r is None:
            request = e.get("request") if isinstance(e.get("request"), dict) else {}
            what = "resource is null" if "resource" in e else "no resource"
            if request.get("method") == "DELETE":
                what += " (a DELETE entry)"
            elif isinstance(e.get("response"), dict):
                what += " (a response entry)"
            yield Skipped(fu or where, f"Bundle entry without a resource: {what}", "no_resource")
            continue
        search = e.get("search")
        if isinstance(search, dict) and search.get("mode") == "outcome":
            yield Skipped(where, "search.mode=outcome entry (server OperationOutcome)", "bundle_outcome")
            continue
        if isinstance(r, dict) and r.get("resourceType") == "Bundle":
            yield from _entries(r, where)
            continue
        if not isinstance(r, dict) or not isinstance(r.get("resourceType"), str):
            yield Skipped(fu or where, "Bundle entry is not a FHIR resource", "not_a_resource")
            continue
        yield SourceResource(r, where, fu, urls)


def _iter_ndjson(f: Path) -> Iterator[SourceResource | Skipped]:
    """NDJSON streamed line by line (memory stays flat), gunzipped on the fly when gzip."""
    try:
        raw = f.open("rb")
    except OSError as exc:
        raise InputError(f"Cannot read {f}: {exc.strerror or exc}.") from exc
    with raw:
        yield from _ndjson_stream(str(f), raw)


def _ndjson_head_problem(name: str, head: bytes) -> Skipped | None:
    bad = _not_json_text(name, head)
    if bad is None and head.startswith((b"\xff\xfe", b"\xfe\xff")):
        bad = Skipped(name, "UTF-16 text: NDJSON must be UTF-8", "not_utf8")
    return bad


def _ndjson_item(name: str, lineno: int, line: bytes) -> SourceResource | Skipped | Iterator[SourceResource | Skipped] | None:
    """What one NDJSON line holds: None for a blank line, the one item of the usual line (a
    resource, or the skip naming the line), else an iterator of items (a Bundle, a list) —
    the line loops take the usual case without a generator per line."""
    if not line or line.isspace():  # (as `not line.strip()`, without copying the line)
        return None
    try:
        value = orjson.loads(line)  # the usual line (`loads` reads what orjson refuses another way)
    except ValueError:
        try:
            value = loads(line)  # tolerant: BOM on any line, 1e309/NaN mark their resource, lone surrogates
        except (ValueError, UnicodeDecodeError) as exc:
            return _invalid_json(f"{name}:{lineno}", exc)
    if type(value) is dict and type(rtype := value.get("resourceType")) is str and rtype != "Bundle":
        return SourceResource(value, f"{name}:{lineno}")  # what _entries yields for it
    return _entries(value, f"{name}:{lineno}")


def _ndjson_stream(name: str, raw: IO[bytes]) -> Iterator[SourceResource | Skipped]:
    """The items of one NDJSON file (`name` names it in origins and skips), from its binary stream."""
    gzipped = raw.read(2) == GZIP_MAGIC

    def stream() -> Any:
        raw.seek(0)
        return gzip.GzipFile(fileobj=raw) if gzipped else raw

    try:
        bad = _ndjson_head_problem(name, stream().read(4096))
        lines = stream()
    except (OSError, EOFError, zlib.error) as exc:
        yield _bad_gzip(name, 0, exc)
        return
    if bad is not None:
        yield bad
        return
    yield from _ndjson_lines(name, lines, 0)


def _ndjson_lines(name: str, lines: Iterable[bytes], lineno: int) -> Iterator[SourceResource | Skipped]:
    """The items of NDJSON `lines` (the first is line `lineno` + 1 of the file `name`); a read
    error of the stream ends them with a `bad_gzip` skip naming the line it stopped at."""
    try:
        for line in lines:
            lineno += 1
            item = _ndjson_item(name, lineno, line)
            if item is None:
                continue
            if type(item) is SourceResource or type(item) is Skipped:
                yield item
            else:
                yield from item
    except (OSError, EOFError, zlib.error) as exc:
        yield _bad_gzip(name, lineno, exc)


def _bad_gzip(name: str, lines_read: int, exc: BaseException) -> Skipped:
    """The skip of a gzip stream that broke after `lines_read` lines (0: the file as a whole)."""
    return Skipped(f"{name}:{lines_read + 1}" if lines_read else name, f"gzip data is corrupt or truncated ({exc})", "bad_gzip")


def iter_ndjson_split(f: Path, start: int, end: int) -> Iterator[SourceResource | Skipped]:
    """The items of the lines of a plain (not gzip) NDJSON file that start at a byte offset in
    [start, end): one split of a large file, read by one Spark task. Together the splits of a
    file yield exactly what `_iter_ndjson` yields for it, with the same line numbers; a file
    that fails the file-level checks (empty, binary, UTF-16) is one skip, from the split at 0."""
    try:
        raw = f.open("rb")
    except OSError as exc:
        raise InputError(f"Cannot read {f}: {exc.strerror or exc}.") from exc
    name = str(f)
    with raw:
        bad = _ndjson_head_problem(name, raw.read(4096))
        if bad is not None:
            if start == 0:
                yield bad
            return
        raw.seek(0)
        lineno, left = 0, start
        while left > 0:  # lines before the split: count the newlines in [0, start)
            block = raw.read(min(left, 1 << 20))
            if not block:
                break
            lineno += block.count(b"\n")
            left -= len(block)
        if start > 0:
            raw.seek(start - 1)
            if raw.read(1) != b"\n":
                raw.readline()  # a line that began before `start` belongs to the previous split
                lineno += 1
        first = raw.tell()
    yield from iter_ndjson_range(f, first, end, lineno)


def iter_blob(name: str, data: bytes) -> Iterator[SourceResource | Skipped]:
    """The items of one file's content read elsewhere (a Hadoop-compatible URI in a Spark
    executor): what `iter_path` yields for a file called `name` holding `data`."""
    if name.lower().endswith(SUFFIXES_NDJSON):
        yield from _ndjson_stream(name, io.BytesIO(data))
    else:
        yield from _json_blob(name, data)


def ndjson_head_ok(f: Path) -> bool:
    """Whether a plain (not gzip) NDJSON file may be read in byte ranges (`iter_ndjson_range`):
    its head is text that `_iter_ndjson` would read line by line (not empty, binary or UTF-16)."""
    try:
        with f.open("rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    return not head.startswith(GZIP_MAGIC) and _ndjson_head_problem(str(f), head) is None


def ndjson_cuts(f: Path, chunk: int) -> list[tuple[int, int, int]]:
    """(start byte, end byte or -1 for the end of the file, number of lines before start) of
    consecutive ranges of about `chunk` bytes of a plain NDJSON file, each starting at the
    beginning of a line (so a range's line numbers are those `_iter_ndjson` gives)."""
    size = f.stat().st_size
    cuts: list[tuple[int, int, int]] = []
    start = lines = 0
    with f.open("rb") as fh:
        while start + chunk < size:
            block = fh.read(chunk)  # the file position is `start` here
            block += fh.readline()  # up to the end of the line crossing the cut
            if start + len(block) >= size:
                break
            cuts.append((start, start + len(block), lines))
            lines += block.count(b"\n")
            start += len(block)
    cuts.append((start, -1, lines))
    return cuts


def iter_ndjson_range(f: Path, start: int, end: int, lines_before: int) -> Iterator[SourceResource | Skipped]:
    """The items of bytes [start, end) of a plain NDJSON file (`ndjson_cuts`; end -1: to the end),
    exactly as `_iter_ndjson` yields them for those lines."""
    try:
        fh = f.open("rb")
    except OSError as exc:
        raise InputError(f"Cannot read {f}: {exc.strerror or exc}.") from exc

    def lines() -> Iterator[bytes]:  # the lines that start before `end`
        pos = start
        for line in fh:
            if end >= 0 and pos >= end:
                return
            pos += len(line)
            yield line

    with fh:
        fh.seek(start)
        yield from _ndjson_lines(str(f), lines(), lines_before)


def _iter_file(f: Path) -> Iterator[SourceResource | Skipped]:
    if _is_ndjson(f):
        yield from _iter_ndjson(f)
        return
    yield from _json_blob(str(f), _read_bytes(f))


def _json_blob(name: str, raw: bytes) -> Iterator[SourceResource | Skipped]:
    data = _decompress(name, raw)
    if isinstance(data, Skipped):
        yield data
        return
    bad = _not_json_text(name, data)
    if bad is not None:
        yield bad
        return
    try:
        value = loads(_json_text(data))
    except (ValueError, UnicodeDecodeError) as exc:
        yield _invalid_json(name, exc)
        return
    yield from _entries(value, name)


def iter_path(path: Path) -> Iterator[SourceResource | Skipped]:
    """Every resource in one file or directory tree.

    A path that yields no resource at all (an empty or binary file, truncated or corrupt JSON or
    gzip, a folder with no FHIR files or only unusable ones) raises `InputError` naming the path
    and the reason, after its skips were yielded."""
    files = _files(path)
    resources = 0
    problems: list[Skipped] = []
    for f in files:
        for item in _iter_file(f):
            if isinstance(item, Skipped) and item.code != "own_output":  # (a summary Bundle read back is no broken file)
                problems.append(item)
            else:
                resources += 1
            yield item
    if resources:
        return
    if not files:
        raise InputError(f"{path}: no FHIR files in this folder (*.json, *.ndjson, *.jsonl, optionally .gz).")
    if len(problems) == 1 and len(files) == 1:
        raise InputError(f"{path}: no usable FHIR resource: {problems[0].reason}.")
    if not problems:
        raise InputError(f"{path}: no FHIR resource in " + ("this file." if path.is_file() else f"any of its {len(files)} files."))
    counts = Counter(p.code for p in problems)
    what = ", ".join(f"{n} {SKIP_CODES.get(c, c)}" for c, n in counts.most_common())
    raise InputError(f"{path}: no usable FHIR resource in {len(files)} file(s): {what}.")


def iter_paths(paths: Iterable[Path]) -> Iterator[SourceResource | Skipped]:
    paths = list(paths)
    for p in paths:  # fail fast on a missing path before doing any work
        if not p.exists():
            raise InputError(f"Input path {p} does not exist.")
    for p in paths:
        yield from iter_path(p)


def input_bytes(paths: Iterable[Path]) -> int:
    """Total size on disk of the files `iter_paths(paths)` reads (compressed size for .gz)."""
    total = 0
    for p in paths:
        if p.exists():
            total += sum(f.stat().st_size for f in _files(p))
    return total
