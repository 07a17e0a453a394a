"""Issue 11 audit, end to end through the CLI (click's CliRunner): each class of real-feed input
the issue names, in several shapes, read from Bundle files, NDJSON files and server pages (`pull`
and `sync` against a scripted server on 127.0.0.1). Complements tests/test_fidelity.py (the
pipeline-level tables and the property tests): here every row goes through `fhir-crs grade`,
`pull` or `sync` and the printed JSON is checked against ../shared/contracts."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from click.testing import CliRunner
from conftest import ROOT
from factory import NE, SCT, bp, cart, med, obs, patient, proc, temp, vitals_baseline
from loopback import LoopbackServer
from test_fidelity import CORRUPT_LINES, FEVER_H, base

from fhir_crs.cli import cli

SHARED_CONTRACTS = ROOT.parent / "shared" / "contracts"
CONTRACTS = SHARED_CONTRACTS if SHARED_CONTRACTS.is_dir() else ROOT / "tests" / "contracts"
GRADE_SCHEMA = json.loads((CONTRACTS / "grade.schema.json").read_text())
SYNC_SCHEMA = json.loads((CONTRACTS / "sync-summary.schema.json").read_text())
FORMATS = ["bundle", "ndjson"]


# ---- helpers ------------------------------------------------------------------------------------

def write(tmp: Path, rows: list[dict[str, Any]], fmt: str, name: str = "input") -> Path:
    if fmt == "bundle":
        p = tmp / f"{name}.json"
        p.write_text(json.dumps({"resourceType": "Bundle", "type": "collection", "entry": [
            {"fullUrl": f"http://ehr.example.org/fhir/{r['resourceType']}/{r['id']}", "resource": r} for r in rows]}))
    else:
        p = tmp / f"{name}.ndjson"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def grade(*paths: Path, sets: tuple[str, ...] = ()) -> dict[str, Any]:
    args = ["grade", *map(str, paths), "--json"]
    for s in sets:
        args += ["--set", s]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    jsonschema.validate(out, GRADE_SCHEMA)
    assert out["resources_read"] == out["resources_used"] + len(out["skipped"])
    return out


def astct(out: dict[str, Any]) -> dict[str, Any]:
    (case,) = out["cases"]
    return case["crs"]["astct"]


def skips_of(out: dict[str, Any], ref: str) -> list[str]:
    return [s["reason"] for s in out["skipped"] if s["resource"].startswith(ref)]


def fever_case(extra: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Afebrile course (grade 0) plus `extra` (a fever reading under test)."""
    return [patient(), cart(0), *vitals_baseline(72), *extra]


# ---- 1. status normalisation, every graded resource type ---------------------------------------

def _t(status: Any) -> dict[str, Any]:
    r = temp(30, 39.6)
    r["id"] = "x"
    if status is _ABSENT:
        del r["status"]
    else:
        r["status"] = status
    return r


_ABSENT = object()
OBS_STATUS = [
    # (status as sent, counted?, skip reason part or flag)
    ("Entered-In-Error", False, "status entered-in-error"),
    ("entered-in-error ", False, "status entered-in-error"),  # Cerner: trailing space
    ("\tENTERED_IN_ERROR\n", False, "status entered-in-error"),
    ("entered-in-error\u200b", False, "status entered-in-error"),  # zero-width space pasted in
    ("\ufeffCancelled", False, "status cancelled"),  # a byte-order mark inside the field
    ("Registered", False, "no result yet"),
    ("finalised", False, "unknown status 'finalised'"),
    ("", False, "unknown status ''"),
    (["final"], False, "status is not a code"),
    ("FINAL\u00a0", True, None),  # no-break space
    ("Corrected", True, None),
    ("unknown", True, "status_unknown"),
    (_ABSENT, True, "status_missing"),  # required in R4, dropped by a feed: used and flagged, never silent
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("status", "counted", "why"), OBS_STATUS, ids=[repr(s) if s is not _ABSENT else "absent" for s, _, _ in OBS_STATUS])
def test_observation_status_normalised_before_the_valid_decision(tmp_path, fmt, status, counted, why):
    out = grade(write(tmp_path, fever_case([_t(status)]), fmt))
    a = astct(out)
    assert a["grade"] == (1 if counted else 0)
    mine = skips_of(out, "Observation/x")
    if counted:
        assert mine == []
        assert why is None or why in a["flags"]
    else:
        assert len(mine) == 1 and why in mine[0], mine


