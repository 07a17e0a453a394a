"""Docs stay true: every CLI command has help and appears in the README; every mapping key is
documented in mappings/README.md."""

from __future__ import annotations

from click.testing import CliRunner
from conftest import ROOT

from fhir_crs.cli import cli
from fhir_crs.mapping_files import _CLASS_KEYS, _DRUG_KEYS, _OBS_KEYS


def test_every_command_has_help_and_is_in_readme():
    readme = (ROOT / "README.md").read_text()
    for name, cmd in cli.commands.items():
        assert cmd.help, name
        assert f"fhir-crs {name}" in readme, name
        r = CliRunner().invoke(cli, [name, "--help"])
        assert r.exit_code == 0


def test_every_mapping_key_is_documented():
    doc = (ROOT / "mappings" / "README.md").read_text()
    for key in _OBS_KEYS | _CLASS_KEYS | _DRUG_KEYS:
        assert f"`{key}`" in doc, key


def test_readme_names_the_test_command_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./scripts/test" in readme and "scripts/test" in ci


def test_readme_lists_every_run_setting_with_its_range():
    from fhir_crs.config import RunConfig
    from fhir_crs.validation import allowed

    readme = (ROOT / "README.md").read_text()
    for name, info in RunConfig.model_fields.items():
        assert f"`{name}`" in readme, name
        if info.annotation not in (str, "str", "str | None"):
            text = allowed(info).removesuffix(" (or unset)")
            assert text in readme, (name, text)


def test_grading_toml_prints_every_settings_allowed_range():
    from fhir_crs.settings import GradingSettings
    from fhir_crs.validation import allowed

    text = (ROOT / "mappings" / "grading.toml").read_text()
    for name, info in GradingSettings.model_fields.items():
        assert f"#     allowed: {allowed(info)}\n{name} = " in text, name


def test_security_doc_cites_only_existing_tests():
    """docs/SECURITY.md proves each defence by test names: each must be a test function in tests/,
    and each file path it names must exist, so the threat model cannot rot."""
    import re

    doc = (ROOT / "docs" / "SECURITY.md").read_text()
    cited = set(re.findall(r"`(test_\w+)`", doc)) | set(re.findall(r"::(test_\w+)`", doc))
    defined = {m for path in (ROOT / "tests").glob("test_*.py")
               for m in re.findall(r"^(?:async )?def (test_\w+)\(", path.read_text(), re.MULTILINE)}
    assert len(cited) >= 40
    assert sorted(cited - defined) == []
    paths = set(re.findall(r"`((?:fhir_crs|tests|docs)/[\w/.]+\.(?:py|md))", doc))
    assert paths and sorted(p for p in paths if not (ROOT / p).is_file()) == []
    # every row of every "Threat | Defence | Test(s)" table names at least one test in its last column
    rows, in_table = [], False
    for line in doc.splitlines():
        if line.startswith("| Threat |"):
            in_table = True
        elif not line.startswith("|"):
            in_table = False
        elif in_table and not line.startswith("|---"):
            rows.append(line)
    assert len(rows) >= 25
    assert [r for r in rows if not re.search(r"`test_\w+`", r.rstrip(" |").rsplit("|", 1)[-1])] == []


def test_readme_links_the_security_threat_model():
    readme = (ROOT / "README.md").read_text()
    assert "](docs/SECURITY.md)" in readme and "## Security" in readme
