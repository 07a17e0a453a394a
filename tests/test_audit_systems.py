"""Audit of 2026-12-04, older CRS systems (grading-criteria §1.4, §1.5, §4-§10): HFNC FiO2
estimates, review flags of criteria that tie the maximum, vasopressor hand-offs in the systems
that grade concurrent vasopressors, and the vasopressin_counted flag. Synthetic data only."""

from __future__ import annotations

from typing import Any

from factory import EPI, NE, VASO, at, bp, cart, device, fio2, flow, med, obs, patient, proc, temp, vitals_baseline

from fhir_crs.pipeline import grade_resources

FIO2_SYSTEMS = ("lee2014", "mskcc", "cartox", "ctcae5")
HYPO = [bp(27.5, 80), bp(27.7, 82)]


def grades(*rows: dict[str, Any], fevers: tuple[float, ...] = (24, 28, 32), until: float = 140) -> dict[str, dict[str, Any]]:
    resources = [patient(birth="1967-01-01"), cart(0), obs("29463-7", -12, 70, "kg"),
                 *vitals_baseline(until, skip=set(fevers)), *[temp(h, 39.0) for h in fevers],
                 *[bp(h, 120) for h in fevers], *rows]
    return grade_resources(resources).to_json()["cases"][0]["crs"]


def conventions(r: dict[str, Any]) -> set[str]:
    return {c["setting"] for c in r["conventions"]}


def test_hfnc_with_flow_and_no_fio2_gets_the_nasal_cannula_estimate():
    """§1.5: NC > 6 L/min (HFNC included) is 0.44 + 0.03/L, capped at 0.60, flagged estimated."""
    crs = grades(device(28, "High flow nasal cannula", "426854004"), flow(28, 40), device(34, "Room air"))
    for s in FIO2_SYSTEMS:
        r = crs[s]
        assert r["grade"] == 3 and r["max_at"] == at(28), s
        assert "estimated_fio2" in r["flags"], s
        assert {"fio2_nc_high_per_lpm", "fio2_nc_cap"} <= conventions(r), s
        assert any("FiO2 60 % (estimated)" in c["criterion"] for c in r["criteria"]), s


def test_hfnc_without_flow_or_fio2_is_flagged_never_silently_below_the_cut():
    """§1.5: HFNC is high flow by class, so its estimate is at least that at low_flow_max_lpm
    (44 %), flagged fio2_unknown and missing_flow: never a silent '< 40 %'."""
    crs = grades(device(28, "High flow nasal cannula", "426854004"), device(34, "Room air"))
    for s in FIO2_SYSTEMS:
        r = crs[s]
        assert r["grade"] == 3, s
        assert {"fio2_unknown", "missing_flow", "estimated_fio2"} <= set(r["flags"]), s
        assert "low_flow_max_lpm" in conventions(r), s


def test_documented_fio2_of_the_same_device_is_used_before_an_estimate():
    """§1.5: documented FiO2 first; an HFNC Procedure beside charted HFNC FiO2 30 % is not
    estimated on its own (the lower bound of the rule above must not override the chart)."""
    crs = grades(device(28, "High flow nasal cannula", "426854004"), flow(28, 40), fio2(28, 30),
                 proc("426854004", 28, 34, display="High flow nasal cannula"), device(34, "Room air"))
    for s in FIO2_SYSTEMS:
        assert crs[s]["grade"] == 2, s
        assert "fio2_unknown" not in crs[s]["flags"], s


def test_review_flag_of_a_criterion_tying_the_maximum_reaches_the_result():
    """§1.5, §10: BiPAP FiO2 30 % after low-flow O2 ties grade 2 in the FiO2 systems; its
    niv_ambiguity flag (and the BiPAP evidence) reach the result, max_at stays the first max."""
    nc = device(28, "Nasal cannula", "336623009")
    bipap = device(30, "BiPAP", "243142003")
    crs = grades(nc, flow(28, 2), obs("59408-5", 29, 86, "%"), bipap, fio2(30, 30), device(34, "Room air"))
    for s in FIO2_SYSTEMS:
        r = crs[s]
        assert r["grade"] == 2 and r["max_at"] == at(28), s
        assert "niv_ambiguity" in r["flags"], s
        assert nc["id"] in str(r["evidence"]) and bipap["id"] in str(r["evidence"]), s


def test_review_flag_of_a_later_episode_tying_the_maximum_reaches_the_result():
    """§1.7 episodes, §1.5: a second episode at the same maximum grade keeps its review flag."""
    bipap = device(102, "BiPAP", "243142003")
    crs = grades(*HYPO, obs("59408-5", 101, 86, "%"), bipap, fio2(102, 30), device(106, "Room air"),
                 fevers=(24, 28, 32, 100, 104), until=200)
    r = crs["lee2014"]
    assert [e["grade"] for e in r["episodes"]] == [2, 2]
    assert r["grade"] == 2 and "niv_ambiguity" in r["flags"] and bipap["id"] in str(r["evidence"])


def test_vasopressor_handoff_is_flagged_by_every_system_grading_concurrency():
    """§1.4: a 45-min overlap < vasopressor_overlap_min counts as one vasopressor; Lee, CARTOX
    and CTCAE (which grade concurrent vasopressors higher) flag vasopressor_handoff and report
    the setting; Penn and MSKCC do not grade concurrency."""
    crs = grades(*HYPO, med(NE, 30, 34, rate=5, rate_unit="ug/min"), med(EPI, 33.25, 37, rate=3, rate_unit="ug/min"))
    assert {s: crs[s]["grade"] for s in ("lee2014", "cartox", "ctcae5")} == {"lee2014": 2, "cartox": 2, "ctcae5": 3}
    for s in ("astct", "lee2014", "cartox", "ctcae5"):
        assert "vasopressor_handoff" in crs[s]["flags"], s
        assert "vasopressor_overlap_min" in conventions(crs[s]), s
    for s in ("penn", "mskcc"):
        assert "vasopressor_handoff" not in crs[s]["flags"], s


def test_vasopressin_handoff_is_flagged_where_vasopressin_counts():
    """§1.4, §10: Lee/CARTOX/CTCAE count vasopressin, so a short NE + vasopressin overlap is a
    hand-off for them (ASTCT excludes vasopressin and has nothing to flag)."""
    crs = grades(*HYPO, med(NE, 30, 34, rate=5, rate_unit="ug/min"), med(VASO, 33.25, 37, rate=0.03, rate_unit="U/min"))
    for s in ("lee2014", "cartox", "ctcae5"):
        assert "vasopressor_handoff" in crs[s]["flags"], s
    assert "vasopressor_handoff" not in crs["astct"]["flags"]


def test_vasopressin_counted_only_when_vasopressin_runs():
    """§10: vasopressin_counted says vasopressin made the combination; NE + epinephrine is not."""
    without = grades(*HYPO, med(NE, 30, 36, rate=5, rate_unit="ug/min"), med(EPI, 30.5, 36, rate=3, rate_unit="ug/min"))
    with_vaso = grades(*HYPO, med(NE, 30, 36, rate=5, rate_unit="ug/min"), med(VASO, 30.5, 36, rate=0.03, rate_unit="U/min"))
    for s in ("lee2014", "cartox", "ctcae5"):
        assert without[s]["grade"] == with_vaso[s]["grade"] == (4 if s == "ctcae5" else 3), s
        assert "vasopressin_counted" not in without[s]["flags"], s
        assert "vasopressin_counted" in with_vaso[s]["flags"], s
