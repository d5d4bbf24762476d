"""``romebert serve``: an HTTP service for early-exit classification (Starlette on uvicorn).

    POST /predict        {"text": "..."} | {"text": "...", "text_pair": "..."} | {"inputs": [...]}
                         (+ optional "threshold", "criterion"); answers per input its label, its
                         probabilities and the layer it exited at, in input order
    GET  /health         liveness            GET /ready    readiness (model loaded, not draining)
    GET  /metrics        Prometheus text     GET /openapi.json

Requests from every client share the continuous batcher (``serving.py``). The service keeps no state
between requests, so several workers (processes) or replicas behind any load balancer scale it out.
Limits, each answered with one JSON line: a body over ``max_body_bytes`` -> 413; malformed JSON -> 400;
too many inputs or too long a text, or a bad field -> 422; too many inputs in flight -> 503 with
Retry-After. Torch-free for an export; a run folder is served with PyTorch.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from romebert.core.errors import RomebertError
from romebert.core.options import option
from romebert.deploy.classifier import EarlyExitClassifier, _examples
from romebert.deploy.serving import ContinuousBatcher, Job, Overloaded
from romebert.runtime.artefacts import MANIFEST_FILE
from romebert.runtime.encoding import encode
from romebert.runtime.exit_policy import OPTION_NAMES, ExitPolicy
from romebert.runtime.policies import CRITERIA, POLICIES, get_policy
from romebert.runtime.scores import softmax


@dataclass
class ServeConfig:
    """Everything ``romebert serve`` sets (its flags come from these fields); a worker process rebuilds
    the app from it, as JSON."""

    source: str = option(help="an ONNX export (ONNX Runtime, no torch), a classifier folder or a run folder (PyTorch)",
                         cli=False)  # fmt: skip
    max_batch: int = option(32, "rows per layer call")
    # 0 by default: inputs that arrive while the worker is busy still share a batch anyway, and waiting
    # for company adds its wait to every request (docs/serving.md has the load tests)
    max_wait_ms: float = option(0.0, "longest a fresh input waits for company when the worker is idle")
    max_queue: int = option(1024, "inputs in flight before requests get 503")
    max_body_bytes: int = option(1 << 20, "largest request body (413 beyond)")
    max_inputs: int = option(256, "inputs per request (422 beyond)")
    max_text_chars: int = option(10_000, "characters per text (422 beyond)")
    intra_op_threads: int | None = option(None, "ONNX Runtime threads per graph call (default: usable cores / workers)")
    device: str = option("cpu", "run and classifier folders only: cpu, cuda, ...")
    full_depth: bool = option(False, "run every input to the last layer (the same service without early exit)")
    full_graph: bool = option(False, "exports made with --full-graph: run the whole model as one graph, final "
                              "head only (the plain model, the baseline without exits)")  # fmt: skip

    def __post_init__(self) -> None:
        """Settings no service can run with fail here, in one line naming the flag."""
        positive = ("max_batch", "max_queue", "max_body_bytes", "max_inputs", "max_text_chars")
        for name in positive:
            if getattr(self, name) < 1:
                raise RomebertError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise RomebertError(f"--max-wait-ms must not be negative, got {self.max_wait_ms}")
        if self.intra_op_threads is not None and self.intra_op_threads < 1:
            raise RomebertError(f"--intra-op-threads must be at least 1, got {self.intra_op_threads}")


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class Metrics:
    """Prometheus metrics of one app (a registry of its own, so several apps can live in one process)."""

    def __init__(self, num_layers: int, max_batch: int) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("romebert_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=self.registry)  # fmt: skip
        self.errors = Counter("romebert_errors", "requests answered with an error, by status", ["status"],
                              registry=self.registry)  # fmt: skip
        self.latency = Histogram("romebert_request_latency_seconds", "time from request to answer (POST /predict)",
                                 buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1, 2, 5),
                                 registry=self.registry)  # fmt: skip
        self.exit_layer = Histogram("romebert_exit_layer", "the layer each input exited at",
                                    buckets=tuple(range(1, num_layers + 1)), registry=self.registry)  # fmt: skip
        sizes = sorted({1, 2, 4, 8, 16, 32, 64, 128, max_batch})
        self.batch = Histogram("romebert_batch_rows", "rows of each layer call", buckets=tuple(s for s in sizes
                               if s <= max_batch), registry=self.registry)  # fmt: skip
        self.depth = Gauge("romebert_queue_depth", "inputs in flight (queued or running)", registry=self.registry)

    def observe(self, event: str, value: float) -> None:
        if event == "exit":
            self.exit_layer.observe(value)
        elif event == "batch":
            self.batch.observe(value)
        elif event == "depth":
            self.depth.set(value)


class Service:
    """The classifier, its batcher, the limits and the request handling (``app()`` wires the routes)."""

    def __init__(self, cfg: ServeConfig, clf: EarlyExitClassifier | None = None) -> None:
        self.cfg = cfg
        runtime = {"intra_op_threads": cfg.intra_op_threads} if cfg.intra_op_threads else {}
        if cfg.full_graph:
            if clf is None and not (Path(cfg.source) / MANIFEST_FILE).is_file():
                raise RomebertError(f"{cfg.source}: --full-graph needs an ONNX export made with --full-graph")
            runtime["one_graph"] = True
        self.clf = clf or EarlyExitClassifier.from_pretrained(cfg.source, cfg.device, **runtime)
        # full depth: entropy < 0 never holds, so every input runs to the last layer, whatever the criterion
        self.full_depth = cfg.full_depth or cfg.full_graph
        self.policy = get_policy("entropy", 0.0) if self.full_depth else self.clf.policy()
        temps = self.clf.exit_config.temperatures
        self.num_layers = self.clf.num_layers
        self.metrics = Metrics(self.num_layers, cfg.max_batch)
        self.batcher = ContinuousBatcher(self.clf.segments, self.policy, self.clf.collator, temps, cfg.max_batch,
                                         cfg.max_wait_ms, cfg.max_queue, self.metrics.observe)  # fmt: skip
        self.draining = False

    # ------------------------------------------------------------------------------------ requests
    def parse(self, body: bytes) -> tuple[list[Any], ExitPolicy | None, list[Any] | None]:
        """(inputs, a policy other than the default or None, per-input thresholds or None)."""
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HTTPError(400, f"malformed JSON: {exc}") from None
        if not isinstance(data, dict):
            raise HTTPError(422, "the body must be a JSON object")
        unknown = sorted(set(data) - {"text", "text_pair", "inputs", "threshold", "criterion"})
        if unknown:
            raise HTTPError(422, f"unknown fields {unknown}")
        if "inputs" in data:
            if "text" in data or "text_pair" in data:
                raise HTTPError(422, "give either 'inputs' or 'text' (with 'text_pair'), not both")
            raw = data["inputs"]
            if not isinstance(raw, list) or not raw:
                raise HTTPError(422, "'inputs' must be a non-empty list")
        elif "text" in data:
            raw = [data["text"] if "text_pair" not in data else [data["text"], data["text_pair"]]]
        else:
            raise HTTPError(422, "give 'text' (with 'text_pair' for a pair) or 'inputs'")
        if len(raw) > self.cfg.max_inputs:
            raise HTTPError(422, f"'inputs' has {len(raw)} items; at most {self.cfg.max_inputs} per request")
        inputs = [self._input(i, x) for i, x in enumerate(raw)]
        policy, thresholds = self._policy(data)
        return inputs, policy, thresholds

    def _input(self, i: int, x: Any) -> Any:
        if isinstance(x, dict):
            extra = sorted(set(x) - {"text", "text_pair"})
            if extra or "text" not in x:
                raise HTTPError(422, f"inputs[{i}]: an object needs 'text' (and optionally 'text_pair') only")
            x = x["text"] if "text_pair" not in x else [x["text"], x["text_pair"]]
        texts = [x] if isinstance(x, str) else x
        if not (isinstance(texts, list) and len(texts) in (1, 2) and all(isinstance(t, str) for t in texts)):
            raise HTTPError(422, f"inputs[{i}]: expected a text or a pair of texts")
        for t in texts:
            if len(t) > self.cfg.max_text_chars:
                raise HTTPError(422, f"inputs[{i}]: a text of {len(t)} characters; at most {self.cfg.max_text_chars}")
        return texts[0] if len(texts) == 1 else (texts[0], texts[1])

    def _policy(self, data: dict) -> tuple[ExitPolicy | None, list[Any] | None]:
        criterion, threshold = data.get("criterion"), data.get("threshold")
        if criterion is None and threshold is None:
            return None, None
        if self.full_depth:
            raise HTTPError(422, "this service runs every input to the last layer; it takes no threshold")
        if criterion is not None and criterion not in CRITERIA:
            raise HTTPError(422, f"'criterion' must be one of {list(CRITERIA)}")
        criterion = criterion or self.policy.name
        if threshold is None:
            if criterion != self.policy.name:
                raise HTTPError(422, "a 'criterion' other than the service's needs a 'threshold'")
            return None, None
        lo, hi = self.bounds()[criterion]
        if not isinstance(threshold, int | float) or isinstance(threshold, bool) or not lo <= threshold <= hi:
            raise HTTPError(422, f"'threshold' for {criterion} must be a number in [{lo:.4g}, {hi:.4g}]")
        try:
            policy = self.clf.policy(criterion, float(threshold))
        except RomebertError as exc:
            raise HTTPError(422, str(exc)) from None
        return policy, None

    async def predict(self, body: bytes) -> dict[str, Any]:
        inputs, policy, thresholds = self.parse(body)
        examples = _examples(inputs)
        try:
            features = encode(examples, self.clf.tokenizer, None, self.clf.max_seq_length).features
        except RomebertError as exc:
            raise HTTPError(422, str(exc)) from None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Job] = loop.create_future()

        def done(job: Job) -> None:  # on the batcher's thread
            loop.call_soon_threadsafe(lambda: future.done() or future.set_result(job))

        if self.draining:
            raise HTTPError(503, "the service is shutting down", {"Retry-After": "1"})
        try:
            self.batcher.submit(features, done, policy, thresholds)
        except Overloaded as exc:
            raise HTTPError(503, str(exc), {"Retry-After": "1"}) from None
        job = await future  # a client that disconnects cancels only this wait; its inputs still finish
        if job.error is not None:
            raise HTTPError(500, f"inference failed: {job.error}")
        used = policy or self.policy
        return {"results": self._results(job), "criterion": used.name, "threshold": used.threshold}

    def _results(self, job: Job) -> list[dict[str, Any]]:
        logits = np.stack(job.logits) if job.logits else np.zeros((0, self.clf.segments.num_labels))
        names = self.clf.label_names
        if names is None:
            return [{"value": float(v[0]), "exit_layer": int(k)} for v, k in zip(logits, job.exit_layer)]
        probs = softmax(logits)
        return [
            {"label": names[int(p.argmax())], "probabilities": {n: float(q) for n, q in zip(names, p)},
             "exit_layer": int(k)}
            for p, k in zip(probs, job.exit_layer)
        ]  # fmt: skip

    def bounds(self) -> dict[str, tuple[float, float]]:
        """The thresholds a request may ask for, per criterion: where its decisions can change."""
        options = {k: getattr(self.clf.exit_config, k) for k in OPTION_NAMES}
        c = self.clf.segments.num_labels
        return {name: cls.bounds(c, self.num_layers, **options) for name, cls in POLICIES.items()}

    # ------------------------------------------------------------------------------------ the app
    def app(self):
        from starlette.applications import Starlette
        from starlette.requests import ClientDisconnect, Request
        from starlette.responses import JSONResponse, PlainTextResponse, Response
        from starlette.routing import Route

        service = self

        async def predict(request: Request) -> Response:
            t0 = time.perf_counter()
            try:
                length = request.headers.get("content-length")
                if length is not None and length.isdigit() and int(length) > service.cfg.max_body_bytes:
                    raise HTTPError(413, f"the body has {length} bytes; at most {service.cfg.max_body_bytes}")
                body = bytearray()
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > service.cfg.max_body_bytes:
                        raise HTTPError(413, f"the body is over {service.cfg.max_body_bytes} bytes")
                out = await service.predict(bytes(body))
                status, response = 200, JSONResponse(out)
            except HTTPError as exc:
                status = exc.status
                response = JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)
            except ClientDisconnect:
                status, response = 499, Response(status_code=499)
            service.metrics.requests.labels("predict", str(status)).inc()
            if status >= 400:
                service.metrics.errors.labels(str(status)).inc()
            else:
                service.metrics.latency.observe(time.perf_counter() - t0)
            return response

        async def health(request: Request) -> Response:
            return JSONResponse({"status": "ok"})

        async def ready(request: Request) -> Response:
            if service.draining:
                return JSONResponse({"status": "draining"}, status_code=503)
            return JSONResponse({"status": "ready", "layers": service.num_layers, **service.policy.params()})

        async def metrics(request: Request) -> Response:
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            return PlainTextResponse(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        async def openapi(request: Request) -> Response:
            return JSONResponse(openapi_spec(service))

        @asynccontextmanager
        async def lifespan(app):
            yield
            # uvicorn has stopped taking connections and answered the requests in flight by now;
            # finish whatever is still queued, then stop the worker.
            service.draining = True
            await asyncio.get_running_loop().run_in_executor(None, service.batcher.close)

        routes = [Route("/predict", predict, methods=["POST"]), Route("/health", health), Route("/ready", ready),
                  Route("/metrics", metrics), Route("/openapi.json", openapi)]  # fmt: skip
        return Starlette(routes=routes, lifespan=lifespan)


def openapi_spec(service: Service) -> dict[str, Any]:
    """The OpenAPI 3 description of the service (limits included)."""
    cfg = service.cfg
    bounds = "; ".join(f"{name} [{lo:.4g}, {hi:.4g}]" for name, (lo, hi) in service.bounds().items())
    text = {"type": "string", "maxLength": cfg.max_text_chars}
    item = {"oneOf": [text, {"type": "array", "items": text, "minItems": 2, "maxItems": 2},
                      {"type": "object", "required": ["text"],
                       "properties": {"text": text, "text_pair": text}}]}  # fmt: skip
    request = {"type": "object", "properties": {
        "text": text, "text_pair": text, "inputs": {"type": "array", "items": item, "maxItems": cfg.max_inputs},
        "criterion": {"type": "string", "enum": list(CRITERIA),
                      "description": "; ".join(f"{name}: {cls.rule}" for name, cls in POLICIES.items())},
        "threshold": {"type": "number", "description": f"bounded per criterion: {bounds}"}}}  # fmt: skip
    result = {"type": "object", "properties": {"label": {"type": "string"}, "value": {"type": "number"},
              "probabilities": {"type": "object", "additionalProperties": {"type": "number"}},
              "exit_layer": {"type": "integer", "minimum": 1, "maximum": service.num_layers}}}  # fmt: skip
    error = {"type": "object", "properties": {"error": {"type": "string"}}}

    def answer(description: str, schema: dict | None = None) -> dict:
        out: dict[str, Any] = {"description": description}
        if schema is not None:
            out["content"] = {"application/json": {"schema": schema}}
        return out

    return {
        "openapi": "3.0.3",
        "info": {"title": "romebert early-exit classifier", "version": "1"},
        "paths": {
            "/predict": {
                "post": {
                    "requestBody": {"required": True, "content": {"application/json": {"schema": request}}},
                    "responses": {
                        "200": answer(
                            "per input, in order",
                            {
                                "type": "object",
                                "properties": {
                                    "results": {"type": "array", "items": result},
                                    "criterion": {"type": "string"},
                                    "threshold": {},
                                },
                            },
                        ),
                        "400": answer("malformed JSON", error),
                        "413": answer(f"body over {cfg.max_body_bytes} bytes", error),
                        "422": answer("a field is missing, wrong or over a limit", error),
                        "503": answer("overloaded or shutting down (see Retry-After)", error),
                    },
                }
            },  # fmt: skip
            "/health": {"get": {"responses": {"200": answer("alive")}}},
            "/ready": {"get": {"responses": {"200": answer("ready"), "503": answer("draining")}}},
            "/metrics": {"get": {"responses": {"200": answer("Prometheus text format")}}},
        },
    }


def create_app(cfg: ServeConfig | None = None):
    """The ASGI app; without ``cfg``, from the ROMEBERT_SERVE environment variable (JSON of a
    ServeConfig), as each uvicorn worker process builds it."""
    if cfg is None:
        try:
            cfg = ServeConfig(**json.loads(os.environ["ROMEBERT_SERVE"]))
        except (KeyError, json.JSONDecodeError, TypeError) as exc:
            raise RomebertError(f"ROMEBERT_SERVE must hold the service's settings as JSON ({exc})") from None
    return Service(cfg).app()


def serve(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    """Run the service with uvicorn; ``workers`` processes share the port (each loads the model, and
    ONNX Runtime gets the usable cores divided among them unless ``intra_op_threads`` says otherwise)."""
    import uvicorn

    if workers < 1:
        raise RomebertError(f"--workers must be at least 1, got {workers}")
    if cfg.intra_op_threads is None and workers > 1:
        from romebert.runtime.onnx_runtime import default_threads

        cfg.intra_op_threads = max(1, default_threads() // workers)
    _check_source(cfg.source)  # one line now, rather than a traceback (from every worker)
    opts = {"host": host, "port": port, "log_level": "warning", "timeout_graceful_shutdown": 30}
    if workers == 1:
        uvicorn.run(Service(cfg).app(), **opts)
        return
    os.environ["ROMEBERT_SERVE"] = json.dumps(asdict(cfg))
    uvicorn.run("romebert.deploy.service:create_app", factory=True, workers=workers, **opts)


def _check_source(source: str) -> None:
    from romebert.core.runs import RunFolder
    from romebert.runtime.artefacts import ExportManifest

    path = Path(source)
    if (path / MANIFEST_FILE).is_file():
        ExportManifest.load(path)
    elif RunFolder(path).run_file.is_file():
        RunFolder(path).require_trained()
    elif not path.is_dir():
        raise RomebertError(f"{path}: no such export, classifier or run folder")
