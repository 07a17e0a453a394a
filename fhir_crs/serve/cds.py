"""CDS Hooks 2.0 service `fhir-crs-crs-grade` on `patient-view` (stage: EHR ⇄ serve ⇄ pipeline).

    POST /cds-services/fhir-crs-crs-grade
      request  -> `parse_request` (400 on a malformed request, 412 when data cannot be had)
      prefetch -> resources per template key; a key that is absent, null, an OperationOutcome or a
                  Bundle with a `next` page is *missing*
      missing  -> read from `fhirServer` with the `fhirAuthorization` bearer token through
                  `FhirClient` (origin-bound credentials), windowed around the CAR-T infusion like
                  `pull` (`pipeline.fetch_patient` when nothing usable was prefetched)
      grade    -> `pipeline.grade_resources` (the same mappers and grading as every other command)
      cards    -> `cards_for` (grade, onset, maximum, driving criterion, evidence, flags, the other
                  systems side by side, a "rising" card, a SMART app link)

A fetch or grading failure answers 200 with one card saying grading failed (never a crash, never
an empty answer that would read as "no CRS"). The bearer token is never logged or echoed.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from ..errors import ConfigError, FhirCrsError
from ..events import SKIP_CODES
from ..fhir.auth import BearerAuth, NoAuth
from ..fhir.client import FhirClient
from ..grading.result import iso
from ..logs import note_secret
from ..pipeline import GradedCase, fetch_patient, fetch_window, grade_resources, map_items
from ..sources import SourceResource
from .config import HOOK, SERVICE_ID, ServeConfig

log = logging.getLogger("fhir_crs.serve")

# Template key -> (FHIR query template, resource types it yields, what it is). A contract: EHRs
# are registered with these keys.
PREFETCH: dict[str, str] = {
    "patient": "Patient/{{context.patientId}}",
    "procedures": "Procedure?patient={{context.patientId}}",
    "medications": "MedicationAdministration?patient={{context.patientId}}&_include=MedicationAdministration:medication",
    "vitals": "Observation?patient={{context.patientId}}&category=vital-signs",
    "labs": "Observation?patient={{context.patientId}}&category=laboratory",
    "assessments": "Observation?patient={{context.patientId}}&category=survey,exam,imaging",
    "conditions": "Condition?patient={{context.patientId}}",
}
# Keys an EHR registered before they existed may lack: without them and without a fhirServer the
# grade is still given, with a note on the card naming what was not read (never a silent gap).
OPTIONAL_PREFETCH = {"conditions": "the patient's Conditions (a seizure, cerebral oedema or HLH on the problem list, "
                                   "the reasons Procedures and fluids name) were not read: ICANS and carHLH may be under-called"}
OBSERVATION_CATEGORY = {"vitals": "vital-signs", "labs": "laboratory", "assessments": "survey,exam,imaging"}
CARD_SOURCE = {"label": "fhir-crs: ASTCT CRS/ICANS grading", "topic": {
    "system": "urn:fhir-crs:cds", "code": "crs-icans-grade", "display": "CAR-T CRS/ICANS grade"}}
RISING_WINDOW_H = 24.0
SYSTEM_LABELS = {"astct": "ASTCT 2019", "lee2014": "Lee 2014", "penn": "Penn", "mskcc": "MSKCC",
                 "cartox": "CARTOX", "ctcae5": "CTCAE v5"}


class HookError(Exception):
    """A request the spec answers with an HTTP error (400 malformed, 404 unknown service,
    412 the data cannot be had)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}


def discovery(config: ServeConfig) -> dict[str, Any]:
    return {"services": [{
        "hook": HOOK,
        "id": SERVICE_ID,
        "title": "CAR-T CRS/ICANS grade (ASTCT)",
        "description": ("Current ASTCT consensus grade of cytokine release syndrome (CRS) and ICANS after CAR-T "
                        "infusion, the criterion and resources that drive it, and the other grading systems side "
                        "by side, computed from the chart's vitals, labs, assessments, medications and procedures."),
        "prefetch": dict(PREFETCH),
        "usageRequirements": ("Prefetch or fhirServer access to Patient, Observation, MedicationAdministration, "
                              "Medication and Procedure (read). fhirServer must be on the service's allow-list."),
    }]}


# --------------------------------------------------------------------------- request


