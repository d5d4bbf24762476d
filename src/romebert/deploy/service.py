"""``romebert serve``: an HTTP service for early-exit classification (Starlette on uvicorn).

    POST /predict        {"text": "..."} | {"text": "...", "text_pair": "..."} | {"inputs": [...]}
                         (+ optional "threshold", "criterion"); answers per input its label, its
                         probabilities and the layer it exited at, in input order
    GET  /health         liveness            GET /ready    readiness (model loaded, not draining)
    GET  /metrics        Prometheus text     GET /openapi.json  the contract (``openapi.py``)

Requests from every client share the continuous batcher (``serving.py``). The service keeps no state
between requests, so several workers (processes) or replicas behind any load balancer scale it out.
A request is admitted or refused from its headers alone (``admission.py``); an admitted body is parsed
and tokenized, and its answer written, off the event loop (``parse_threads``) unless it is small. Limits,
each answered with one JSON line: a body over ``max_body_bytes`` -> 413; malformed JSON -> 400; too many
inputs or too long a text, or a bad field -> 422; too much work admitted -> 503 with Retry-After. The
routes are in ``app.py``, the metrics in ``metrics.py``, the accuracy guard in ``guard.py``. Torch-free
for an export; a run folder is served with PyTorch.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from romebert.core.errors import RomebertError
from romebert.core.options import option
from romebert.deploy.app import HTTPError, build_app
from romebert.deploy.classifier import EarlyExitClassifier, _examples
from romebert.deploy.guard import GuardOptions
from romebert.deploy.memory import one_arena, release_memory
from romebert.deploy.metrics import Metrics
from romebert.deploy.serving import ContinuousBatcher, Job
from romebert.runtime.artefacts import MANIFEST_FILE
from romebert.runtime.encoding import encode
from romebert.runtime.exit_policy import ExitPolicy
from romebert.runtime.policies import CRITERIA, get_policy
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
    max_queue: int = option(1024, "inputs in flight (queued, running, or expected from admitted requests) "
                            "before new requests get 503")  # fmt: skip
    max_body_bytes: int = option(1 << 20, "largest request body (413 beyond)")
    max_inputs: int = option(256, "inputs per request (422 beyond)")
    max_text_chars: int = option(10_000, "characters per text (422 beyond)")
    max_pending_requests: int | None = option(None, "requests admitted and not yet answered before new ones "
                                              "get 503 at once (default: --max-queue)")  # fmt: skip
    max_pending_bytes: int | None = option(None, "bytes of admitted bodies not yet tokenized before new requests "
                                           "get 503 at once (default: 2 x --max-body-bytes)")  # fmt: skip
    parse_threads: int = option(1, "threads that parse and tokenize bodies and write answers, off the event loop")
    worker_idle: bool = option(True, "Linux: the batcher's and parse threads run in the SCHED_IDLE class, so the "
                               "event loop, which admits and refuses requests, takes a busy core from them at "
                               "once (--no-worker-idle: --worker-nice instead)")  # fmt: skip
    worker_nice: int = option(10, "with --no-worker-idle: the batcher's and parse threads run this much nicer "
                              "than the event loop")  # fmt: skip
    inline_bytes: int = option(2048, "bodies up to this size are parsed on the event loop (a thread hand-off "
                               "costs more than they do)")  # fmt: skip
    warm_up: bool = option(True, "before taking requests, run a full batch of the longest inputs through every "
                           "layer: the first burst then finds the runtime's first calls made")  # fmt: skip
    system_allocator: bool = option(True, "command line only: restart once with Python's objects on the C heap "
                                    "(PYTHONMALLOC=malloc; glibc's tcache cut to 2), so that what a burst leaves "
                                    "behind pins pages, not 1 MiB arenas, and RSS stays flat across bursts "
                                    "(deploy/memory.py)")  # fmt: skip
    intra_op_threads: int | None = option(None, "ONNX Runtime threads per graph call (default: usable cores / workers)")
    memory_arena: bool = option(False, "ONNX Runtime's CPU memory arena: it keeps the largest batch's memory "
                                "and grows as shapes vary (off: memory goes back to the system when idle)")  # fmt: skip
    device: str = option("cpu", "run and classifier folders only: cpu, cuda, ...")
    full_depth: bool = option(False, "run every input to the last layer (the same service without early exit)")
    full_graph: bool = option(False, "exports made with --full-graph: run the whole model as one graph, final "
                              "head only (the plain model, the baseline without exits)")  # fmt: skip
    guard: GuardOptions = option(help="the accuracy guard (its own flags: --guard-rate, --max-disagreement, ...)",
                                 default_factory=GuardOptions, cli=False)  # fmt: skip

    def __post_init__(self) -> None:
        """Settings no service can run with fail here, in one line naming the flag."""
        if isinstance(self.guard, dict):  # a worker process rebuilds it from JSON
            self.guard = GuardOptions(**self.guard)
        if self.max_pending_requests is None:
            self.max_pending_requests = self.max_queue
        if self.max_pending_bytes is None:
            self.max_pending_bytes = 2 * self.max_body_bytes
        positive = ("max_batch", "max_queue", "max_body_bytes", "max_inputs", "max_text_chars", "max_pending_requests",
                    "max_pending_bytes", "parse_threads")  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise RomebertError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.worker_nice <= 19:
            raise RomebertError(f"--worker-nice must lie in 0..19, got {self.worker_nice}")
        for name in ("max_wait_ms", "inline_bytes"):
            if getattr(self, name) < 0:
                raise RomebertError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if self.intra_op_threads is not None and self.intra_op_threads < 1:
            raise RomebertError(f"--intra-op-threads must be at least 1, got {self.intra_op_threads}")
        if self.guard.enabled and (self.full_depth or self.full_graph):
            raise RomebertError("--guard-rate watches early exits; a --full-depth or --full-graph service has none")


@dataclass
class Prepared:
    """A parsed, tokenized request: its features and the exit rule it asked for (None: the service's)."""

    features: list[dict[str, Any]]
    policy: ExitPolicy | None


class Service:
    """The classifier, its batcher, the limits and the request handling (``app.py`` wires the routes)."""

    def __init__(self, cfg: ServeConfig, clf: EarlyExitClassifier | None = None) -> None:
        self.cfg = cfg
        one_arena()  # before the batcher and parse threads start (deploy/memory.py)
        runtime: dict[str, Any] = {"memory_arena": cfg.memory_arena}  # exports only
        if cfg.intra_op_threads:
            runtime["intra_op_threads"] = cfg.intra_op_threads
        if cfg.full_graph:
            if clf is None and not (Path(cfg.source) / MANIFEST_FILE).is_file():
                raise RomebertError(f"{cfg.source}: --full-graph needs an ONNX export made with --full-graph")
            runtime["one_graph"] = True
        self.clf = clf or EarlyExitClassifier.from_pretrained(cfg.source, cfg.device, **runtime)
        # full depth: entropy < 0 never holds, so every input runs to the last layer, whatever the criterion
        self.full_depth = cfg.full_depth or cfg.full_graph
        self.policy = get_policy("entropy", 0.0) if self.full_depth else self.clf.policy()
        self.num_layers = self.clf.num_layers
        self.metrics = Metrics(self.num_layers, cfg.max_batch)
        self.guard = self.clf.accuracy_guard(cfg.guard) if cfg.guard.enabled else None
        if self.guard is not None:
            self.metrics.watch_guard(self.guard.snapshot)
        self.batcher = ContinuousBatcher(self.clf.segments, self.policy, self.clf.collator,
                                         self.clf.exit_config.temperatures, cfg.max_batch, cfg.max_wait_ms,
                                         cfg.max_queue, self.metrics.observe, self.guard, cfg.worker_nice,
                                         cfg.worker_idle)  # fmt: skip
        self.draining = False
        if cfg.warm_up:
            self.warm_up()

    def warm_up(self) -> None:
        """A batch of ``max_batch`` inputs of ``max_seq_length`` tokens through every layer, on this thread,
        before the service takes requests."""
        long_text = " ".join(["word"] * self.clf.max_seq_length)  # truncated to the longest input
        full = get_policy("entropy", 0.0)  # entropy < 0 never holds: every layer runs
        self.clf.predict_with_exits([long_text] * self.cfg.max_batch, full, batch_size=self.cfg.max_batch)
        release_memory()  # what the batch took goes back: the service starts at its resting size

    # ------------------------------------------------------------------------------------ requests
    def prepare(self, body: bytes) -> Prepared:
        """Parse and tokenize a body (on a parse thread, or on the event loop when it is small)."""
        inputs, policy = self.parse(body)
        try:
            features = encode(_examples(inputs), self.clf.tokenizer, None, self.clf.max_seq_length).features
        except RomebertError as exc:
            raise HTTPError(422, str(exc)) from None
        return Prepared(features, policy)

    def parse(self, body: bytes) -> tuple[list[Any], ExitPolicy | None]:
        """(inputs, a policy other than the default or None); exactly what the OpenAPI document allows."""
        try:
            data = json.loads(body, parse_constant=_not_json)
        except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
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
        return inputs, self._policy(data)

    def _input(self, i: int, x: Any) -> Any:
        if isinstance(x, dict):
            extra = sorted(set(x) - {"text", "text_pair"})
            if extra or "text" not in x:
                raise HTTPError(422, f"inputs[{i}]: an object needs 'text' (and optionally 'text_pair') only")
            x = x["text"] if "text_pair" not in x else [x["text"], x["text_pair"]]
        texts = [x] if isinstance(x, str) else x
        if not (isinstance(texts, list) and len(texts) in (1, 2) and all(isinstance(t, str) for t in texts)) or (
            len(texts) == 1 and not isinstance(x, str)
        ):
            raise HTTPError(422, f"inputs[{i}]: expected a text, a pair of texts or an object with 'text'")
        for t in texts:
            if len(t) > self.cfg.max_text_chars:
                raise HTTPError(422, f"inputs[{i}]: a text of {len(t)} characters; at most {self.cfg.max_text_chars}")
            if not t.isascii():
                try:
                    t.encode("utf-8")
                except UnicodeEncodeError:
                    raise HTTPError(422, f"inputs[{i}]: not a Unicode text (a lone surrogate)") from None
        return texts[0] if len(texts) == 1 else (texts[0], texts[1])

    def _policy(self, data: dict) -> ExitPolicy | None:
        criterion, threshold = data.get("criterion"), data.get("threshold")
        if "criterion" not in data and "threshold" not in data:
            return None
        if self.full_depth:
            raise HTTPError(422, "this service runs every input to the last layer; it takes no threshold")
        if "criterion" in data and criterion not in CRITERIA:
            raise HTTPError(422, f"'criterion' must be one of {list(CRITERIA)}")
        criterion = criterion or self.policy.name
        if "threshold" not in data:
            if criterion != self.policy.name:
                raise HTTPError(422, "a 'criterion' other than the service's needs a 'threshold'")
            return None
        lo, hi = self.bounds()[criterion]
        if not isinstance(threshold, int | float) or isinstance(threshold, bool) or not lo <= threshold <= hi:
            raise HTTPError(422, f"'threshold' for {criterion} must be a number in [{lo:.4g}, {hi:.4g}]")
        try:
            return self.clf.policy(criterion, float(threshold))
        except RomebertError as exc:
            raise HTTPError(422, str(exc)) from None

    def render(self, job: Job, policy: ExitPolicy | None) -> bytes:
        """The 200 answer's body (on a parse thread, or on the event loop when it is small)."""
        if job.error is not None:
            raise HTTPError(500, f"inference failed: {job.error}")
        used = policy or self.policy
        out = {"results": self._results(job), "criterion": used.name, "threshold": job.threshold}
        return json.dumps(out).encode()

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
        return self.clf.threshold_bounds()

    def app(self):
        """The ASGI app (admission in front of the Starlette routes)."""
        return build_app(self)


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def create_app(cfg: ServeConfig | None = None):
    """The ASGI app; without ``cfg``, from the ROMEBERT_SERVE environment variable (JSON of a
    ServeConfig), as each uvicorn worker process builds it."""
    if cfg is None:
        try:
            cfg = ServeConfig(**json.loads(os.environ["ROMEBERT_SERVE"]))
        except (KeyError, json.JSONDecodeError, TypeError) as exc:
            raise RomebertError(f"ROMEBERT_SERVE must hold the service's settings as JSON ({exc})") from None
    return Service(cfg).app()


def uvicorn_settings(**overrides: Any) -> dict[str, Any]:
    """uvicorn's settings for the service: refusals are answered as the head is parsed (shed_protocol.py,
    where httptools is installed)."""
    from romebert.deploy.shed_protocol import protocol_class

    return {"log_level": "warning", "timeout_graceful_shutdown": 30, "http": protocol_class(), **overrides}


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
    opts = uvicorn_settings(host=host, port=port)
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
