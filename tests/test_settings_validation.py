"""Issue 14: every grading convention (mappings/grading.toml, --set) and every run setting
(fhir-crs.toml, FHIR_CRS_* environment, flags) is typed and range-checked. A bad value is ONE
line on stderr naming the key and its allowed range, exit 2, before any request is sent or any
file written — before this, `--set fever_c=1e400` graded a grade-3 case 0 in every system with
no flag, and `pull --write` then overwrote the server's grade-3 Condition."""

from __future__ import annotations

import json
import math
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from annotated_types import Ge, Gt, Le
from click.testing import CliRunner
from conftest import ROOT

from fhir_crs.cli import cli
from fhir_crs.config import RunConfig, resolve
from fhir_crs.errors import ConfigError
from fhir_crs.mapping_files import DRUG_CLASSES
from fhir_crs.settings import DrugClass, GradingSettings, load_settings
from fhir_crs.validation import literal_values

V06 = ROOT / "fixtures" / "R4" / "vignettes" / "V06.json"  # ASTCT grade 3 (norepinephrine)


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, list(args), env=env)
    return r.exit_code, r.stdout, r.stderr


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("fhir-crs: error: ") and "Traceback" not in err
    return lines[0]


class _Counter(BaseHTTPRequestHandler):
    requests: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def do_PUT(self) -> None:
        self._answer()

    def _answer(self) -> None:
        type(self).requests.append(f"{self.command} {self.path}")
        self.send_response(500)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def listening_server():
    """A real HTTP listener on 127.0.0.1 that records every request it receives."""
    _Counter.requests = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Counter)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/fhir", _Counter.requests
    finally:
        httpd.shutdown()
        httpd.server_close()


# ---- grading conventions ---------------------------------------------------------------------

BAD_SETS = [
    ("fever_c=nan", "'fever_c' = 'nan' is not allowed: expected a finite number from 37 to 40 °C"),
    ("fever_c=1e400", "'fever_c' = '1e400' is not allowed: expected a finite number from 37 to 40 °C"),
    ("fever_c=inf", "'fever_c' = 'inf' is not allowed"),
    ("fever_c=-40", "'fever_c' = '-40' is not allowed: expected a finite number from 37 to 40 °C"),
    ("vasopressor_overlap_min=-5", "'vasopressor_overlap_min' = '-5' is not allowed: expected a finite number from 0 to 720 min"),
    ("masking_drug_classes=antipyretic,antihistamine",
     "'masking_drug_classes' = 'antipyretic,antihistamine' is not allowed: expected a list of: antipyretic, anti_il6, anti_cytokine, corticosteroid"),
    ("penn_iv_therapy_classes=iv_antibiotic,magic", "'penn_iv_therapy_classes' = 'iv_antibiotic,magic' is not allowed"),
    ("ice_min_age_years=12.5", "'ice_min_age_years' = '12.5' is not allowed: expected a whole number from 1 to 18 years"),
    ("short_vasopressor_sole_treatment_only=maybe", "'short_vasopressor_sole_treatment_only' = 'maybe' is not allowed: expected true or false"),
    ("fever=37", "unknown setting 'fever' (did you mean 'fever_c'?)"),
    ("hypotension_confirm_min_gap_min=60", "hypotension_confirm_min_gap_min (60) must be below hypotension_confirm_window_min (60)"),
    ("fever_c", "--set 'fever_c': expected name=value"),
]


@pytest.mark.parametrize(("item", "message"), BAD_SETS, ids=[b[0] for b in BAD_SETS])
def test_bad_set_is_one_line_exit_2_and_grades_nothing(item: str, message: str):
    code, out, err = run("grade", str(V06), "--json", "--set", item)
    assert code == 2, (out, err)
    assert message in one_error_line(err)
    # nothing graded: stdout holds only the --json error object
    assert json.loads(out) == {"error": {"code": "config", "message": one_error_line(err).removeprefix("fhir-crs: error: "), "exit": 2}}


