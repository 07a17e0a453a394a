"""Log lines of the command line — `2026-12-03T07:48:00.123Z fhir-crs INFO message` on stderr
(ISO 8601 UTC timestamps; `-v` lowers the level to DEBUG) — without secrets or PHI
(docs/SECURITY.md, "Logs").

The code logs method, path, counts and reasons — never resource content, headers or query
values. This module is the second line of defence, applied to every line the CLI emits on
stderr (log records, the one-line error, `-v` tracebacks):

* **secrets** registered at runtime (`note_secret`: the bearer token, the Basic password, each
  SMART access token and signed assertion) and anything shaped like a JWT or an
  ``Authorization: Bearer/Basic`` value become ``<redacted>``;
* **PHI** seen in Patient resources (`note_patient`: names, identifier values such as the MRN,
  the birth date, telecom and address lines) becomes ``<phi>``;
* with redaction on (`--log-redact`, the default for `sync`), every ``Patient/<id>`` and every
  patient id registered with `note_patient_id` becomes ``Patient/~<hash>``: HMAC-SHA256 of the
  id under a random per-installation key (`log_key`, a 0600 file beside the sync state), first
  12 hex digits. The same patient gets the same hash every night, so lines can be correlated;
  `fhir-crs log-hash ID...` (cli.py) prints ``ID<TAB>~<hash>`` with the same key, so an operator
  can find one patient's lines (whoever holds the key can map ids to hashes, nobody else).

`setup_logging` installs one stderr handler on the ``fhir_crs`` logger with `RedactingFilter`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .private import private_dir, write_private_bytes

__all__ = [
    "RedactingFilter",
    "hash_patient_id",
    "log_key",
    "note_patient",
    "note_patient_id",
    "note_secret",
    "redact",
    "set_patient_redaction",
    "setup_logging",
]

LOGGER = "fhir_crs"

_JWT = re.compile(r"eyJ[\w-]{4,}\.[\w-]{4,}\.[\w-]*")
_AUTH_VALUE = re.compile(r"\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]{6,}", re.IGNORECASE)
_PATIENT_REF = re.compile(r"\bPatient/(?!~)([A-Za-z0-9.-]{1,64})")
_MIN_PHI = 3  # shorter strings ("Al", initials) would blot out ordinary words


_TOKEN = re.compile(r"[\w.@+-]+")


class _Registry:
    """What to scrub: secrets, PHI words and patient ids (looked up per word, so the cost of a
    line does not grow with the size of the cohort), and the hashing key."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.secrets: set[str] = set()
        self.phi: set[str] = set()  # lower-cased words
        self.ids: set[str] = set()
        self.key: bytes | None = None
        self.key_folder: Path | None = None
        self.create_key = True
        self.redact_ids = False


_REG = _Registry()


def note_secret(*values: str | None) -> None:
    """Never let these strings into a log line (tokens, passwords, assertions)."""
    with _REG.lock:
        _REG.secrets.update(v.strip() for v in values if isinstance(v, str) and len(v.strip()) >= 4)


def note_patient(resource: dict[str, Any]) -> None:
    """Register the identifying values of a Patient resource (names, identifiers, birth date,
    telecom, address) so that no log line can carry them; and its id for hashing."""
    if not isinstance(resource, dict) or resource.get("resourceType") != "Patient":
        return
    values: list[Any] = []
    for name in resource.get("name") or ():
        if isinstance(name, dict):
            values += [name.get("family"), name.get("text"), *(name.get("given") or ())]
    for ident in resource.get("identifier") or ():
        if isinstance(ident, dict):
            values.append(ident.get("value"))
    for point in resource.get("telecom") or ():
        if isinstance(point, dict):
            values.append(point.get("value"))
    for addr in resource.get("address") or ():
        if isinstance(addr, dict):
            values += [addr.get("text"), *(addr.get("line") or ())]
    values.append(resource.get("birthDate"))
    words = {w.lower() for v in values if isinstance(v, str) for w in _TOKEN.findall(v) if len(w) >= _MIN_PHI}
    with _REG.lock:
        _REG.phi.update(words)
    if isinstance(resource.get("id"), str):
        note_patient_id(resource["id"])


