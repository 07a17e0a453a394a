"""Bad input never crashes: arbitrary (hypothesis-generated) junk in every field the mappers read
either maps or becomes a named skip, and grading whatever survives never raises."""

from __future__ import annotations

from typing import Any

from factory import bp, cart, patient, temp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhir_crs.pipeline import grade_resources

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12), st.sampled_from(["2025-03-10T08:00:00Z", "2025-03-10", "2025", "T08:00", "", "+05:00"]))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=8)
FIELDS = ["status", "code", "subject", "effectiveDateTime", "effectivePeriod", "valueQuantity", "valueString",
          "valueCodeableConcept", "component", "medicationCodeableConcept", "medicationReference", "dosage",
          "performedDateTime", "performedPeriod", "reasonCode", "birthDate", "deceasedDateTime", "contained",
          "referenceRange", "extension", "id", "usedCode", "interpretation", "note"]


@st.composite
def junk_resource(draw: st.DrawFn) -> dict[str, Any]:
    base = draw(st.sampled_from([temp(24, 39.0), bp(30, 80), cart(0), patient()]))
    r = dict(base)
    r["resourceType"] = draw(st.sampled_from(["Observation", "MedicationAdministration", "Procedure", "Patient", "Medication", "Bundle", "Foo"]))
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)):
        r[name] = draw(json_values)
    return r


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(junk_resource(), min_size=1, max_size=6))
def test_junk_never_crashes(resources):
    good = [patient(), cart(0), temp(24, 39.0), temp(30, 37.0), bp(24, 120)]
    run = grade_resources(good + resources).to_json()
    assert isinstance(run["skipped"], list)
    for s in run["skipped"]:
        assert s["resource"] and s["reason"]


def test_extreme_and_malformed_timestamps_are_skipped_not_fatal():
    res = [patient(), cart(0), temp(24, 39.0)]
    for bad in ("0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "2025-13-40T25:61:00Z", "yesterday"):
        t = temp(30, 38.5)
        t["effectiveDateTime"] = bad
        res.append(t)
    run = grade_resources(res).to_json()
    assert run["cases"][0]["crs"]["astct"]["grade"] == 1
    assert sum(s["reason"].startswith("effectiveDateTime: ") for s in run["skipped"]) == 4
