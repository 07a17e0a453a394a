"""What `fhir-crs serve` is allowed to do, resolved once at start-up (bad values: exit 2).

* `fhir_servers`: the only FHIR base URLs the service may call (`--allow-fhir-server`, and the
  `--server` a site runs it against). A CDS Hooks request naming another `fhirServer`, or a SMART
  launch with another `iss`, is refused before anything is fetched: never an open proxy.
* `ehr_origins`: browser origins allowed to call the CDS service (CORS), e.g. an EHR sandbox.
* `smart_client_id`, `smart_scope`: the SMART app's registration at the EHR.
* `cds_clients`: the EHRs whose signed JWT a CDS Hooks call must carry (`--cds-client ISS=JWKS_URL`,
  `cds_auth.py`); empty = calls are not authenticated (a warning at start-up: put a gateway in front).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from ..errors import ConfigError
from ..fhir.client import is_loopback, origin
from ..mapping_files import CodeMap
from ..settings import GradingSettings

if TYPE_CHECKING:
    from .cds_auth import CdsClient

SERVICE_ID = "fhir-crs-crs-grade"
HOOK = "patient-view"
# SMART v1 scopes; `.rs` replaces `.read` for SMART v2 servers (`smart_scope_v2`)
SMART_SCOPE = "launch patient/*.read openid fhirUser"
SMART_SCOPE_V2 = "launch patient/*.rs openid fhirUser"


def normalise_base(url: str, what: str) -> str:
    """An absolute http(s) FHIR base URL without a trailing slash, query or fragment."""
    text = (url or "").strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(f"{what} {url!r} is not an absolute http(s) FHIR base URL (e.g. https://ehr.example.org/fhir).")
    return f"{origin(text)}{parts.path.rstrip('/')}"


def normalise_origin(value: str, what: str) -> str:
    parts = urlsplit((value or "").strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/") or parts.query:
        raise ConfigError(f"{what} {value!r} is not an origin (scheme://host[:port], no path).")
    # as a browser sends it in `Origin` (RFC 6454): lower-cased, the scheme's default port left out;
    # `origin()` makes the port explicit, which no browser's Origin header would ever match
    text = origin(value.strip())
    default = {"http": ":80", "https": ":443"}[parts.scheme]
    return text[: -len(default)] if text.endswith(default) else text


@dataclass(slots=True)
class ServeConfig:
    settings: GradingSettings
    code_map: CodeMap
    fhir_servers: frozenset[str] = frozenset()
    ehr_origins: tuple[str, ...] = ()
    smart_client_id: str = "fhir-crs"
    smart_scope: str = SMART_SCOPE
    public_url: str | None = None
    window_before_days: float = 7.0
    window_after_days: float = 100.0
    timeout: float = 30.0
    allow_insecure_http: bool = False
    ca_bundle: str | None = None
    mappings: Path | None = None
    session_max_seconds: float = 3600.0
    cds_clients: tuple[CdsClient, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def cds_audience(self) -> str | None:
        """The `aud` a CDS client's JWT must name: this service's endpoint URL (needs `public_url`)."""
        return f"{self.public_url}/cds-services/{SERVICE_ID}" if self.public_url else None

    def allows(self, base: str) -> bool:
        """Whether a FHIR base URL is on the allow-list (compared without a trailing slash)."""
        try:
            return normalise_base(base, "FHIR server") in self.fhir_servers
        except ConfigError:
            return False

    @staticmethod
    def check_servers(urls: list[str], allow_insecure_http: bool) -> frozenset[str]:
        out = set()
        for url in urls:
            base = normalise_base(url, "--allow-fhir-server")
            if base.startswith("http://") and not is_loopback(base) and not allow_insecure_http:
                raise ConfigError(f"--allow-fhir-server {url}: plain http:// is only accepted on loopback "
                                  "(pass --allow-insecure-http to accept it anyway).")
            out.add(base)
        return frozenset(out)
