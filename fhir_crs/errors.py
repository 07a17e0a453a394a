"""Error tree of fhir-crs and the exit codes the CLI maps them to.

::

    FhirCrsError                 exit 1   base class; message is shown to the user as one line
    ├── ConfigError              exit 2   bad settings file / flag / environment value
    ├── MappingFileError         exit 2   a mappings/*.toml file is malformed (names file and key)
    ├── InputError               exit 3   an input path cannot be read (missing, unreadable, empty)
    ├── FhirServerError          exit 4   the FHIR server answered with an error
    │   ├── FhirNotFound         exit 4   404 / 410 on a read
    │   ├── FhirAuthError        exit 5   401 / 403
    │   ├── FhirOperationOutcome exit 4   any other 4xx/5xx; keeps the OperationOutcome diagnostics
    │   └── DuplicateTargetError exit 8   >1 server resource carries an identifier fhir-crs writes to
    └── GradingError             exit 6   an internal inconsistency while grading (a bug)
"""

from __future__ import annotations


class FhirCrsError(Exception):
    """Base class: a failure the user should see as one clear line."""

    exit_code = 1


class ConfigError(FhirCrsError):
    """A setting (flag, environment variable or settings file) is invalid."""

    exit_code = 2


class MappingFileError(FhirCrsError):
    """A mapping table under mappings/ is malformed; the message names file and key."""

    exit_code = 2


class InputError(FhirCrsError):
    """An input path cannot be read at all."""

    exit_code = 3


class FhirServerError(FhirCrsError):
    """The FHIR server answered with an error status."""

    exit_code = 4

    def __init__(self, message: str, status: int | None = None, diagnostics: str | None = None):
        super().__init__(message)
        self.status = status
        self.diagnostics = diagnostics


class FhirNotFound(FhirServerError):
    """The resource or search page does not exist (404/410)."""


class FhirAuthError(FhirServerError):
    """Authentication or authorisation failed (401/403)."""

    exit_code = 5


class FhirOperationOutcome(FhirServerError):
    """Any other error status; `diagnostics` keeps the OperationOutcome text."""


class GradingError(FhirCrsError):
    """Internal inconsistency while grading (should never happen; please report)."""

    exit_code = 6


class DuplicateTargetError(FhirServerError):
    """More than one server resource carries the identifier fhir-crs writes to: a data-quality
    problem on the server, reported and never retried."""

    exit_code = 8
