"""Input paths that yield nothing usable are errors a user can act on (exit 3, one stderr line
naming the path and the reason), never a silent success; gzipped Bulk exports are read."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import ROOT
from factory import bp, cart, med, patient, temp, vitals_baseline

from fhir_crs.cli import cli

V06 = ROOT / "fixtures" / "R4" / "vignettes" / "V06.json"


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, list(args))
    return r.exit_code, r.stdout, r.stderr


def resources() -> list[dict]:
    return [patient("p1"), cart(0), *vitals_baseline(96, skip={24, 28}), temp(24, 39.1), temp(28, 38.4),
            bp(24, 118), bp(28, 84), bp(28.2, 82), med("7512", 28.5, 34, rate=6, rate_unit="ug/min")]


def one_error_line(err: str, path: Path, reason: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(path) in lines[0] and reason in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize(("name", "content", "reason"), [
    ("empty.json", b"", "empty file"),
    ("blank.ndjson", b"\n\n  \n", "empty file"),
    ("truncated.json", V06.read_bytes()[:500], "not valid JSON (truncated?)"),
    ("binary.json", bytes(range(256)) * 8, "binary content"),
    ("binary.ndjson", b"\x00\x01\x02garbage\n" * 50, "binary content"),
    ("corrupt.json.gz", gzip.compress(V06.read_bytes())[:200], "gzip data is corrupt or truncated"),
    ("not-a-resource.json", b'{"hello": "world"}', "not a FHIR resource"),
    ("empty-bundle.json", b'{"resourceType": "Bundle", "type": "collection"}', "no FHIR resource"),
])
def test_unusable_file_is_exit_3_with_one_line(tmp_path: Path, name: str, content: bytes, reason: str):
    f = tmp_path / name
    f.write_bytes(content)
    code, out, err = run("grade", str(f))
    assert code == 3, (out, err)
    one_error_line(err, f, reason)


def test_folder_without_fhir_files_is_exit_3(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("not FHIR")
    code, _, err = run("grade", str(tmp_path))
    assert code == 3
    one_error_line(err, tmp_path, "no FHIR files")


def test_folder_whose_files_are_all_skipped_is_exit_3(tmp_path: Path):
    (tmp_path / "a.json").write_text("{")
    (tmp_path / "b.json").write_bytes(b"")
    (tmp_path / "c.ndjson").write_text("{not json\n")
    code, _, err = run("grade", str(tmp_path))
    assert code == 3
    one_error_line(err, tmp_path, "3 file(s)")
    assert "not valid JSON" in err and "empty file" in err


def test_json_error_for_unusable_input(tmp_path: Path):
    f = tmp_path / "empty.json"
    f.write_bytes(b"")
    code, out, _ = run("grade", str(f), "--json")
    assert code == 3
    assert json.loads(out)["error"]["code"] == "input"


def test_one_bad_file_in_a_good_folder_is_a_named_skip(tmp_path: Path):
    (tmp_path / "good.json").write_text(json.dumps({"resourceType": "Bundle", "type": "collection",
                                                    "entry": [{"resource": r} for r in resources()]}))
    (tmp_path / "empty.json").write_bytes(b"")
    code, out, _ = run("grade", str(tmp_path), "--json")
    assert code == 0
    data = json.loads(out)
    assert data["cases"][0]["crs"]["astct"]["grade"] == 3
    assert {"resource": str(tmp_path / "empty.json"), "reason": "empty file", "code": "empty_file"} in data["skipped"]


@pytest.mark.parametrize("name", ["export.ndjson.gz", "export.jsonl.gz"])
def test_gzipped_ndjson_is_read(tmp_path: Path, name: str):
    f = tmp_path / name
    f.write_bytes(gzip.compress(("\n".join(json.dumps(r) for r in resources()) + "\n").encode()))
    code, out, err = run("grade", str(f), "--json")
    assert code == 0, err
    assert json.loads(out)["cases"][0]["crs"]["astct"]["grade"] == 3


def test_gzipped_json_bundle_is_read_in_a_folder(tmp_path: Path):
    (tmp_path / "V06.json.gz").write_bytes(gzip.compress(V06.read_bytes()))
    code, out, err = run("grade", str(tmp_path), "--json")
    assert code == 0, err
    plain = json.loads(run("grade", str(V06), "--json")[1])
    assert json.loads(out)["cases"] == plain["cases"]


def test_byte_order_mark_json_is_read(tmp_path: Path):
    for enc, name in (("utf-8-sig", "bom8.json"), ("utf-16", "bom16.json")):
        (tmp_path / name).write_bytes(V06.read_text(encoding="utf-8").encode(enc))
        code, out, err = run("grade", str(tmp_path / name), "--json")
        assert code == 0, (name, err)
        assert json.loads(out)["cases"][0]["crs"]["astct"]["grade"] == 3
