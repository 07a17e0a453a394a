"""Typed, range-checked validation shared by the grading conventions (settings.py) and the run
config (config.py): both are frozen pydantic models whose fields carry their allowed range; a
bad value becomes ONE `ConfigError` line naming the source, the key, the value and what is
allowed (exit 2), raised before anything is read or written.
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from typing import Any, Literal

from annotated_types import Ge, Gt, Le, MinLen
from pydantic import BaseModel, ValidationError, ValidationInfo
from pydantic.fields import FieldInfo

from .errors import ConfigError


def _num(v: float) -> str:
    return f"{v:g}"


def _base(annotation: Any) -> tuple[Any, bool]:
    """(the type without Optional/Annotated, whether None is allowed)."""
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0] if len(args) == 1 else annotation
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation, optional


def literal_values(annotation: Any) -> tuple[Any, ...] | None:
    base, _ = _base(annotation)
    if typing.get_origin(base) is tuple:
        base = typing.get_args(base)[0]
    if typing.get_origin(base) is Literal:
        return typing.get_args(base)
    return None


def allowed(info: FieldInfo) -> str:
    """What a field accepts, in words: 'a number from 37 to 40 °C', 'one of: a, b', …"""
    base, optional = _base(info.annotation)
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    unit = f" {extra['unit']}" if extra.get("unit") else ""
    lo = hi = None
    lo_open = False
    min_len = 0
    for m in info.metadata:
        if isinstance(m, Ge):
            lo = m.ge
        elif isinstance(m, Gt):
            lo, lo_open = m.gt, True
        elif isinstance(m, Le):
            hi = m.le
        elif isinstance(m, MinLen):
            min_len = m.min_length
    values = literal_values(info.annotation)
    if typing.get_origin(base) is tuple:
        text = f"a list of: {', '.join(map(str, values))}" if values else (extra.get("allowed") or "a list of names")
    elif values is not None:
        text = "one of: " + ", ".join(map(str, values))
    elif base is bool:
        text = "true or false"
    elif base in (int, float):
        kind = "a whole number" if base is int else "a finite number"
        if lo is not None and hi is not None:
            text = f"{kind} above {_num(lo)}, up to {_num(hi)}{unit}" if lo_open else f"{kind} from {_num(lo)} to {_num(hi)}{unit}"
        elif lo is not None:
            text = f"{kind} {'above' if lo_open else 'of at least'} {_num(lo)}{unit}"
        elif hi is not None:
            text = f"{kind} of at most {_num(hi)}{unit}"
        else:
            text = kind + unit
    else:
        text = extra.get("allowed") or ("a non-empty text" if min_len else "a text")
    return text + (" (or unset)" if optional and base is not bool else "")


def check_typed(value: Any, info: ValidationInfo, fields: dict[str, FieldInfo], typed: bool | None = None) -> Any:
    """Before-validator for every field: a number is never a bool; a list field given as one
    string ('a,b' from --set or the environment) is split on commas; values from a typed source
    (a TOML file) must already have the right type (no "38" for a number)."""
    name = info.field_name
    if name is None or name not in fields:
        return value
    base, _ = _base(fields[name].annotation)
    typed = bool((info.context or {}).get("typed")) if typed is None else typed
    if base in (int, float) and isinstance(value, bool):
        raise ValueError("a true/false value is not a number")
    if typing.get_origin(base) is tuple and isinstance(value, str):
        if typed:
            raise ValueError("expected a list")
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if typed and isinstance(value, str) and (base in (int, float, bool)):
        raise ValueError("expected a value, not a quoted text")
    if base is float and isinstance(value, float | int) and not math.isfinite(value):
        raise ValueError("not a finite number")
    return value


def one_line(exc: ValidationError, model: type[BaseModel], given: dict[str, Any], where: Any,
             catalogue: str | None = None, noun: str = "key") -> ConfigError:
    """The first problem of a ValidationError as one ConfigError line.

    `where` is the source text ('grading.toml', '--set', …) or a function key -> source;
    `catalogue` says where the known keys are listed (else they are named in the message)."""
    err = exc.errors()[0]
    loc = err.get("loc") or ()
    key = str(loc[0]) if loc else ""
    src = where(key) if callable(where) else where
    fields = model.model_fields
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(key, fields, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        known = catalogue or f"known {noun}s: " + ", ".join(sorted(fields))
        return ConfigError(f"{src}: unknown {noun} '{key}'{hint}; {known}.")
    if key not in fields:  # a cross-field rule (model validator): its message says everything
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        return ConfigError(f"{src}: {msg}")
    value = given.get(key, err.get("input")) if fields[key].repr else "<secret>"
    return ConfigError(f"{src}: '{key}' = {value!r} is not allowed: expected {allowed(fields[key])}.")
