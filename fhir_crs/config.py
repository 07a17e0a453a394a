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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .textfile import TextFileError, read_text

ENV_PREFIX = "FHIR_CRS_"
SECRET_KEYS = ("token", "password", "client_secret", "private_key")
AUTH_MODES = ("none", "bearer", "basic", "smart")


@dataclass(frozen=True)
class RunConfig:
    server: str | None = None
    auth: str = "none"
    token: str | None = field(default=None, repr=False)
    token_file: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    password_file: str | None = None
    client_id: str | None = None
    private_key_file: str | None = None
    key_id: str | None = None
    jwt_alg: str = "RS384"
    scope: str = "system/Observation.rs system/MedicationAdministration.rs system/Procedure.rs system/Patient.rs system/Medication.rs system/Condition.cu system/Bundle.cu"
    token_url: str | None = None
    timeout: float = 30.0
    page_size: int = 200
    max_retries: int = 5
    total_time_cap: float = 600.0
    window_before_days: float = 7.0
    window_after_days: float = 100.0
    identifier_system: str = "urn:fhir-crs:case"
    write: bool = False
    state_path: str | None = None  # None: the per-user data directory (sync.default_state_path)
    lookback_days: float = 120.0
    workers: int = 4
    mappings: str | None = None

    def secret_token(self) -> str | None:
        return self.token or _read_secret(self.token_file, "token_file")

    def secret_password(self) -> str | None:
        return self.password or _read_secret(self.password_file, "password_file")


def _read_secret(path: str | None, key: str) -> str | None:
    if not path:
        return None
    try:
        return Path(path).expanduser().read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"Cannot read {key} {path}: {exc.strerror or exc}.") from exc


_FIELDS = {f.name: f for f in fields(RunConfig)}


def _coerce(name: str, value: Any, where: str) -> Any:
    default = getattr(RunConfig(), name)
    kind = type(default) if default is not None else str
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    try:
        if kind is bool:
            if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return value.strip().lower() in ("1", "true", "yes", "on")
            raise ValueError
        if kind is int:
            return int(str(value))
        if kind is float:
            return float(str(value))
        return str(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: '{name}' expects {kind.__name__}, got {value!r}.") from exc


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
        if k not in _FIELDS:
            raise ConfigError(f"Config file {path}: unknown key '{k}'. Known keys: {', '.join(sorted(_FIELDS))}.")
        out[k] = _coerce(k, v, str(path))
    return out


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
    for name in _FIELDS:
        key = ENV_PREFIX + name.upper()
        if key in env and env[key] != "":
            values[name] = _coerce(name, env[key], f"environment {key}")
    for name, v in flags.items():
        if v is None:
            continue
        if name not in _FIELDS:
            raise ConfigError(f"unknown option '{name}'.")
        values[name] = _coerce(name, v, f"--{name.replace('_', '-')}")
    cfg = RunConfig(**values)
    if cfg.auth not in AUTH_MODES:
        raise ConfigError(f"auth '{cfg.auth}' is not one of {', '.join(AUTH_MODES)}.")
    if cfg.server is not None and not cfg.server.startswith(("http://", "https://")):
        raise ConfigError(f"server '{cfg.server}' is not an http(s) URL.")
    if cfg.page_size < 1 or cfg.timeout <= 0:
        raise ConfigError("page_size and timeout must be positive.")
    return cfg
