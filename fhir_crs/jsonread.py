"""Stage 0 helper: JSON text -> Python values, tolerant of what real EHR exports contain.

The fast path is orjson. When orjson refuses a document that is still JSON in the sense of
RFC 8259 (or one the RFC lets a reader accept), the document is read again with the standard
library so that one odd value cannot lose its neighbours:

* a UTF-8 byte-order mark at the start of the text is ignored (RFC 8259 §8.1 allows it);
* numbers that overflow a double (`1e309`), integers longer than a double can hold and the
  non-standard `NaN` / `Infinity` literals are read as null and the innermost *resource* that
  held one is marked (`UNREADABLE`): the mappers skip that resource, never the whole file or
  page (`unreadable()` gives the reason);
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


UNREADABLE = "_fhir_crs_unreadable"  # set on a resource that held a BadNumber; the mappers skip it


def _clean(value: Any, path: str, found: list[str]) -> Any:
    """Lone surrogates -> U+FFFD in every string (keys included); BadNumber -> None, noted in
    `found` as 'path = text' and set as UNREADABLE on the innermost enclosing resource."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value) if _SURROGATE.search(value) else value
    if isinstance(value, BadNumber):
        found.append(f"{path or '(value)'} = {value.text}")
        return None
    if isinstance(value, list):
        return [_clean(v, f"{path}[{i}]", found) for i, v in enumerate(value)]
    if isinstance(value, dict):
        is_resource = isinstance(value.get("resourceType"), str)
        inner: list[str] = [] if is_resource else found
        out = {_clean(k, "", inner): _clean(v, (k if is_resource or not path else f"{path}.{k}"), inner) for k, v in value.items()}
        if is_resource and inner and out["resourceType"] != "Bundle":
            out[UNREADABLE] = inner[0]
        if is_resource and inner:
            found.extend(inner)  # a contained resource's problem is its container's too
        return out
    return value


def loads(data: bytes | str) -> Any:
    """The JSON value of `data`. Raises ValueError when the text is not JSON."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    if data.startswith(BOM):
        data = data[len(BOM):]
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as first:
        text = data.decode("utf-8", "replace")
        try:
            value = json.loads(text, parse_constant=BadNumber, parse_float=_float, parse_int=_int)
        except (json.JSONDecodeError, RecursionError, ValueError):
            raise ValueError(str(first)) from None
        found: list[str] = []
        value = _clean(value, "", found)
        if found and isinstance(value, dict) and UNREADABLE not in value and value.get("resourceType") != "Bundle":
            value[UNREADABLE] = found[0]  # not a resource: the caller skips it as such
        return value


def unreadable(resource: dict[str, Any]) -> str | None:
    """Why a resource cannot be used because of a number no double holds, or None."""
    why = resource.get(UNREADABLE)
    return f"unreadable number (overflow, NaN or Infinity): {why}" if why else None
