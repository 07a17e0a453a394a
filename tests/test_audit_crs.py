"""Audit of 2026-12-04 (ASTCT CRS, shared definitions): rules an independent audit of new cases
found under-called or set aside without a word (grading-criteria §1.1, §1.3, §2.3; the clinical
safety rule: a default that sets a grade-raising finding aside says so). Each test fails
without its fix."""

from __future__ import annotations

from factory import NE, at, bp, cart, device, flow, med, obs, patient, proc, temp, vitals_baseline
from test_grading_astct import base, case, crs
from test_grading_systems import HYPO, grades
from test_mappers import map_one


def _kpa_bp(h: float, kpa: float) -> dict:
    return obs("8480-6", h, kpa, "kPa")


def test_sbp_in_kpa_is_converted_not_skipped(code_map):
    (e,), skipped, _ = map_one(code_map, _kpa_bp(1, 11.2))
    assert not skipped and e.kind == "sbp" and round(e.value, 1) == 84.0
    low = crs(case(_kpa_bp(28, 11.2), _kpa_bp(28.2, 11.2)))
    assert low["grade"] == 2  # two readings of 84 mmHg >= 5 min apart: hypotension
    normal = crs(case(_kpa_bp(28, 16.0), _kpa_bp(28.2, 16.0)))
    assert normal["grade"] == 1  # 120 mmHg, never read as 16 mmHg


def test_molar_ferritin_is_read_in_ng_per_ml(code_map):
    (e,), skipped, _ = map_one(code_map, obs("14723-1", 1, 40000, "pmol/L"))
    assert not skipped and e.kind == "ferritin" and round(e.value) == 17800


def test_positive_pressure_set_aside_after_the_episode_is_still_flagged():
    # fever 24-32 h, resolved; intubated at 60 h "for airway protection" (no hypoxia): not CRS
    # by §2.3, but a possible grade 4 that the result must name
    r = crs(case(proc("112798008", 60, None, reason="airway protection after seizure"), proc("1258985005", 60, 70)))
    assert r["grade"] == 1 and "ppv_not_attributed" in r["flags"]
    assert any(c["setting"] == "ppv_hypoxia_lookback_h" for c in r["conventions"])


def test_airway_protection_after_documented_hypoxia_counts_and_is_flagged():
    # §2.3 [I]: positive pressure counts if hypoxia preceded it within 6 h OR the indication is
    # respiratory failure; an airway-protection indication does not veto documented hypoxia
    hypoxic = crs(case(obs("59408-5", 27, 87, "%"),
                       proc("112798008", 28, None, reason="airway protection after seizure"), proc("1258985005", 28, 40)))
    assert hypoxic["grade"] == 4 and "ppv_indication_conflict" in hypoxic["flags"]
    not_hypoxic = crs(case(proc("112798008", 28, None, reason="airway protection after seizure"), proc("1258985005", 28, 40)))
    assert not_hypoxic["grade"] == 1 and "ppv_not_attributed" in not_hypoxic["flags"]
    assert "ppv_indication_conflict" not in not_hypoxic["flags"]


def test_a_component_just_before_the_first_fever_is_flagged_not_dropped():
    # hypotension treated with norepinephrine 18-22 h, first fever at 24 h: the episode opens
    # with the fever (§1.1), so the pressor is not graded, but it is named for review
    pre = crs(case(bp(17.5, 80), bp(17.9, 79), med(NE, 18, 22, rate=8, rate_unit="ug/min")))
    assert pre["grade"] == 1
    assert "component_before_onset" in pre["flags"] and "afebrile_hypotension" not in pre["flags"]
    # still running at the fever onset: graded there, nothing to flag
    running = crs(case(bp(17.5, 80), bp(17.9, 79), med(NE, 18, 30, rate=8, rate_unit="ug/min")))
    assert running["grade"] == 3 and "component_before_onset" not in running["flags"]
    # the same pressor two days before the fever is afebrile hypotension, as before
    far = crs(case(bp(17.5, 80), bp(17.9, 79), med(NE, 18, 22, rate=8, rate_unit="ug/min"), onset=72, last=80))
    assert "afebrile_hypotension" in far["flags"] and "component_before_onset" not in far["flags"]


def test_a_single_untreated_low_reading_is_flagged_for_review():
    single = crs(case(bp(28.1, 72)))
    assert single["grade"] == 1 and "hypotension_unconfirmed" in single["flags"]
    assert any(c["setting"] == "hypotension_confirm_window_min" for c in single["conventions"])
    confirmed = crs(case(bp(28.1, 72), bp(28.3, 74)))
    assert confirmed["grade"] == 2 and "hypotension_unconfirmed" not in confirmed["flags"]


def _child(birth: str, sbp: float) -> list[dict]:
    fevers = [temp(h, 39.0) for h in (116, 118, 120)]
    return [patient(birth=birth), cart(0), *vitals_baseline(114, sbp=100), *fevers, bp(120, sbp), bp(120.2, sbp)]


