"""Refusal inside the HTTP protocol: ``POST /predict`` is judged the moment its headers are parsed.

Through ASGI, a request that is going to be refused still costs uvicorn a request cycle, an asyncio
task and two ``send`` calls before its 503 is written: about a third of what a refusal costs the event
loop (accepting, parsing the head, answering and closing are the rest). In a burst that cost is paid
for every refused request ahead of the last one, so it sets the refusals' latency.
:class:`SheddingProtocol` is uvicorn's httptools protocol with one step added: when the head of a
``POST /predict`` is complete it asks the app's :class:`~romebert.deploy.admission.AdmissionMiddleware`
(the same rule, counters and metrics); a refusal is written at once with ``Connection: close`` and the
connection closes once the body has arrived (read and dropped), with no cycle or task; an admitted
request carries its ticket into the ASGI scope, where the middleware finds it.

It builds on uvicorn's ``HttpToolsProtocol`` internals (``url``, ``headers``, ``scope``, ``parser`` and
the parser callbacks), as of uvicorn 0.30-0.55; ``tests/test_service_traffic.py`` runs it in a real
uvicorn. :func:`protocol_class` gives uvicorn's ``http`` setting: this class where httptools is
installed, else uvicorn's own choice (the middleware alone then refuses, one step later).
"""

from __future__ import annotations

import functools
from http import HTTPStatus
from typing import Any

from romebert.deploy.admission import TICKET, AdmissionMiddleware, Refusal, Ticket, json_response

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # no httptools: uvicorn runs h11, and the middleware refuses
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

PATH = b"/predict"


def protocol_class() -> Any:
    """uvicorn's ``http`` setting for ``romebert serve``."""
    return SheddingProtocol if HttpToolsProtocol is not None else "auto"


def http_refusal(refusal: Refusal) -> bytes:
    """The whole HTTP/1.1 answer to a refused request, closing the connection."""
    status, raw, body = json_response(refusal[0], {"error": refusal[1]}, refusal[3])  # the middleware's answer
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode(), b"connection: close"]
    head += [k + b": " + v for k, v in raw]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


@functools.lru_cache(maxsize=4)  # one app per process: looked up once, not per connection
def _gate(app: Any) -> AdmissionMiddleware | None:
    """The admission layer under uvicorn's wrappers (each keeps the app it wraps in ``.app``)."""
    for _ in range(8):
        if isinstance(app, AdmissionMiddleware) or app is None:
            return app
        app = getattr(app, "app", None)
    return None


if HttpToolsProtocol is not None:

    class SheddingProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol, refusing ``POST /predict`` as its head is parsed."""

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self.gate = _gate(self.app)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.refused = False

        def on_headers_complete(self) -> None:
            url = self.url
            if self.gate is not None and url.partition(b"?")[0] == PATH and self.parser.get_method() == b"POST":
                verdict = self.gate.judge(self.headers)
                if isinstance(verdict, Ticket):
                    self.scope[TICKET] = verdict  # type: ignore[literal-required]
                else:
                    self.refused = True
                    self.transport.write(http_refusal(verdict))
                    return
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if not self.refused:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if self.refused:  # the body has arrived (and was dropped): nothing is left unread to reset
                self.transport.close()
                return
            super().on_message_complete()
