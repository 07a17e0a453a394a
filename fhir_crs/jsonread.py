"""Stage 0 helper: JSON text -> Python values, tolerant of what real EHR exports contain.

The fast path is orjson. When orjson refuses a document that is still JSON in the sense of
RFC 8259 (or one the RFC lets a reader accept), the document is read again with the standard
library so that one odd value cannot lose its neighbours:

* a UTF-8 byte-order mark at the start of the text is ignored (RFC 8259 §8.1 allows it);
* numbers that overflow a double (`1e309`), integers longer than a double can hold and the
  non-standard `NaN` / `Infinity` literals become a `BadNumber` marker: the *resource* that
  holds one is skipped by the caller (`first_bad_number`), never the whole file;
* lone surrogate escapes (`"\\ud800"`) become U+FFFD, so the value can always be printed and
  serialised again; invalid UTF-8 bytes are read as U+FFFD too.

Text that is not JSON at all still raises `ValueError` (the caller makes it a named skip).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import orjson

BOM = b"\xef\xbb\xbf"
_SURROGATE = re.compile("[\ud800-\udfff]")
_MAX_INT_DIGITS = 300  # beyond this an integer does not fit a double (and int() refuses > 4300 digits)


class BadNumber:
    """A JSON number no double can hold (or a NaN/Infinity literal), kept as its text."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text if len(text) <= 40 else f"{text[:20]}…({len(text)} characters)"

    def __repr__(self) -> str:
        return f"BadNumber({self.text})"


def _float(text: str) -> float | BadNumber:
    v = float(text)
    return v if math.isfinite(v) else BadNumber(text)


def _int(text: str) -> int | BadNumber:
    return BadNumber(text) if len(text.lstrip("-")) > _MAX_INT_DIGITS else int(text)


def _clean(value: Any) -> Any:
    """Lone surrogates -> U+FFFD in every string (keys included)."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value) if _SURROGATE.search(value) else value
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    return value


def loads(data: bytes | str) -> tuple[Any, bool]:
    """(value, tolerant): tolerant is True when the slow path was needed, i.e. the value may hold
    `BadNumber` markers. Raises ValueError when the text is not JSON."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    if data.startswith(BOM):
        data = data[len(BOM):]
    try:
        return orjson.loads(data), False
    except orjson.JSONDecodeError as first:
        text = data.decode("utf-8", "replace")
        try:
            value = json.loads(text, parse_constant=BadNumber, parse_float=_float, parse_int=_int)
        except (json.JSONDecodeError, RecursionError, ValueError):
            raise ValueError(str(first)) from None
        return _clean(value), True


def first_bad_number(value: Any, path: str = "") -> str | None:
    """`path = text` of the first `BadNumber` inside value, or None."""
    if isinstance(value, BadNumber):
        return f"{path or '(value)'} = {value.text}"
    if isinstance(value, dict):
        for k, v in value.items():
            found = first_bad_number(v, f"{path}.{k}" if path else str(k))
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = first_bad_number(v, f"{path}[{i}]")
            if found:
                return found
    return None
