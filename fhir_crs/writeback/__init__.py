"""Stage 5: graded case -> FHIR resources to write back (pure builders; the client sends them)."""

from .build import CaseWrite, build_case_write, identifiers, provenance, stored_grade, stored_hash, transaction_for

__all__ = ["CaseWrite", "build_case_write", "identifiers", "provenance", "stored_grade", "stored_hash", "transaction_for"]
