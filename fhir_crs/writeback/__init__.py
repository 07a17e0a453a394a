"""Stage 5: graded case -> FHIR resources to write back (pure builders; the client sends them)."""

from .build import CaseWrite, build_case_write, identifiers

__all__ = ["CaseWrite", "build_case_write", "identifiers"]
