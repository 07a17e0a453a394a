"""Mapper tables: one FHIR shape in, the expected event or skip reason out."""

from __future__ import annotations

from typing import Any

import pytest
from factory import LOCAL, RXN, SCT, UCUM, at, bp, device, fio2, med, obs, proc, score, temp

from fhir_crs.events import DrugGiven, Finding, Measurement, ProcedureDone, Skipped
from fhir_crs.mappers import ResourceMapper
from fhir_crs.sources import SourceResource


def map_one(code_map, res: dict[str, Any]) -> tuple[list[Any], list[Skipped], set[str]]:
    m = ResourceMapper(code_map)
    m.add(SourceResource(res, "test"))
    r = m.finish()
    events = [e for v in r.events.values() for e in v]
    flags = set().union(*r.flags.values()) if r.flags else set()
    return events, r.skipped, flags


@pytest.mark.parametrize(
    ("res", "kind", "value"),
    [
        (temp(1, 38.2), "temperature", 38.2),
        (temp(1, 100.4, "[degF]"), "temperature", 38.0),
        (obs("8331-1", 1, 37.5, "Cel"), "temperature", 37.5),
        (obs("8310-5", 1, 38.0, "degrees C"), "temperature", 38.0),
        (fio2(1, 0.3, "1"), "fio2", 30.0),
        (fio2(1, 0.3), "fio2", 30.0),
        (fio2(1, 45), "fio2", 45.0),
        (obs("3151-8", 1, 2, "L/min"), "o2_flow", 2.0),
        (obs("751-8", 1, 0.3, "10*3/uL"), "anc", 300.0),
        (obs("751-8", 1, 300, "/uL"), "anc", 300.0),
        (obs("2160-0", 1, 221, "umol/L"), "creatinine", 2.5),
        (obs("1988-5", 1, 5, "mg/dL"), "crp", 50.0),
        (obs("3255-7", 1, 1.1, "g/L"), "fibrinogen", 110.0),
        (score("ICE-SCORE", 1, 7), "ice_score", 7.0),
    ],
)
def test_observation_values(code_map, res, kind, value):
    events, skipped, _ = map_one(code_map, res)
    assert not skipped
    (e,) = events
    assert isinstance(e, Measurement) and e.kind == kind
    assert e.value == pytest.approx(value, abs=0.01)


def test_bp_panel_components(code_map):
    events, _, _ = map_one(code_map, bp(2, 84, 50))
    assert sorted((e.kind, e.value) for e in events) == [("dbp", 50), ("sbp", 84)]


def test_cerner_pulse_ox_components_carry_flow_and_fio2(code_map):
    r = obs("59408-5", 2, 93, "%")
    r["code"]["coding"].append({"system": "http://loinc.org", "code": "2708-6"})
    r["component"] = [
        {"code": {"coding": [{"system": "http://loinc.org", "code": "3151-8"}]}, "valueQuantity": {"value": 4, "unit": "L/min", "system": UCUM, "code": "L/min"}},
        {"code": {"coding": [{"system": "http://loinc.org", "code": "3150-0"}]}, "valueQuantity": {"value": 36, "unit": "%", "system": UCUM, "code": "%"}},
    ]
    events, _, _ = map_one(code_map, r)
    assert sorted(e.kind for e in events) == ["fio2", "o2_flow", "spo2"]


@pytest.mark.parametrize(
    ("res", "reason"),
    [
        (temp(1, 38.6, "[degF]"), "unit error"),
        (temp(1, 101.2, "Cel"), "looks like °F"),
        (temp(1, 52.0, "Cel"), "implausible"),
        ({**temp(1, 39.0), "status": "entered-in-error"}, "status entered-in-error"),
        ({**temp(1, 39.0), "status": "cancelled"}, "status cancelled"),
        ({k: v for k, v in temp(1, 39.0).items() if k != "effectiveDateTime"}, "no effective time"),
        ({**temp(1, 39.0), "effectiveDateTime": "2025-03-10"}, "day precision"),
        (obs("39156-5", 1, 22, "kg/m2"), "code not in mappings/observations.toml"),
        (obs("8480-6", 1, 120, "mL"), "cannot be converted"),
    ],
)
def test_observation_skips_with_reason(code_map, res, reason):
    events, skipped, _ = map_one(code_map, res)
    assert not events
    assert len(skipped) == 1 and reason in skipped[0].reason