def test_a_reading_low_only_for_the_age_reached_during_the_course_is_flagged():
    # 11 months at infusion (2025-03-10, limit 70); first birthday on day 5 (limit 72): SBP 71
    # at 120 h is graded by the age at infusion (a named convention) and flagged
    turning = crs(_child("2024-03-13", 71))
    assert turning["grade"] == 1 and "age_threshold_changes" in turning["flags"]
    assert any(c["setting"] == "sbp_child_base" for c in turning["conventions"])
    far = crs(_child("2024-01-01", 71))  # already 1 at infusion: limit 72, hypotension
    assert far["grade"] == 2 and "age_threshold_changes" not in far["flags"]
    assert at(120) in {e["max_at"] for e in far["episodes"]}


def test_cibmtr_export_estimates_fio2_as_the_grader_does():
    # Form 4100 q91/q93 (hypoxia with FiO2 < / >= 40 %) use the grader's §1.5 estimate: an HFNC
    # without a charted FiO2 was left out of both before
    from fhir_crs.cibmtr import _fio2_estimate

    assert _fio2_estimate("high_flow_nasal_cannula", 40, None) == 60
    assert _fio2_estimate("high_flow_nasal_cannula", None, None) == 44
    assert _fio2_estimate("nasal_cannula", 2, None) == 28 and _fio2_estimate("nasal_cannula", None, None) is None
    assert _fio2_estimate("face_mask", 8, 35.0) == 35.0


# ---- round 2 (times and episodes) --------------------------------------------------------------


def test_resolution_never_falls_inside_charted_hypotension():
    # fever 24-28 h (afebrile from 32 h); SBP 84 at 33 h and 33.5 h, normal again at 36 h: the
    # last abnormality is the low stretch up to the next normal reading (§1.1), not its first reading
    r = crs(case(bp(33, 84), bp(33.5, 85), onset=24, last=28))
    assert r["grade"] == 2 and r["resolved"] == at(36)


def test_a_third_low_reading_inside_a_confirmed_event_is_not_unconfirmed():
    r = crs(case(bp(30, 84), bp(30 + 1 / 6, 84), bp(30 + 2 / 6, 84)))
    assert r["grade"] == 2 and "hypotension_unconfirmed" not in r["flags"]


def test_exactly_24_hours_clear_resolves_and_a_later_fever_is_a_new_episode():
    # fever at 24 h, afebrile from 28 h, fever again at exactly 52 h: clear for the whole 24 h
    r = crs([*base(skip={24.0, 52.0}), temp(24, 39.0), bp(24, 120), temp(52, 39.0), bp(52, 120)])
    assert [e["onset"] for e in r["episodes"]] == [at(24), at(52)]
    assert r["episodes"][0]["resolved"] == at(28)


def test_oxygen_charted_row_by_row_through_the_onset_is_not_before_onset():
    rows = [device(h, "Nasal cannula", "336623009") for h in (20, 22, 26, 30)] + [flow(h, 2) for h in (20, 22, 26, 30)]
    r = crs(case(*rows, device(34, "Room air")))
    assert r["grade"] == 2 and "component_before_onset" not in r["flags"]


def test_a_short_pause_does_not_restart_the_high_dose_clock():
    # norepinephrine 25 ug/min 30-31.75 h, paused 15 min, again 32-34 h: one infusion (the pause
    # is shorter than vasopressor_course_gap_min), held >= 3 h; said on the result
    crs_ = grades(*HYPO, med(NE, 28, 30, rate=10, rate_unit="ug/min"), med(NE, 30, 31.75, rate=25, rate_unit="ug/min"),
                  med(NE, 32, 34, rate=25, rate_unit="ug/min"))
    for system, grade in (("lee2014", 3), ("penn", 4), ("cartox", 3)):
        r = crs_[system]
        assert r["grade"] == grade and "high_dose_pause_bridged" in r["flags"], system
        assert "vasopressor_course_gap_min" in {c["setting"] for c in r["conventions"]}
    # a lower dose in between (a dip, not a pause) still ends the high-dose stretch
    dip = grades(*HYPO, med(NE, 30, 31.75, rate=25, rate_unit="ug/min"), med(NE, 31.75, 32, rate=5, rate_unit="ug/min"),
                 med(NE, 32, 34, rate=25, rate_unit="ug/min"))
    assert dip["lee2014"]["grade"] == 2


def test_mskcc_counts_the_hours_vasopressors_ran_not_the_pauses():
    # 30-41.75 h and 42.25-54 h: 23.5 h given (the 30-min pause joins one infusion but is not
    # vasopressor time), so MSKCC 2; both records cited when 24 h are reached
    short = grades(*HYPO, med(NE, 30, 41.75, rate=8, rate_unit="ug/min"), med(NE, 42.25, 54, rate=8, rate_unit="ug/min"), until=180)
    assert short["mskcc"]["grade"] == 2
    long = grades(*HYPO, med(NE, 30, 41.75, rate=8, rate_unit="ug/min"), med(NE, 42.25, 54.75, rate=8, rate_unit="ug/min"), until=180)
    assert long["mskcc"]["grade"] == 3 and long["mskcc"]["max_at"] == at(54.5)
    assert len([e for e in long["mskcc"]["evidence"] if e.startswith("MedicationAdministration/")]) >= 2


def test_one_drug_charted_twice_at_once_is_added_and_flagged():
    crs_ = grades(*HYPO, med(NE, 30, 36, rate=12, rate_unit="ug/min"), med(NE, 30, 36, rate=12, rate_unit="ug/min"))
    assert crs_["lee2014"]["grade"] == 3 and "same_drug_overlap" in crs_["lee2014"]["flags"]