@dataclass(slots=True)
class HookRequest:
    hook_instance: str
    patient_id: str
    user_id: str | None
    fhir_server: str | None
    token: str | None
    prefetched: dict[str, list[dict[str, Any]]]  # usable prefetch, per key
    missing: list[str]  # template keys to read from the server
    notes: list[str] = field(default_factory=list)


def _bad(message: str) -> HookError:
    return HookError(400, "bad_request", message)


def _resources_of(key: str, value: Any, patient_id: str) -> list[dict[str, Any]] | None:
    """Resources of one prefetch value; None = missing (null, OperationOutcome, a partial Bundle)."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("resourceType"), str):
        raise _bad(f"prefetch.{key} is not a FHIR resource (a JSON object with resourceType)")
    rtype = value["resourceType"]
    if rtype == "OperationOutcome":
        return None
    if key == "patient":
        if rtype != "Patient":
            raise _bad(f"prefetch.patient is a {rtype}, not a Patient")
        if value.get("id") != patient_id:
            raise _bad("prefetch.patient is not the Patient of context.patientId")
        return [value]
    if rtype != "Bundle":
        raise _bad(f"prefetch.{key} is a {rtype}, not a Bundle (a search result)")
    entries = value.get("entry") or []
    if not isinstance(entries, list):
        raise _bad(f"prefetch.{key}.entry is not a list")
    links = value.get("link") or []
    if isinstance(links, list) and any(isinstance(link, dict) and link.get("relation") == "next" for link in links):
        return None  # only the first page: the whole search is read from the server instead
    out = []
    for i, entry in enumerate(entries):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            raise _bad(f"prefetch.{key}.entry[{i}] has no resource")
        if resource["resourceType"] != "OperationOutcome":
            out.append(resource)
    return out


def parse_request(body: Any, config: ServeConfig) -> HookRequest:
    if not isinstance(body, dict):
        raise _bad("the request body is not a JSON object")
    hook = body.get("hook")
    if hook != HOOK:
        raise _bad(f"hook {hook!r} is not served here: {SERVICE_ID} answers {HOOK!r}")
    instance = body.get("hookInstance")
    if not isinstance(instance, str) or not instance.strip():
        raise _bad("hookInstance is missing")
    context = body.get("context")
    if not isinstance(context, dict):
        raise _bad("context is missing")
    patient_id = context.get("patientId")
    from ..mappers.common import SAFE_ID

    if not isinstance(patient_id, str) or not SAFE_ID.match(patient_id):
        raise _bad("context.patientId is missing or not a FHIR logical id")
    user = context.get("userId")
    if user is not None and not isinstance(user, str):
        raise _bad("context.userId is not a string")
    server = body.get("fhirServer")
    if server is not None and (not isinstance(server, str) or not server.strip()):
        raise _bad("fhirServer is not a URL")
    authz = body.get("fhirAuthorization")
    token = None
    if authz is not None:
        if server is None:
            raise _bad("fhirAuthorization is given without fhirServer")
        if not isinstance(authz, dict) or not isinstance(authz.get("access_token"), str) or not authz["access_token"].strip():
            raise _bad("fhirAuthorization.access_token is missing")
        if str(authz.get("token_type", "")).lower() != "bearer":
            raise _bad("fhirAuthorization.token_type must be Bearer")
        if authz.get("patient") not in (None, patient_id):
            raise _bad("fhirAuthorization is for another patient than context.patientId")
        token = authz["access_token"].strip()
        note_secret(token)  # never in a log line
    if server is not None and not config.allows(server):
        raise HookError(412, "fhir_server_not_allowed",
                        f"fhirServer {server!r} is not on this service's allow-list (--allow-fhir-server); nothing was fetched")
    prefetch = body.get("prefetch")
    if prefetch is None:
        prefetch = {}
    if not isinstance(prefetch, dict):
        raise _bad("prefetch is not a JSON object")
    prefetched: dict[str, list[dict[str, Any]]] = {}
    missing = []
    for key in PREFETCH:
        resources = _resources_of(key, prefetch.get(key), patient_id)
        if resources is None:
            missing.append(key)
        else:
            prefetched[key] = resources
    notes = [f"prefetch key {k!r} is not one of this service's templates and was not read"
             for k in sorted(prefetch) if k not in PREFETCH]
    required = [k for k in missing if k not in OPTIONAL_PREFETCH]
    if required and server is None:
        raise HookError(412, "data_unavailable",
                        f"prefetch lacks {', '.join(required)} and no fhirServer was given to read them from")
    if server is None:
        notes += [f"no prefetch {k!r} and no fhirServer: {OPTIONAL_PREFETCH[k]}" for k in missing]
        missing = []
    return HookRequest(instance, patient_id, user, server, token, prefetched, missing, notes)


# --------------------------------------------------------------------------- data


def make_client(req: HookRequest, config: ServeConfig) -> FhirClient:
    """The same FHIR client as `pull`: the token goes only to fhirServer's origin (`FhirClient._hop`)."""
    assert req.fhir_server is not None
    return FhirClient(req.fhir_server, auth=BearerAuth(req.token) if req.token else NoAuth(), timeout=config.timeout,
                      max_retries=1, total_time_cap=max(config.timeout, 20.0),
                      allow_insecure_http=config.allow_insecure_http, ca_bundle=config.ca_bundle)


