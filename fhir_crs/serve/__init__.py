"""`fhir-crs serve`: the grade at the bedside, inside the EHR.

A CDS Hooks 2.0 service (`cds.py`) and a SMART on FHIR app (`smart_app.py`) on one ASGI
application (`app.py`, FastAPI under uvicorn). Both grade with the pipeline's own mappers and
grading (`pipeline.grade_resources`); what they may call is fixed at start-up (`config.py`).
"""

from .config import HOOK, SERVICE_ID, ServeConfig

__all__ = ["HOOK", "SERVICE_ID", "ServeConfig", "create_app"]


def create_app(config: ServeConfig):  # type: ignore[no-untyped-def]
    from .app import create_app as _create

    return _create(config)
