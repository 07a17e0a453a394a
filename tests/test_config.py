"""Run settings: one precedence (flag > FHIR_CRS_* env > fhir-crs.toml > default), secrets only
from env or files, clear errors; auth failures end in one line and exit 5."""

from __future__ import annotations

from pathlib import Path

import pytest
import responses
from click.testing import CliRunner

from fhir_crs.cli import cli
from fhir_crs.config import resolve
from fhir_crs.errors import ConfigError


@pytest.fixture
def cfg_file(tmp_path: Path) -> Path:
    p = tmp_path / "fhir-crs.toml"
    p.write_text('[fhir-crs]\nserver = "http://file.example/fhir"\ntimeout = 11\npage_size = 50\n')
    return p


@pytest.mark.parametrize(
    ("flags", "env", "expected_server", "expected_timeout"),
    [
        ({}, {}, "http://file.example/fhir", 11.0),
        ({}, {"FHIR_CRS_SERVER": "http://env.example/fhir"}, "http://env.example/fhir", 11.0),
        ({"server": "http://flag.example/fhir"}, {"FHIR_CRS_SERVER": "http://env.example/fhir"}, "http://flag.example/fhir", 11.0),
        ({"timeout": 3}, {"FHIR_CRS_TIMEOUT": "7"}, "http://file.example/fhir", 3.0),
        ({}, {"FHIR_CRS_TIMEOUT": "7"}, "http://file.example/fhir", 7.0),
    ],
)
def test_precedence(cfg_file, flags, env, expected_server, expected_timeout):
    cfg = resolve(flags, env, None, cfg_file.parent)
    assert (cfg.server, cfg.timeout, cfg.page_size) == (expected_server, expected_timeout, 50)


def test_defaults_without_file(tmp_path: Path):
    cfg = resolve({}, {}, None, tmp_path)
    assert cfg.server is None and cfg.auth == "none" and cfg.window_before_days == 7 and cfg.write is False


def test_config_path_from_env(cfg_file: Path, tmp_path: Path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    assert resolve({}, {"FHIR_CRS_CONFIG": str(cfg_file)}, None, other).server == "http://file.example/fhir"


@pytest.mark.parametrize("key", ["token", "password"])
def test_secret_in_config_file_is_refused(tmp_path: Path, key):
    p = tmp_path / "fhir-crs.toml"
    p.write_text(f'[fhir-crs]\n{key} = "s3cret"\n')
    with pytest.raises(ConfigError, match=f"'{key}' must not be written in a config file") as exc:
        resolve({}, {}, p, tmp_path)
    assert "s3cret" not in str(exc.value)


def test_token_from_env_or_file(tmp_path: Path):
    tok = tmp_path / "token"
    tok.write_text("from-file\n")
    tok.chmod(0o600)
    assert resolve({}, {"FHIR_CRS_TOKEN": "from-env"}, None, tmp_path).secret_token() == "from-env"
    assert resolve({"token_file": str(tok)}, {}, None, tmp_path).secret_token() == "from-file"
    assert "from-env" not in repr(resolve({}, {"FHIR_CRS_TOKEN": "from-env"}, None, tmp_path))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[fhir-crs]\nservr = "x"\n', "unknown key 'servr'"),
        ('[fhir-crs]\ntimeout = "soon"\n', "'timeout' = 'soon' is not allowed: expected a finite number above 0, up to 600 s"),
        ("[fhir-crs\n", "not valid TOML"),
        ('[fhir-crs]\nserver = "ftp://x"\n', "'server' = 'ftp://x' is not allowed: expected an http(s) URL"),
        ('[fhir-crs]\nauth = "kerberos"\n', "'auth' = 'kerberos' is not allowed: expected one of: none, bearer, basic, smart"),
    ],
)
def test_bad_config_is_one_clear_error(tmp_path: Path, content, message):
    p = tmp_path / "fhir-crs.toml"
    p.write_text(content)
    with pytest.raises(ConfigError) as exc:
        resolve({}, {}, p, tmp_path)
    assert message in str(exc.value)


@responses.activate
def test_auth_failure_is_exit_5_without_the_token(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FHIR_CRS_TOKEN", "super-secret-token")
    denied = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "login", "diagnostics": "Unknown bearer token"}]}
    responses.get("https://fhir.test/r4/Patient/p1", status=401, json=denied)
    responses.post("https://fhir.test/r4", status=401, json=denied)  # pull batches its first reads
    r = CliRunner().invoke(cli, ["pull", "--patient", "p1", "--server", "https://fhir.test/r4", "--auth", "bearer"])
    assert r.exit_code == 5
    assert "401" in r.stderr and "super-secret-token" not in r.stderr + r.stdout
    assert responses.calls[0].request.headers["Authorization"] == "Bearer super-secret-token"


def test_bearer_without_token_is_a_config_error(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FHIR_CRS_TOKEN", raising=False)
    r = CliRunner().invoke(cli, ["pull", "--patient", "p1", "--server", "https://fhir.test/r4", "--auth", "bearer"])
    assert r.exit_code == 2 and "needs a token" in r.stderr