@dataclass(slots=True)
class WindowConfig:
    window_before_days: float
    window_after_days: float


def _infusions(resources: list[dict[str, Any]], config: ServeConfig) -> list[Any]:
    from ..timeline import find_infusions

    result, _ = map_items((SourceResource(r, f"hook#{i}") for i, r in enumerate(resources)), config.code_map)
    return find_infusions([e for evs in result.events.values() for e in evs])


def fetch_missing(client: FhirClient, req: HookRequest, config: ServeConfig) -> list[dict[str, Any]]:
    """The resources of the missing prefetch keys, read from the server windowed around the infusions.

    Nothing usable prefetched (only the Patient at most): `pipeline.fetch_patient`, exactly the
    reads of `fhir-crs pull`. Otherwise: the Patient if missing; the CAR-T administrations searched
    by the site's codes for a missing `procedures`/`medications` key; then, within [first infusion -
    window_before_days, last infusion + window_after_days], the searches of the missing keys.
    """
    from ..sync import cart_codes

    pid = req.patient_id
    window = WindowConfig(config.window_before_days, config.window_after_days)
    data_keys = [k for k in PREFETCH if k != "patient"]
    if all(k in req.missing for k in data_keys):
        return fetch_patient(client, pid, window, config.code_map, config.settings)
    have = [r for rs in req.prefetched.values() for r in rs]
    fetched: list[dict[str, Any]] = []
    if "patient" in req.missing:
        fetched.append(client.read("Patient", pid))
    proc_codes, drug_codes = cart_codes(config.code_map)
    found: list[dict[str, Any]] = []
    for key, rtype, codes in (("procedures", "Procedure", proc_codes), ("medications", "MedicationAdministration", drug_codes)):
        if key in req.missing:
            for chunk in range(0, len(codes), 20):
                found += client.search(rtype, [("patient", pid), ("code", ",".join(codes[chunk:chunk + 20]))], no_cache=True).matches
    infusions = _infusions([*have, *fetched, *found], config)
    if not infusions:
        return [*fetched, *found]  # no CAR-T infusion: no card
    before, after = fetch_window(window, config.settings)
    lo = iso(infusions[0][0] - timedelta(days=before))
    hi = iso(infusions[-1][0] + timedelta(days=after))
    for key in req.missing:
        if key == "procedures":
            fetched += client.search("Procedure", [("patient", pid), ("date", f"ge{lo}"), ("date", f"le{hi}")], no_cache=True).matches
        elif key == "medications":
            res = client.search("MedicationAdministration", [("patient", pid), ("effective-time", f"ge{lo}"), ("effective-time", f"le{hi}"),
                                                             ("_include", "MedicationAdministration:medication")], no_cache=True)
            fetched += [*res.matches, *res.includes]
        elif key == "conditions":  # all of them: problem-list entries are often undated
            fetched += client.search("Condition", [("patient", pid)], no_cache=True).matches
        elif key in OBSERVATION_CATEGORY:
            fetched += client.search("Observation", [("patient", pid), ("category", OBSERVATION_CATEGORY[key]),
                                                     ("date", f"ge{lo}"), ("date", f"le{hi}")], no_cache=True).matches
    seen = {f"{r.get('resourceType')}/{r.get('id')}" for r in fetched}
    fetched += [r for r in found if f"{r.get('resourceType')}/{r.get('id')}" not in seen]
    return fetched