def test_the_grade_3_case_still_grades_3_with_a_valid_override():
    code, out, _ = run("grade", str(V06), "--json", "--set", "fever_c=38.3", "--set", "masking_drug_classes=anti_il6,corticosteroid")
    assert code == 0
    assert json.loads(out)["cases"][0]["crs"]["astct"]["grade"] == 3


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("fever_c = nan", "grading.toml: 'fever_c' = nan is not allowed: expected a finite number from 37 to 40 °C"),
        ("fever_c = 1e400", "grading.toml: 'fever_c' = inf is not allowed"),  # TOML parses 1e400 to inf
        ('fever_c = "38"', "grading.toml: 'fever_c' = '38' is not allowed"),  # wrong type: quoted text
        ("fever_c = true", "grading.toml: 'fever_c' = True is not allowed"),
        ("resolution_clear_h = 0", "grading.toml: 'resolution_clear_h' = 0 is not allowed: expected a finite number above 0, up to 168 h"),
        ('masking_drug_classes = "antipyretic"', "grading.toml: 'masking_drug_classes' = 'antipyretic' is not allowed: expected a list of"),
        ('masking_drug_classes = ["antipyretic", "paracetamol"]', "'masking_drug_classes' = ['antipyretic', 'paracetamol'] is not allowed"),
        ("fevr_c = 38", "grading.toml: unknown setting 'fevr_c' (did you mean 'fever_c'?)"),
    ],
)
def test_bad_grading_toml_is_one_line_exit_2(tmp_path: Path, line: str, message: str):
    mapdir = tmp_path / "mappings"
    shutil.copytree(ROOT / "mappings", mapdir)
    (mapdir / "grading.toml").write_text(f"[conventions]\n{line}\n")
    code, out, err = run("grade", str(V06), "--mappings", str(mapdir))
    assert code == 2 and out == ""
    assert message in one_error_line(err)


def _numeric_bounds(info) -> tuple[float | None, bool, float | None]:
    lo, lo_open, hi = None, False, None
    for m in info.metadata:
        if isinstance(m, Ge):
            lo = m.ge
        elif isinstance(m, Gt):
            lo, lo_open = m.gt, True
        elif isinstance(m, Le):
            hi = m.le
    return lo, lo_open, hi


NUMERIC = [n for n, f in GradingSettings.model_fields.items() if f.annotation in ("float", "int", float, int)]


def test_every_numeric_setting_has_a_finite_range_containing_its_default():
    assert len(NUMERIC) > 60
    d = GradingSettings()
    for name in NUMERIC:
        lo, lo_open, hi = _numeric_bounds(GradingSettings.model_fields[name])
        assert lo is not None and hi is not None, name
        v = getattr(d, name)
        assert (lo < v if lo_open else lo <= v) and v <= hi, name


@pytest.mark.parametrize("name", NUMERIC)
def test_every_numeric_setting_refuses_out_of_range_non_finite_and_bool(name: str):
    lo, lo_open, hi = _numeric_bounds(GradingSettings.model_fields[name])
    bad = [str(lo if lo_open else lo - 1), str(hi + 1), "nan", "inf", "-inf", "1e400", "true"]
    for value in bad:
        with pytest.raises(ConfigError, match=f"'{name}' = '{value}' is not allowed: expected a "):
            load_settings(None, [f"{name}={value}"])
    # the bounds themselves are allowed (where they do not break a cross-check)
    for value in ([] if lo_open else [lo]) + [hi]:
        try:
            s = load_settings(None, [f"{name}={value}"])
        except ConfigError as exc:
            assert "must" in str(exc), exc  # a cross-field rule, not the range
        else:
            assert math.isclose(getattr(s, name), value)


def test_drug_class_lists_use_the_mapping_tables_classes():
    assert set(literal_values(DrugClass)) == set(DRUG_CLASSES)  # type: ignore[arg-type]


def test_settings_are_frozen_and_hashable():
    s = GradingSettings()
    with pytest.raises(Exception):  # noqa: B017 (pydantic raises ValidationError on frozen models)
        s.fever_c = 20.0  # type: ignore[misc]
    assert hash(s) == hash(GradingSettings()) and s.fingerprint() == GradingSettings().fingerprint()
    assert load_settings(None, ["fever_c=38.5"]).fingerprint() != s.fingerprint()


