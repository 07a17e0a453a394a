"""The embedded local FHIR R4 server used by `fhir-crs demo` and the integration tests:
sekmet-fhir (pinned, pure Python, FastAPI + SQLite) started on 127.0.0.1 on a free port, waited
for on `/metadata`, and stopped by PID. No Docker, no network."""

from __future__ import annotations

import os
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


class LocalFhirServer:
    """`with LocalFhirServer(workdir) as server: server.base` — a real FHIR server on loopback.

    `smart_clients` (list of dicts with client_id, public_key_path, scopes) turns on sekmet's
    SMART Backend Services token endpoint (`/auth/token`) and makes the FHIR API require tokens.
    """

    def __init__(self, workdir: Path, port: int | None = None, smart_clients: list[dict[str, str]] | None = None,
                 startup_timeout: float = 60.0):
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}/fhir"
        self.token_url = f"http://127.0.0.1:{self.port}/auth/token"
        self.smart_clients = smart_clients
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: BinaryIO | None = None

    def start(self) -> LocalFhirServer:
        from .private import create_private_file, private_dir, write_private_text

        exe = sekmet_executable()
        private_dir(self.workdir)
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
        write_private_text(self.workdir / "settings.yaml", "\n".join(lines) + "\n")
        self._log = create_private_file(self.workdir / "serve.log").open("ab")
        # The server's database holds the (synthetic) patients: owner-only, whatever the umask.
        self.proc = subprocess.Popen(
            [str(exe), "serve", "-c", "settings.yaml", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=self.workdir, stdout=self._log, stderr=subprocess.STDOUT, umask=0o077,
        )
        deadline = time.monotonic() + self.startup_timeout
        while True:
            try:
                with urllib.request.urlopen(self.base + "/metadata", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise LocalServerError(f"the local FHIR server did not start; see {self.workdir / 'serve.log'}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None) is not None:
            self._log.close()

    def kill(self) -> None:
        """Hard kill (fault-injection tests)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        if getattr(self, "_log", None) is not None:
            self._log.close()

    def __enter__(self) -> LocalFhirServer:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
