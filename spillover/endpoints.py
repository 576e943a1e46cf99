"""The replayer's HTTP port: /metrics (Prometheus), /healthz (alive), /readyz (can do its job).

A small threaded http.server, so the replayer needs no web framework.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger("spillover.endpoints")


class Heartbeat:
    """The replayer's main loop beats; /healthz fails when it has not for ``limit`` seconds."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.last = time.monotonic()

    def beat(self) -> None:
        self.last = time.monotonic()

    def alive(self) -> bool:
        return time.monotonic() - self.last < self.limit


def serve(port: int, heartbeat: Heartbeat, ready: Callable[[], bool], host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Start serving in a daemon thread; returns the server (``.shutdown()`` to stop)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._send(200, generate_latest(), CONTENT_TYPE_LATEST)
            elif self.path == "/healthz":
                alive = heartbeat.alive()
                self._send(200 if alive else 503, b"ok\n" if alive else b"main loop stalled\n")
            elif self.path == "/readyz":
                try:
                    is_ready, reason = ready(), "not ready"
                except Exception as exc:  # the outbox is unreachable: not ready, say why
                    is_ready, reason = False, f"outbox unreachable: {exc.__class__.__name__}"
                self._send(200 if is_ready else 503, b"ok\n" if is_ready else f"{reason}\n".encode())
            else:
                self._send(404, b"not found\n")

        def _send(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug(format, *args)

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="spillover-endpoints", daemon=True).start()
    return server
