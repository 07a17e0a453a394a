from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REALWORLD = SHARED / "realworld"
sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-sandbox", action="store_true", help="run tests against the public HAPI sandbox")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-sandbox"):
        return
    skip = pytest.mark.skip(reason="public HAPI sandbox tests are opt-in (--run-sandbox)")
    for item in items:
        if "sandbox" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def code_map():
    from fhir_crs.mapping_files import load_code_map

    return load_code_map(ROOT / "mappings")


@pytest.fixture(scope="session")
def settings():
    from fhir_crs.settings import load_settings

    return load_settings(ROOT / "mappings")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalFhirServer:
    """A real FHIR R4 server (sekmet-fhir, pinned) on 127.0.0.1, started and killed by PID."""

    def __init__(self, workdir: Path):
        import subprocess
        import time
        import urllib.request

        exe = Path(sys.executable).with_name("sekmet")
        if not exe.exists():
            raise RuntimeError(f"sekmet-fhir is not installed next to {sys.executable} (pip install -e '.[test]')")
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}/fhir"
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "settings.yaml").write_text(
            f"base_url: {self.base}\nhost: 127.0.0.1\nport: {self.port}\ndata_dir: {workdir / 'data'}\n"
            "simulator:\n  enabled: false\n"
        )
        self.log = (workdir / "serve.log").open("wb")
        self.proc = subprocess.Popen(
            [str(exe), "serve", "-c", "settings.yaml", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=workdir, stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(self.base + "/metadata", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sekmet did not start; see {workdir / 'serve.log'}")
            time.sleep(0.2)

    def stop(self) -> None:
        import os
        import signal

        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except Exception:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture(scope="session")
def fhir_server(tmp_path_factory: pytest.TempPathFactory):
    server = LocalFhirServer(tmp_path_factory.mktemp("sekmet"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def realworld() -> Path:
    if not REALWORLD.is_dir():
        pytest.skip("../shared/realworld is absent (real-world FHIR examples not available on this machine)")
    return REALWORLD