def _ne(status: str) -> dict[str, Any]:
    r = med(NE, 30.1, 40, rate=8, rate_unit="ug/min", status=status)
    r["id"] = "x"
    return r


def _ppv(status: str) -> dict[str, Any]:
    r = proc("1258985005", 30, 40)  # CPAP
    r["id"], r["status"] = "x", status
    return r


OTHER_STATUS = [
    # (resource, used?, skip reason part or flag)
    (_ne("Not-Done"), False, "status not-done"),
    (_ne(" not_done"), False, "status not-done"),
    (_ne("ENTERED-IN-ERROR"), False, "status entered-in-error"),
    (_ne("Stopped "), True, None),
    (_ne("On-Hold"), True, "status_on_hold"),
    (_ne("given"), False, "unknown status 'given'"),
    (_ppv("Not-Done"), False, "status not-done"),
    (_ppv("entered-in-error\u200b"), False, "status entered-in-error"),
    (_ppv("PREPARATION"), False, "status preparation (not started)"),
    (_ppv("completed "), True, None),
    (_ppv("scheduled"), False, "unknown status 'scheduled'"),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("res", "used", "why"), OTHER_STATUS, ids=[f"{r['resourceType']}-{r['status']!r}" for r, _, _ in OTHER_STATUS])
def test_medication_and_procedure_status_normalised(tmp_path, fmt, res, used, why):
    """Fever + hypotension (grade 2); a norepinephrine infusion makes it 3, CPAP after hypoxia 4."""
    rows = [*base(), obs("59408-5", 29.5, 86, "%")] if res["resourceType"] == "Procedure" else base()
    out = grade(write(tmp_path, [*rows, bp(30.1, 78), res], fmt))
    a = astct(out)
    used_grade = 3 if res["resourceType"] == "MedicationAdministration" else 4
    assert a["grade"] == (used_grade if used else 2), a["criteria"][-2:]
    mine = skips_of(out, f"{res['resourceType']}/x")
    if used:
        assert mine == [] and (why is None or why in a["flags"])
    else:
        assert len(mine) == 1 and why in mine[0], mine


# ---- 2. one version per Type/id: files, formats, pages, pull, sync -------------------------------

def _copy(value: float, meta: dict[str, Any] | None) -> dict[str, Any]:
    r = temp(30, value)
    r["id"] = "v"
    if meta is not None:
        r["meta"] = meta
    return r


VERSION_SHAPES = [
    # (first copy, second copy, expected grade (1 = the 39.5 copy won), superseded reason, cited ref)
    (_copy(37.0, {"versionId": "1"}), _copy(39.5, {"versionId": "2"}), 1, "superseded by version 2", "Observation/v/_history/1"),
    (_copy(39.5, {"versionId": "2"}), _copy(37.0, {"versionId": "1"}), 1, "superseded by version 2", "Observation/v/_history/1"),
    (_copy(37.0, {"versionId": "9"}), _copy(39.5, {"versionId": "10"}), 1, "superseded by version 10", "Observation/v/_history/9"),
    (_copy(39.5, {"versionId": 'W/"3"'}), _copy(37.0, {"versionId": 'W/"2"'}), 1, "superseded by version 3", "Observation/v/_history/2"),
    (_copy(37.0, {"versionId": " 4 "}), _copy(39.5, {"versionId": "4", "lastUpdated": "2025-03-11T09:00:00Z"}), 1,
     "superseded by version 4", "Observation/v/_history/4"),
    (_copy(39.5, {"lastUpdated": "2025-03-11T10:00:00+02:00"}), _copy(37.0, {"lastUpdated": "2025-03-11T07:30:00Z"}), 1,
     "superseded by a later copy", "Observation/v"),  # 08:00Z beats 07:30Z: offsets compared as instants
    (_copy(37.0, None), _copy(39.5, None), 1, "superseded by a later copy", "Observation/v"),  # last in input wins
    (_copy(39.5, None), _copy(37.0, None), 0, "superseded by a later copy", "Observation/v"),
]


