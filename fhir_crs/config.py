"""Run settings for the server path (pull, sync): where the FHIR server is, how to authenticate,
what to fetch and where to write. Resolved in ONE place with one precedence:

    command-line flag  >  environment (FHIR_CRS_*)  >  config file (fhir-crs.toml)  >  default

The config file is `--config PATH`, else `$FHIR_CRS_CONFIG`, else `./fhir-crs.toml` if present
(see `mappings/site.example.toml`). Secrets (bearer token, password, SMART private key) come only
from the environment or from a file named in the config (`token_file`, `password_file`,
`private_key_file`) — a secret written into the config file itself is refused. Pure: resolution
takes its inputs as arguments, so it is tested without touching the real environment.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from .errors import ConfigError
from .textfile import TextFileError, read_text
from .validation import check_typed, one_line

ENV_PREFIX = "FHIR_CRS_"
SECRET_KEYS = ("token", "password", "client_secret", "private_key")
AUTH_MODES = ("none", "bearer", "basic", "smart")


# (where each key came from, whether the values are typed TOML) while `resolve` builds a RunConfig
_SOURCE: ContextVar[tuple[Mapping[str, str], bool]] = ContextVar("fhir_crs_config_source", default=({}, False))


def _f(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
       unit: str = "", allowed: str = "", repr: bool = True) -> Any:
    return Field(default, ge=ge, gt=gt, le=le, repr=repr, json_schema_extra={"unit": unit, "allowed": allowed})


class RunConfig(BaseModel):
    """Every run setting, typed and range-checked (see README "Run settings")."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, validate_default=True)

    server: str | None = _f(None, allowed="an http(s) URL")
    auth: Literal["none", "bearer", "basic", "smart"] = "none"
    token: str | None = _f(None, repr=False)
    token_file: str | None = None
    username: str | None = None
    password: str | None = _f(None, repr=False)
    password_file: str | None = None
    client_id: str | None = None
    private_key_file: str | None = None
    key_id: str | None = None
    jwt_alg: Literal["RS384", "ES384"] = "RS384"
    # what fhir-crs reads and searches (Conditions too: problem-list findings, reasons, and its own
    # written ones, found by identifier), writes (Condition, Bundle) and adds (the Provenance of a write)
    scope: str = ("system/Observation.rs system/MedicationAdministration.rs system/Procedure.rs system/Patient.rs "
                  "system/Medication.rs system/Condition.crus system/Bundle.crus system/Provenance.c")
    token_url: str | None = _f(None, allowed="an http(s) URL")
    timeout: float = _f(30.0, gt=0, le=600, unit="s")
    page_size: int = _f(200, ge=1, le=1000, unit="resources per page")
    max_retries: int = _f(5, ge=0, le=20)
    total_time_cap: float = _f(600.0, gt=0, le=86400, unit="s")
    # longest wait between Bulk $export status polls; a longer Retry-After is capped to it (HAPI says 120)
    bulk_max_poll: float = _f(120.0, ge=1, le=3600, unit="s")
    window_before_days: float = _f(7.0, ge=1, le=365, unit="days")
    window_after_days: float = _f(100.0, ge=30, le=730, unit="days")
    identifier_system: str = _f("urn:fhir-crs:case", allowed="a URI (urn:…, http(s)://…)")
    write: bool = False
    # None: the per-user data directory (sync.default_state_path)
    state_path: str | None = _f(None, allowed="a file path")
    lookback_days: float = _f(120.0, ge=1, le=100000, unit="days")
    workers: int = _f(4, ge=1, le=32)
    # --- nightly change detection (sync.py, changefeed.py)
    change_feed: Literal["auto", "history", "search", "per-patient"] = "auto"
    sync_overlap_seconds: float = _f(300.0, ge=0, le=86400, unit="s")
    reconcile_days: float = _f(7.0, ge=0, le=3650, unit="days (0: never)")
    mappings: str | None = None
    # --- security (docs/SECURITY.md)
    allow_insecure_http: bool = False
    ca_bundle: str | None = _f(None, allowed="a CA certificate file (PEM) or folder")
    bulk_file_origins: tuple[str, ...] = _f((), allowed="a list of origins (https://host[:port], no path)")
    max_response_mb: float = _f(64.0, gt=0, le=4096, unit="MB")
    max_pages: int = _f(10_000, ge=1, le=500_000, unit="pages")
    max_bulk_file_mb: float = _f(16384.0, gt=0, le=100_000, unit="MB")
    max_decompression_ratio: float = _f(200.0, ge=10, le=100_000)
    log_redact: bool | None = None

    def __init__(self, **data: Any) -> None:
        """Constructed directly or by `resolve`: a bad value is one ConfigError line naming its source."""
        origin, _typed = _SOURCE.get()
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise one_line(exc, RunConfig, data, lambda key: origin.get(key, "run config")) from None

    @field_validator("*", mode="before")
    @classmethod
    def _typed(cls, value: Any, info: ValidationInfo) -> Any:
        return check_typed(value, info, cls.model_fields, typed=_SOURCE.get()[1])

    @field_validator("server", "token_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("not an http(s) URL")
        return value

    @field_validator("identifier_system")
    @classmethod
    def _uri(cls, value: str) -> str:
        if not value or any(c.isspace() for c in value) or ":" not in value:
            raise ValueError("not a URI")
        return value

    @field_validator("bulk_file_origins")
    @classmethod
    def _origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            parts = urlsplit(item.strip())
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/") or parts.query:
                raise ValueError(f"{item!r} is not an origin")
        return tuple(item.strip() for item in value)

    @field_validator("state_path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("empty path")
        return value

    def secret_token(self) -> str | None:
        return self.token or _read_secret(self.token_file, "token_file")

    def secret_password(self) -> str | None:
        return self.password or _read_secret(self.password_file, "password_file")


def _read_secret(path: str | None, key: str) -> str | None:
    """The secret in file `path`; a file other users can access is refused (private.py)."""
    if not path:
        return None
    from .private import check_secret_file

    check_secret_file(Path(path).expanduser(), key)
    try:
        return Path(path).expanduser().read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"Cannot read {key} {path}: {exc.strerror or exc}.") from exc


_FIELDS = RunConfig.model_fields


def load_config_file(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(read_text(path))
    except OSError as exc:
        raise ConfigError(f"Cannot read config file {path}: {exc.strerror or exc}.") from exc
    except TextFileError as exc:
        raise ConfigError(f"Config file {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"Config file {path} is not valid TOML: {exc}.") from exc
    table = data.get("fhir-crs", data)
    if not isinstance(table, dict):
        raise ConfigError(f"Config file {path}: expected a [fhir-crs] table.")
    out: dict[str, Any] = {}
    for k, v in table.items():
        if k in SECRET_KEYS:
            raise ConfigError(
                f"Config file {path}: '{k}' must not be written in a config file; "
                f"set {ENV_PREFIX}{k.upper()} or name a file with '{k}_file'."
            )
        out[k] = v
    _validate(out, {k: f"Config file {path}" for k in out}, typed=True)
    return out


def _validate(values: dict[str, Any], origin: Mapping[str, str], typed: bool) -> RunConfig:
    """RunConfig from `values`, or ONE ConfigError line naming where the bad key came from."""
    token = _SOURCE.set((origin, typed))
    try:
        return RunConfig(**values)
    finally:
        _SOURCE.reset(token)


def resolve(flags: Mapping[str, Any], env: Mapping[str, str], config_path: Path | None = None,
            cwd: Path | None = None) -> RunConfig:
    """Flag > env > file > default. `flags` holds only options the user actually gave."""
    values: dict[str, Any] = {}
    path = config_path or (Path(env[ENV_PREFIX + "CONFIG"]) if env.get(ENV_PREFIX + "CONFIG") else None)
    if path is None and cwd is not None and (cwd / "fhir-crs.toml").is_file():
        path = cwd / "fhir-crs.toml"
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"Config file {path} does not exist.")
        values.update(load_config_file(path))
    origin = {k: f"Config file {path}" for k in values}
    for name in _FIELDS:
        key = ENV_PREFIX + name.upper()
        if key in env and env[key] != "":
            values[name], origin[name] = env[key], f"environment {key}"
    for name, v in flags.items():
        if v is None:
            continue
        if name not in _FIELDS:
            raise ConfigError(f"unknown option '{name}'.")
        values[name], origin[name] = v, f"--{name.replace('_', '-')}"
    return _validate(values, origin, typed=False)
