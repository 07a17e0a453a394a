"""The ASGI application of `fhir-crs serve` (FastAPI under uvicorn).

    GET  /cds-services                      CDS Hooks discovery (one service, fhir-crs-crs-grade)
    POST /cds-services/fhir-crs-crs-grade   patient-view: cards with the CRS/ICANS grade (cds.py);
                                            with --cds-client, only with the EHR's signed JWT (cds_auth.py)
    GET  /launch                            SMART App Launch (EHR launch with `launch`, standalone without)
    GET  /callback                          OAuth 2.0 redirect: state, PKCE, token, nonce (smart_app.py)
    GET  /app                               the launched patient's timeline page (the `report --html` page)
    GET  /openapi.json                      this service's OpenAPI description
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.middleware.cors import CORSMiddleware

from .. import __version__
from . import cds
from .config import SERVICE_ID, ServeConfig
from .schemas import CDS_REQUEST, CDS_RESPONSE, DISCOVERY, ERROR

log = logging.getLogger("fhir_crs.serve")


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _error(status: int, code: str, message: str) -> Response:
    return _json({"error": {"code": code, "message": message}}, status)


def _responses(ok: dict[str, Any], *errors: int) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {200: {"description": "OK", "content": {"application/json": {"schema": ok}}}}
    for status in errors:
        out[status] = {"description": {400: "Malformed request", 404: "No such service", 412: "The data cannot be had",
                                       401: "Not authorised", 403: "Refused"}[status],
                       "content": {"application/json": {"schema": ERROR}}}
    return out


def create_app(config: ServeConfig) -> FastAPI:
    app = FastAPI(title="fhir-crs serve", version=__version__,
                  description="CDS Hooks 2.0 service and SMART on FHIR app grading CAR-T CRS/ICANS (ASTCT) from the chart.",
                  docs_url=None, redoc_url=None)
    auth = None
    if config.cds_clients:
        from .cds_auth import CdsAuthenticator

        assert config.cds_audience is not None  # the CLI requires --public-url with --cds-client
        auth = CdsAuthenticator(config.cds_clients, config.cds_audience, timeout=config.timeout, ca_bundle=config.ca_bundle)
    if config.ehr_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.ehr_origins), allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"], allow_credentials=False)

    def app_url(request: Request) -> str:
        base = config.public_url or str(request.base_url)
        return base.rstrip("/") + "/launch"

    @app.get("/cds-services", responses=_responses(DISCOVERY), summary="CDS Hooks discovery")
    def discovery() -> Response:
        return _json(cds.discovery(config))

    @app.post("/cds-services/{service_id}", responses=_responses(CDS_RESPONSE, 400, 401, 404, 412),
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": CDS_REQUEST}}}},
              summary="Call the CDS service (patient-view)")
    async def call_service(service_id: str, request: Request) -> Response:
        if service_id != SERVICE_ID:
            return _error(404, "unknown_service", f"no CDS service {service_id!r} here (discovery: /cds-services)")
        if auth is not None:
            from .cds_auth import AuthRefused

            try:
                await run_in_threadpool(auth.verify, request.headers.get("authorization"))
            except AuthRefused as exc:  # before the body is read: nothing is parsed or fetched
                log.warning("CDS Hooks call refused (401): %s", exc.reason)
                resp = _error(401, "unauthorized", exc.reason)
                resp.headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
                return resp
        raw = await request.body()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return _error(400, "bad_request", "the request body is not JSON")
        try:
            result = await run_in_threadpool(cds.answer, body, config, app_url(request))
        except cds.HookError as exc:
            return _json(exc.body(), exc.status)
        return _json(result)

    from .smart_app import add_smart_routes

    add_smart_routes(app, config)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> Response:  # pragma: no cover - a bug
        log.error("internal error on %s %s: %s", request.method, request.url.path, type(exc).__name__)
        return JSONResponse({"error": {"code": "internal", "message": "internal error"}}, status_code=500)

    return app
