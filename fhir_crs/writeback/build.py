"""Stage 5 (pure): a graded case -> the resources fhir-crs writes back.

* A **CRS Condition** (primary system ASTCT 2019): ICD-10-CM D89.83x by grade and NCIt C78251,
  severity, `stage` = one entry per grading system (the ASTCT stage first; Lee 2014, Penn, MSKCC,
  CARTOX/PedsCARTOX, CTCAE v5 after it — one Condition per case rather than one per system,
  because they describe the same illness and a problem list must not show six CRS entries),
  onset/abatement from the ASTCT timeline, `evidence.detail` -> the resources behind the grade,
  verificationStatus `provisional` (machine-derived, for clinician review), and a stable
  `identifier` so reruns update instead of duplicating.
* An **ICANS Condition** (ICD-10-CM G92.0x) when ASTCT ICANS > 0 (CARTOX CRES in its stages).
* A **summary Bundle** (`collection`, with identifier): the Condition(s), one Observation per
  system result (grade, onset -> resolution, evidence in `derivedFrom` where R4 allows the
  type, i.e. Observations, and in the core `workflow-supportingInfo` extension otherwise, e.g.
  MedicationAdministrations and Procedures; criteria/flags/conventions in `note`), the adjacent-syndrome screens, and a `List` "CRS case timeline" whose
  entries point at the source resources of the salient events (day 0 = infusion).
* A **Provenance** in the same transaction (`transaction_for`): target = the Condition(s) and
  the summary Bundle, agent = fhir-crs as a contained Device with its version, entity = every
  source resource of the case (role `source`), and the conventions extension (hash of the
  settings and mapping tables, `conventions.py`) — the Conditions carry that extension too.

Everything is validated against `fhir.resources.R4B` before it leaves this module.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.condition import Condition
from fhir.resources.R4B.provenance import Provenance

from .. import __version__
from ..ownoutput import GRADING_SYSTEM, RESULT_SYSTEM
from ..settings import GradingSettings

if TYPE_CHECKING:
    from ..conventions import Conventions
    from ..grading.case import GradedCase

SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
NCIT = "http://ncicb.nci.nih.gov/xml/owl/EVS/Thesaurus.owl"
LOCAL_SYSTEM = GRADING_SYSTEM  # "urn:fhir-crs:CodeSystem:grading-system": what is read back is known as its own (ownoutput.py)
LOCAL_GRADE = "urn:fhir-crs:CodeSystem:grade"
LOCAL_RESULT = RESULT_SYSTEM  # "urn:fhir-crs:CodeSystem:result"
HASH_EXTENSION = "urn:fhir-crs:StructureDefinition:content-hash"
CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
SUPPORTING_INFO = "http://hl7.org/fhir/StructureDefinition/workflow-supportingInfo"
# Observation.derivedFrom targets in R4; other evidence (drugs, procedures) goes to SUPPORTING_INFO
# (a real HAPI server rejects e.g. a MedicationAdministration there: HAPI-0931).
DERIVED_FROM_TYPES = frozenset({"DocumentReference", "ImagingStudy", "Media", "QuestionnaireResponse", "Observation",
                                "MolecularSequence"})

SEVERITY = {
    1: ("255604002", "Mild"), 2: ("6736007", "Moderate"), 3: ("24484000", "Severe"),
    4: ("442452003", "Life threatening severity"), 5: ("24484000", "Severe"),
}
NCIT_GRADE = {
    1: ("C41338", "Grade 1 Mild Adverse Event"), 2: ("C41339", "Grade 2 Moderate Adverse Event"),
    3: ("C41340", "Grade 3 Severe Adverse Event"), 4: ("C41337", "Grade 4 Life Threatening or Disabling Adverse Event"),
    5: ("C48275", "Grade 5 Death Related to Adverse Event"),
}
SYSTEM_NAMES = {
    "astct": "ASTCT 2019", "lee2014": "Lee 2014", "penn": "Penn (Porter 2018)", "mskcc": "MSKCC (Park 2018)",
    "cartox": "CARTOX (Neelapu 2018)", "ctcae5": "CTCAE v5.0", "cartox_cres": "CARTOX CRES",
}


def identifiers(case: GradedCase, system: str) -> dict[str, dict[str, str]]:
    """Stable identifiers of what is written for one case (patient + infusion start)."""
    tl = case.timeline
    return case_identifiers(tl.patient.split("/", 1)[1], tl.infusion, system)


def case_identifiers(patient_id: str, infusion: datetime, system: str) -> dict[str, dict[str, str]]:
    """The identifiers of one case from its key: patient id + infusion start (as the timeline holds it)."""
    key = f"{patient_id}-{infusion:%Y%m%dT%H%M%SZ}"
    return {name: {"system": system, "value": f"{key}-{name}"} for name in ("crs", "icans", "summary")}


def _uuid(*parts: str) -> str:
    return "urn:uuid:" + str(uuid.uuid5(uuid.NAMESPACE_URL, "fhir-crs:" + ":".join(parts)))


def _stage(system: str, result: dict[str, Any], kind: str) -> dict[str, Any]:
    g = result["grade"]
    coding = [{"system": LOCAL_GRADE, "code": f"{system}-{g}", "display": f"{kind} grade {g} ({SYSTEM_NAMES[system]})"}]
    if g in NCIT_GRADE:
        coding.insert(0, {"system": NCIT, "code": NCIT_GRADE[g][0], "display": NCIT_GRADE[g][1]})
    label = SYSTEM_NAMES[system] + (f", {result['variant']}" if result.get("variant") else "")
    return {
        "summary": {"coding": coding, "text": f"{kind} grade {g} ({label})"},
        "type": {"coding": [{"system": LOCAL_SYSTEM, "code": f"{system}-{kind.lower()}", "display": f"{SYSTEM_NAMES[system]} {kind}"}]},
    }


def _note(system: str, r: dict[str, Any]) -> str:
    parts = [f"{SYSTEM_NAMES[system]}: grade {r['grade']}"]
    if r.get("max_at"):
        parts.append(f"max at {r['max_at']}")
    crit = [c for c in r.get("criteria", []) if c["grade"] == r["grade"]]
    if crit:
        parts.append("because " + "; ".join(c["criterion"] for c in crit[:3]))
    if r.get("flags"):
        parts.append("flags: " + ", ".join(r["flags"]))
    if r.get("conventions"):
        parts.append("conventions: " + ", ".join(f"{c['setting']}={c['value']}" for c in r["conventions"]))
    return "; ".join(parts)


def _condition(case_json: dict[str, Any], kind: str, ident: dict[str, str]) -> dict[str, Any]:
    results = case_json["crs"] if kind == "CRS" else case_json["icans"]
    primary = results["astct"]
    g = primary["grade"]
    if kind == "CRS":
        icd = (f"D89.83{g}", f"Cytokine release syndrome, grade {g}") if g else ("D89.839", "Cytokine release syndrome, grade unspecified")
        code = {"coding": [{"system": ICD10CM, "code": icd[0], "display": icd[1]},
                           {"system": NCIT, "code": "C78251", "display": "Cytokine Release Syndrome"}],
                "text": f"Cytokine release syndrome, grade {g} (ASTCT 2019)"}
    else:
        icd = (f"G92.0{g}", f"Immune effector cell-associated neurotoxicity syndrome, grade {g}") if g else (
            "G92.00", "Immune effector cell-associated neurotoxicity syndrome, grade unspecified")
        code = {"coding": [{"system": ICD10CM, "code": icd[0], "display": icd[1]}],
                "text": f"ICANS, grade {g} (ASTCT 2019)"}
    cond: dict[str, Any] = {
        "resourceType": "Condition",
        "identifier": [ident],
        "category": [{"coding": [{"system": CATEGORY, "code": "encounter-diagnosis", "display": "Encounter Diagnosis"}]}],
        "code": code,
        "subject": {"reference": case_json["patient"]},
        "stage": [_stage(name, r, kind) for name, r in results.items()],
        "note": [{"text": _note(name, r)} for name, r in results.items()],
    }
    if g == 0:
        # A previous run found this condition; the data no longer support it.
        cond["verificationStatus"] = {"coding": [{"system": VERIFICATION, "code": "refuted"}]}
        cond["clinicalStatus"] = {"coding": [{"system": CLINICAL, "code": "inactive"}]}
    else:
        cond["verificationStatus"] = {"coding": [{"system": VERIFICATION, "code": "provisional"}]}
        sev = SEVERITY[g]
        cond["severity"] = {"coding": [{"system": SNOMED, "code": sev[0], "display": sev[1]}]}
        if primary.get("onset"):
            cond["onsetDateTime"] = primary["onset"]
        if primary.get("resolved"):
            cond["abatementDateTime"] = primary["resolved"]
            cond["clinicalStatus"] = {"coding": [{"system": CLINICAL, "code": "resolved"}]}  # con-4
        else:
            cond["clinicalStatus"] = {"coding": [{"system": CLINICAL, "code": "active"}]}
        refs = [r for r in primary.get("evidence", []) if not r.startswith("Patient/")]
        if refs:
            cond["evidence"] = [{"detail": [{"reference": r} for r in refs]}]
    return cond


def _result_observation(case_json: dict[str, Any], family: str, system: str, r: dict[str, Any]) -> dict[str, Any]:
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "preliminary",
        "code": {"coding": [{"system": LOCAL_RESULT, "code": f"{family}-{system}", "display": f"{family.upper()} grade, {SYSTEM_NAMES[system]}"}]},
        "subject": {"reference": case_json["patient"]},
        "valueInteger": r["grade"],
        "note": [{"text": _note(system, r)}],
    }
    if r.get("onset"):
        obs["effectivePeriod"] = {"start": r["onset"], **({"end": r["resolved"]} if r.get("resolved") else {})}
    else:
        obs["effectiveDateTime"] = case_json["infusion"]
    _add_evidence(obs, r.get("evidence", []))
    if r.get("max_at"):
        obs["component"] = [{"code": {"text": "time of maximum grade"}, "valueDateTime": r["max_at"]}]
    return obs


def _add_evidence(obs: dict[str, Any], evidence: list[str]) -> None:
    """Evidence references on a result Observation: `derivedFrom` for the types R4 allows there,
    the `workflow-supportingInfo` extension for the rest (the Patient itself is the subject)."""
    refs = [e for e in evidence if not e.startswith("Patient/")]
    derived = [e for e in refs if e.split("/", 1)[0] in DERIVED_FROM_TYPES]
    other = [e for e in refs if e.split("/", 1)[0] not in DERIVED_FROM_TYPES]
    if other:
        obs["extension"] = [{"url": SUPPORTING_INFO, "valueReference": {"reference": e}} for e in other]
    if derived:
        obs["derivedFrom"] = [{"reference": e} for e in derived]


def _timeline_list(case_json: dict[str, Any]) -> dict[str, Any]:
    entries = []
    for e in case_json.get("timeline", []):
        refs = [r for r in e["evidence"] if not r.startswith("Patient/")]
        if not refs:
            continue
        # The event time goes in the flag text: List.entry.date means "added to the list" and is only
        # allowed on a working list (lst-3; the HL7 validator on a real HAPI flags it on a snapshot).
        entries.append({
            "flag": {"coding": [{"system": LOCAL_RESULT, "code": str(e["kind"])}],
                     "text": f"+{e['hour']:g} h ({e['at']}) {e['kind']}: {e['detail']}"},
            "item": {"reference": refs[0]},
        })
    lst: dict[str, Any] = {
        "resourceType": "List", "status": "current", "mode": "snapshot",
        "title": f"CRS case timeline (day 0 = CAR-T infusion {case_json['infusion']})",
        "code": {"coding": [{"system": LOCAL_RESULT, "code": "crs-case-timeline"}]},
        "subject": {"reference": case_json["patient"]},
        "date": case_json["infusion"],
    }
    if entries:
        lst["entry"] = entries
    else:
        lst["emptyReason"] = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/list-empty-reason", "code": "nilknown"}]}
    return lst


@dataclass(slots=True)
class CaseWrite:
    """What one case writes: keyed by identifier name ('crs', 'icans', 'summary'); with
    `conventions` the transaction also carries a Provenance of the write."""

    identifiers: dict[str, dict[str, str]]
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    conventions: Conventions | None = None
    sources: list[str] = field(default_factory=list)  # "Type/id" of every source resource
    recorded: str | None = None

    def content_hash(self) -> str:
        """Hash of the clinical content (without run-specific fields) to detect changed grades."""
        def strip(r: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in r.items() if k not in ("id", "meta", "recordedDate", "timestamp")}

        blob = json.dumps({k: strip(v) for k, v in sorted(self.resources.items())}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()


_REF = re.compile(r"^[A-Z][A-Za-z]+/[A-Za-z0-9.-]{1,64}(/_history/[A-Za-z0-9.-]{1,64})?$")  # evidence may name the version


def source_refs(cj: dict[str, Any]) -> list[str]:
    """Every source resource of a graded case (the patient, the infusion, all evidence), once."""
    refs: list[str] = [cj["patient"], *cj.get("infusion_evidence", [])]
    for family in ("crs", "icans"):
        for r in cj.get(family, {}).values():
            refs += r.get("evidence", [])
    for r in (cj.get("adjacent") or {}).values():
        refs += r.get("evidence", []) if isinstance(r, dict) else []
    for e in cj.get("timeline", []):
        refs += e.get("evidence", [])
    return [r for r in dict.fromkeys(refs) if isinstance(r, str) and _REF.match(r)]


def build_case_write(case: GradedCase, settings: GradingSettings, identifier_system: str,
                     include_icans_if_zero: bool = False, recorded: str | None = None,
                     conventions: Conventions | None = None) -> CaseWrite:
    """Builds (and validates) the Condition(s) and the summary Bundle for one graded case; with
    `conventions` the Conditions record them and the transaction gets a Provenance."""
    cj = case.to_json(settings)
    ids = identifiers(case, identifier_system)
    out = CaseWrite(ids, conventions=conventions, sources=source_refs(cj), recorded=recorded)
    out.resources["crs"] = _condition(cj, "CRS", ids["crs"])
    if cj["icans"]["astct"]["grade"] > 0 or include_icans_if_zero:
        out.resources["icans"] = _condition(cj, "ICANS", ids["icans"])
    key = ids["summary"]["value"]
    entries = [{"fullUrl": _uuid(key, name), "resource": res} for name, res in out.resources.items()]
    for family in ("crs", "icans"):
        for system, r in cj[family].items():
            entries.append({"fullUrl": _uuid(key, family, system), "resource": _result_observation(cj, family, system, r)})
    adj = cj.get("adjacent") or {}
    for name, r in adj.items():
        value = {"carhlh": r.get("met"), "iec_hs": r.get("suspected")}.get(name)
        obs: dict[str, Any] = {
            "resourceType": "Observation", "status": "preliminary",
            "code": {"coding": [{"system": LOCAL_RESULT, "code": name}], "text": name},
            "subject": {"reference": cj["patient"]},
            "effectiveDateTime": r.get("onset") or cj["infusion"],
            "note": [{"text": json.dumps({k: v for k, v in r.items() if k != "evidence"}, default=str)}],
        }
        if value is not None:
            obs["valueBoolean"] = bool(value)
        elif name == "icaht" and r.get("early_grade") is not None:
            obs["valueInteger"] = r["early_grade"]
        _add_evidence(obs, r.get("evidence", []))
        entries.append({"fullUrl": _uuid(key, "adjacent", name), "resource": obs})
    entries.append({"fullUrl": _uuid(key, "timeline"), "resource": _timeline_list(cj)})
    bundle: dict[str, Any] = {"resourceType": "Bundle", "identifier": ids["summary"], "type": "collection", "entry": entries}
    out.resources["summary"] = bundle
    # Hash the clinical content first; run-time fields are added after (the Bundle's entries are
    # the same Condition objects, so they carry the hash and the recorded date too).
    digest = out.content_hash()
    for name in ("crs", "icans"):
        if name in out.resources:
            out.resources[name]["extension"] = [{"url": HASH_EXTENSION, "valueString": digest}]
            if conventions is not None:
                out.resources[name]["extension"].append(conventions.extension())
            if recorded:
                out.resources[name]["recordedDate"] = recorded
    if recorded:
        bundle["timestamp"] = recorded
    validate(out)
    return out


def stored_hash(resource: dict[str, Any]) -> str | None:
    """The content hash a previous run stored on a Condition it wrote."""
    for ext in resource.get("extension") or []:
        if isinstance(ext, dict) and ext.get("url") == HASH_EXTENSION:
            return ext.get("valueString")
    return None


def validate(write: CaseWrite) -> None:
    """Everything written validates against fhir.resources.R4B (raises pydantic.ValidationError)."""
    for res in write.resources.values():
        if res["resourceType"] == "Condition":
            Condition.model_validate(res)
        else:
            Bundle.model_validate(res)


def stored_grade(resource: dict[str, Any]) -> int | None:
    """The ASTCT grade a stored Condition written by fhir-crs records (its first stage)."""
    for stage in resource.get("stage") or []:
        for c in ((stage or {}).get("summary") or {}).get("coding") or []:
            code = (c or {}).get("code", "")
            if (c or {}).get("system") == LOCAL_GRADE and code.startswith("astct-") and code[6:].isdigit():
                return int(code[6:])
        break
    return None


DEVICE_ID = "fhir-crs"


def provenance(write: CaseWrite, targets: list[str], activity: str) -> dict[str, Any]:
    """The Provenance of one write-back (validated against R4B)."""
    if write.conventions is None:
        raise ValueError("a Provenance needs the conventions of the write")
    recorded = write.recorded or datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    prov: dict[str, Any] = {
        "resourceType": "Provenance",
        "contained": [{
            "resourceType": "Device", "id": DEVICE_ID,
            "deviceName": [{"name": "fhir-crs", "type": "manufacturer-name"}],
            "version": [{"value": __version__}],
            "note": [{"text": "fhir-crs: CAR-T CRS/ICANS grading from FHIR R4 (machine-derived, for clinician review)"}],
        }],
        "extension": [write.conventions.extension()],
        "target": [{"reference": t} for t in targets],
        "recorded": recorded,
        "policy": [f"urn:fhir-crs:conventions:sha256:{write.conventions.sha256}"],
        "activity": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation", "code": activity,
                                 "display": activity.lower()}]},
        "agent": [{
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                                 "code": "assembler", "display": "Assembler"}]},
            "who": {"reference": f"#{DEVICE_ID}", "display": f"fhir-crs {__version__}"},
        }],
    }
    if write.sources:
        prov["entity"] = [{"role": "source", "what": {"reference": r}} for r in write.sources]
    Provenance.model_validate(prov)
    return prov


def transaction_for(write: CaseWrite, existing: dict[str, tuple[str, str | None]]) -> dict[str, Any]:
    """A transaction Bundle writing `write`: PUT Type/id + If-Match for what exists (id, etag),
    else a conditional update `PUT Type?identifier=system|value` (create if absent); plus, when
    the write records its conventions, a POST of its Provenance (targets: the entries above)."""
    entries = []
    for name, res in write.resources.items():
        rtype = res["resourceType"]
        ident = write.identifiers[name]
        body = dict(res)
        request: dict[str, Any]
        if name in existing:
            rid, etag = existing[name]
            body["id"] = rid
            request = {"method": "PUT", "url": f"{rtype}/{rid}"}
            if etag:
                request["ifMatch"] = etag
        else:
            request = {"method": "PUT", "url": f"{rtype}?identifier={ident['system']}|{ident['value']}"}
        entries.append({"fullUrl": _uuid(ident["value"], "tx"), "resource": body, "request": request})
    if write.conventions is not None:
        targets = [e["request"]["url"] if n in existing else e["fullUrl"] for n, e in zip(write.resources, entries, strict=True)]
        prov = provenance(write, targets, "UPDATE" if existing else "CREATE")
        key = write.identifiers["summary"]["value"]
        entries.append({"fullUrl": _uuid(key, "provenance", write.recorded or ""), "resource": prov,
                        "request": {"method": "POST", "url": "Provenance"}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}

