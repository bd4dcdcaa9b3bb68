"""``/metrics``, ``/healthz`` and ``/readyz`` of the consumer over HTTP (a background thread).

The server binds to ``127.0.0.1`` unless told otherwise.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from .health import HealthState
from .metrics import ConsumerMetrics

__all__ = ["HealthServer"]


class HealthServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on a background thread."""

    def __init__(
        self, metrics: ConsumerMetrics, health: HealthState, host: str, port: int
    ) -> None:
        self.metrics = metrics
        self.health = health
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, outer.metrics.exposition(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    ok, why = outer.health.healthy()
                    self._send(200 if ok else 503, (why + "\n").encode(), "text/plain")
                elif path == "/readyz":
                    with outer.health.lock:
                        ok, why = outer.health.ready, outer.health.reason
                    self._send(200 if ok else 503, (why + "\n").encode(), "text/plain")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return int(self.server.server_address[1])

    def start(self) -> None:
        """Serve in the background."""
        self.thread.start()

    def stop(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()
