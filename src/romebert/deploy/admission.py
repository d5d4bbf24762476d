"""Admission: a request is accepted or refused from its headers, before its body is read or parsed.

Refusing late is what makes a burst hurt: a request that waits behind the parsing and tokenizing of
every request ahead of it only to get 503 has cost its client the whole wait. :class:`Admission` counts
the work already admitted and answers a new request at once, on the event loop, with nothing awaited:

* ``max_pending_requests``: requests admitted and not yet answered;
* ``max_pending_bytes``: bodies admitted and not yet tokenized (their bytes, from Content-Length; a
  body without one counts as ``max_body_bytes``);
* the batcher's queue: inputs in flight plus the inputs admitted requests are expected to bring (a
  body's size over the running mean size of an input, at most ``max_inputs``) must fit in
  ``max_queue``, so the queue rarely refuses a request that has already been parsed.

The first request is always admitted whatever its size (within ``max_body_bytes``), so one large body
is never refused by the byte limit alone. :class:`AdmissionMiddleware` applies it to ``POST /predict``
as a plain ASGI layer in front of the routes: a refusal is one 503 with Retry-After, sent without
reading the body (uvicorn discards it and keeps the connection). Under uvicorn's httptools protocol,
``shed_protocol.py`` applies the same rule a step earlier, as the headers are parsed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PRIOR_BYTES_PER_INPUT = 64.0  # until bodies have been parsed: a short sentence and its JSON quoting
RETRY_AFTER_S = 1
RETRY_HEADERS = {"Retry-After": str(RETRY_AFTER_S)}  # on every 503 that asks the client to come back


@dataclass
class Ticket:
    """One admitted request's share of the counters."""

    bytes: int
    inputs: int  # inputs reserved in the queue until the request is handed to the batcher
    parsed: bool = False
    closed: bool = False


class Admission:
    """The counters and the rule (single-threaded: the event loop calls every method)."""

    def __init__(self, max_requests: int, max_bytes: int, max_queue: int, max_inputs: int, max_body_bytes: int,
                 in_flight: Callable[[], int]) -> None:  # fmt: skip
        self.max_requests, self.max_bytes, self.max_queue = max_requests, max_bytes, max_queue
        self.max_inputs, self.max_body_bytes = max_inputs, max_body_bytes
        self.in_flight = in_flight  # inputs the batcher holds now
        self.pending = 0  # admitted, not answered
        self.pending_bytes = 0  # admitted, not tokenized
        self.reserved = 0  # inputs expected from admitted requests not yet handed to the batcher
        self.bytes_per_input = PRIOR_BYTES_PER_INPUT
        self.draining = False

    def expected_inputs(self, length: int) -> int:
        return int(min(self.max_inputs, max(1.0, length / self.bytes_per_input)))

    def admit(self, length: int | None) -> Ticket | str:
        """A ticket, or why the request is refused now (an empty queue always admits one request)."""
        size = self.max_body_bytes if length is None else length
        if self.draining:
            return "the service is shutting down"
        if self.pending >= self.max_requests:
            return f"{self.pending} requests pending; the service takes {self.max_requests} at once"
        if self.pending_bytes and self.pending_bytes + size > self.max_bytes:
            return f"{self.pending_bytes} bytes of requests waiting to be parsed; at most {self.max_bytes}"
        expected = self.expected_inputs(size)
        busy = self.in_flight() + self.reserved
        if busy and busy + expected > self.max_queue:
            return f"{busy} inputs in flight or arriving; the queue holds {self.max_queue}"
        ticket = Ticket(size, expected)
        self.pending += 1
        self.pending_bytes += size
        self.reserved += expected
        return ticket

    def parsed(self, ticket: Ticket) -> None:
        """The body is tokenized (or failed to be): its bytes and its reservation are released; the caller
        hands its inputs to the batcher in the same step (no await between), so they are never uncounted."""
        if ticket.parsed:
            return
        ticket.parsed = True
        self.pending_bytes -= ticket.bytes
        self.reserved -= ticket.inputs

    def learn(self, length: int, inputs: int) -> None:
        """A body of ``length`` bytes held ``inputs`` inputs: the running mean size of an input follows."""
        if inputs:
            self.bytes_per_input = 0.9 * self.bytes_per_input + 0.1 * (length / inputs)

    def close(self, ticket: Ticket) -> None:
        """The request is answered (or failed): it leaves the counters."""
        if ticket.closed:
            return
        self.parsed(ticket)
        ticket.closed = True
        self.pending -= 1


def json_response(status: int, payload: dict[str, Any], headers: dict[str, str] | None = None):
    """(status, headers, body) of a JSON answer, for a raw ASGI send."""
    body = json.dumps(payload).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return status, raw, body


TICKET = "romebert.ticket"  # the scope key of an admitted request's ticket
Refusal = tuple[int, str, str, dict]  # (status, message, why, headers)


class AdmissionMiddleware:
    """ASGI: ``POST /predict`` passes only with a ticket (in ``scope[TICKET]``, closed when the route
    returns, then ``on_answered()``); a body declared over ``max_body_bytes`` gets 413 and a refused
    request 503, both without their body being read. ``on_refused(status, reason)`` counts them.

    Under uvicorn's httptools protocol, ``shed_protocol.py`` calls :meth:`judge` as soon as the headers
    are parsed and answers refusals itself; a request it admitted arrives here with its ticket."""

    def __init__(self, app: Any, admission: Admission, on_refused: Callable[[int, str], None],
                 on_answered: Callable[[], None] = lambda: None) -> None:  # fmt: skip
        self.app, self.admission, self.on_refused, self.on_answered = app, admission, on_refused, on_answered

    def judge(self, headers: list[tuple[bytes, bytes]]) -> Ticket | Refusal:
        """A ticket for a ``POST /predict`` with these headers, or its refusal (counted)."""
        length = _content_length(headers)
        limit = self.admission.max_body_bytes
        if length is not None and length > limit:
            refusal: Refusal = 413, f"the body has {length} bytes; at most {limit}", "too large", {}
        else:
            ticket = self.admission.admit(length)
            if isinstance(ticket, Ticket):
                return ticket
            refusal = 503, ticket, "admission", RETRY_HEADERS
        self.on_refused(refusal[0], refusal[2])
        return refusal

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] != "/predict" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        ticket = scope.get(TICKET) or self.judge(scope["headers"])
        if not isinstance(ticket, Ticket):
            status, raw, body = json_response(ticket[0], {"error": ticket[1]}, ticket[3])
            await send({"type": "http.response.start", "status": status, "headers": raw})
            await send({"type": "http.response.body", "body": body})
            return
        scope[TICKET] = ticket
        try:
            await self.app(scope, receive, send)
        finally:
            self.admission.close(ticket)
            self.on_answered()


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for key, value in headers:
        if key == b"content-length":
            return int(value) if value.isdigit() else None
    return None
