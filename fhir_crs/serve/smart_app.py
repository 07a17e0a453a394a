"""SMART App Launch (EHR launch and standalone launch) of the timeline page.

    GET /launch?iss=…[&launch=…]   iss on the allow-list -> [iss]/.well-known/smart-configuration
                                   (fetched without credentials, on the iss origin only) -> redirect to
                                   its authorization_endpoint with state, nonce and PKCE (S256)
    GET /callback?code=…&state=…   state checked against this browser's pending launch (single use) ->
                                   token request with the code_verifier -> granted scope, patient
                                   context and the id_token (signature by the server's JWKS, aud,
                                   nonce) checked -> server-side session -> redirect to /app
    GET /app[?patient=…]           the session's patient only: pipeline.fetch_patient with the
                                   session's token, graded, rendered as the `report --html` page

Tokens stay in this process's memory (`SessionStore`); the browser holds only a random session
id in an HttpOnly cookie. A session ends when its token expires. Nothing here logs a token, a
code, a state or a patient identifier.
"""

from __future__ import annotations

import base64
import hashlib
import html
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import jwt
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from ..errors import FhirCrsError
from ..fhir.auth import BearerAuth, NoAuth
from ..fhir.client import FhirClient, origin, require_secure_url
from ..logs import note_secret
from .config import ServeConfig

log = logging.getLogger("fhir_crs.serve")

COOKIE = "fhir_crs_session"
PENDING_SECONDS = 600
# what the timeline needs to read, each as patient/<Type>.read (v1) or .rs (v2), or patient/*.*
NEEDED_TYPES = ("Patient", "Observation", "MedicationAdministration", "Procedure")
ID_TOKEN_ALGS = ["RS256", "RS384", "ES256", "ES384"]


class LaunchRefused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class Pending:
    sid: str
    iss: str
    verifier: str
    nonce: str
    token_endpoint: str
    issuer: str | None
    jwks_uri: str | None
    redirect_uri: str
    created: float


@dataclass(slots=True)
class Session:
    iss: str
    token: str
    patient: str
    scope: str
    expires_at: float


class SessionStore:
    """Pending launches by state and sessions by id, in memory, expired ones dropped on access."""

    def __init__(self, clock: Any = time.time) -> None:
        self._pending: dict[str, Pending] = {}
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._clock = clock

    def add_pending(self, state: str, pending: Pending) -> None:
        with self._lock:
            now = self._clock()
            for k in [k for k, p in self._pending.items() if now - p.created > PENDING_SECONDS]:
                del self._pending[k]
            self._pending[state] = pending

    def take_pending(self, state: str, sid: str | None) -> Pending | None:
        """The pending launch of `state` if it was started by this browser (single use)."""
        with self._lock:
            pending = self._pending.get(state)
            if pending is None or sid is None or not secrets.compare_digest(pending.sid, sid):
                return None
            del self._pending[state]
            if self._clock() - pending.created > PENDING_SECONDS:
                return None
            return pending

    def put(self, sid: str, session: Session) -> None:
        with self._lock:
            self._sessions[sid] = session

    def get(self, sid: str | None) -> tuple[Session | None, bool]:
        """(session, expired)."""
        if sid is None:
            return None, False
        with self._lock:
            s = self._sessions.get(sid)
            if s is not None and self._clock() >= s.expires_at:
                del self._sessions[sid]
                return None, True
            return s, False


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def pkce_pair() -> tuple[str, str]:
    verifier = _b64url(secrets.token_bytes(48))
    return verifier, _b64url(hashlib.sha256(verifier.encode("ascii")).digest())


def granted_reads(scope: str) -> set[str]:
    """Resource types the granted scopes let the app read in the patient compartment."""
    out: set[str] = set()
    for s in scope.split():
        if not s.startswith("patient/") or "." not in s:
            continue
        rtype, perms = s[len("patient/"):].split(".", 1)
        perms = perms.split("?", 1)[0]
        if perms in ("read", "*") or (perms and set(perms) <= set("cruds") and "r" in perms and "s" in perms):
            out.add(rtype)
    return out


def missing_reads(scope: str) -> list[str]:
    reads = granted_reads(scope)
    return [] if "*" in reads else [t for t in NEEDED_TYPES if t not in reads]


def _page(title: str, message: str, status: int) -> HTMLResponse:
    body = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title></head>"
            f"<body><h1>{html.escape(title)}</h1><p class=\"message\">{html.escape(message, quote=False)}</p></body></html>")
    return HTMLResponse(body, status_code=status, headers=_headers())