def _dedupe(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One copy per Type/id (a resource may be in two prefetch Bundles); anonymous ones all kept."""
    out, seen = [], set()
    for r in resources:
        key = (r.get("resourceType"), r.get("id"))
        if r.get("id") is not None and key in seen:
            continue
        seen.add(key)
        out.append(r)
    return out


# --------------------------------------------------------------------------- cards


def _hours(case: dict[str, Any], when: str | None) -> str:
    if when is None:
        return "–"
    infusion = datetime.fromisoformat(case["infusion"].replace("Z", "+00:00"))
    h = (datetime.fromisoformat(when.replace("Z", "+00:00")) - infusion).total_seconds() / 3600
    return f"day {int(h // 24)} (+{h:g} h, {when})" if h >= 0 else f"{h:g} h ({when})"


def driving_criterion(result: dict[str, Any]) -> dict[str, Any] | None:
    """The first criterion reaching the maximum grade: what drives the grade."""
    return next((c for c in result.get("criteria", []) if c["grade"] == result["grade"]), None)


def indicator_for(grade: int) -> str:
    return "critical" if grade >= 3 else "warning" if grade == 2 else "info"


def grade_at(result: dict[str, Any], when: datetime) -> int:
    """The highest grade any criterion reached at or before `when` (0 before the first)."""
    g = 0
    for c in result.get("criteria", []):
        at = datetime.fromisoformat(c["at"].replace("Z", "+00:00"))
        if at <= when:
            g = max(g, c["grade"])
    return g


def _syndrome_lines(case: dict[str, Any], syndrome: str) -> list[str]:
    r = case[syndrome]["astct"]
    name = syndrome.upper()
    lines = [f"**{name} (ASTCT 2019): grade {r['grade']}**"]
    if r["grade"] > 0:
        status = f"resolved {_hours(case, r['resolved'])}" if r.get("resolved") else "not resolved"
        lines.append(f"- onset {_hours(case, r['onset'])}; maximum at {_hours(case, r['max_at'])}; {status}")
        crit = driving_criterion(r)
        if crit:
            lines.append(f"- driven by: {crit['criterion']} at +{crit['hour']:g} h ({', '.join(crit['evidence'][:4])})")
    if r.get("flags"):
        lines.append(f"- flags: {', '.join(r['flags'])}")
    if r.get("evidence"):
        lines.append(f"- evidence: {', '.join(r['evidence'][:8])}" + (f" and {len(r['evidence']) - 8} more" if len(r["evidence"]) > 8 else ""))
    return lines


def _systems_table(case: dict[str, Any]) -> list[str]:
    rows = ["| System | CRS | ICANS |", "| --- | --- | --- |"]
    def cell(r: dict[str, Any] | None) -> str:
        if r is None:
            return "–"
        return f"{r['grade']}" + (f" ({', '.join(r['flags'])})" if r.get("flags") else "")

    for system in dict.fromkeys([*case["crs"], *case["icans"]]):
        rows.append(f"| {SYSTEM_LABELS.get(system, system)} | {cell(case['crs'].get(system))} | {cell(case['icans'].get(system))} |")
    return rows


def case_card(case: dict[str, Any], sources: str, skipped: list[dict[str, str]], app_url: str | None,
              notes: list[str]) -> dict[str, Any]:
    crs, icans = case["crs"]["astct"], case["icans"]["astct"]
    top = max(crs["grade"], icans["grade"])
    summary = f"CAR-T (day 0 {case['infusion'][:10]}): CRS grade {crs['grade']}, ICANS grade {icans['grade']} (ASTCT)"
    detail = [*_syndrome_lines(case, "crs"), "", *_syndrome_lines(case, "icans"), "",
              "Other grading systems side by side:", "", *_systems_table(case), ""]
    detail.append(f"Data: {sources}.")
    if skipped:
        codes: dict[str, int] = {}
        for s in skipped:
            codes[s["code"]] = codes.get(s["code"], 0) + 1
        detail.append("Not used: " + "; ".join(f"{n} × {code} ({SKIP_CODES.get(code, code)})" for code, n in sorted(codes.items())) + ".")
    detail += [f"Note: {n}." for n in notes]
    detail.append("Decision support, not a diagnosis: confirm the grade against the chart.")
    card: dict[str, Any] = {"uuid": str(uuid.uuid4()), "summary": summary[:140], "detail": "\n".join(detail),
                            "indicator": indicator_for(top), "source": CARD_SOURCE}
    if app_url:
        card["links"] = [{"label": "CRS/ICANS timeline (fhir-crs SMART app)", "url": app_url, "type": "smart"}]
    return card


def rising_card(case: dict[str, Any], now: datetime, app_url: str | None) -> dict[str, Any] | None:
    """A card when the ASTCT CRS or ICANS grade went up within the last 24 h before `now`."""
    since = now - timedelta(hours=RISING_WINDOW_H)
    rises = []
    for syndrome in ("crs", "icans"):
        r = case[syndrome]["astct"]
        before, current = grade_at(r, since), grade_at(r, now)
        if current > before:
            crit = next((c for c in reversed(r.get("criteria", []))
                         if c["grade"] == current and datetime.fromisoformat(c["at"].replace("Z", "+00:00")) <= now), None)
            rises.append((syndrome, before, current, crit))
    if not rises:
        return None
    summary = "Rising in the last 24 h: " + ", ".join(f"{s.upper()} grade {a} → {b}" for s, a, b, _ in rises)
    detail = [f"- {s.upper()} grade {a} → {b}" + (f": {c['criterion']} at {c['at']} ({', '.join(c['evidence'][:4])})" if c else "")
              for s, a, b, c in rises]
    card: dict[str, Any] = {"uuid": str(uuid.uuid4()), "summary": summary[:140], "detail": "\n".join(detail),
                            "indicator": indicator_for(max(b for _, _, b, _ in rises)) if max(b for _, _, b, _ in rises) >= 3 else "warning",
                            "source": CARD_SOURCE}
    if app_url:
        card["links"] = [{"label": "CRS/ICANS timeline (fhir-crs SMART app)", "url": app_url, "type": "smart"}]
    return card


def failure_card(message: str) -> dict[str, Any]:
    return {"uuid": str(uuid.uuid4()), "summary": "CRS/ICANS grading failed: no grade could be computed",
            "detail": f"fhir-crs could not grade this patient: {message}\n\nThis is not a grade of 0: check the chart.",
            "indicator": "warning", "source": CARD_SOURCE}


def cards_for(cases: list[GradedCase], run_json: dict[str, Any], req: HookRequest, config: ServeConfig,
              sources: str, app_url: str | None, now: datetime) -> list[dict[str, Any]]:
    cards: list[dict[str, Any]] = []
    wanted = f"Patient/{req.patient_id}"
    mine = [c for c in run_json["cases"] if c["patient"] == wanted]
    others = len(run_json["cases"]) - len(mine)
    notes = list(req.notes)
    if others:
        notes.append(f"{others} case(s) of other patients in the data were not shown")
    for case in sorted(mine, key=lambda c: c["infusion"] or "", reverse=True):
        rising = rising_card(case, now, app_url)
        if rising:
            cards.append(rising)
        cards.append(case_card(case, sources, run_json["skipped"], app_url, notes))
    return cards


def answer(body: Any, config: ServeConfig, app_url: str | None, now: datetime | None = None) -> dict[str, Any]:
    """The CDS Hooks response for one request (HookError for the spec's HTTP errors)."""
    req = parse_request(body, config)
    now = now or datetime.now(UTC)
    used = [k for k in PREFETCH if k in req.prefetched]
    resources = [r for rs in req.prefetched.values() for r in rs]
    try:
        if req.missing:
            with make_client(req, config) as client:
                resources += fetch_missing(client, req, config)
        resources = _dedupe(resources)
        sources = ", ".join(filter(None, [
            f"prefetch ({', '.join(used)})" if used else "",
            f"read from the FHIR server ({', '.join(req.missing)})" if req.missing else ""]))
        run = grade_resources(resources, config.settings, config.code_map.directory, origin="hook")
        run_json = run.to_json()
        return {"cards": cards_for(run.cases, run_json, req, config, sources, app_url, now)}
    except ConfigError as exc:  # e.g. an insecure fhirServer URL: nothing was sent
        return {"cards": [failure_card(str(exc))]}
    except FhirCrsError as exc:
        log.warning("grading failed: %s", type(exc).__name__)
        return {"cards": [failure_card(str(exc))]}
    except Exception as exc:  # a bug: still a card, never a silent empty answer
        log.exception("internal error while grading a hook request")
        return {"cards": [failure_card(f"internal error ({type(exc).__name__}); the service log has the details")]}
