"""FHIR server access (stage: FHIR server ⇄ pipeline): the REST client, its credentials
(static, or SMART Backend Services) and Bulk Data ``$export``.

`client.py` is the one module in fhir-crs that touches HTTP; everything else gets plain dicts.
"""

from __future__ import annotations

from .auth import Auth, BasicAuth, BearerAuth, NoAuth
from .bulk import (
    DEFAULT_EXPORT_TYPES,
    BulkExport,
    BulkExportError,
    BulkExportTimeout,
    BulkItem,
    Manifest,
    ManifestFile,
)
from .client import (
    CrossOriginRefused,
    FhirClient,
    Params,
    PreconditionFailed,
    ResponseTooLarge,
    SearchIterator,
    SearchResult,
    ServerUnavailable,
    TransactionMismatch,
    VersionConflict,
)
from .smart import SmartBackendAuth, discover_token_url, smart_auth_from_config

__all__ = [
    "DEFAULT_EXPORT_TYPES",
    "Auth",
    "BasicAuth",
    "BearerAuth",
    "BulkExport",
    "BulkExportError",
    "BulkExportTimeout",
    "BulkItem",
    "CrossOriginRefused",
    "FhirClient",
    "Manifest",
    "ManifestFile",
    "NoAuth",
    "Params",
    "PreconditionFailed",
    "ResponseTooLarge",
    "SearchIterator",
    "SearchResult",
    "ServerUnavailable",
    "SmartBackendAuth",
    "TransactionMismatch",
    "VersionConflict",
    "discover_token_url",
    "smart_auth_from_config",
]
