"""A local OAuth 2.0 / OpenID Connect authorization server for the SMART tests, built on Authlib
(Flask integration: authorization code grant, PKCE S256 required, OpenID Connect id_token),
run as its own process on 127.0.0.1 (started by a fixture, killed by PID).

It approves every authorization request at once (no login page) and binds the EHR launch
context of the `launch` parameter (config "launches": {launch: {"patient", "expires_in"?, "scope"?}})
or, for a standalone launch, config "standalone_patient". `python tests/smart_authz.py CONFIG`.
Every token request is appended to config "log" (form fields, code_verifier included).
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.jose import JsonWebKey
from authlib.oauth2.rfc6749 import AuthorizationCodeMixin, ClientMixin, grants
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oidc.core import UserInfo
from authlib.oidc.core import grants as oidc_grants
from flask import Flask, jsonify, request

CONFIG = Path(sys.argv[1]) if __name__ == "__main__" else None


def conf() -> dict[str, Any]:
    assert CONFIG is not None
    return json.loads(CONFIG.read_text())


class User:
    def __init__(self, patient: str, launch: str | None) -> None:
        self.id = "Practitioner/test-clinician"
        self.patient = patient
        self.launch = launch

    def get_user_id(self) -> str:
        return self.id


class Client(ClientMixin):
    def __init__(self, client_id: str, redirect_uris: list[str]) -> None:
        self.client_id = client_id
        self.redirect_uris = redirect_uris

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str:
        return self.redirect_uris[0]

    def get_allowed_scope(self, scope: str) -> str:
        return scope

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri in self.redirect_uris

    def check_client_secret(self, client_secret: str) -> bool:
        return False

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == "none"  # a public client: PKCE instead of a secret

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "authorization_code"


class Code(AuthorizationCodeMixin):
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope

    def get_nonce(self) -> str | None:
        return _launch_ctx(self.user).get("id_token_nonce", self.nonce)

    def get_auth_time(self) -> int:
        return self.auth_time

    def get_acr(self) -> None:
        return None

    def get_amr(self) -> None:
        return None

    def get_code_challenge(self) -> str | None:
        return self.code_challenge

    def get_code_challenge_method(self) -> str | None:
        return self.code_challenge_method


CODES: dict[str, Code] = {}
KEY = JsonWebKey.generate_key("RSA", 2048, is_private=True, options={"kid": "test-key-1"})
# a key the server does not publish, with the published key's kid (a forged id_token)
OTHER_KEY = JsonWebKey.generate_key("RSA", 2048, is_private=True, options={"kid": "test-key-1"})


def _launch_ctx(user: Any) -> dict[str, Any]:
    """The test's per-launch settings; `id_token_nonce`, `id_token_aud`, `id_token_iss` and
    `id_token_key: "other"` make the server issue a substituted or forged id_token."""
    launch = getattr(user, "launch", None)
    return conf()["launches"].get(launch, {}) if launch else {}


def _payload(req: Any) -> Any:
    return getattr(req, "payload", None) or req


class CodeGrant(grants.AuthorizationCodeGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ["none"]  # noqa: RUF012

    def save_authorization_code(self, code: str, req: Any) -> None:
        data = _payload(req).data
        CODES[code] = Code(code=code, client_id=req.client.client_id, redirect_uri=data.get("redirect_uri"),
                           scope=data.get("scope", ""), user=req.user, nonce=data.get("nonce"),
                           code_challenge=data.get("code_challenge"), code_challenge_method=data.get("code_challenge_method"),
                           auth_time=int(time.time()))

    def query_authorization_code(self, code: str, client: Client) -> Code | None:
        item = CODES.get(code)
        return item if item is not None and item.client_id == client.client_id else None

    def delete_authorization_code(self, authorization_code: Code) -> None:
        CODES.pop(authorization_code.code, None)

    def authenticate_user(self, authorization_code: Code) -> User:
        return authorization_code.user


class OpenIDCode(oidc_grants.OpenIDCode):
    def exists_nonce(self, nonce: str, req: Any) -> bool:
        return False

    def get_jwt_config(self, grant: Any) -> dict[str, Any]:
        ctx = _launch_ctx(grant.request.authorization_code.user)
        key = OTHER_KEY if ctx.get("id_token_key") == "other" else KEY
        return {"key": key.as_dict(is_private=True), "alg": "RS256", "iss": ctx.get("id_token_iss", conf()["issuer"]), "exp": 3600}

    def get_audiences(self, request: Any) -> list[str]:
        ctx = _launch_ctx(request.authorization_code.user)
        return ctx.get("id_token_aud", [request.client.get_client_id()])

    def generate_user_info(self, user: User, scope: str) -> UserInfo:
        return UserInfo(sub=user.id, fhirUser=user.id)


def generate_token(grant_type: str, client: Client, user: User | None = None, scope: str | None = None,
                   expires_in: int | None = None, include_refresh_token: bool = True) -> dict[str, Any]:
    ctx = conf()["launches"].get(user.launch, {}) if user and user.launch else {}
    return {"token_type": "Bearer", "access_token": "at-" + secrets.token_urlsafe(24),
            "expires_in": ctx.get("expires_in", 3600), "scope": ctx.get("scope", scope or ""),
            **({"patient": user.patient} if user and user.patient else {})}


def create_app() -> Flask:
    app = Flask(__name__)
    cfg = conf()
    clients = {c["client_id"]: Client(c["client_id"], c["redirect_uris"]) for c in cfg["clients"]}
    server = AuthorizationServer(app, query_client=clients.get, save_token=lambda token, req: None)
    server.register_token_generator("default", generate_token)
    server.register_grant(CodeGrant, [CodeChallenge(required=True), OpenIDCode(require_nonce=True)])

    @app.route("/authorize")
    def authorize() -> Any:
        c = conf()
        if request.args.get("aud") != c["aud"]:
            return jsonify({"error": "invalid_request", "error_description": "aud is not this server's FHIR base"}), 400
        launch = request.args.get("launch")
        if launch is not None:
            ctx = c["launches"].get(launch)
            if ctx is None:
                return jsonify({"error": "invalid_request", "error_description": "unknown launch"}), 400
            patient = ctx["patient"]
        else:
            patient = c["standalone_patient"]
        return server.create_authorization_response(grant_user=User(patient, launch))

    @app.route("/token", methods=["POST"])
    def token() -> Any:
        with open(conf()["log"], "a", encoding="utf-8") as fh:
            fh.write(json.dumps(dict(request.form)) + "\n")
        return server.create_token_response()

    @app.route("/jwks")
    def jwks() -> Any:
        return jsonify({"keys": [KEY.as_dict(is_private=False)]})

    return app


if __name__ == "__main__":
    create_app().run(host="127.0.0.1", port=conf()["port"], threaded=True)