@pytest.mark.parametrize("layout", ["one bundle", "one ndjson", "bundle then ndjson", "ndjson then bundle"])
@pytest.mark.parametrize(("first", "second", "want", "why", "cited"), VERSION_SHAPES)
def test_one_version_reaches_the_graders_across_files_and_formats(tmp_path, layout, first, second, want, why, cited):
    rows = fever_case([])
    if layout.startswith("one"):
        paths = [write(tmp_path, [*rows, first, second], layout.split()[1])]
    else:
        f1, f2 = layout.split(" then ")
        paths = [write(tmp_path, [*rows, first], f1, "a"), write(tmp_path, [second], f2, "b")]
    out = grade(*paths)
    a = astct(out)
    assert a["grade"] == want
    sup = [s for s in out["skipped"] if s["code"] == "superseded"]
    assert len(sup) == 1 and why in sup[0]["reason"] and sup[0]["resource"] == cited, sup
    if want == 1 and (v := (second if second["valueQuantity"]["value"] == 39.5 else first).get("meta", {}).get("versionId")):
        assert any(e.startswith("Observation/v/_history/") for e in a["evidence"]), a["evidence"]
        assert f"Observation/v/_history/{str(v).strip().removeprefix('W/').strip(chr(34))}" in a["evidence"]


def _searchset(resources: list[dict[str, Any]], next_url: str | None = None, extra: list[Any] = ()) -> dict[str, Any]:
    b: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset",
                         "entry": [{"fullUrl": f"http://127.0.0.1/fhir/{r['resourceType']}/{r['id']}", "resource": r,
                                    "search": {"mode": "match"}} for r in resources] + list(extra)}
    if next_url:
        b["link"] = [{"relation": "next", "url": next_url}]
    return b


def _serve_patient(srv: LoopbackServer, page1: list[dict[str, Any]], page2: list[dict[str, Any]],
                   page2_extra: list[Any] = (), page2_raw: bytes | None = None) -> None:
    """Patient p1 on a scripted server: Procedures, no MedicationAdministrations, Observations
    on two pages (page 2 optionally sent as raw bytes: corrupt JSON as real feeds send it)."""
    rows = {"Procedure": [r for r in page1 if r["resourceType"] == "Procedure"]}
    srv.route("GET", "/fhir/Patient/p1", json=patient())
    srv.route("GET", "/fhir/Procedure", json=_searchset(rows["Procedure"]))
    srv.route("GET", "/fhir/MedicationAdministration", json=_searchset([]))
    srv.route("GET", "/fhir/Observation", json=_searchset([r for r in page1 if r["resourceType"] == "Observation"],
                                                          next_url="/fhir/Observation?page=2"))
    if page2_raw is not None:
        srv.route("GET", "/fhir/Observation?page=2", body=page2_raw, headers={"Content-Type": "application/fhir+json"})
    else:
        srv.route("GET", "/fhir/Observation?page=2", json=_searchset(page2, extra=page2_extra))
    for rtype in ("Condition", "Bundle", "Provenance"):
        srv.route("GET", f"/fhir/{rtype}", json=_searchset([]))


@pytest.fixture
def ehr(tmp_path: Path):
    with LoopbackServer(tmp_path / "srv") as srv:
        yield srv


