"""The worker's /metrics endpoint: Prometheus text of what a callable returns, over HTTP.

A plain `http.server` on a daemon thread (not prometheus_client's start_http_server): the
port is bound in the caller's thread, so a port in use or a bad address fails the worker's
start with a ConfigError that says what to change, instead of a traceback in a thread.
One request at a time is enough for a scraper or two; each reads the worker's folder.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from .errors import ConfigError

__all__ = ["MetricsServer", "CONTENT_TYPE"]

log = logging.getLogger("livingai_tasks.metrics_http")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path.split("?", 1)[0] not in ("/metrics", "/metrics/"):
            self._reply(404, "text/plain; charset=utf-8", b"Not found: try /metrics\n")
            return
        try:
            body = self.server.render().encode("utf-8")
        except Exception:  # noqa: BLE001 - a scrape must not kill the server thread
            log.exception("livingai_tasks: rendering /metrics failed")
            self._reply(500, "text/plain; charset=utf-8", b"metrics unavailable (see log)\n")
            return
        self._reply(200, CONTENT_TYPE, body)

    def _reply(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - its signature
        pass  # a scrape every 15 s would flood the worker's log


class _Server(HTTPServer):
    render: Callable[[], str]


class MetricsServer:
    """Serves `render()` at http://<bind>:<port>/metrics from a daemon thread."""

    def __init__(self, bind: str, port: int, render: Callable[[], str]) -> None:
        try:
            server = _Server((bind, port), _Handler)
        except OSError as exc:
            raise ConfigError(
                f"metrics_port {port}: cannot listen on {bind}:{port} "
                f"({exc.strerror or exc}). Choose a free TCP port 1..65535 (each worker on a "
                f"host needs its own), or 0 for no endpoint; metrics_bind must be an address "
                f"of this host (127.0.0.1, or 0.0.0.0 for every interface)."
            ) from None
        server.render = render
        self._server = server
        self.address = server.server_address
        self._thread = threading.Thread(target=server.serve_forever, name="livingai-metrics-http",
                                        daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self.address[1])

    def forget_after_fork(self) -> None:
        """In a forked child: close the inherited socket (no thread serves it here, and
        shutdown() would wait for one for ever)."""
        self._server.server_close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)