def note_patient_id(*ids: str) -> None:
    """Patient ids that are hashed wherever they appear (not only after ``Patient/``)."""
    with _REG.lock:
        _REG.ids.update(i for i in ids if isinstance(i, str) and i)


def set_patient_redaction(on: bool, key: bytes | None = None, key_folder: Path | None = None,
                          create_key: bool = True) -> None:
    """Turn patient-id hashing on or off. The HMAC key is `key`, else the `log_key` of
    `key_folder` — read or created when the first id is hashed, so that nothing is written
    before the run has started — else a random key for this run only."""
    with _REG.lock:
        _REG.redact_ids = on
        _REG.key = key
        _REG.key_folder = key_folder
        _REG.create_key = create_key


def _current_key() -> bytes:
    with _REG.lock:
        if _REG.key is None:
            found = None
            if _REG.key_folder is not None:
                try:
                    found = log_key(_REG.key_folder, create=_REG.create_key)
                except OSError:
                    found = None
            _REG.key = found or secrets.token_bytes(32)
        return _REG.key


def hash_patient_id(patient_id: str, key: bytes | None = None) -> str:
    key = key if key is not None else _current_key()
    return hmac.new(key, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()[:12]


def log_key(folder: Path, create: bool = True) -> bytes | None:
    """The installation's log-hash key: ``folder/log-key`` (32 random bytes, 0600), created on
    first use. It sits beside the sync state, which already holds the ids it protects. None
    when it does not exist and `create` is False."""
    path = folder / "log-key"
    try:
        data = path.read_bytes()
        if len(data) >= 16:
            return data
    except FileNotFoundError:
        pass
    if not create:
        return None
    private_dir(folder)
    data = secrets.token_bytes(32)
    write_private_bytes(path, data)
    return data


def redact(text: str) -> str:
    """`text` with secrets, PHI and (when on) patient ids replaced."""
    if not text:
        return text
    for secret in _REG.secrets.copy():
        if secret in text:
            text = text.replace(secret, "<redacted>")
    text = _JWT.sub("<jwt>", text)
    text = _AUTH_VALUE.sub(lambda m: f"{m.group(1)} <redacted>", text)
    if _REG.redact_ids:
        text = _PATIENT_REF.sub(lambda m: "Patient/~" + hash_patient_id(m.group(1)), text)
    phi, ids, hashing = _REG.phi, _REG.ids, _REG.redact_ids

    def word(m: re.Match[str]) -> str:
        w = m.group(0)
        if hashing and w in ids:
            return "~" + hash_patient_id(w)
        return "<phi>" if w.lower() in phi else w

    return _TOKEN.sub(word, text) if phi or (hashing and ids) else text


class RedactingFilter(logging.Filter):
    """Rewrites each record's message (and formatted traceback) through `redact`."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        if record.exc_info:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


class IsoFormatter(logging.Formatter):
    """ISO 8601 UTC timestamps with milliseconds and a Z."""

    converter = time.gmtime

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", self.converter(record.created)) + f".{int(record.msecs):03d}Z"


class _CurrentStderr(logging.StreamHandler):  # type: ignore[type-arg]
    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler.__init__ assigns it
        pass


FORMAT = "%(asctime)s fhir-crs %(levelname)s %(message)s"


def setup_logging(verbose: bool = False) -> None:
    """One handler on the `fhir_crs` logger (installed once, by the CLI), writing to whatever
    `sys.stderr` is at the time of the record (so click's test runner captures it too), every
    line through `RedactingFilter`. `-v` lowers the level to DEBUG."""
    logger = logging.getLogger(LOGGER)
    handler = next((h for h in logger.handlers if isinstance(h, _CurrentStderr)), None)
    if handler is None:
        handler = _CurrentStderr()
        handler.setFormatter(IsoFormatter(FORMAT))
        handler.addFilter(RedactingFilter())
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    set_patient_redaction(False)  # each command decides (run_config); off until then
