"""A tiny scripted HTTP(S) server on 127.0.0.1 for the security tests, run as its own process
(started by a fixture, killed by PID) that records every request it receives.

    server = LoopbackServer(tmp_path / "a").start()
    server.route("GET", "/fhir/Patient/p1", json={...})
    server.route("GET", "/files/1.ndjson", body=b"...", headers={"Content-Encoding": "gzip"})
    server.proxy(upstream_base)           # anything unrouted is forwarded (origins rewritten)
    server.requests()                     # [{"method", "path", "query", "headers", "body"}]

Routes live in a JSON file the server re-reads on every request, so a test can change them
while the server runs. Matching is on method + path, and on the query too when the route
gives one (``"/fhir/Observation?page=2"``). `python tests/loopback.py CONFIG` runs the server.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LoopbackServer:
    def __init__(self, workdir: Path, *, tls: tuple[Path, Path] | None = None, port: int | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.tls = tls
        scheme = "https" if tls else "http"
        self.origin = f"{scheme}://127.0.0.1:{self.port}"
        self.base = f"{self.origin}/fhir"
        self.config = self.workdir / "server.json"
        self.log = self.workdir / "requests.jsonl"
        self._routes: dict[str, Any] = {}
        self._upstream: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._write()

    # ------------------------------------------------------------------ scripting

    def route(self, method: str, path: str, *, status: int = 200, json: Any = None, body: bytes | str | None = None,
              headers: dict[str, str] | None = None) -> LoopbackServer:
        data = body.encode() if isinstance(body, str) else body
        if json is not None:
            data = _json_bytes(json)
            headers = {"Content-Type": "application/fhir+json", **(headers or {})}
        self._routes[f"{method.upper()} {path}"] = {
            "status": status, "headers": headers or {}, "body": base64.b64encode(data or b"").decode(),
        }
        self._write()
        return self

    def proxy(self, upstream_base: str) -> LoopbackServer:
        self._upstream = upstream_base
        self._write()
        return self

    def requests(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def _write(self) -> None:
        cfg = {"port": self.port, "routes": self._routes, "log": str(self.log), "origin": self.origin,
               "upstream": self._upstream, "tls": [str(p) for p in self.tls] if self.tls else None}
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(json.dumps(cfg))
        tmp.replace(self.config)

    # ------------------------------------------------------------------ process

    def start(self) -> LoopbackServer:
        self._stderr = (self.workdir / "stderr.log").open("wb")
        self.proc = subprocess.Popen([sys.executable, __file__, str(self.config)],
                                     stdout=subprocess.DEVNULL, stderr=self._stderr)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"loopback server did not start: {(self.workdir / 'stderr.log').read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        if getattr(self, "_stderr", None) is not None:
            self._stderr.close()

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _json_bytes(data: Any) -> bytes:
    return json.dumps(data).encode()


# ---------------------------------------------------------------------- the server process


def _serve(config_path: Path) -> None:
    cfg = json.loads(config_path.read_text())

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _handle(self) -> None:
            conf = json.loads(config_path.read_text())
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            parts = urlsplit(self.path)
            with open(conf["log"], "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"method": self.command, "path": parts.path, "query": parts.query,
                                     "headers": dict(self.headers.items()),
                                     "body": body.decode("utf-8", "replace")}) + "\n")
            routes = conf["routes"]
            route = routes.get(f"{self.command} {self.path}") or routes.get(f"{self.command} {parts.path}")
            if route is None and conf.get("upstream"):
                status, headers, data = _forward(conf, self.command, self.path, dict(self.headers.items()), body)
            elif route is None:
                status, headers, data = 404, {"Content-Type": "application/fhir+json"}, _json_bytes(
                    {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-found"}]})
            else:
                status, headers, data = route["status"], route["headers"], base64.b64decode(route["body"])
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle

    server = ThreadingHTTPServer(("127.0.0.1", cfg["port"]), Handler)
    if cfg.get("tls"):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cfg["tls"][0], cfg["tls"][1])
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    server.serve_forever()


def _forward(conf: dict[str, Any], method: str, path: str, headers: dict[str, str], body: bytes
             ) -> tuple[int, dict[str, str], bytes]:
    """Forward to the upstream server; its origin in the answer becomes this server's."""
    up = urlsplit(conf["upstream"])
    up_origin = f"{up.scheme}://{up.netloc}"
    keep = {k: v for k, v in headers.items() if k.lower() in ("accept", "content-type", "prefer", "if-match",
                                                               "if-none-exist", "cache-control")}
    req = urllib.request.Request(up_origin + path, data=body or None, method=method, headers=keep)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            status, out_headers, data = resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as exc:
        status, out_headers, data = exc.code, dict(exc.headers.items()), exc.read()
    data = data.replace(up_origin.encode(), conf["origin"].encode())
    passed = {k: v.replace(up_origin, conf["origin"]) for k, v in out_headers.items()
              if k.lower() in ("content-type", "etag", "location", "content-location", "retry-after", "x-progress")}
    return status, passed, data


if __name__ == "__main__":
    _serve(Path(sys.argv[1]))
