"""The interval sweep behind vasopressor concurrency (grading/crs.py) against a brute-force
reference that tries every combination of courses (issue 17): same intervals, same order, on
random small course sets — ties, nesting, same-drug overlaps and zero-length courses included."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import combinations

from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_crs.events import DrugGiven
from fhir_crs.grading.crs import concurrent_intervals, handoffs
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