def test_unit_error_sets_flag(code_map):
    _, _, flags = map_one(code_map, temp(1, 38.6, "[degF]"))
    assert "unit_error" in flags


def test_effective_period_and_timezone_offset(code_map):
    r = temp(0, 38.5)
    del r["effectiveDateTime"]
    r["effectivePeriod"] = {"start": "2025-03-10T10:00:00+02:00", "end": "2025-03-10T10:05:00+02:00"}
    (e,), _, _ = map_one(code_map, r)
    assert e.time.isoformat() == "2025-03-10T08:00:00+00:00"


@pytest.mark.parametrize(
    ("text", "code", "cls", "by_text"),
    [
        ("Nasal cannula", "336623009", "nasal_cannula", False),
        ("NC 2L", None, "nasal_cannula", True),
        ("HFNC", None, "high_flow_nasal_cannula", True),
        ("High flow nasal cannula", "426854004", "high_flow_nasal_cannula", False),
        ("Room air", None, "room_air", True),
        ("Non-rebreather", None, "non_rebreather", True),
        ("BiPAP", None, "bipap", True),
        ("Ventilator", "706172005", "invasive_ventilation", False),
        ("Venturi mask 28%", None, "venturi_mask", True),
    ],
)
def test_o2_device_values(code_map, text, code, cls, by_text):
    (e,), _, _ = map_one(code_map, device(3, text, code))
    assert isinstance(e, Finding) and e.detail == cls and e.matched_by_text == by_text


def test_local_ice_row_matched_by_text_is_flagged(code_map):
    r = obs("99999", 3, system="http://other-hospital.example/cs", display="ICE Score (neuro)")
    r["valueInteger"] = 8
    (e,), _, _ = map_one(code_map, r)
    assert e.kind == "ice_score" and e.matched_by_text


def test_unknown_device_text_is_skipped(code_map):
    _, (s,), _ = map_one(code_map, device(3, "Bubble wrap"))
    assert "O2 device value not in mappings/devices.toml" in s.reason


def test_infusion_rate_units(code_map):
    (e,), _, _ = map_one(code_map, med("7512", 1, 5, rate=0.05, rate_unit="ug/kg/min"))
    assert isinstance(e, DrugGiven) and e.drug == "norepinephrine" and e.rate_ug_kg_min == 0.05
    (v,), _, _ = map_one(code_map, med("11149", 1, 5, rate=2.4, rate_unit="U/h"))
    assert v.rate_u_min == pytest.approx(0.04)
    (n,), _, _ = map_one(code_map, med("7512", 1, 5, rate=1.2, rate_unit="mg/h"))
    assert n.rate_ug_min == pytest.approx(20)


def test_cerner_style_ml_per_hour_with_contained_strength(code_map):
    r = med(None, 1, 5, rate=15, rate_unit="mL/h")
    del r["medicationCodeableConcept"]
    r["contained"] = [{
        "resourceType": "Medication", "id": "m1", "code": {"text": "norepinephrine 4 mg in 250 mL"},
        "ingredient": [{"itemCodeableConcept": {"coding": [{"system": RXN, "code": "7512"}]},
                        "strength": {"numerator": {"value": 4, "unit": "mg", "system": UCUM, "code": "mg"},
                                     "denominator": {"value": 250, "unit": "mL", "system": UCUM, "code": "mL"}}}],
    }]
    r["medicationReference"] = {"reference": "#m1"}
    (e,), _, _ = map_one(code_map, r)
    assert e.drug == "norepinephrine" and e.rate_ug_min == pytest.approx(4.0)  # 15 mL/h x 16 ug/mL / 60


def test_medication_reference_resolved_later_in_input(code_map):
    m = ResourceMapper(code_map)
    ma = med(None, 1, 2)
    del ma["medicationCodeableConcept"]
    ma["medicationReference"] = {"reference": "Medication/toci"}
    m.add(SourceResource(ma, "a"))
    m.add(SourceResource({"resourceType": "Medication", "id": "toci", "code": {"coding": [{"system": RXN, "code": "612865"}]}}, "b"))
    r = m.finish()
    (e,) = r.events["Patient/p1"]
    assert e.drug == "tocilizumab"


