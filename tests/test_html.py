"""The clinician pages (fhir_crs/html.py): self-contained, labelled, and rendered by a real browser."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import zlib
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT

from fhir_crs.html import grade_bands, patient_file_name, render_case_html, render_report_html
from fhir_crs.pipeline import run_paths
from fhir_crs.report import report_from_cases

VIGNETTES = ROOT / "fixtures" / "R4" / "vignettes"
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@cache
def cohort() -> list[dict[str, Any]]:
    return run_paths([ROOT / "fixtures" / "cohort" / "picu"]).to_json(series=True)["cases"]


@cache
def vignette(name: str, series: bool = True) -> dict[str, Any]:
    (case,) = run_paths([VIGNETTES / f"{name}.json"]).to_json(series=series)["cases"]
    return case


def assert_self_contained(html: str) -> None:
    assert not re.search(r"""(?:src|href|xlink:href|action)\s*=\s*["']?\s*(?:https?:)?//""", html, re.IGNORECASE)
    assert not re.search(r"<script\b", html, re.IGNORECASE)
    assert not re.search(r"<link\b|@import|url\(\s*['\"]?(?:https?:)?//", html, re.IGNORECASE)
    assert not re.search(r"<(?:img|iframe|object|embed)\b", html, re.IGNORECASE)


def test_case_page_is_self_contained_and_labelled() -> None:
    case = vignette("V20")
    html = render_case_html(case)
    assert html.startswith("<!DOCTYPE html>") and "<svg" in html
    assert_self_contained(html)
    for label in ("CRS · ASTCT", "CRS · Lee 2014", "ICANS · ASTCT", "Temperature", "Systolic BP", "SpO2",
                  "O2 support", "Norepinephrine", "Epinephrine", "Tocilizumab", "Corticosteroids", "Procedures",
                  "death", "grade5_candidate", "Criteria and evidence"):
        assert label in html, label
    # every resource that drove the ASTCT grade is listed
    for ref in case["crs"]["astct"]["evidence"]:
        assert ref in html
    assert "2 vasopressors concurrently (excluding vasopressin)" in html


def test_case_page_without_series_still_renders() -> None:
    html = render_case_html(vignette("V06", series=False))
    assert_self_contained(html)
    assert "CRS · ASTCT" in html and "Norepinephrine" in html  # bands and vasopressors from the timeline
    assert "Systolic BP" not in html  # no plotted series without --series


def test_grade_bands_follow_criteria_and_episodes() -> None:
    case = vignette("V06")
    bands = grade_bands(case, case["crs"]["astct"], end_h=200)
    # V06: grade 1 from the fever at +24 h, 2 at +30 h, 3 at +41 h, resolved at +60 h
    assert [(a, b, g) for a, b, g, _ in bands] == [(24.0, 30.0, 1), (30.0, 41.0, 2), (41.0, 60.0, 3)]
    assert grade_bands(case, case["icans"]["astct"], end_h=200) == []
    v20 = vignette("V20")
    last = grade_bands(v20, v20["crs"]["astct"], end_h=70)[-1]
    assert last[2] == 5 and last[0] == 70.0  # grade 5 drawn at the time of death


def test_report_pages_link_every_patient(tmp_path: Path) -> None:
    cases = cohort()
    report = report_from_cases(cases)
    index = render_report_html(report, cases, tmp_path / "out")
    assert index == tmp_path / "out" / "index.html"
    html = index.read_text(encoding="utf-8")
    assert_self_contained(html)
    assert "Severe CRS (grade ≥ 3)" in html and "64.3" in html and "Spearman" in html
    links = set(re.findall(r'href="(patients/[^"]+\.html)"', html))
    assert len(links) == 14
    for link in links:
        page = (index.parent / link).read_text(encoding="utf-8")
        assert_self_contained(page)
        assert 'href="../index.html"' in page
    for c in cases:
        assert (index.parent / "patients" / patient_file_name(c["patient"])).is_file()


def test_patient_file_names_are_safe() -> None:
    assert patient_file_name("Patient/abc-1.2") == "abc-1.2.html"
    assert patient_file_name("Patient/../x y") == ".._x_y.html"
    assert "/" not in patient_file_name("Patient/a/b")


# ---- a real browser ---------------------------------------------------------------------------


def _chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp / 'profile'}", *args],
        capture_output=True, text=True, timeout=90, check=False)


def _png_pixels(path: Path) -> tuple[int, int, bytes]:
    """Width, height and the decompressed (filtered) scanlines of a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", chunk[:8])
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    return width, height, zlib.decompress(idat)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_headless_chromium_renders_the_pages(tmp_path: Path) -> None:
    from fhir_crs.identity import ReportMeta

    cases = cohort()
    index = render_report_html(report_from_cases(cases, meta=ReportMeta.for_paths([ROOT / "fixtures" / "cohort" / "picu"])),
                               cases, tmp_path / "site")
    dom = _chromium(["--dump-dom", index.as_uri()], tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "Recovered within 14 days" in dom.stdout and "Haemodynamic instability" in dom.stdout
    # issue 14: date, source and version; MRN and name; units on the columns
    assert "Report date" in dom.stdout and "data source: files:" in dom.stdout and "fhir-crs 0.1.0" in dom.stdout
    assert "<th>MRN</th><th>Name</th>" in dom.stdout and "Age (y)" in dom.stdout and "Peak IL-6 (pg/mL)" in dom.stdout
    died = next(c for c in cases if c["facts"]["died"])
    page = index.parent / "patients" / patient_file_name(died["patient"])
    dom = _chromium(["--dump-dom", page.as_uri()], tmp_path)
    assert dom.returncode == 0
    assert "Grades over time" in dom.stdout and "CRS · ASTCT" in dom.stdout and "death" in dom.stdout
    assert f'<h1 class="patient">{died["name"]}</h1>' in dom.stdout and f"MRN {died['mrn']}" in dom.stdout
    assert "pg/mL, log scale" in dom.stdout and "+-" not in dom.stdout and "Report date" in dom.stdout

    shot = tmp_path / "shot.png"
    result = _chromium([f"--screenshot={shot}", "--window-size=1400,1000", "--hide-scrollbars", page.as_uri()], tmp_path)
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    assert shot.stat().st_size > 30_000
    width, height, raw = _png_pixels(shot)
    assert (width, height) == (1400, 1000)
    # not blank: many distinct byte values and a substantial share of non-white samples
    assert len(set(raw)) > 100
    assert sum(1 for b in raw[::7] if b < 200) > len(raw[::7]) * 0.02