# ---- run config -----------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("flags", "env", "file_line", "message"),
    [
        ({"window_after_days": -10}, {}, "", "--window-after-days: 'window_after_days' = -10 is not allowed: expected a finite number from 30 to 730 days"),
        ({"workers": 0}, {}, "", "--workers: 'workers' = 0 is not allowed: expected a whole number from 1 to 32"),
        ({}, {"FHIR_CRS_WORKERS": "0"}, "", "environment FHIR_CRS_WORKERS: 'workers' = '0' is not allowed"),
        ({}, {"FHIR_CRS_WINDOW_AFTER_DAYS": "nan"}, "", "environment FHIR_CRS_WINDOW_AFTER_DAYS: 'window_after_days' = 'nan' is not allowed"),
        ({}, {"FHIR_CRS_TIMEOUT": "1e400"}, "", "'timeout' = '1e400' is not allowed: expected a finite number above 0, up to 600 s"),
        ({}, {}, "window_after_days = -10", "fhir-crs.toml: 'window_after_days' = -10 is not allowed"),
        ({}, {}, "workers = 0", "fhir-crs.toml: 'workers' = 0 is not allowed: expected a whole number from 1 to 32"),
        ({}, {}, "workers = true", "fhir-crs.toml: 'workers' = True is not allowed"),
        ({}, {}, 'workers = "4"', "fhir-crs.toml: 'workers' = '4' is not allowed"),
        ({}, {}, "window_before_days = inf", "'window_before_days' = inf is not allowed: expected a finite number from 1 to 365 days"),
        ({}, {}, "page_size = 0", "'page_size' = 0 is not allowed"),
        ({}, {}, "max_retries = -1", "'max_retries' = -1 is not allowed: expected a whole number from 0 to 20"),
        ({}, {}, "lookback_days = 0", "'lookback_days' = 0 is not allowed"),
        ({}, {}, 'jwt_alg = "HS256"', "'jwt_alg' = 'HS256' is not allowed: expected one of: RS384, ES384"),
        ({}, {}, 'identifier_system = "not a uri"', "'identifier_system' = 'not a uri' is not allowed: expected a URI"),
        ({}, {}, "wokers = 2", "unknown key 'wokers' (did you mean 'workers'?)"),
    ],
)
def test_bad_run_setting_names_source_key_and_range(tmp_path: Path, flags, env, file_line, message):
    cfg = tmp_path / "fhir-crs.toml"
    cfg.write_text(f"[fhir-crs]\n{file_line}\n")
    with pytest.raises(ConfigError) as exc:
        resolve(flags, env, cfg, tmp_path)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_secret_values_are_never_echoed():
    with pytest.raises(ConfigError) as exc:
        RunConfig(token=["s3cret-token"])  # type: ignore[arg-type]
    assert "s3cret" not in str(exc.value) and "'token' = '<secret>'" in str(exc.value)


def test_direct_construction_is_validated_too():
    with pytest.raises(ConfigError, match="'workers' = 0 is not allowed"):
        RunConfig(workers=0)


# ---- before any read or write -----------------------------------------------------------------

@pytest.mark.parametrize(
    "args",
    [
        ["pull", "--patient", "p1", "--write", "--set", "fever_c=1e400"],
        ["pull", "--patient", "p1", "--write", "--set", "masking_drug_classes=antipyretic,unknown_class"],
        ["sync", "--set", "vasopressor_overlap_min=-5"],
        ["sync", "--workers", "0"],
        ["report", "--set", "fever_c=nan"],
    ],
)
def test_bad_setting_sends_no_request_and_writes_no_file(tmp_path: Path, monkeypatch, listening_server, args):
    base, requests = listening_server
    monkeypatch.chdir(tmp_path)
    state = tmp_path / "state" / "state.sqlite"
    extra = ["--state", str(state)] if args[0] == "sync" else []
    code, out, err = run(*args, "--server", base, *extra)
    assert code == 2, (out, err)
    one_error_line(err)
    assert requests == []
    assert list(tmp_path.iterdir()) == []  # no state store, no folder, nothing


def test_bad_config_file_sends_no_request(tmp_path: Path, monkeypatch, listening_server):
    base, requests = listening_server
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fhir-crs.toml").write_text(f'[fhir-crs]\nserver = "{base}"\nwindow_after_days = -10\n')
    code, _, err = run("pull", "--patient", "p1", "--write")
    assert code == 2 and "'window_after_days' = -10 is not allowed: expected a finite number from 30 to 730 days" in one_error_line(err)
    assert requests == [] and [p.name for p in tmp_path.iterdir()] == ["fhir-crs.toml"]


def test_demo_with_bad_conventions_writes_nothing(tmp_path: Path):
    mapdir = tmp_path / "mappings"
    shutil.copytree(ROOT / "mappings", mapdir)
    (mapdir / "grading.toml").write_text("[conventions]\nfever_c = -40\n")
    out_dir = tmp_path / "demo"
    code, _, err = run("demo", "--out", str(out_dir), env={"FHIR_CRS_MAPPINGS": str(mapdir)})
    assert code == 2 and "'fever_c' = -40 is not allowed" in one_error_line(err)
    assert not out_dir.exists()