def test_push_dose_pressor_is_a_bolus_and_drug_by_text_is_flagged(code_map):
    (e,), _, _ = map_one(code_map, med(None, 1, text="Phenylephrine 100 mcg IV push", dose=100, dose_unit="ug"))
    assert e.drug == "phenylephrine" and e.bolus and e.matched_by_text


@pytest.mark.parametrize(
    ("res", "reason"),
    [
        ({**med("7512", 1, 2), "status": "entered-in-error"}, "status entered-in-error"),
        (med("999999", 1, 2, text="Unobtainium"), "medication not in mappings/medications.toml: Unobtainium"),
        ({**med("7512", 1, 2), "effectivePeriod": {"start": at(3), "end": at(2)}}, "ends before it starts"),
    ],
)
def test_medication_skips(code_map, res, reason):
    _, (s,), _ = map_one(code_map, res)
    assert reason in s.reason


def test_procedures(code_map):
    (p,), _, _ = map_one(code_map, proc("112798008", 10, reason="hypoxemic respiratory failure"))
    assert isinstance(p, ProcedureDone) and p.kind == "intubation" and "hypoxemic" in p.reason
    r = proc("1258985005", 10, 20)
    del r["performedPeriod"]
    r["performedString"] = "last week"
    _, (s,), _ = map_one(code_map, r)
    assert "performedString is not a date/time" in s.reason


def test_contained_patient_subject_is_skipped(code_map):
    r = temp(1, 37)
    r["subject"] = {"reference": "#newborn"}
    _, (s,), _ = map_one(code_map, r)
    assert "not a resolvable Patient reference" in s.reason


def test_local_code_table_entry_wins_over_text(code_map):
    r = obs("O2-DEVICE", 1, {"text": "Nasal cannula"}, system=LOCAL, display="Temperature probe")
    (e,), _, _ = map_one(code_map, r)
    assert e.kind == "o2_device" and e.detail == "nasal_cannula"
    assert e.matched_by_text  # the row code matched, but the device value only by its text
    coded = obs("O2-DEVICE", 1, {"coding": [{"system": SCT, "code": "336623009"}]}, system=LOCAL, display="Temperature probe")
    (c,), _, _ = map_one(code_map, coded)
    assert c.kind == "o2_device" and not c.matched_by_text


def _condition(code: str, text: str, onset: str | None = "2025-03-15T10:00:00Z", **extra: Any) -> dict[str, Any]:
    r: dict[str, Any] = {"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1"},
                         "code": {"coding": [{"system": "http://snomed.info/sct", "code": code}], "text": text}, **extra}
    if onset:
        r["onsetDateTime"] = onset
    return r


@pytest.mark.parametrize(
    ("res", "kind", "detail"),
    [
        (_condition("91175000", "Generalized tonic-clonic seizure"), "seizure", "generalized"),
        (_condition("230456007", "Status epilepticus"), "seizure", "status"),
        (_condition("2032001", "Cerebral edema, diffuse"), "cerebral_edema", "diffuse"),
        (_condition("1386000", "Intracranial hemorrhage"), "intracranial_hemorrhage", "present"),
    ],
)
def test_neuro_findings_as_conditions(code_map, res, kind, detail):
    (e,), skipped, _ = map_one(code_map, res)
    assert not skipped and isinstance(e, Finding) and (e.kind, e.detail) == (kind, detail)


@pytest.mark.parametrize(
    ("res", "reason"),
    [
        (_condition("44054006", "Diabetes mellitus type 2"), "Condition not used for grading"),
        (_condition("91175000", "Seizure", verificationStatus={"coding": [{"code": "refuted"}]}), "verificationStatus refuted"),
        (_condition("91175000", "Seizure", onset=None), "no onset"),
    ],
)
def test_other_conditions_are_named_skips(code_map, res, reason):
    events, (s,), _ = map_one(code_map, res)
    assert not events and reason in s.reason


def test_rate_charted_in_the_dose_field(code_map):
    (e,), _, _ = map_one(code_map, med("7512", 1, 5, dose=0.08, dose_unit="ug/kg/min"))
    assert e.rate_ug_kg_min == 0.08 and "rate_from_dose_field" in e.notes and not e.bolus
