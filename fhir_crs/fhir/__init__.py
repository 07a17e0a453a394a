"""FHIR server access (stage: FHIR server ⇄ pipeline): the REST client and its credentials.

`client.py` is the one module in fhir-crs that touches HTTP; everything else gets plain dicts.
"""

from __future__ import annotations

from .auth import Auth, BasicAuth, BearerAuth, NoAuth
from .client import (
    FhirClient,
    Params,
    PreconditionFailed,
    SearchIterator,
    SearchResult,
    ServerUnavailable,
    VersionConflict,
)

__all__ = [
    "Auth",
    "BasicAuth",
    "BearerAuth",
    "FhirClient",
    "NoAuth",
    "Params",
    "PreconditionFailed",
    "SearchIterator",
    "SearchResult",
    "ServerUnavailable",
    "VersionConflict",
]
