"""The ASGI app of a :class:`~romebert.deploy.service.Service`: admission in front, then the routes.

``POST /predict`` once admitted (``admission.py``): read the body (413 past ``max_body_bytes``), parse
and tokenize it, hand its inputs to the batcher, wait for them, write the answer. Parsing, tokenizing
and writing run in ``parse_threads`` threads, off the event loop, unless the body is at most
``inline_bytes`` (a thread hand-off costs more than a sentence does), so the loop keeps answering
admissions and refusals while a large body is tokenized. A second after the last request is answered,
the memory it freed goes back to the system (ONNX Runtime runs without its arena: ``memory_arena``).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from romebert.deploy.admission import RETRY_HEADERS, TICKET, Admission, AdmissionMiddleware
from romebert.deploy.memory import freeze_startup_objects, release_memory
from romebert.deploy.openapi import openapi_spec
from romebert.deploy.serving import Job, Overloaded, lower_priority

IDLE_S = 1.0  # idle this long, the service returns freed memory to the system (steady traffic never is)


class HTTPError(Exception):
    """A request answered with ``status`` and one JSON line ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def build_app(service: Any):
    """The app of a ``service.Service`` (its config, classifier, batcher, metrics and request handling)."""
    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    cfg, metrics = service.cfg, service.metrics
    admission = Admission(cfg.max_pending_requests, cfg.max_pending_bytes, cfg.max_queue, cfg.max_inputs,
                          cfg.max_body_bytes, lambda: service.batcher.in_flight)  # fmt: skip
    service.admission = admission
    pool = ThreadPoolExecutor(cfg.parse_threads, "romebert-parse", lower_priority, (cfg.worker_nice, cfg.worker_idle))

    async def off_loop(small: bool, fn, *args):
        return fn(*args) if small else await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def handle(request: Request) -> bytes:
        ticket = request.scope[TICKET]
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > cfg.max_body_bytes:
                raise HTTPError(413, f"the body is over {cfg.max_body_bytes} bytes")
        small = len(body) <= cfg.inline_bytes
        try:
            prepared = await off_loop(small, service.prepare, bytes(body))
        finally:
            admission.parsed(ticket)  # a failed parse frees its share at once too
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Job] = loop.create_future()

        def done(job: Job) -> None:  # on the batcher's thread
            loop.call_soon_threadsafe(lambda: future.done() or future.set_result(job))

        admission.learn(len(body), len(prepared.features))
        try:
            service.batcher.submit(prepared.features, done, prepared.policy)
        except Overloaded as exc:
            admission.close(ticket)  # it leaves the counters before it counts as shed: never both
            metrics.shed.labels("queue").inc()
            raise HTTPError(503, str(exc), RETRY_HEADERS) from None
        job = await future  # a client that disconnects cancels only this wait; its inputs still finish
        return await off_loop(small, service.render, job, prepared.policy)

    async def predict(request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            response = Response(await handle(request), media_type="application/json")
        except HTTPError as exc:
            response = JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)
        except ClientDisconnect:
            response = Response(status_code=499)
        status = response.status_code
        metrics.requests.labels("predict", str(status)).inc()
        if status >= 400:
            metrics.errors.labels(str(status)).inc()
        else:
            metrics.latency.observe(time.perf_counter() - t0)
        return response

    idle: list = [None]  # the pending call of trim_when_idle

    def answered() -> None:  # the last request is answered: give the burst's memory back a second later
        if admission.pending == 0:
            if idle[0] is not None:
                idle[0].cancel()
            idle[0] = asyncio.get_running_loop().call_later(IDLE_S, trim_when_idle)

    def trim_when_idle() -> None:
        idle[0] = None
        if admission.pending == 0 and service.batcher.in_flight == 0:
            asyncio.get_running_loop().run_in_executor(None, release_memory)

    counters: dict[tuple[int, str], tuple] = {}  # a burst refuses thousands: look their labels up once

    def refused(status: int, why: str) -> None:
        key = status, why
        if key not in counters:
            code = str(status)
            counters[key] = (
                metrics.requests.labels("predict", code),
                metrics.errors.labels(code),
                metrics.shed.labels(why),
            )
        for counter in counters[key]:
            counter.inc()

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        if service.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        threshold = list(service.guard.thresholds) if service.guard is not None else service.policy.threshold
        return JSONResponse({"status": "ready", "layers": service.num_layers, **service.policy.params(),
                             "threshold": threshold})  # fmt: skip

    async def metrics_text(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        metrics.pending.set(admission.pending)
        metrics.pending_bytes.set(admission.pending_bytes)
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_spec(service))

    @asynccontextmanager
    async def lifespan(app):
        freeze_startup_objects()  # (deploy/memory.py) once everything is loaded, before the first request
        yield
        # uvicorn has stopped taking connections and answered the requests in flight by now;
        # finish whatever is still queued, then stop the worker.
        service.draining = admission.draining = True
        await asyncio.get_running_loop().run_in_executor(None, service.batcher.close)
        pool.shutdown(wait=False)

    routes = [Route("/predict", predict, methods=["POST"]), Route("/health", health), Route("/ready", ready),
              Route("/metrics", metrics_text), Route("/openapi.json", openapi)]  # fmt: skip
    return AdmissionMiddleware(Starlette(routes=routes, lifespan=lifespan), admission, refused, answered)
