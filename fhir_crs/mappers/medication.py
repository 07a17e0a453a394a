"""MedicationAdministration JSON -> `DrugGiven`, or a `Skipped` reason.

Resolves the drug from medicationCodeableConcept, a `#contained` Medication or a referenced
Medication (codes, then ingredient codes, then ATC prefix, then text), reads the time as a point
or an interval, and derives the infusion rate in ug/min, ug/kg/min or U/min where the data
allow — including Cerner-style `mL/h` with the Medication's ingredient strength.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from ..events import DrugGiven, Skipped
from ..mapping_files import CodeMap
from .common import codings, label, parse_datetime, quantity, texts
from .reasons import affirmed, classify, reason_references
from .status import status_decision

_IV = re.compile(r"\b(IV|intravenous|i\.v\.|intra-?venous|infusion|central line|peripheral line)\b", re.IGNORECASE)
_BOLUS = re.compile(r"\bbolus\b|\bpush\b|\bstat dose\b|\bfluid challenge\b", re.IGNORECASE)

# Factor to reach ug/min (mass) or U/min (units) from a rate in the given UCUM unit.
_MASS_RATE = {"ug/min": 1.0, "mg/min": 1000.0, "mg/h": 1000.0 / 60, "ug/h": 1.0 / 60}
_UNIT_RATE = {"U/min": 1.0, "U/h": 1.0 / 60}
_AMOUNT_TO_UG = {"ug": 1.0, "mg": 1000.0, "g": 1e6, "ng": 1e-3}


def _ingredient_strength(med: dict[str, Any] | None, code_map: CodeMap) -> tuple[float, str] | None:
    """Concentration of the (first) active ingredient per mL: (amount per mL, 'ug'|'U')."""
    if not med:
        return None
    for ing in med.get("ingredient") or []:
        if not isinstance(ing, dict) or ing.get("isActive") is False:
            continue
        s = ing.get("strength")
        if not isinstance(s, dict):
            continue
        num, den = quantity(s.get("numerator")), quantity(s.get("denominator"))
        if not num or not den or den[0] == 0:
            continue
        nu, du = code_map.canonical_unit(num[1]), code_map.canonical_unit(den[1])
        per_ml = {"mL": 1.0, "L": 1000.0}.get(du)
        if per_ml is None:
            continue
        if nu in _AMOUNT_TO_UG:
            return num[0] * _AMOUNT_TO_UG[nu] / (den[0] * per_ml), "ug"
        if nu == "U":
            return num[0] / (den[0] * per_ml), "U"
    return None


_LIMIT_UNITS = {"max_ug_min": "ug/min", "max_ug_kg_min": "ug/kg/min", "max_u_min": "U/min", "max_ml": "mL"}


class MedicationMapper:
    def __init__(self, code_map: CodeMap):
        self.code_map = code_map

    def _implausible(self, drug_class: str, dose: float | None, rate: float | None, rate_unit: str,
                     start: datetime, end: datetime | None, derived: dict[str, float | None]) -> str | None:
        """Why a dose or rate cannot be real (mappings/plausibility.toml [medications.*]), or None."""
        if dose is not None and dose < 0:
            return f"negative dose {dose:g}"
        if rate is not None and rate < 0:
            return f"negative rate {rate:g} {rate_unit}".rstrip()
        if rate is not None and rate > 0 and end is not None and end == start and rate_unit not in ("min", "h", "s"):
            return "infusion rate charted over a zero-length effectivePeriod"
        for key, limit in self.code_map.dose_limits.get(drug_class, {}).items():
            v = derived.get(key)
            if v is not None and v > limit:
                return f"{v:g} {_LIMIT_UNITS[key]} is above the plausible {limit:g} {_LIMIT_UNITS[key]} (plausibility.toml)"
        return None

    def identify(self, concept_sets: list[Any], extra_texts: list[str]) -> tuple[str | None, bool]:
        """Drug name from several CodeableConcepts (medication code, ingredient items)."""
        all_codings = [c for cc in concept_sets for c in codings(cc)]
        name, by_text = self.code_map.drug_table.match(all_codings, [])
        if name:
            return name, False
        for system, code in all_codings:
            if "atc" in system.lower():
                for prefix, drug in self.code_map.atc_prefixes:
                    if code.upper().startswith(prefix.upper()):
                        return drug, False
        all_texts = [t for cc in concept_sets for t in texts(cc)] + extra_texts
        name, by_text = self.code_map.drug_table.match([], all_texts)
        return name, by_text

    def map(
        self, res: dict[str, Any], ref: str, flags: set[str],
        resolve: Callable[[str], dict[str, Any] | None],
    ) -> DrugGiven | Skipped:
        why, flag, code = status_decision(res)
        if why:
            return Skipped(ref, why, code)
        if flag:
            flags.add(flag)
        med: dict[str, Any] | None = None
        concepts: list[Any] = []
        extra: list[str] = []
        if "medicationCodeableConcept" in res:
            concepts.append(res["medicationCodeableConcept"])
        elif isinstance(res.get("medicationReference"), dict):
            mref = res["medicationReference"]
            target = mref.get("reference")
            if isinstance(target, str):
                med = resolve(target)
                if med is None and not mref.get("display"):
                    return Skipped(ref, f"medicationReference {target} cannot be resolved (not contained, not in the input)", "unresolved_reference")
            if isinstance(mref.get("display"), str):
                extra.append(mref["display"])
        else:
            return Skipped(ref, "no medication[x]", "unmapped_code")
        if med:
            concepts.append(med.get("code"))
            for ing in med.get("ingredient") or []:
                if isinstance(ing, dict):
                    concepts.append(ing.get("itemCodeableConcept"))
                    ir = ing.get("itemReference")
                    if isinstance(ir, dict) and isinstance(ir.get("display"), str):
                        extra.append(ir["display"])
        drug, by_text = self.identify(concepts, extra)
        if drug is None:
            what = label(concepts[0]) if concepts and concepts[0] else (extra[0] if extra else "(no code)")
            return Skipped(ref, f"medication not in mappings/medications.toml: {what}", "unmapped_code")
        spec = self.code_map.drugs[drug]

        if "effectiveDateTime" in res:
            start_w, end_w, point = parse_datetime(res["effectiveDateTime"]), None, True
        elif isinstance(res.get("effectivePeriod"), dict):
            p = res["effectivePeriod"]
            start_w, end_w, point = parse_datetime(p.get("start")), parse_datetime(p.get("end")), False
        else:
            return Skipped(ref, "no effective[x]", "no_time")
        if start_w is None:
            return Skipped(ref, "effective time missing or unreadable", "no_time")
        if start_w.precision != "time":
            return Skipped(ref, f"effective time has {start_w.precision} precision only", "imprecise_time")
        if start_w.tz_assumed:
            flags.add("timezone_assumed")
        start, end = start_w.time, end_w.time if end_w else None
        if end is not None and end < start:
            return Skipped(ref, "effectivePeriod ends before it starts", "bad_period")
        if end is None:
            # Cerner: infusions are charted at one instant with the duration in an extension.
            for ext in res.get("extension") or []:
                if isinstance(ext, dict) and str(ext.get("url", "")).endswith("infuse-over-time"):
                    q = quantity(ext.get("valueQuantity"))
                    if q and q[0] > 0:
                        mult = {"min": 60.0, "h": 3600.0, "s": 1.0}.get(self.code_map.canonical_unit(q[1]), 60.0)
                        end = start + timedelta(seconds=q[0] * mult)

        dosage = res.get("dosage") if isinstance(res.get("dosage"), dict) else {}
        route_texts = texts(dosage.get("route")) + [c for _, c in codings(dosage.get("route"))]
        route = "IV" if any(_IV.search(t) or t == "47625008" for t in route_texts) else (route_texts[0] if route_texts else "")
        dtext = " ".join(t for t in [dosage.get("text") or "", *texts(dosage.get("method"))] if isinstance(t, str))
        if not route and _IV.search(dtext):
            route = "IV"
        notes: list[str] = []
        dose = quantity(dosage.get("dose"))
        dose_value, dose_unit = (dose[0], self.code_map.canonical_unit(dose[1])) if dose else (None, "")
        rate_value, rate_unit = None, ""
        if isinstance(dosage.get("rateQuantity"), dict):
            rq = quantity(dosage["rateQuantity"])
            if rq:
                rate_value, rate_unit = rq[0], self.code_map.canonical_unit(rq[1])
        elif isinstance(dosage.get("rateRatio"), dict):
            num, den = quantity(dosage["rateRatio"].get("numerator")), quantity(dosage["rateRatio"].get("denominator"))
            if num and den and den[0]:
                rate_value = num[0] / den[0]
                rate_unit = self.code_map.canonical_unit(
                    f"{self.code_map.canonical_unit(num[1])}/{self.code_map.canonical_unit(den[1])}"
                )
        if rate_value is None and dose_value is not None and ("/min" in dose_unit or dose_unit.endswith("/h")):
            # some feeds chart the infusion rate in dosage.dose (e.g. 0.05 ug/kg/min)
            rate_value, rate_unit = dose_value, dose_unit
            notes.append("rate_from_dose_field")
        rate_ug_min = rate_ug_kg_min = rate_u_min = None
        if rate_value is not None:
            if rate_unit in _MASS_RATE:
                rate_ug_min = rate_value * _MASS_RATE[rate_unit]
            elif rate_unit == "ug/kg/min":
                rate_ug_kg_min = rate_value
            elif rate_unit == "mg/kg/h":
                rate_ug_kg_min = rate_value * 1000 / 60
            elif rate_unit in _UNIT_RATE:
                rate_u_min = rate_value * _UNIT_RATE[rate_unit]
            elif rate_unit in ("mL/h", "mL/min"):
                strength = _ingredient_strength(med, self.code_map)
                ml_min = rate_value / 60 if rate_unit == "mL/h" else rate_value
                if strength and strength[1] == "ug":
                    rate_ug_min = ml_min * strength[0]
                    notes.append("rate_from_concentration")
                elif strength and strength[1] == "U":
                    rate_u_min = ml_min * strength[0]
                    notes.append("rate_from_concentration")
                elif spec.drug_class == "vasopressor":
                    notes.append("rate_volume_only")
            elif rate_unit in ("min", "h", "s"):
                notes.append("rate_is_duration")  # e.g. HL7 medadmin0305 puts "min" in rateQuantity
        volume_ml = None
        if dose_value is not None and dose_unit in ("mL", "L"):
            volume_ml = dose_value * (1000.0 if dose_unit == "L" else 1.0)
        elif rate_unit == "mL/h" and rate_value is not None and end is not None and spec.drug_class == "fluid":
            volume_ml = rate_value * (end - start).total_seconds() / 3600
        problem = self._implausible(spec.drug_class, dose_value, rate_value, rate_unit, start, end,
                                    {"max_ug_min": rate_ug_min, "max_ug_kg_min": rate_ug_kg_min, "max_u_min": rate_u_min, "max_ml": volume_ml})
        if problem:
            return Skipped(ref, f"{drug}: {problem} (quarantined, never evidence)", "implausible_value")
        bolus = affirmed(_BOLUS, dtext)  # "not a bolus" / "no bolus" is not one
        reason_refs: tuple[str, ...] = ()
        if spec.drug_class == "fluid":
            # a fluid given FOR hypotension is a bolus: coded reasonCode first, then text (flagged)
            contained_codes, reference_words, condition_refs = reason_references(res)
            codes_ = [c for rc in res.get("reasonCode") or [] for c in codings(rc)] + contained_codes
            words = [t for rc in res.get("reasonCode") or [] for t in texts(rc)] + reference_words
            indications, ind_text = classify(self.code_map.reasons, codes_, words)
            if "hypotension" in indications and not bolus:
                bolus = True
                notes.append("bolus_by_indication_text" if ind_text else "bolus_by_indication")
            elif not bolus:
                reason_refs = tuple(condition_refs)  # the patient's Conditions decide at the timeline
        if spec.drug_class == "vasopressor" and point and rate_value is None:
            bolus = True  # a push dose, not an infusion (grading-criteria §1.4)
        if point and rate_value is not None and spec.drug_class in ("vasopressor", "inotrope", "sedative"):
            notes.append("point_infusion")
        return DrugGiven(
            drug=drug, drug_class=spec.drug_class, start=start, end=end, ref=ref, route=route,
            dose_value=dose_value, dose_unit=dose_unit, rate_value=rate_value, rate_unit=rate_unit,
            rate_ug_min=rate_ug_min, rate_ug_kg_min=rate_ug_kg_min, rate_u_min=rate_u_min,
            volume_ml=volume_ml, bolus=bolus, matched_by_text=by_text, notes=tuple(notes), reason_refs=reason_refs,
        )