def _headers() -> dict[str, str]:
    return {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:"}


def patient_name(patient: dict[str, Any]) -> str | None:
    for name in patient.get("name") or []:
        if not isinstance(name, dict):
            continue
        if isinstance(name.get("text"), str) and name["text"].strip():
            return name["text"].strip()
        parts = [*(g for g in name.get("given") or [] if isinstance(g, str)), *([name["family"]] if isinstance(name.get("family"), str) else [])]
        if parts:
            return " ".join(parts)
    return None


def add_smart_routes(app: FastAPI, config: ServeConfig) -> None:
    store = SessionStore()
    app.state.smart_sessions = store

    def base_url(request: Request) -> str:
        return (config.public_url or str(request.base_url)).rstrip("/")

    def client_for(iss: str, token: str | None = None) -> FhirClient:
        return FhirClient(iss, auth=BearerAuth(token) if token else NoAuth(), timeout=config.timeout, max_retries=1,
                          total_time_cap=max(config.timeout, 20.0), allow_insecure_http=config.allow_insecure_http,
                          ca_bundle=config.ca_bundle)

    def discover(iss: str) -> dict[str, Any]:
        with client_for(iss) as client:
            try:
                doc = client.get_json_url(f"{client.base_url}/.well-known/smart-configuration", with_auth=False)
            except FhirCrsError as exc:
                raise LaunchRefused(502, f"SMART discovery at the FHIR server failed: {exc}") from exc
        for key in ("authorization_endpoint", "token_endpoint"):
            url = doc.get(key)
            if not isinstance(url, str) or not url.strip():
                raise LaunchRefused(502, f"the server's SMART configuration has no {key}")
            try:
                require_secure_url(url, f"SMART {key}", allow_insecure_http=config.allow_insecure_http)
            except FhirCrsError as exc:
                raise LaunchRefused(502, str(exc)) from exc
        methods = doc.get("code_challenge_methods_supported")
        if isinstance(methods, list) and "S256" not in methods:
            raise LaunchRefused(502, "the server's SMART configuration does not support PKCE S256")
        return doc

    def set_cookie(response: Response, request: Request, sid: str) -> None:
        response.set_cookie(COOKIE, sid, httponly=True, samesite="lax", path="/",
                            secure=urlsplit(base_url(request)).scheme == "https", max_age=int(config.session_max_seconds))

    @app.get("/launch", response_class=HTMLResponse, summary="SMART App Launch (EHR launch or standalone)")
    async def launch(request: Request, iss: str | None = None, launch: str | None = None) -> Response:
        if not iss:
            return _page("Launch refused", "the launch has no iss (the FHIR server): launch the app from the EHR", 400)
        if not config.allows(iss):
            return _page("Launch refused", "this FHIR server (iss) is not on the app's allow-list; nothing was fetched", 400)
        try:
            doc = await run_in_threadpool(discover, iss)
        except LaunchRefused as exc:
            return _page("Launch failed", exc.message, exc.status)
        sid = request.cookies.get(COOKIE) or secrets.token_urlsafe(32)
        state, nonce = secrets.token_urlsafe(32), secrets.token_urlsafe(24)
        verifier, challenge = pkce_pair()
        redirect_uri = base_url(request) + "/callback"
        store.add_pending(state, Pending(sid, iss, verifier, nonce, doc["token_endpoint"], doc.get("issuer"),
                                         doc.get("jwks_uri"), redirect_uri, time.time()))
        scope = config.smart_scope if launch else config.smart_scope.replace("launch ", "launch/patient ", 1)
        params = {"response_type": "code", "client_id": config.smart_client_id, "redirect_uri": redirect_uri,
                  "scope": scope, "state": state, "aud": iss, "nonce": nonce,
                  "code_challenge": challenge, "code_challenge_method": "S256"}
        if launch:
            params["launch"] = launch
        endpoint = doc["authorization_endpoint"]
        response = RedirectResponse(endpoint + ("&" if "?" in endpoint else "?") + urlencode(params), status_code=302,
                                    headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})
        set_cookie(response, request, sid)
        return response

    def exchange(pending: Pending, code: str) -> Session:
        with client_for(pending.iss) as client:
            status, body = client.post_form(pending.token_endpoint, {
                "grant_type": "authorization_code", "code": code, "redirect_uri": pending.redirect_uri,
                "client_id": config.smart_client_id, "code_verifier": pending.verifier})
            if status != 200 or not body or not isinstance(body.get("access_token"), str):
                error = (body or {}).get("error") if isinstance(body, dict) else None
                raise LaunchRefused(502, f"the authorization server refused the token request (HTTP {status}"
                                         + (f", {error}" if isinstance(error, str) else "") + ")")
            token = body["access_token"]
            note_secret(token)
            if str(body.get("token_type", "")).lower() != "bearer":
                raise LaunchRefused(502, "the token is not a Bearer token")
            scope = body.get("scope") if isinstance(body.get("scope"), str) else ""
            if lacking := missing_reads(scope):
                raise LaunchRefused(403, "the granted scope does not let the app read " + ", ".join(lacking)
                                    + " of the patient (asked: " + config.smart_scope + ")")
            patient = body.get("patient")
            if not isinstance(patient, str) or not patient.strip():
                raise LaunchRefused(403, "the token has no patient context: launch the app from a patient's chart")
            if "openid" in scope.split():
                check_id_token(client, pending, body.get("id_token"))
        expires_in = body.get("expires_in")
        lifetime = float(expires_in) if isinstance(expires_in, int | float) and expires_in > 0 else 300.0
        return Session(pending.iss, token, patient.strip(), scope, time.time() + min(lifetime, config.session_max_seconds))

    def check_id_token(client: FhirClient, pending: Pending, id_token: Any) -> None:
        if not isinstance(id_token, str) or not id_token:
            raise LaunchRefused(403, "openid was granted but the token response has no id_token")
        if not pending.jwks_uri:
            raise LaunchRefused(502, "the server's SMART configuration has no jwks_uri to check the id_token with")
        try:
            require_secure_url(pending.jwks_uri, "SMART jwks_uri", allow_insecure_http=config.allow_insecure_http)
            resp = client.get_url(pending.jwks_uri, accept="application/json", with_auth=False, foreign=True, what="jwks_uri")
            keys = jwt.PyJWKSet.from_dict(resp.json())
            kid = jwt.get_unverified_header(id_token).get("kid")
            key = next((k for k in keys.keys if kid is None or k.key_id == kid), None)
            if key is None:
                raise LaunchRefused(403, "the id_token is signed with a key the server does not publish")
            claims = jwt.decode(id_token, key.key, algorithms=ID_TOKEN_ALGS, audience=config.smart_client_id,
                                issuer=pending.issuer, options={"require": ["exp", "iat", "aud", "iss"]})
        except LaunchRefused:
            raise
        except (jwt.PyJWTError, ValueError, FhirCrsError) as exc:
            raise LaunchRefused(403, f"the id_token is not valid ({type(exc).__name__})") from exc
        if not secrets.compare_digest(str(claims.get("nonce", "")), pending.nonce):
            raise LaunchRefused(403, "the id_token's nonce does not match this launch")

    @app.get("/callback", response_class=HTMLResponse, summary="SMART OAuth 2.0 redirect URI")
    async def callback(request: Request, code: str | None = None, state: str | None = None, error: str | None = None) -> Response:
        pending = store.take_pending(state, request.cookies.get(COOKIE)) if state else None
        if pending is None:
            return _page("Launch refused", "the state does not match a launch started in this browser: launch the app again", 400)
        if error:
            return _page("Launch refused", f"the authorization server answered {error}", 403)
        if not code:
            return _page("Launch refused", "the authorization server sent no code", 400)
        try:
            session = await run_in_threadpool(exchange, pending, code)
        except LaunchRefused as exc:
            return _page("Launch refused", exc.message, exc.status)
        except FhirCrsError as exc:
            return _page("Launch failed", str(exc), 502)
        store.put(pending.sid, session)
        return RedirectResponse("/app", status_code=303, headers={"Cache-Control": "no-store"})

    def render(session: Session, patient_id: str) -> str:
        from ..html import render_patient_html
        from ..pipeline import fetch_patient, grade_resources
        from .cds import WindowConfig

        with client_for(session.iss, session.token) as client:
            resources = fetch_patient(client, patient_id, WindowConfig(config.window_before_days, config.window_after_days),
                                      config.code_map, config.settings)
        run = grade_resources(resources, config.settings, config.code_map.directory, origin=f"Patient/{patient_id}")
        cases = [c.to_json(config.settings, series=True) for c in run.cases if c.timeline.patient == f"Patient/{patient_id}"]
        patient = next((r for r in resources if r.get("resourceType") == "Patient"), {})
        name = patient_name(patient)
        if not cases:
            raise LaunchRefused(200, f"No CAR-T infusion (day 0) was found for {name or 'this patient'}: nothing to grade.")
        return render_patient_html(cases, name=name)

    @app.get("/app", response_class=HTMLResponse, summary="The launched patient's CRS/ICANS timeline page")
    async def app_page(request: Request, patient: str | None = None) -> Response:
        session, expired = store.get(request.cookies.get(COOKIE))
        if session is None:
            if expired:
                return _page("Session expired", "the access token expired: launch the app again from the EHR", 401)
            return _page("Not launched", "no SMART session: launch the app from the EHR", 401)
        wanted = (patient or session.patient).removeprefix("Patient/")
        if wanted != session.patient:
            return _page("Refused", "this patient is outside the launch context of the token", 403)
        try:
            page = await run_in_threadpool(render, session, wanted)
        except LaunchRefused as exc:
            return _page("CRS/ICANS timeline", exc.message, exc.status)
        except FhirCrsError as exc:
            return _page("Could not read the chart", f"grading failed: {exc}", 502)
        return HTMLResponse(page, headers=_headers())


__all__ = ["COOKIE", "SessionStore", "add_smart_routes", "granted_reads", "missing_reads", "origin", "pkce_pair"]
