"""`fhir-crs grade` end to end through the CLI: the JSON contract (validated against the shared
schema), readable output, skips, and one-line errors with non-zero exits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from click.testing import CliRunner
from conftest import ROOT, SHARED
from factory import bp, cart, med, patient, temp, vitals_baseline

from fhir_crs.cli import cli

CONTRACTS = ROOT / "tests" / "contracts"


def schema(name: str) -> dict:
    return json.loads((CONTRACTS / name).read_text())


@pytest.fixture
def export(tmp_path: Path) -> Path:
    """A folder with a collection Bundle, an NDJSON file (one bad line) and a broken JSON file."""
    d = tmp_path / "export"
    d.mkdir()
    resources = [patient("p1"), cart(0), *vitals_baseline(96, skip={24, 28}), temp(24, 39.1), temp(28, 38.4),
                 bp(24, 118), bp(28, 84), bp(28.2, 82), med("7512", 28.5, 34, rate=6, rate_unit="ug/min")]
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources[:20]]}
    (d / "bundle.json").write_text(json.dumps(bundle))
    lines = [json.dumps(r) for r in resources[20:]] + ["{not json", json.dumps({"resourceType": "Encounter", "id": "e1"})]
    (d / "more.ndjson").write_text("\n".join(lines) + "\n")
    (d / "broken.json").write_text("{")
    (d / "notes.txt").write_text("ignored: not JSON by extension")
    return d


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, list(args))
    return r.exit_code, r.stdout, r.stderr


def test_grade_json_contract(export: Path):
    code, out, _ = run("grade", str(export), "--json")
    assert code == 0
    data = json.loads(out)
    jsonschema.validate(data, schema("grade.schema.json"))
    (case,) = data["cases"]
    assert case["patient"] == "Patient/p1"
    assert case["crs"]["astct"]["grade"] == 3
    reasons = {s["resource"]: s["reason"] for s in data["skipped"]}
    assert any(k.endswith("more.ndjson:" + str(len(reasons) and k.split(":")[-1])) or "more.ndjson:" in k for k in reasons)
    assert any("broken.json" in k and "not valid JSON" in v for k, v in reasons.items())
    assert reasons.get("Encounter/e1") == "resource type Encounter is not used for grading"


def test_grade_readable_output(export: Path):
    code, out, _ = run("grade", str(export))
    assert code == 0
    assert "Patient/p1" in out and "astct" in out and "skipped" in out


def test_strict_turns_skips_into_an_error(export: Path):
    code, _, err = run("grade", str(export), "--strict")
    assert code == 7 and "skipped" in err


def test_missing_path_is_one_clear_error(tmp_path: Path):
    code, out, err = run("grade", str(tmp_path / "nope"))
    assert code == 3
    assert err.strip().startswith("fhir-crs: error: Input path") and "Traceback" not in err
    assert out == ""


def test_bad_setting_is_one_clear_error(export: Path):
    code, _, err = run("grade", str(export), "--set", "no_such=1")
    assert code == 2 and "unknown setting 'no_such'" in err


def test_bad_mappings_folder_is_one_clear_error(export: Path, tmp_path: Path):
    code, _, err = run("grade", str(export), "--mappings", str(tmp_path / "missing"))
    assert code == 2 and "Mappings folder" in err


def test_override_changes_the_grade(export: Path):
    _, out, _ = run("grade", str(export), "--json", "--set", "fever_c=39.5")
    assert json.loads(out)["cases"][0]["crs"]["astct"]["grade"] == 0


@pytest.mark.parametrize("command", [[], ["grade"]])
def test_help(command):
    code, out, _ = run(*command, "--help")
    assert code == 0 and "Usage" in out


def test_contract_copies_match_shared():
    shared = SHARED / "contracts"
    if not shared.is_dir():
        pytest.skip("../shared/contracts is absent: cannot compare the project's copy of the schemas")
    for f in CONTRACTS.glob("*.json"):
        problems = _extension_problems(json.loads((shared / f.name).read_text()), json.loads(f.read_text()))
        assert not problems, f"{f.name}: {problems}"


def _extension_problems(shared: Any, local: Any, path: str = "$") -> list[str]:
    """The project's copy may only EXTEND the shared contract (an issue adds an optional key):
    every shared key is kept with the same meaning; new keys only under `properties` / `$defs`."""
    if isinstance(shared, dict) and isinstance(local, dict):
        out = [f"{path}.{k} removed" for k in shared if k not in local]
        for k in shared:
            if k in local:
                out += _extension_problems(shared[k], local[k], f"{path}.{k}")
        if not path.endswith((".properties", ".$defs")):
            out += [f"{path}.{k} added outside properties" for k in local if k not in shared]
        return out
    return [] if shared == local else [f"{path} changed"]