def pull(srv: LoopbackServer) -> dict[str, Any]:
    res = CliRunner().invoke(cli, ["pull", "--patient", "p1", "--server", srv.base, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    jsonschema.validate(out, GRADE_SCHEMA)
    assert out["resources_read"] == out["resources_used"] + len(out["skipped"])
    return out


@pytest.mark.parametrize(("first", "second", "want", "why", "cited"), VERSION_SHAPES[:4] + VERSION_SHAPES[6:])
def test_pull_pages_bring_the_same_resource_twice(ehr, first, second, want, why, cited):
    """Page 1 and page 2 of one search carry two copies of Observation/v: the version rule holds
    whichever page has the newer one, and the other copy is a named skip (never dropped silently)."""
    rows = [p for p in fever_case([]) if p["resourceType"] != "Patient"]
    _serve_patient(ehr, [*rows, first], [second])
    out = pull(ehr)
    assert astct(out)["grade"] == want
    sup = [s for s in out["skipped"] if s["code"] == "superseded"]
    assert len(sup) == 1 and why in sup[0]["reason"] and sup[0]["resource"] == cited, sup


def test_pull_page_entries_without_a_resource_are_counted_skips(ehr):
    rows = [p for p in fever_case([temp(30, 39.6)]) if p["resourceType"] != "Patient"]
    holes = [{"fullUrl": "http://127.0.0.1/fhir/Observation/gone"}, {"resource": None}, "not an entry"]
    _serve_patient(ehr, rows[:20], rows[20:], page2_extra=holes)
    out = pull(ehr)
    assert astct(out)["grade"] == 1
    holes_skipped = [s for s in out["skipped"] if "search page entry without a resource" in s["reason"]]
    assert sorted(s["resource"] for s in holes_skipped)[0] == "http://127.0.0.1/fhir/Observation/gone"
    assert len(holes_skipped) == 3 and {"no resource", "resource is null", "not a JSON object"} == {
        s["reason"].rsplit(": ", 1)[1] for s in holes_skipped}


@pytest.mark.parametrize("corruption", ["1e309", "NaN", "bom", "surrogate"])
def test_pull_corrupt_value_on_a_page_is_one_resource_skip(ehr, corruption):
    """A page whose JSON holds one corrupt value loses only that resource, never the page."""
    rows = [p for p in fever_case([temp(30, 39.6)]) if p["resourceType"] != "Patient"]
    page2 = rows[20:]
    victim = next(r for r in page2 if r["resourceType"] == "Observation" and r.get("valueQuantity", {}).get("value") == 37.0)
    text = json.dumps(_searchset(page2))
    mine = json.dumps(victim)
    assert mine in text
    if corruption == "bom":
        raw = b"\xef\xbb\xbf" + text.encode()
    elif corruption == "surrogate":
        raw = text.replace(mine, mine[:-1] + ', "note": [{"text": "probe \\ud800 moved"}]}').encode()
    else:
        raw = text.replace(mine, mine.replace('"value": 37.0', f'"value": {corruption}')).encode()
    _serve_patient(ehr, rows[:20], [], page2_raw=raw)
    out = pull(ehr)
    assert astct(out)["grade"] == 1
    unread = [s for s in out["skipped"] if s["code"] == "unreadable_number"]
    if corruption in ("1e309", "NaN"):
        assert len(unread) == 1 and unread[0]["resource"] == f"Observation/{victim['id']}", out["skipped"]
    else:
        assert unread == [] and out["resources_used"] == len(rows) + 1  # every resource read (+ the Patient)


def test_sync_counts_superseded_and_holes_like_pull(ehr, tmp_path):
    first, second = VERSION_SHAPES[0][:2]
    rows = [p for p in fever_case([]) if p["resourceType"] != "Patient"]
    _serve_patient(ehr, [*rows, second], [first], page2_extra=[{"resource": None}])
    (tmp_path / "patients.txt").write_text("p1\n")
    res = CliRunner().invoke(cli, ["sync", "--server", ehr.base, "--patients", str(tmp_path / "patients.txt"),
                                   "--state", str(tmp_path / "state.sqlite"), "--dry-run", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    jsonschema.validate(out, SYNC_SCHEMA)
    assert out["graded"] == 1 and out["skipped"].get("superseded") == 1 and out["skipped"].get("no_resource") == 1, out["skipped"]


# ---- 3. coded reasons first; text flagged; negation never counts ---------------------------------

def _ppv_rows(reason: dict[str, Any] | None, spo2: float) -> list[dict[str, Any]]:
    intub = proc("112798008", 30)
    if reason is not None:
        intub["reasonCode"] = [reason]
    return [patient(), cart(0), *vitals_baseline(120, skip=set(map(float, FEVER_H))), *[temp(h, 39.0) for h in FEVER_H],
            *[bp(h, 118) for h in FEVER_H], obs("59408-5", 29, spo2, "%"), intub, proc("1258985005", 30, 40)]


PPV_REASONS = [
    # (reasonCode, SpO2 before, grade, matched_by_text?)
    ({"coding": [{"system": SCT, "code": "389087006"}]}, 97, 4, False),                 # coded hypoxemia
    ({"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "J96.01"}], "text": "airway protection"}, 97, 4, False),
    ({"coding": [{"system": SCT, "code": "91175000"}], "text": "hypoxemic respiratory failure"}, 97, 1, False),  # coded seizure decides
    ({"coding": [{"system": "urn:local:unknown", "code": "77", "display": "Acute hypoxemic respiratory failure"}]}, 97, 4, True),
    ({"text": "hypoxemia"}, 97, 4, True),
    ({"text": "not for hypoxemia"}, 97, 1, False),
    ({"text": "Not for hypoxemia"}, 85, 4, False),   # negated text, but SpO2 85 preceded: the look-back counts it
    ({"text": "no evidence of respiratory failure"}, 97, 1, False),
    ({"text": "denies shortness of breath; not hypoxic"}, 97, 1, False),
    ({"text": "non-hypoxic, intubated for airway protection"}, 97, 1, False),
    ({"text": "negative for hypoxia"}, 97, 1, False),
    ({"text": "without desaturation"}, 97, 1, False),
    ({"text": "hypoxia ruled out"}, 97, 1, False),
    ({"text": "airway protection; later hypoxemic"}, 97, 4, True),  # both: respiratory failure wins
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("reason", "spo2", "want", "by_text"), PPV_REASONS, ids=[json.dumps(r)[:60] for r, *_ in PPV_REASONS])
def test_positive_pressure_reason_code_first_negation_aware(tmp_path, fmt, reason, spo2, want, by_text):
    a = astct(grade(write(tmp_path, _ppv_rows(reason, spo2), fmt)))
    assert a["grade"] == want, a["criteria"][-2:]
    assert ("matched_by_text" in a["flags"]) is by_text, a["flags"]
    assert ("ppv_not_attributed" in a["flags"]) is (want != 4)


def _culture(value: dict[str, Any] | str | None, interp: str | None = None) -> dict[str, Any]:
    r = obs("600-7", 25, value if value is not None else None)
    r["id"] = "bc"
    if interp:
        r["interpretation"] = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "code": interp}]}]
    return r


CULTURES = [
    # (result value, interpretation, positive?, read by text?)
    ({"coding": [{"system": SCT, "code": "264868006", "display": "Staph aureus"}]}, None, False, False),  # the code decides
    ({"coding": [{"system": SCT, "code": "10828004"}], "text": "no growth"}, None, True, False),
    ({"coding": [{"system": SCT, "code": "3092008"}]}, None, True, False),  # an organism code: growth
    ("No growth at 5 days", None, False, True),
    ("Gram-negative rods", None, True, True),  # not a negation
    ("Coagulase negative Staphylococcus", None, True, True),
    ("Escherichia coli isolated", None, True, True),
    ("negative for bacteria", None, False, True),
    ("Organism not detected", None, False, True),
    ("Gram negative rods", "NEG", False, False),  # coded interpretation first
    ("no growth", "POS", True, False),
]


@pytest.mark.parametrize(("value", "interp", "positive", "by_text"), CULTURES, ids=[json.dumps(v)[:50] for v, *_ in CULTURES])
def test_blood_culture_code_first_then_text(tmp_path, value, interp, positive, by_text):
    out = grade(write(tmp_path, [*base(), _culture(value, interp)], "bundle"))
    a = astct(out)
    assert a["grade"] == 2  # a culture never changes the grade by default
    assert ("positive_blood_culture" in a["flags"]) is positive, a["flags"]
    if positive:
        assert "attribution_needed" in a["flags"]
        assert ("matched_by_text" in a["flags"]) is by_text


# ---- 4. a severe second episode is never hidden by default -----------------------------------------

def _biphasic() -> list[dict[str, Any]]:
    rows = [patient(), cart(0), obs("29463-7", -12, 70, "kg"), *vitals_baseline(240, skip={24.0, 28.0, 192.0, 196.0, 200.0}),
            temp(24, 39.0), temp(28, 38.6), obs("2276-4", -2, 800, "ng/mL")]
    rows += [temp(192, 39.4), temp(196, 39.1), temp(200, 38.8), bp(192, 118), bp(196, 78), bp(196.25, 80),
             med(NE, 196.5, 206, rate=8, rate_unit="ug/min"), obs("2276-4", 194, 4800, "ng/mL")]
    return rows


@pytest.mark.parametrize("fmt", FORMATS)
def test_second_episode_counts_by_default_and_excluding_it_is_said(tmp_path, fmt):
    p = write(tmp_path, _biphasic(), fmt)
    a = astct(grade(p))
    assert a["grade"] == 3 and [e["counted"] for e in a["episodes"]] == [True, True]
    assert {"attribution_needed", "possible_iec_hs"} <= set(a["flags"]) and "episode_excluded_by_setting" not in a["flags"]
    under = astct(grade(p, sets=("exclude_provisional_episodes=true",)))
    assert under["grade"] == 1 and [e["counted"] for e in under["episodes"]] == [True, False]
    assert "episode_excluded_by_setting" in under["flags"]
    assert {"setting": "exclude_provisional_episodes", "value": True} in [
        {k: c[k] for k in ("setting", "value")} for c in under["conventions"]]
    text = CliRunner().invoke(cli, ["grade", str(p), "--set", "exclude_provisional_episodes=true"]).output
    assert "episode 2 (grade 3) NOT counted in the grade: setting exclude_provisional_episodes=true" in text


# ---- 5. one bad value must not lose its neighbours: Bundle files too -------------------------------

@pytest.mark.parametrize("name", [n for n in CORRUPT_LINES if n != "not JSON"])
def test_one_corrupt_resource_in_a_bundle_is_one_named_skip(tmp_path, name):
    line, why = CORRUPT_LINES[name]
    rows = base()
    good = json.dumps({"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in rows]})
    (tmp_path / "before.json").write_text(good)
    (tmp_path / "after.json").write_text(good[:-2] + ', {"resource": ' + line + "}]}")
    before, after = grade(tmp_path / "before.json"), grade(tmp_path / "after.json")
    assert [c["crs"] for c in after["cases"]] == [c["crs"] for c in before["cases"]]
    new = [s for s in after["skipped"] if s not in before["skipped"]]
    assert len(new) == 1 and len(after["skipped"]) == len(before["skipped"]) + 1 and why in new[0]["reason"], new


@pytest.mark.parametrize(("rate", "unit", "grade_", "skip"), [
    (0, "ug/min", 2, None),             # charted off: not a running vasopressor
    (0.0, "ug/kg/min", 2, None),
    (8, "ug/min", 3, None),
    (-3, "ug/min", 2, "negative rate"),
    (150, "ug/kg/min", 2, "above the plausible 100 ug/kg/min"),
    (9000, "ug/min", 2, "above the plausible 7000 ug/min"),
])
@pytest.mark.parametrize("fmt", FORMATS)
def test_vasopressor_rates_zero_negative_absurd(tmp_path, fmt, rate, unit, grade_, skip):
    ne = med(NE, 40.1, 46, rate=rate, rate_unit=unit)
    ne["id"] = "ne"
    out = grade(write(tmp_path, [*base(), bp(40, 78), ne], fmt))
    assert astct(out)["grade"] == grade_
    assert ("MedicationAdministration/ne" in astct(out)["evidence"]) is (grade_ == 3)
    mine = skips_of(out, "MedicationAdministration/ne")
    assert (mine == []) if skip is None else (len(mine) == 1 and skip in mine[0]), mine


def test_zero_rate_row_ends_a_point_charted_infusion(tmp_path):
    """NE charted at 8 then at 0 two hours later (point rows): the course ends at the 0 row."""
    on, off = med(NE, 40.1, rate=8, rate_unit="ug/min"), med(NE, 42.1, rate=0, rate_unit="ug/min")
    out = grade(write(tmp_path, [*base(), bp(40, 78), on, off], "bundle"))
    a = astct(out)
    assert a["grade"] == 3 and "infusion_end_assumed" not in a["flags"]
    (row,) = [e for e in out["cases"][0]["timeline"] if e["kind"] == "vasopressor"]
    assert row["detail"] == "norepinephrine until +42.1 h (2.0 h)" and row["evidence"] == [f"MedicationAdministration/{on['id']}"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_datetime_and_reference_problems_in_both_formats(tmp_path, fmt):
    bad = [
        (temp(50, 39.5) | {"id": "d1", "effectiveDateTime": "2025-03-12T10:00:00+25:00"}, "UTC offset +25:00"),
        (temp(50, 39.5) | {"id": "d2", "effectiveDateTime": "2025-13-12T10:00:00Z"}, "month 13"),
        (temp(50, 39.5) | {"id": "d3", "effectiveDateTime": "2025-02-30T10:00:00Z"}, "day 30"),
        (temp(50, 39.5) | {"id": "d4", "effectiveDateTime": "2025-03-12T23:59:60Z"}, "second 60"),
        (temp(50, 39.5) | {"id": "d5", "subject": {"reference": "urn:uuid:0b6a3c2e-0000-4000-8000-000000000000"}}, "unresolved reference"),
    ]
    rows = fever_case([])
    out = grade(write(tmp_path, [*rows, *copy.deepcopy([r for r, _ in bad])], fmt))
    assert astct(out)["grade"] == 0  # none of the impossible fevers is evidence
    for r, why in bad:
        mine = skips_of(out, f"Observation/{r['id']}")
        assert len(mine) == 1 and why in mine[0], (r["id"], mine)
    assert len(out["skipped"]) == len(bad)


# ---- realworld feeds ---------------------------------------------------------------------------------

REALWORLD = ROOT.parent / "shared" / "realworld"


@pytest.mark.skipif(not REALWORLD.is_dir(), reason="../shared/realworld is absent (real-world sample feeds not on this machine)")
@pytest.mark.parametrize("sub", ["hl7-examples", "synthea", "synthea-covid"])
def test_realworld_feeds_account_for_every_resource(sub):
    path = REALWORLD / sub
    if not path.is_dir():
        pytest.skip(f"../shared/realworld/{sub} is absent")
    res = CliRunner().invoke(cli, ["grade", str(path), "--json"])
    assert res.exit_code == 0, res.output[-2000:]
    out = json.loads(res.stdout)
    jsonschema.validate(out, GRADE_SCHEMA)
    assert out["resources_read"] == out["resources_used"] + len(out["skipped"]) > 0
    assert all(s["reason"] for s in out["skipped"])
