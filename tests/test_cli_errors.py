"""Errors a user can act on: one line on stderr and no traceback without -v, the JSON error
object with --json, exit codes listed in --help (and the README's table equal to it), local
validation before any request, and what `sync` says when it finds nobody."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import responses
from click.testing import CliRunner
from conftest import ROOT
from factory import cart, patient, temp, unused

from fhir_crs import __version__
from fhir_crs.cli import cli
from fhir_crs.errors import EXIT_CODES

V06 = ROOT / "fixtures" / "R4" / "vignettes" / "V06.json"
DEAD_SERVER = "http://127.0.0.1:9/fhir"  # nothing listens on the discard port


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, list(args), env=env)
    return r.exit_code, r.stdout, r.stderr


def assert_one_line(err: str, *needles: str) -> None:
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    text = " ".join(lines)
    for n in needles:
        assert n in text, (n, err)


# ---- no tracebacks ---------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["", "  ", "Patient/", "a/b?c"])
def test_pull_with_an_unusable_patient_id_is_a_usage_error(value: str):
    with responses.RequestsMock() as mock:  # any request would fail the test
        code, _, err = run("pull", "--patient", value, "--server", DEAD_SERVER)
        assert not mock.calls
    assert code == 2
    assert_one_line(err, "--patient")


def test_sync_since_not_iso_is_a_usage_error_and_sends_nothing():
    with responses.RequestsMock() as mock:
        code, _, err = run("sync", "--server", DEAD_SERVER, "--since", "yesterday")
        assert not mock.calls
    assert code == 2
    assert_one_line(err, "--since", "'yesterday' is not an ISO 8601 date")


def test_sync_since_not_iso_with_json_prints_the_error_object():
    code, out, _ = run("sync", "--server", DEAD_SERVER, "--since", "yesterday", "--json")
    assert code == 2
    assert json.loads(out)["error"]["code"] == "usage"


def test_report_csv_into_a_folder_is_one_line_before_any_work(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    code, stdout, err = run("report", str(V06), "--csv", f"{out}/", "--html", str(tmp_path / "html"))
    assert code == 3
    assert_one_line(err, "--csv", "is a folder")
    assert not (tmp_path / "html").exists() and not stdout  # refused before anything was written


def test_report_cibmtr_into_a_missing_folder_is_one_line(tmp_path: Path):
    code, _, err = run("report", str(V06), "--cibmtr", str(tmp_path / "missing" / "x.csv"))
    assert code == 3
    assert_one_line(err, "--cibmtr", "does not exist")


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig", "utf-16-be"])
def test_bom_config_and_mapping_files_are_read(tmp_path: Path, encoding: str):
    maps = tmp_path / "mappings"
    shutil.copytree(default_mappings(), maps)
    for f in (maps / "grading.toml", maps / "units.toml"):
        write_encoded(f, f.read_text(encoding="utf-8"), encoding)
    code, out, err = run("grade", str(V06), "--json", "--mappings", str(maps))
    assert code == 0, err
    assert json.loads(out)["cases"][0]["crs"]["astct"]["grade"] == 3
    cfg = tmp_path / "fhir-crs.toml"
    write_encoded(cfg, 'server = "http://127.0.0.1:9/fhir"\n', encoding)
    from fhir_crs.config import load_config_file

    assert load_config_file(cfg)["server"] == "http://127.0.0.1:9/fhir"


def write_encoded(path: Path, text: str, encoding: str) -> None:
    bom = b"\xfe\xff" if encoding == "utf-16-be" else b""  # Python writes no mark for -be: add it
    path.write_bytes(bom + text.encode(encoding))


def default_mappings() -> Path:
    from fhir_crs.mapping_files import default_mappings_dir

    return default_mappings_dir()


def test_non_utf8_mapping_file_is_one_line(tmp_path: Path):
    maps = tmp_path / "mappings"
    shutil.copytree(default_mappings(), maps)
    (maps / "units.toml").write_bytes((maps / "units.toml").read_bytes() + "# µg (Latin-1)\n".encode("latin-1"))
    code, _, err = run("grade", str(V06), "--mappings", str(maps))
    assert code == 2
    assert_one_line(err, "units.toml", "is not UTF-8")
    assert len(err.strip().splitlines()) == 1


def test_non_utf8_config_file_is_one_line(tmp_path: Path):
    cfg = tmp_path / "fhir-crs.toml"
    cfg.write_bytes('server = "http://127.0.0.1:9/fhir"\n# Zürich\n'.encode("latin-1"))
    code, _, err = run("pull", "--patient", "1", "--config", str(cfg))
    assert code == 2
    assert_one_line(err, "fhir-crs.toml", "is not UTF-8")
    assert len(err.strip().splitlines()) == 1


def test_non_utf8_grading_file_is_one_line(tmp_path: Path):
    maps = tmp_path / "mappings"
    shutil.copytree(default_mappings(), maps)
    (maps / "grading.toml").write_bytes((maps / "grading.toml").read_bytes() + "# °C\n".encode("cp1252"))
    code, _, err = run("grade", str(V06), "--mappings", str(maps))
    assert code == 2
    assert_one_line(err, "grading.toml", "is not UTF-8")


# ---- --json error object, exit codes -------------------------------------------------------

def test_json_error_object_for_a_server_error():
    code, out, err = run("pull", "--patient", "1", "--server", DEAD_SERVER, "--json", "--timeout", "2")
    assert code == 4
    error = json.loads(out)["error"]
    assert error["exit"] == 4 and error["code"] in ("server", "not_found") and error["message"]
    assert_one_line(err, "fhir-crs: error:")


def test_json_error_object_for_a_bad_setting():
    code, out, _ = run("grade", str(V06), "--json", "--set", "nope=1")
    assert code == 2
    assert json.loads(out) == {"error": {"code": "config", "message": json.loads(out)["error"]["message"], "exit": 2}}


def test_help_lists_the_exit_codes():
    code, out, _ = run("--help")
    assert code == 0
    for exit_code, meaning in EXIT_CODES:
        assert re.search(rf"^\s+{exit_code}\s+{re.escape(meaning)}$", out, re.MULTILINE), (exit_code, out)


def test_readme_exit_code_table_matches_help():
    _, out, _ = run("--help")
    in_help = re.findall(r"^\s+(\d+)\s{2}(.+)$", out.split("Exit codes:", 1)[1], re.MULTILINE)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Exit codes", 1)[1].split("\n#", 1)[0]
    in_readme = re.findall(r"^\| (\d+) \| (.+?) \|$", section, re.MULTILINE)
    assert in_readme == in_help
    assert [(int(c), m) for c, m in in_help] == list(EXIT_CODES)


def test_version():
    code, out, _ = run("--version")
    assert code == 0 and out.strip() == f"fhir-crs, version {__version__}"


# ---- -v after the subcommand, --series, --strict ------------------------------------------

def test_verbose_after_the_subcommand_shows_the_traceback(tmp_path: Path):
    for args in (["-v", "grade", str(tmp_path / "nope")], ["grade", str(tmp_path / "nope"), "-v"]):
        code, _, err = run(*args)
        assert code == 3
        assert "Traceback" in err and "does not exist" in err


def test_series_without_json_says_it_needs_json():
    code, _, err = run("grade", str(V06), "--series")
    assert code == 2
    assert_one_line(err, "--series needs --json")


def test_strict_ignores_resource_types_fhir_crs_does_not_grade(tmp_path: Path):
    f = tmp_path / "b.json"
    resources = [patient("p1"), cart(0), temp(24, 39.0), unused("Encounter"), unused("Claim")]
    f.write_text(json.dumps({"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}))
    code, _, err = run("grade", str(f), "--strict")
    assert code == 0, err
    bad = dict(temp(30, 38.2), status="entered-in-error")
    f.write_text(json.dumps({"resourceType": "Bundle", "type": "collection",
                             "entry": [{"resource": r} for r in [*resources, bad]]}))
    code, _, err = run("grade", str(f), "--strict")
    assert code == 7 and "1 resource(s)" in err


def test_text_output_groups_skips_by_reason_code(tmp_path: Path):
    f = tmp_path / "b.json"
    bad1 = dict(temp(30, 38.2), status="entered-in-error")
    bad2 = dict(temp(31, 38.2), status="cancelled")
    resources = [patient("p1"), cart(0), temp(24, 39.0), bad1, bad2, unused("Encounter")]
    f.write_text(json.dumps({"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}))
    code, out, _ = run("grade", str(f))
    assert code == 0
    assert re.search(r"^\s+2\s+status: ", out, re.MULTILINE), out  # two statuses, one reason code
    assert re.search(r"^\s+1\s+unused_type: ", out, re.MULTILINE), out


# ---- sync: 0 patients, --lookback-days, state path, ISO log lines --------------------------

@pytest.mark.integration
def test_sync_with_no_patients_says_why_and_where_the_state_is(fhir_server, tmp_path: Path):
    env = {"XDG_DATA_HOME": str(tmp_path / "data"), "FHIR_CRS_LOOKBACK_DAYS": ""}
    code, out, err = run("sync", "--server", fhir_server.base, env=env)
    assert code == 0, err
    assert f"no CAR-T administration in the last 120 days on {fhir_server.base}" in out
    assert "see --lookback-days" in out
    state = tmp_path / "data" / "fhir-crs" / "state.sqlite"
    assert state.is_file()  # the per-user data folder, not the current folder
    assert f"State file: {state}" in out
    assert re.search(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z fhir-crs INFO sync state: ", err, re.MULTILINE), err
    code, out, err = run("sync", "--server", fhir_server.base, "--lookback-days", "3", "--state", str(tmp_path / "s.sqlite"), env=env)
    assert code == 0, err
    assert "in the last 3 days" in out and f"State file: {tmp_path / 's.sqlite'}" in out


@pytest.mark.integration
def test_sync_json_with_no_patients_logs_why(fhir_server, tmp_path: Path):
    code, out, err = run("sync", "--server", fhir_server.base, "--json", "--lookback-days", "2",
                         "--state", str(tmp_path / "s.sqlite"))
    assert code == 0
    assert json.loads(out)["patients"] == 0
    assert re.search(r"Z fhir-crs WARNING 0 patients: no CAR-T administration in the last 2 days", err), err
