"""Connection-level limits for ``dermkit serve``: uvicorn's h11 protocol with a header-read
timeout, a connection limit and JSON protocol errors.

uvicorn (0.55) closes an idle keep-alive connection after ``timeout_keep_alive``, but has
no timeout for reading a request's headers: a fresh connection that sends nothing, or one
that sends half a header and stops (slowloris), is held forever (data cancels the
keep-alive timer). Its ``limit_concurrency`` answers in plain text, and so does its 400
for a malformed request (``Content-Length: abc``). :class:`HardenedH11Protocol` adds:

* **header timeout** ``header_timeout_s`` (default 10 s), armed when a connection opens
  and again after each response, disarmed when a complete request head has arrived: a
  connection still without one is closed, with a JSON 408 when it had sent part of one;
* **idle keep-alive** connections closed after ``keep_alive_s`` (default 5 s; uvicorn's);
* **connection limit** ``max_connections`` (default 128): a connection over it gets a JSON
  503 and is closed at once, before any of its bytes is read;
* **JSON 400** for requests h11 cannot parse; request heads are capped at
  ``max_header_bytes`` (16 KiB).

Body timeouts (a slow upload) are the app's ``request_timeout_s``
(:class:`dermkit.deploy.server.LimitsMiddleware`).
"""

from __future__ import annotations

import json
from http import HTTPStatus

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 10.0
KEEP_ALIVE_S = 5
MAX_CONNECTIONS = 128
MAX_HEADER_BYTES = 16 * 1024


def raw_json_response(status: int, code: str, message: str) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 response with the server's error JSON."""
    body = json.dumps({"error": {"status": status, "code": code, "message": message}}).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


class HardenedH11Protocol(H11Protocol):
    """uvicorn's H11Protocol plus the limits above (class attributes; see :func:`protocol`)."""

    header_timeout_s: float = HEADER_TIMEOUT_S
    max_connections: int = MAX_CONNECTIONS

    _header_timer = None
    _bytes_waiting = 0  # bytes received since the header timer was armed

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            message = f"too many open connections (limit {self.max_connections}); try again"
            transport.write(raw_json_response(503, "too_many_connections", message))
            transport.close()
            return
        self._arm_header_timer()

    def connection_lost(self, exc) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._bytes_waiting += len(data)
        super().data_received(data)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a complete request head arrived: the app has it now
            self._disarm_header_timer()

    def on_response_complete(self) -> None:
        # armed before uvicorn starts on a pipelined request, whose head disarms it again
        if not self.transport.is_closing():
            self._arm_header_timer()
        super().on_response_complete()

    def send_400_response(self, msg: str) -> None:
        message = "malformed HTTP request (request line or headers, e.g. Content-Length)"
        body = json.dumps({"error": {"status": 400, "code": "bad_request", "message": message}})
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        try:
            for event in (
                h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                h11.Data(data=body.encode()),
                h11.EndOfMessage(),
            ):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:  # h11 is past the point of answering: write it raw
            self.transport.write(raw_json_response(400, "bad_request", message))
        self.transport.close()

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._bytes_waiting = 0
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self._bytes_waiting:
            message = f"the request headers did not arrive within {self.header_timeout_s:g} s"
            self.transport.write(raw_json_response(408, "header_timeout", message))
        self.transport.close()


def protocol(
    header_timeout_s: float = HEADER_TIMEOUT_S, max_connections: int = MAX_CONNECTIONS
) -> type[HardenedH11Protocol]:
    """:class:`HardenedH11Protocol` with these limits (uvicorn instantiates the class)."""
    if header_timeout_s <= 0 or max_connections < 1:
        raise ValueError("header_timeout_s must be > 0 and max_connections >= 1")
    return type(
        "HardenedH11Protocol",
        (HardenedH11Protocol,),
        {"header_timeout_s": header_timeout_s, "max_connections": max_connections},
    )


def uvicorn_config(
    app,
    host: str,
    port: int,
    *,
    header_timeout_s: float = HEADER_TIMEOUT_S,
    keep_alive_s: int = KEEP_ALIVE_S,
    max_connections: int = MAX_CONNECTIONS,
    log_level: str = "warning",
):
    """The ``uvicorn.Config`` ``dermkit serve`` runs with (and the tests' servers)."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol(header_timeout_s, max_connections),
        timeout_keep_alive=keep_alive_s,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        log_level=log_level,
    )
