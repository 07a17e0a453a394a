"""Log lines of the command line: `2026-12-03T07:48:00.123Z fhir-crs INFO message` on stderr.

One handler on the `fhir_crs` logger (installed once, by the CLI), writing to whatever
`sys.stderr` is at the time of the record (so click's test runner captures it too). Timestamps
are ISO 8601 in UTC; `-v` lowers the level to DEBUG.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

LOGGER = "fhir_crs"


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
    logger = logging.getLogger(LOGGER)
    handler = next((h for h in logger.handlers if isinstance(h, _CurrentStderr)), None)
    if handler is None:
        handler = _CurrentStderr()
        handler.setFormatter(IsoFormatter(FORMAT))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
