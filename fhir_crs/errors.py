"""Error tree of fhir-crs and the exit codes the CLI maps them to.

::

    FhirCrsError                 exit 1   base class; message is shown to the user as one line
    ├── ConfigError              exit 2   bad settings file / flag / environment value
    ├── MappingFileError         exit 2   a mappings/*.toml file is malformed (names file and key)
    ├── InputError               exit 3   an input path cannot be read (missing, unreadable, empty)
    ├── OutputError              exit 3   an output path cannot be written (a folder, a missing folder)
    ├── FhirServerError          exit 4   the FHIR server answered with an error
    │   ├── FhirNotFound         exit 4   404 / 410 on a read
    │   ├── FhirAuthError        exit 5   401 / 403
    │   ├── FhirOperationOutcome exit 4   any other 4xx/5xx; keeps the OperationOutcome diagnostics
    │   └── DuplicateTargetError exit 8   >1 server resource carries an identifier fhir-crs writes to
    ├── ConventionChangeError    exit 9   a stored Condition was graded with other settings/mapping tables
    ├── EngineError              exit 10  `grade --engine spark` cannot start (pyspark or Java 17 missing, bad --master)
    └── GradingError             exit 6   an internal inconsistency while grading (a bug)

`sync` stopped by a signal exits 128 + signal number (130 SIGINT, 143 SIGTERM; interrupt.py).

`code` is the stable key of the `{"error": {"code", "message", "exit"}}` object printed with
`--json`; `EXIT_CODES` is the table `fhir-crs --help` and the README show.
"""

from __future__ import annotations


class FhirCrsError(Exception):
    """Base class: a failure the user should see as one clear line."""

    exit_code = 1
    code = "error"


class ConfigError(FhirCrsError):
    """A setting (flag, environment variable or settings file) is invalid."""

    exit_code = 2
    code = "config"


class MappingFileError(FhirCrsError):
    """A mapping table under mappings/ is malformed; the message names file and key."""

    exit_code = 2
    code = "mapping"


class InputError(FhirCrsError):
    """An input path cannot be read at all."""

    exit_code = 3
    code = "input"


class OutputError(FhirCrsError):
    """An output path (--csv, --cibmtr, --html, --out) cannot be written."""

    exit_code = 3
    code = "output"


class FhirServerError(FhirCrsError):
    """The FHIR server answered with an error status."""

    exit_code = 4
    code = "server"

    def __init__(self, message: str, status: int | None = None, diagnostics: str | None = None):
        super().__init__(message)
        self.status = status
        self.diagnostics = diagnostics


class FhirNotFound(FhirServerError):
    """The resource or search page does not exist (404/410)."""

    code = "not_found"


class FhirAuthError(FhirServerError):
    """Authentication or authorisation failed (401/403)."""

    exit_code = 5
    code = "auth"


class FhirOperationOutcome(FhirServerError):
    """Any other error status; `diagnostics` keeps the OperationOutcome text."""


class GradingError(FhirCrsError):
    """Internal inconsistency while grading (should never happen; please report)."""

    exit_code = 6
    code = "internal"


class DuplicateTargetError(FhirServerError):
    """More than one server resource carries the identifier fhir-crs writes to: a data-quality
    problem on the server, reported and never retried."""

    exit_code = 8
    code = "duplicate_target"


class ConventionChangeError(FhirCrsError):
    """A stored write-back was graded with other settings or mapping tables: not overwritten
    without --allow-convention-change (the message names what differs)."""

    exit_code = 9
    code = "convention_change"


class EngineError(FhirCrsError):
    """`grade --engine spark` cannot run here: pyspark is not installed, Java is missing, or the
    Spark master cannot be reached (the message says which, in one line)."""

    exit_code = 10
    code = "engine"


# (exit code, meaning): printed by `fhir-crs --help` and copied into the README (a test compares them).
EXIT_CODES: tuple[tuple[int, str], ...] = (
    (0, "success"),
    (1, "sync / demo: at least one patient failed (the summary lists them)"),
    (2, "bad usage, settings, config or mapping tables"),
    (3, "an input path yields nothing usable, or an output path cannot be written"),
    (4, "FHIR server error (unknown patient, unreachable server)"),
    (5, "authentication failed"),
    (6, "internal error (a bug: please report it; -v shows the traceback)"),
    (7, "--strict: a resource of a type fhir-crs grades was skipped"),
    (8, "two server resources carry one write-back identifier (data quality)"),
    (9, "write-back refused: the stored Condition was graded with other settings or mapping tables (--allow-convention-change)"),
    (10, "grade --engine spark cannot start: pyspark or Java 17 missing, or the Spark master unreachable"),
    (130, "sync stopped by Ctrl-C (SIGINT) after the write in flight; recorded as interrupted"),
    (143, "sync stopped by SIGTERM after the write in flight; recorded as interrupted"),
)
