"""Issue 14 (packaging): the wheel that `pip wheel .` / `pip install .` build installs into a fresh
virtual environment and works from outside the source tree: the default mapping tables ship as
package data, `fhir-crs --version` prints the version, and a fixture grades as it does here.

Offline on purpose: the wheel is built with no build isolation (setuptools is a pinned test
dependency), and the fresh venv installs it with `--no-index` from a local wheelhouse made of the
distributions already installed in this environment (repacked as wheels with their RECORD
rehashed), so pip resolves the wheel's declared dependencies exactly as it would from PyPI.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from conftest import ROOT
from packaging import tags
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import fhir_crs

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
V06 = ROOT / "fixtures" / "R4" / "vignettes" / "V06.json"


def _closure(name: str) -> list[metadata.Distribution]:
    """The installed distributions that `name` needs (its requirements, their extras, recursively)."""
    seen: dict[str, metadata.Distribution] = {}
    todo: list[tuple[str, frozenset[str]]] = [(name, frozenset())]
    while todo:
        dist_name, extras = todo.pop()
        dist = metadata.distribution(dist_name)
        key = canonicalize_name(dist.metadata["Name"])
        if key in seen and not extras:
            continue
        seen[key] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            env_extras = extras | {""}
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in env_extras):
                todo.append((req.name, frozenset(req.extras)))
    seen.pop(canonicalize_name(name))
    return list(seen.values())


def _record_line(path: str, data: bytes) -> list[str]:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return [path, f"sha256={digest}", str(len(data))]


def _repack(dist: metadata.Distribution, out_dir: Path) -> Path:
    """An installed distribution as a wheel (files under site-packages; pip regenerates scripts)."""
    files = [f for f in dist.files or [] if not str(f).startswith("..") and "__pycache__" not in f.parts]
    info = next(f.parts[0] for f in files if f.parts[0].endswith(".dist-info"))
    wheel_meta = (Path(str(dist.locate_file(info))) / "WHEEL").read_text(encoding="utf-8")
    supported = {str(t) for t in tags.sys_tags()}
    tag = next(t for line in wheel_meta.splitlines() if line.startswith("Tag:")
               for t in [line.split(":", 1)[1].strip()] if t in supported)
    name = re.sub(r"[-_.]+", "_", dist.metadata["Name"])
    target = out_dir / f"{name}-{dist.version}-{tag}.whl"
    skip = {f"{info}/{n}" for n in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")}
    rows = []
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as whl:
        for f in files:
            rel = str(f).replace(os.sep, "/")
            src = Path(str(dist.locate_file(f)))
            if rel in skip or not src.is_file():
                continue
            data = src.read_bytes()
            whl.writestr(rel, data)
            rows.append(_record_line(rel, data))
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([*rows, [f"{info}/RECORD", "", ""]])
        whl.writestr(f"{info}/RECORD", buf.getvalue())
    return target


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"{args}: exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip wheel .` of a copy of the project (what `pip install .` builds and installs)."""
    base = tmp_path_factory.mktemp("build")
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "fhir_crs", src / "fhir_crs", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = base / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(out), str(src)], cwd=base)
    (built,) = out.glob("fhir_crs-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed offline (--no-index) and its dependencies resolved by pip."""
    base = tmp_path_factory.mktemp("venv")
    house = base / "wheelhouse"
    house.mkdir()
    for dist in _closure("fhir-crs"):
        _repack(dist, house)
    env_dir = base / "env"
    _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], cwd=base)
    py = env_dir / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-index", "--no-compile",
          "--find-links", str(house), str(wheel)], cwd=base)
    _run([sys.executable, "-m", "pip", "--python", str(py), "check"], cwd=base)
    return env_dir


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FHIR_CRS_", "PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    return env


def test_wheel_ships_the_default_mapping_tables(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
    shipped = {p.name for p in (ROOT / "fhir_crs" / "mappings").iterdir() if p.is_file()}
    assert {"grading.toml", "observations.toml", "medications.toml", "README.md"} <= shipped
    for name in shipped:
        assert f"fhir_crs/mappings/{name}" in names, name
    assert "fhir_crs/py.typed" in names
    assert not [n for n in names if n.startswith(("tests/", "fixtures/", "mappings/"))]
    assert wheel.name.startswith(f"fhir_crs-{PROJECT['version']}-")


def test_top_level_mappings_is_the_packaged_folder() -> None:
    """Sites and docs keep the `mappings/` path of the checkout: it is the same folder."""
    from fhir_crs.mapping_files import packaged_mappings_dir

    assert (ROOT / "mappings").resolve() == (ROOT / "fhir_crs" / "mappings").resolve()
    assert packaged_mappings_dir().resolve() == (ROOT / "fhir_crs" / "mappings").resolve()


def test_installed_wheel_grades_from_outside_the_source_tree(venv: Path, tmp_path: Path) -> None:
    work = tmp_path / "elsewhere"
    work.mkdir()
    shutil.copy2(V06, work / "V06.json")
    env = _clean_env()
    exe = venv / "bin" / "fhir-crs"

    version = _run([str(exe), "--version"], cwd=work, env=env).stdout.strip()
    assert version == f"fhir-crs, version {PROJECT['version']}" and PROJECT["version"] == fhir_crs.__version__

    where = _run([str(venv / "bin" / "python"), "-c",
                  "import fhir_crs, fhir_crs.mapping_files as m; print(fhir_crs.__file__); print(m.default_mappings_dir())"],
                 cwd=work, env=env).stdout.split()
    site = (venv / "lib").resolve()
    assert all(Path(p).resolve().is_relative_to(site) for p in where), where
    assert not any(Path(p).resolve().is_relative_to(ROOT.resolve()) for p in where), where

    out = _run([str(exe), "grade", "V06.json", "--json"], cwd=work, env=env).stdout
    installed = json.loads(out)
    from fhir_crs.pipeline import run_paths

    here = run_paths([V06]).to_json()
    assert [c["crs"]["astct"]["grade"] for c in installed["cases"]] == [3]
    for got, want in zip(installed["cases"], here["cases"], strict=True):
        for family in ("crs", "icans"):
            assert {k: v["grade"] for k, v in got[family].items()} == {k: v["grade"] for k, v in want[family].items()}
    assert installed["resources_read"] == here["resources_read"]

    text = _run([str(exe), "grade", "V06.json"], cwd=work, env=env).stdout
    assert "astct" in text and "Traceback" not in text
