"""`fhir-crs demo` end to end in the test suite: embedded server up, synthetic PICU cohort loaded,
sync with write-back, report, server down — and the report equals the cohort's ground truth and
the seed study's counts exactly."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner
from conftest import ROOT

from fhir_crs.cli import cli
from fhir_crs.synthetic import generate_picu_cohort

pytestmark = pytest.mark.integration

SEED_COUNTS = {  # the seed paper (../shared/seed): 14 children after CAR-T in a PICU
    "crs_any": 14, "crs_severe": 9, "haemodynamic_instability": 11, "mechanical_ventilation": 5, "neurological": 10,
    "liver_injury": 7, "tocilizumab": 14, "corticosteroids": 7, "blood_purification": 5, "deaths": 3, "recovered_14d": 11,
}


def test_demo_reproduces_the_ground_truth(tmp_path: Path):
    out = tmp_path / "demo"
    r = CliRunner().invoke(cli, ["demo", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    jsonschema.validate(report, json.loads((ROOT / "tests" / "contracts" / "report.schema.json").read_text()))
    _, truth = generate_picu_cohort()
    expected = truth["report"]
    assert report["patients"] == expected["patients"] == 14
    assert {k: v["n"] for k, v in report["rows"].items()} == SEED_COUNTS
    # the cohort is loaded with its ids (PUT), so the patients behind every row must match too
    assert report["rows"] == expected["rows"]
    for key in ("il6", "ifng"):
        assert report["correlation"][key]["n"] == expected["correlation"][key]["n"]
        assert report["correlation"][key]["rho"] == pytest.approx(expected["correlation"][key]["rho"])
        assert report["correlation"][key]["rho"] > 0.5 and report["correlation"][key]["p"] < 0.05
    index = out / "report" / "index.html"
    assert index.exists() and len(list((out / "report" / "patients").glob("*.html"))) == 14
    assert (out / "cibmtr-4100.csv").read_text().count("\n") >= 15
    assert "Local FHIR server" in r.stderr and "sync: 14 patients" in r.stderr
    assert (out / ".fhir-crs-demo").is_file()


# ---- demo --out only ever deletes what demo created (issue 14) ---------------------------------

def _user_folder(d: Path) -> dict[str, str]:
    """A folder holding a user's own files under the names the demo uses."""
    files = {"report/index.html": "<p>my own report</p>", "server/notes.txt": "mine", "state.sqlite": "not a db",
             "thesis.docx": "chapter 1"}
    for rel, text in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(text)
    return files


def test_demo_refuses_a_foreign_non_empty_folder_and_deletes_nothing(tmp_path: Path):
    out = tmp_path / "mine"
    files = _user_folder(out)
    r = CliRunner().invoke(cli, ["demo", "--out", str(out)])
    assert r.exit_code == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "is not empty and was not created by fhir-crs demo" in lines[0] and "nothing was deleted" in lines[0]
    assert {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} == set(files)
    assert all((out / rel).read_text() == text for rel, text in files.items())
    assert "Local FHIR server" not in r.stderr  # refused before the server started


def test_demo_folder_rerun_clears_only_its_own_entries(tmp_path: Path):
    from fhir_crs.outdir import MARKER, prepare_demo_dir

    out = tmp_path / "demo"
    prepare_demo_dir(out)  # fresh: created with the marker
    assert [p.name for p in out.iterdir()] == [MARKER]
    (out / "report" / "patients").mkdir(parents=True)
    (out / "report" / "index.html").write_text("old")
    (out / "state.sqlite").write_text("old")
    (out / "report.csv").write_text("old")
    (out / "my-notes.txt").write_text("keep me")  # the user's file beside the demo's
    elsewhere = tmp_path / "precious"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    (out / "server").symlink_to(elsewhere, target_is_directory=True)
    prepare_demo_dir(out)
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "my-notes.txt"])
    assert (out / "my-notes.txt").read_text() == "keep me"
    assert (elsewhere / "keep.txt").read_text() == "keep"  # a symlink is removed, never followed


def test_demo_takes_over_an_empty_folder_but_not_a_file(tmp_path: Path):
    from fhir_crs.errors import ConfigError
    from fhir_crs.outdir import MARKER, prepare_demo_dir

    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_demo_dir(empty)
    assert (empty / MARKER).is_file()
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is not a folder"):
        prepare_demo_dir(f)
    assert f.read_text() == "x"


class _SharedHapi:
    """Stands in for `HapiFhirServer` in `demo --server hapi`: the session's HAPI server (emptied
    first), so the demo's HAPI path runs without a second JVM; leaving it does not stop it."""

    server = None

    def __init__(self, workdir: Path) -> None:
        self.base = self.server.base

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def test_demo_on_hapi_reproduces_the_ground_truth(hapi_server, tmp_path: Path, monkeypatch):
    from conftest import reset_hapi

    import fhir_crs.localserver

    reset_hapi(hapi_server)
    _SharedHapi.server = hapi_server
    monkeypatch.setattr(fhir_crs.localserver, "HapiFhirServer", _SharedHapi)
    r = CliRunner().invoke(cli, ["demo", "--server", "hapi", "--out", str(tmp_path / "demo"), "--json"])
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    _, truth = generate_picu_cohort()
    assert {k: v["n"] for k, v in report["rows"].items()} == SEED_COUNTS
    assert report["rows"] == truth["report"]["rows"]
    assert "Local FHIR server (HAPI FHIR JPA)" in r.stderr and "sync: 14 patients" in r.stderr
