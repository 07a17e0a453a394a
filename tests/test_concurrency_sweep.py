"""The interval sweep behind vasopressor concurrency (grading/crs.py) against a brute-force
reference that tries every combination of courses (issue 17): same intervals, same order, on
random small course sets — ties, nesting, same-drug overlaps and zero-length courses included.
And the bisection indexes the systems query at each change point (grading/state.py) against the
whole-series scans they replace."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import combinations
from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_crs.events import DrugGiven
from fhir_crs.grading.concurrency import concurrent_intervals, handoffs
from fhir_crs.grading.organ import OrganGrade
from fhir_crs.grading.state import FeverIndex, IntervalIndex, LatestOrgan
from fhir_crs.timeline import PressorCourse

T0 = datetime(2025, 1, 1, tzinfo=UTC)
DRUGS = ["norepinephrine", "epinephrine", "phenylephrine", "dopamine"]


def brute_concurrent(courses: list[PressorCourse], min_overlap: timedelta) -> list[tuple[datetime, datetime, int, list[str]]]:
    out = []
    for k in range(2, len(courses) + 1):
        for combo in combinations(courses, k):
            if len({c.drug for c in combo}) < k:
                continue
            start = max(c.start for c in combo)
            end = min(c.end for c in combo)
            if end - start >= min_overlap:
                out.append((start, end, k, [r for c in combo for r in c.refs[:1]]))
    return out


def brute_handoffs(courses: list[PressorCourse], min_overlap: timedelta) -> list[tuple[datetime, list[str]]]:
    out = []
    for a, b in combinations(courses, 2):
        if a.drug == b.drug:
            continue
        start, end = max(a.start, b.start), min(a.end, b.end)
        if timedelta(0) < end - start < min_overlap:
            out.append((start, [a.refs[0], b.refs[0]]))
    return out


@st.composite
def course_sets(draw: st.DrawFn) -> list[PressorCourse]:
    n = draw(st.integers(0, 9))
    courses = []
    for i in range(n):
        drug = draw(st.sampled_from(DRUGS))
        start = draw(st.integers(0, 48)) * 15  # minutes, coarse so that ties happen
        length = draw(st.integers(0, 24)) * 15
        a, b = T0 + timedelta(minutes=start), T0 + timedelta(minutes=start + length)
        seg = DrugGiven(drug, "vasopressor", a, b, f"MedicationAdministration/m{i}")
        courses.append(PressorCourse(drug, a, b, [seg]))
    if draw(st.booleans()):
        courses.sort(key=lambda c: c.start)  # how the timeline hands them over
    return courses


overlaps = st.sampled_from([0, 15, 30, 60, 90]).map(lambda m: timedelta(minutes=m))


@settings(max_examples=400, deadline=None)
@given(course_sets(), overlaps)
def test_concurrent_intervals_equal_brute_force(courses: list[PressorCourse], min_overlap: timedelta) -> None:
    assert concurrent_intervals(courses, min_overlap) == brute_concurrent(courses, min_overlap)


@settings(max_examples=400, deadline=None)
@given(course_sets(), overlaps)
def test_handoffs_equal_brute_force(courses: list[PressorCourse], min_overlap: timedelta) -> None:
    assert handoffs(courses, min_overlap) == brute_handoffs(courses, min_overlap)


def test_many_courses_do_not_explode() -> None:
    """120 alternating infusions, each overlapping the next: the old search listed 2^120 subsets."""
    courses = []
    for i in range(120):
        drug = DRUGS[i % 3]
        a = T0 + timedelta(hours=4 * i)
        b = a + timedelta(hours=5, minutes=30)
        courses.append(PressorCourse(drug, a, b, [DrugGiven(drug, "vasopressor", a, b, f"MedicationAdministration/m{i}")]))
    got = concurrent_intervals(courses, timedelta(minutes=60))
    assert len(got) == 119
    assert all(k == 2 and end - start == timedelta(hours=1, minutes=30) for start, end, k, _ in got)
    assert len(handoffs(courses, timedelta(hours=2))) == 119


# ---- the bisection indexes of grading/state.py against plain scans ---------------------------

minutes = st.integers(0, 40).map(lambda m: T0 + timedelta(minutes=15 * m))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(minutes, minutes), max_size=12), minutes)
def test_interval_index_equals_scan(spans: list[tuple[datetime, datetime]], t: datetime) -> None:
    index = IntervalIndex(spans, lambda x: x[0], lambda x: x[1])
    assert index.at(t) == [x for x in spans if x[0] <= t < x[1]]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(minutes, st.sampled_from([37.0, 38.0, 38.4, 39.1])), max_size=12), minutes,
       st.sampled_from([0, 15, 60, 240]))
def test_fever_index_equals_scan(readings: list[tuple[datetime, float]], t: datetime, window_min: int) -> None:
    from fhir_crs.events import Measurement
    from fhir_crs.grading.episodes import is_fever
    from fhir_crs.settings import load_settings

    s = load_settings(None)
    temps = sorted((Measurement("temperature", when, v, "Cel", f"Observation/t{i}") for i, (when, v) in enumerate(readings)),
                   key=lambda m: m.time)
    tl = SimpleNamespace(temps=temps)
    window = timedelta(minutes=window_min)
    near = [m for m in temps if abs(m.time - t) <= window and is_fever(m, s)]
    expected = min(near, key=lambda m: abs(m.time - t)) if near else None
    assert FeverIndex(tl, s).nearest(t, window) is expected  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["creatinine", "ast", "alt"]), st.integers(0, 4), minutes), max_size=14),
       minutes, minutes)
def test_latest_organ_equals_scan(rows: list[tuple[str, int, datetime]], lo: datetime, t: datetime) -> None:
    organs = sorted((OrganGrade(lab, g, when, f"Observation/o{i}", "") for i, (lab, g, when) in enumerate(rows)), key=lambda o: o.time)
    latest: dict[str, OrganGrade] = {}
    for o in organs:  # the scan the systems used to run at every change point
        if o.time <= t and o.time >= lo:
            cur = latest.get(o.lab)
            if cur is None or o.time > cur.time or o.grade > cur.grade:
                latest[o.lab] = o
    assert LatestOrgan(organs).window(lo, t) == list(latest.values())
