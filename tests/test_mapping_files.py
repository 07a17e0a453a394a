"""Shipped mapping tables load; malformed tables fail with the file and key named."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import ROOT

from fhir_crs.errors import ConfigError, MappingFileError
from fhir_crs.mapping_files import load_code_map
from fhir_crs.settings import GradingSettings, load_settings


@pytest.fixture
def mapdir(tmp_path: Path) -> Path:
    d = tmp_path / "mappings"
    shutil.copytree(ROOT / "mappings", d)
    return d


def test_shipped_tables_load(code_map):
    assert {"temperature", "ice_score", "capd_score", "o2_device"} <= set(code_map.observations)
    assert code_map.drugs["vasopressin"].drug_class == "vasopressor"
    assert code_map.observation_table.code_index["http://loinc.org|8310-5"] == "temperature"


@pytest.mark.parametrize(
    ("file", "append", "message"),
    [
        ("observations.toml", "\n[temperature2]\ncodes = []\n", "unknown kind [temperature2]"),
        ("observations.toml", "\n[il10]\nloinc_code = 'x'\n", "TOML"),
        ("medications.toml", "\n[foo]\nclass = 'painkiller'\ncodes = []\n", "[foo] class 'painkiller'"),
        ("medications.toml", "\n[bar]\nclass = 'sedative'\ncodes = ['no-pipe']\n", "'bar.codes' entry 'no-pipe' is not 'system|code'"),
        ("devices.toml", "\n[room_air2]\ncodes = []\n", "unknown device class [room_air2]"),
        ("procedures.toml", "\n[ecmo2]\ncodes = []\n", "unknown procedure kind [ecmo2]"),
        ("medications.toml", "\n[baz]\nclass = 'sedative'\ntext = ['(unclosed']\n", "'baz.text' pattern '(unclosed' is not a valid regular expression"),
        ("medications.toml", "\n[qux]\nclass = 'sedative'\nlocal_code = 'x'\n", "unknown key 'local_code' in [qux]"),
    ],
)
def test_malformed_table_names_file_and_key(mapdir, file, append, message):
    with (mapdir / file).open("a") as fh:
        fh.write(append)
    with pytest.raises(MappingFileError) as exc:
        load_code_map(mapdir)
    assert file in str(exc.value) or "TOML" in message
    if message != "TOML":
        assert message in str(exc.value)


def test_missing_file_is_named(mapdir):
    (mapdir / "units.toml").unlink()
    with pytest.raises(MappingFileError, match=r"units\.toml"):
        load_code_map(mapdir)


def test_every_setting_is_documented_in_grading_toml():
    text = (ROOT / "mappings" / "grading.toml").read_text()
    for name in GradingSettings().as_dict():
        assert f"\n{name} = " in text, name


def test_settings_precedence_and_validation(mapdir):
    (mapdir / "grading.toml").write_text("[conventions]\nvasopressor_overlap_min = 30\n")
    s = load_settings(mapdir, ["low_flow_max_lpm=5"])
    assert s.vasopressor_overlap_min == 30 and s.low_flow_max_lpm == 5
    assert load_settings(mapdir, ["vasopressor_overlap_min=45"]).vasopressor_overlap_min == 45
    with pytest.raises(ConfigError, match="unknown setting 'fever' \\(did you mean 'fever_c'\\?\\)"):
        load_settings(mapdir, ["fever=37"])
    with pytest.raises(ConfigError, match="'fever_c' = 'hot' is not allowed: expected a finite number from 37 to 40 °C"):
        load_settings(mapdir, ["fever_c=hot"])
