"""Local FHIR R4 servers for `fhir-crs demo`, the integration tests and the benchmarks, started on
127.0.0.1 on a free port, waited for on `/metadata`, and stopped by PID. No Docker, no network:

* `LocalFhirServer` — the embedded server, sekmet-fhir (pinned, pure Python, FastAPI + SQLite),
  up in seconds;
* `HapiFhirServer` — a real HAPI FHIR JPA server (`scripts/hapi-server`, tools/hapi-server: R4 on
  H2, Bulk `$export`, `$validate`), needing Java 17 and, for its first build, Maven; up in 30–90 s.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from .errors import FhirCrsError


class LocalServerError(FhirCrsError):
    """The embedded FHIR server could not be started."""

    exit_code = 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sekmet_executable() -> Path:
    exe = Path(sys.executable).with_name("sekmet")
    if not exe.exists():
        raise LocalServerError(f"sekmet-fhir is not installed next to {sys.executable} (pip install sekmet-fhir).")
    return exe


class _ServerProcess:
    """A FHIR server child process on 127.0.0.1: waits for `/metadata`, stopped or killed by PID."""

    name = "FHIR server"
    base: str
    workdir: Path
    startup_timeout: float

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: BinaryIO | None = None
        self.startup_seconds: float | None = None

    def _spawn(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = (self.workdir / "serve.log").open("ab")
        started = time.monotonic()
        self.proc = subprocess.Popen(args, cwd=self.workdir, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = started + self.startup_timeout
        while True:
            try:
                with urllib.request.urlopen(self.base + "/metadata", timeout=5) as r:
                    if r.status == 200:
                        self.startup_seconds = time.monotonic() - started
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise LocalServerError(self._failure())
            time.sleep(0.25)

    def _failure(self) -> str:
        return f"the local {self.name} did not start; see {self.workdir / 'serve.log'}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def rss_bytes(self) -> int | None:
        """Resident memory of the server process (Linux /proc), None when unknown."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return None
        m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        return int(m.group(1)) * 1024 if m else None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()

    def kill(self) -> None:
        """Hard kill (fault-injection tests)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()


class LocalFhirServer(_ServerProcess):
    """`with LocalFhirServer(workdir) as server: server.base` — a real FHIR server on loopback.

    `smart_clients` (list of dicts with client_id, public_key_path, scopes) turns on sekmet's
    SMART Backend Services token endpoint (`/auth/token`) and makes the FHIR API require tokens.
    """

    name = "FHIR server"

    def __init__(self, workdir: Path, port: int | None = None, smart_clients: list[dict[str, str]] | None = None,
                 startup_timeout: float = 60.0):
        super().__init__()
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}/fhir"
        self.token_url = f"http://127.0.0.1:{self.port}/auth/token"
        self.smart_clients = smart_clients
        self.startup_timeout = startup_timeout

    def start(self) -> LocalFhirServer:
        exe = sekmet_executable()
        self.workdir.mkdir(parents=True, exist_ok=True)
        lines = [
            f"base_url: {self.base}", "host: 127.0.0.1", f"port: {self.port}",
            f"data_dir: {self.workdir / 'data'}", "simulator:", "  enabled: false",
        ]
        if self.smart_clients:
            lines += ["server_auth:", "  types: [smart]", "  smart_clients:"]
            for c in self.smart_clients:
                lines.append(
                    f"    - {{client_id: {c['client_id']}, public_key_path: {c['public_key_path']}, scopes: \"{c['scopes']}\"}}"
                )
        (self.workdir / "settings.yaml").write_text("\n".join(lines) + "\n")
        self._spawn([str(exe), "serve", "-c", "settings.yaml", "--host", "127.0.0.1", "--port", str(self.port)])
        return self

    def __enter__(self) -> LocalFhirServer:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


# --------------------------------------------------------------------------- HAPI FHIR JPA

REPO_ROOT = Path(__file__).resolve().parents[1]
HAPI_SCRIPT = REPO_ROOT / "scripts" / "hapi-server"
HAPI_JAR = REPO_ROOT / "tools" / "hapi-server" / "target" / "fhir-crs-hapi-server.jar"
HAPI_STARTUP_TIMEOUT = 300.0


def java_major_version() -> int | None:
    """The major version of `java` on PATH, None when there is none."""
    if shutil.which("java") is None:
        return None
    try:
        out = subprocess.run(["java", "-XshowSettings:properties", "-version"], capture_output=True, text=True,
                             timeout=60).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"java\.specification\.version = (\d+)", out)
    return int(m.group(1)) if m else None


def hapi_unavailable_reason() -> str | None:
    """Why a local HAPI server cannot be built or started here (None: it can)."""
    if not HAPI_SCRIPT.exists():
        return f"{HAPI_SCRIPT} is missing (a local HAPI server needs the fhir-crs source checkout)"
    major = java_major_version()
    if major is None:
        return "Java 17 or newer is not installed (java not found on PATH)"
    if major < 17:
        return f"Java 17 or newer is required for the local HAPI server (found Java {major})"
    if not HAPI_JAR.exists() and shutil.which("mvn") is None:
        return "Maven is not installed (mvn not found on PATH) and the HAPI server jar has not been built"
    return None


def build_hapi_server(timeout: float = 3600.0) -> Path:
    """Build tools/hapi-server if needed (`scripts/hapi-server --build`); returns the jar path."""
    reason = hapi_unavailable_reason()
    if reason:
        raise LocalServerError(f"cannot run a local HAPI server: {reason}.")
    done = subprocess.run([str(HAPI_SCRIPT), "--build"], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = " ".join(done.stderr.strip().splitlines()[-5:])
        raise LocalServerError(f"building the local HAPI server failed: {tail}")
    return Path(done.stdout.strip().splitlines()[-1])


class HapiFhirServer(_ServerProcess):
    """`with HapiFhirServer(workdir) as server: server.base` — HAPI FHIR JPA (R4, H2 in `workdir`).

    Started with `scripts/hapi-server PORT DATA_DIR`, which `exec`s the JVM, so the child's PID is
    the server's. `java_opts` replaces the script's default JVM options (`HAPI_JAVA_OPTS`).
    """

    name = "HAPI FHIR server"

    def __init__(self, workdir: Path, port: int | None = None, startup_timeout: float = HAPI_STARTUP_TIMEOUT,
                 java_opts: str | None = None):
        super().__init__()
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}/fhir"
        self.startup_timeout = startup_timeout
        self.java_opts = java_opts

    def start(self) -> HapiFhirServer:
        build_hapi_server()
        env = dict(os.environ)
        if self.java_opts:
            env["HAPI_JAVA_OPTS"] = self.java_opts
        self._spawn([str(HAPI_SCRIPT), str(self.port), str(self.workdir / "data")], env=env)
        return self

    def __enter__(self) -> HapiFhirServer:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
