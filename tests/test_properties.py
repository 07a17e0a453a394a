"""Property tests (hypothesis): adding an abnormality to a timeline never lowers any system's grade,
and no grade ever exceeds 5."""

from __future__ import annotations

from typing import Any

from factory import (
    EPI,
    NE,
    PHENYL,
    VASO,
    bp,
    cart,
    device,
    fio2,
    flow,
    med,
    obs,
    patient,
    proc,
    score,
    temp,
    vitals_baseline,
)
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fhir_crs.pipeline import grade_resources

hours = st.floats(min_value=0, max_value=150).map(lambda h: round(h * 4) / 4)


@st.composite
def abnormality(draw: st.DrawFn) -> list[dict[str, Any]]:
    kind = draw(st.sampled_from(["hypotension", "pressor", "o2", "hfnc", "ppv", "organ", "bolus", "neuro", "seizure"]))
    x = draw(hours)
    if kind == "hypotension":
        v = draw(st.integers(50, 89))
        return [bp(x, v), bp(x + 0.2, v)]
    if kind == "pressor":
        drug = draw(st.sampled_from([NE, EPI, PHENYL, VASO]))
        dur = draw(st.floats(0.5, 30))
        unit = "U/min" if drug == VASO else "ug/min"
        rate = 0.04 if drug == VASO else draw(st.floats(1, 60))
        return [bp(x, 75), med(drug, x + 0.1, x + 0.1 + dur, rate=rate, rate_unit=unit)]
    if kind == "o2":
        return [device(x, "Nasal cannula", "336623009"), flow(x, draw(st.integers(1, 10)))]
    if kind == "hfnc":
        return [device(x, "High flow nasal cannula", "426854004"), flow(x, 40), fio2(x, draw(st.integers(25, 100)))]
    if kind == "ppv":
        return [obs("59408-5", x, 85, "%"), proc("112798008", x + 0.5, reason="hypoxemic respiratory failure"),
                proc("1258985005", x + 0.5, x + draw(st.floats(2, 48)))]
    if kind == "organ":
        code, value = draw(st.sampled_from([("2160-0", 2.5), ("2160-0", 8.0), ("1920-8", 300), ("1742-6", 900), ("1975-2", 5.0)]))
        unit = "mg/dL" if code in ("2160-0", "1975-2") else "U/L"
        return [obs(code, x, value, unit)]
    if kind == "bolus":
        return [bp(x, 80), med("313002", x + 0.2, x + 0.7, dose=1000, dose_unit="mL", dosage_text="bolus")]
    if kind == "neuro":
        return [score("ICE-SCORE", x, draw(st.integers(0, 9)), display="ICE score")]
    return [obs("91175000", x, {"text": draw(st.sampled_from(["Focal seizure", "Generalized tonic-clonic seizure", "Status epilepticus"]))},
                system="http://snomed.info/sct")]


def all_grades(resources: list[dict[str, Any]]) -> dict[str, int]:
    case = grade_resources(resources).to_json()["cases"][0]
    out = {f"crs.{k}": v["grade"] for k, v in case["crs"].items()}
    out.update({f"icans.{k}": v["grade"] for k, v in case["icans"].items()})
    return out


# derandomize: CI runs the same examples every time (no flaky nights); explore locally with more
# examples and `derandomize=False`.
@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    onset=st.integers(1, 60), length=st.integers(0, 40), child=st.booleans(),
    base=st.lists(abnormality(), max_size=3), extra=abnormality(),
)
def test_adding_an_abnormality_never_lowers_a_grade(onset, length, child, base, extra):
    fever_hours = list(range(onset, onset + length + 1, 4))
    start = [patient(birth="2016-05-01" if child else "1970-05-01"), cart(0), obs("29463-7", -12, 25 if child else 70, "kg"),
             obs("2160-0", -12, 0.6, "mg/dL"), *vitals_baseline(200, skip=set(map(float, fever_hours))),
             *[temp(h, 39.0) for h in fever_hours], *[bp(h, 118) for h in fever_hours]]
    before_rows = [r for rows in base for r in rows]
    # A later O2-device row or lab value of the same kind is new information that REPLACES the
    # charted state from then on (it may lower it): a correction, not an added abnormality.
    def codes(rows: list[dict[str, Any]]) -> set[str]:
        return {c["code"] for r in rows if r["resourceType"] == "Observation" for c in r["code"]["coding"]
                if c["code"] in ("O2-DEVICE", "3151-8", "3150-0", "2160-0", "1920-8", "1742-6", "1975-2")}

    assume(not (codes(before_rows) & codes(extra)))
    before = all_grades(start + before_rows)
    after = all_grades(start + before_rows + extra)
    for system, grade in after.items():
        assert 0 <= grade <= 5
        assert grade >= before[system], (system, before[system], grade)
