"""fhir-crs: a FHIR R4 adapter that grades CAR-T cytokine release syndrome (CRS) and ICANS
from EHR time series (Observations, MedicationAdministrations, Procedures) under ASTCT 2019
and older scales, with the evidence behind every grade."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
