"""A small HTTP proxy on 127.0.0.1 in front of moto's S3 server that injects object-store faults.

Faults, drawn per request from a seeded generator at ``rate``: ``503`` (SlowDown throttling),
``500`` (InternalError), ``drop`` (connection closed before any response), ``lost`` (the
request is applied upstream, then the connection is closed: the response is lost), ``slow``
(answered after a delay). ``down`` matches request paths that always get 503 (retries
exhausted). ``counts`` tells what was injected.
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import urlsplit

FAULTS = ("503", "500", "drop", "lost", "slow")
_XML = ('<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{msg}</Message>'
        "<RequestId>fault-proxy</RequestId></Error>")
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}


class FaultProxy:
    def __init__(self, upstream: str, seed: int = 0, rate: float = 0.0, slow_seconds: float = 0.3):
        self.upstream = urlsplit(upstream)
        self.rng = random.Random(seed)
        self.rate, self.slow_seconds = rate, slow_seconds
        self.down: Callable[[str, str], bool] = lambda method, path: False
        self.counts: Counter = Counter()
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", ""):
                    out = b""
                    while True:
                        line = self.rfile.readline()
                        out += line
                        size = int(line.split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while True:  # trailers, then the blank line
                                t = self.rfile.readline()
                                out += t
                                if t in (b"\r\n", b"\n", b""):
                                    return out
                        out += self.rfile.read(size + 2)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _error(self, status: int, code: str, msg: str) -> None:
                body = _XML.format(code=code, msg=msg).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _drop(self) -> None:
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body or None, headers=dict(self.headers.items()))
                    resp = conn.getresponse()
                    return resp.status, resp.getheaders(), resp.read()
                finally:
                    conn.close()

            def _handle(self) -> None:
                body = self._body()
                fault = proxy.draw(self.command, self.path)
                if fault == "down":
                    return self._error(503, "SlowDown", "Please reduce your request rate.")
                if fault == "503":
                    return self._error(503, "SlowDown", "Please reduce your request rate.")
                if fault == "500":
                    return self._error(500, "InternalError", "We encountered an internal error. Please try again.")
                if fault == "drop":
                    return self._drop()
                if fault == "slow":
                    time.sleep(proxy.slow_seconds)
                status, headers, data = self._forward(body)
                if fault == "lost":
                    return self._drop()
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in _HOP and not (k.lower() == "content-length" and self.command != "HEAD"):
                        self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def draw(self, method: str, path: str) -> str | None:
        with self.lock:
            self.counts["requests"] += 1
            if self.down(method, path):
                self.counts["down"] += 1
                return "down"
            if self.rng.random() >= self.rate:
                return None
            fault = self.rng.choice(FAULTS)
            self.counts[fault] += 1
            return fault

    def __enter__(self) -> "FaultProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
