"""JSON Schemas of the CDS Hooks 2.0 shapes this service reads and answers (used in the OpenAPI
description and by the tests that validate requests and responses)."""

from __future__ import annotations

from typing import Any

ERROR: dict[str, Any] = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message"],
                             "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}},
}

PREFETCH_TEMPLATES: dict[str, Any] = {"type": "object", "additionalProperties": {"type": "string"}}

DISCOVERY: dict[str, Any] = {
    "type": "object", "required": ["services"],
    "properties": {"services": {"type": "array", "items": {
        "type": "object", "required": ["hook", "description", "id"],
        "properties": {"hook": {"type": "string"}, "title": {"type": "string"}, "description": {"type": "string"},
                       "id": {"type": "string"}, "prefetch": PREFETCH_TEMPLATES, "usageRequirements": {"type": "string"}},
    }}},
}

FHIR_AUTHORIZATION: dict[str, Any] = {
    "type": "object", "required": ["access_token", "token_type", "expires_in", "scope", "subject"],
    "properties": {"access_token": {"type": "string"}, "token_type": {"type": "string", "enum": ["Bearer"]},
                   "expires_in": {"type": "integer"}, "scope": {"type": "string"}, "subject": {"type": "string"},
                   "patient": {"type": "string"}},
}

CDS_REQUEST: dict[str, Any] = {
    "type": "object", "required": ["hook", "hookInstance", "context"],
    "properties": {
        "hook": {"type": "string", "enum": ["patient-view"]},
        "hookInstance": {"type": "string", "minLength": 1},
        "fhirServer": {"type": "string", "format": "uri"},
        "fhirAuthorization": FHIR_AUTHORIZATION,
        "context": {"type": "object", "required": ["userId", "patientId"],
                    "properties": {"userId": {"type": "string"}, "patientId": {"type": "string", "pattern": "^[A-Za-z0-9\\-.]{1,64}$"},
                                   "encounterId": {"type": "string"}}},
        "prefetch": {"type": "object", "additionalProperties": {"anyOf": [{"type": "object"}, {"type": "null"}]}},
    },
}

LINK: dict[str, Any] = {
    "type": "object", "required": ["label", "url", "type"],
    "properties": {"label": {"type": "string"}, "url": {"type": "string"}, "type": {"type": "string", "enum": ["absolute", "smart"]},
                   "appContext": {"type": "string"}},
}

CARD: dict[str, Any] = {
    "type": "object", "required": ["summary", "indicator", "source"],
    "properties": {
        "uuid": {"type": "string"},
        "summary": {"type": "string", "maxLength": 140},
        "detail": {"type": "string"},
        "indicator": {"type": "string", "enum": ["info", "warning", "critical"]},
        "source": {"type": "object", "required": ["label"],
                   "properties": {"label": {"type": "string"}, "url": {"type": "string"}, "icon": {"type": "string"},
                                  "topic": {"type": "object"}}},
        "suggestions": {"type": "array"},
        "selectionBehavior": {"type": "string"},
        "links": {"type": "array", "items": LINK},
    },
}

CDS_RESPONSE: dict[str, Any] = {
    "type": "object", "required": ["cards"],
    "properties": {"cards": {"type": "array", "items": CARD}, "systemActions": {"type": "array"}},
}
