"""Docs stay true: every CLI command has help and appears in the README; every mapping key is
documented in mappings/README.md."""

from __future__ import annotations

import re

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


# ---- README against --help (issue 14) -----------------------------------------------------------


def _readme_section(title: str) -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index(title)
    nxt = readme.find("\n#", start + len(title))
    return readme[start:nxt if nxt != -1 else None]


def _exit_rows(text: str) -> list[tuple[int, str]]:
    return [(int(m[1]), m[2].strip()) for m in re.finditer(r"^\| (\d+) \| (.+?) \|$", text, re.MULTILINE)]


def test_readme_exit_code_table_is_the_one_help_prints():
    from fhir_crs.errors import EXIT_CODES

    r = CliRunner().invoke(cli, ["--help"])
    assert r.exit_code == 0
    help_rows = [(int(m[1]), m[2].strip()) for m in re.finditer(r"^\s+(\d+)\s{2}(.+)$", r.output.split("Exit codes:")[1], re.MULTILINE)]
    readme_rows = _exit_rows(_readme_section("### Exit codes"))
    assert readme_rows == list(EXIT_CODES) == help_rows


def test_readme_lists_every_json_error_code():
    import fhir_crs.errors as errors

    codes = {c.code for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.FhirCrsError)} - {"error"}
    section = _readme_section("### Exit codes")
    listed = set(re.findall(r"`(\w+)`", section.split("(`code`:")[1].split(")")[0]))
    assert listed == codes | {"usage"}


def test_readme_command_table_matches_help():
    table = _readme_section("## Commands").split("\n\n")[1]
    rows = {m[1]: m[2] for m in re.finditer(r"^\| `fhir-crs ([\w-]+)([^`]*)` \|", table, re.MULTILINE)}
    assert set(rows) == set(cli.commands)
    for name, usage in rows.items():
        cmd = cli.commands[name]
        known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        for flag in re.findall(r"--[a-z][a-z-]*", usage.replace("\\|", "|")):
            assert flag in known, (name, flag)
        r = CliRunner().invoke(cli, [name, "--help"])
        for flag in re.findall(r"--[a-z][a-z-]*", usage):
            assert flag in r.output, (name, flag)


def test_every_option_of_every_command_is_in_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name, cmd in cli.commands.items():
        for p in cmd.params:
            for flag in (*p.opts, *p.secondary_opts):
                if flag.startswith("--") and flag != "--help":
                    assert flag in readme, (name, flag)


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


def test_no_tracked_file_holds_merge_conflict_markers():
    """A merge left README.md with two versions of the command table and of the settings table for
    weeks: the table tests passed because a dict keeps the last row of a repeated command."""
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False).stdout.split()
    if not files:
        import pytest

        pytest.skip("not a git checkout: no tracked-file list")
    marker = re.compile(r"^(<{7} |>{7} |={7}$)", re.MULTILINE)
    bad = []
    for name in files:
        path = ROOT / name
        if path.suffix not in {".md", ".py", ".toml", ".txt", ".json", ".java", ".xml", ".yml", ".yaml", ""}:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        bad += [f"{name}: {m.group(0)!r}" for m in marker.finditer(text)]
    assert not bad, bad


def test_readme_command_table_has_each_command_once():
    table = _readme_section("## Commands").split("\n\n")[1]
    names = re.findall(r"^\| `fhir-crs ([\w-]+)", table, re.MULTILINE)
    assert sorted(names) == sorted(set(names)), names
