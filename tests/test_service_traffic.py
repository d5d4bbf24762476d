"""The service under traffic: admission decides from the headers alone, refusals never wait for other
requests' parsing, a burst gets correct answers and well-formed refusals, and the published contract
is what the server accepts (schemathesis, every check, on the app in-process)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import threading
import time

import aiohttp
import pytest

from romebert.deploy.admission import Admission
from romebert.deploy.classifier import EarlyExitClassifier
from romebert.deploy.guard import GuardOptions
from romebert.deploy.service import ServeConfig, Service

from glue_fixtures import sentence
from serve_fixtures import Server, expected, export_for_serving, metric


@pytest.fixture(scope="module")
def export_dir(tiny_sst2_run, tmp_path_factory):
    return export_for_serving(tiny_sst2_run, tmp_path_factory.mktemp("traffic"))


@pytest.fixture(scope="module")
def reference(export_dir):
    return EarlyExitClassifier.from_pretrained(export_dir, intra_op_threads=1)


# ------------------------------------------------------------------------------------------ admission
def test_admission_counts_requests_bytes_and_expected_inputs():
    in_flight = [0]
    a = Admission(max_requests=3, max_bytes=1000, max_queue=40, max_inputs=16, max_body_bytes=800,
                  in_flight=lambda: in_flight[0])  # fmt: skip
    big = a.admit(900)  # nothing pending: even a body over the byte limit is admitted
    assert not isinstance(big, str) and (a.pending, a.pending_bytes, a.reserved) == (1, 900, 14)  # 900 / 64
    assert "bytes of requests waiting to be parsed; at most 1000" in a.admit(200)
    a.parsed(big)  # tokenized: its bytes and reservation go; it stays pending until answered
    assert (a.pending, a.pending_bytes, a.reserved) == (1, 0, 0)
    in_flight[0] = 30  # its inputs are in the batcher now
    assert "30 inputs in flight or arriving; the queue holds 40" in a.admit(64 * 11)  # 11 more would not fit
    small = a.admit(64 * 10)
    assert not isinstance(small, str) and a.reserved == 10
    unknown = a.admit(None)  # no Content-Length: counts as the largest body and the most inputs
    assert isinstance(unknown, str)  # 30 + 10 + 16 > 40
    in_flight[0] = 0
    a.close(big)
    a.close(big)  # twice is once
    assert a.pending == 1  # the small one
    assert not isinstance(a.admit(10), str) and not isinstance(a.admit(10), str)
    assert a.admit(10) == "3 requests pending; the service takes 3 at once"
    a.learn(3200, 10)  # 320 bytes per input: the estimate follows
    assert a.bytes_per_input == pytest.approx(0.9 * 64 + 0.1 * 320)
    a.draining = True
    assert a.admit(10) == "the service is shutting down"


def test_admission_refuses_at_the_request_limit():
    a = Admission(2, 10_000, 100, 16, 1000, lambda: 0)
    tickets = [a.admit(10), a.admit(10)]
    assert a.admit(10) == "2 requests pending; the service takes 2 at once"
    a.close(tickets[0])
    assert not isinstance(a.admit(10), str)


# ------------------------------------------------------------------------------------------ bursts
async def _burst(url: str, bodies: list[bytes]) -> list[tuple[int, dict, str | None]]:
    """Every body at once from one aiohttp session without a connection limit."""
    async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=0)) as client:

        async def one(body: bytes):
            async with client.post("/predict", data=body, headers={"content-type": "application/json"}) as r:
                return r.status, json.loads(await r.read()), r.headers.get("retry-after")

        return await asyncio.gather(*[one(b) for b in bodies])


def _start(url: str, bodies: list[bytes]) -> tuple[threading.Thread, list]:
    """A burst on a thread of its own; its answers fill the list when it is done."""
    answers: list = []
    runner = threading.Thread(target=lambda: answers.extend(asyncio.run(_burst(url, bodies))))
    runner.start()
    return runner, answers


def _count_prepares(service: Service, gate: threading.Event | None = None) -> list[int]:
    """Count the bodies the service parses (and hold each until ``gate`` opens)."""
    calls = [0]
    prepare = service.prepare

    def counted(body: bytes):
        calls[0] += 1
        if gate is not None:
            assert gate.wait(30)
        return prepare(body)

    service.prepare = counted
    return calls


def test_refusals_never_wait_for_the_parsing_of_others(export_dir, reference):
    """Three requests are admitted and held in tokenizing; every other request of the burst is refused
    with 503 and Retry-After while they are still held (so it waited for no one's parsing), its body
    never parsed; once released, the three are answered correctly."""
    service = Service(ServeConfig(str(export_dir), intra_op_threads=1, max_pending_requests=3, inline_bytes=0))
    gate = threading.Event()
    calls = _count_prepares(service, gate)
    srv = Server(service)
    texts = [[sentence(7 * i + j, 3 + j % 5) for j in range(1 + i % 4)] for i in range(40)]
    bodies = [json.dumps({"inputs": t}).encode() for t in texts]
    try:
        runner, answers = _start(srv.url, bodies)
        _until(lambda: _refused(srv) == 37)
        assert _refused(srv) == 37 and service.admission.pending == 3 and not gate.is_set()  # refused while 3 hang
        gate.set()
        runner.join(30)
    finally:
        gate.set()
        srv.stop()
    statuses = [status for status, _, _ in answers]
    assert statuses.count(200) == 3 and statuses.count(503) == 37 and calls[0] == 3
    for (status, body, retry), t in zip(answers, texts):
        if status == 503:
            assert retry == "1" and "requests pending; the service takes 3 at once" in body["error"]
        else:
            assert [(r["label"], r["exit_layer"]) for r in body["results"]] == expected(reference, t)


def _head_then_body(port: int, body: bytes, keep_alive: bool, read_rest: bool) -> tuple[bytes, bytes | None]:
    """Send a POST /predict's head alone, read the answer that comes before its body is sent, then send
    the body and read on until the server closes: (the answer, what came after it, or None where the
    server had closed before the body came and reset the connection)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        close = b"" if keep_alive else b"Connection: close\r\n"
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + close
                     + f"Content-Length: {len(body)}\r\n\r\n".encode())  # fmt: skip
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
            answer += sock.recv(65536)
        sock.sendall(body)
        rest = b""
        if not read_rest:
            return answer, None
        try:
            while chunk := sock.recv(65536):  # b"" once the server has closed the connection
                rest += chunk
        except ConnectionResetError:
            return answer, None
        return answer, rest


@pytest.mark.parametrize("http", ["protocol", "h11"])
def test_a_refusal_is_answered_from_the_head_alone(export_dir, monkeypatch, http):
    """While one admitted request holds the service, another is refused with 503 and Retry-After before
    its body is sent. Under the default protocol (shed_protocol.py) the refused request never reaches the
    ASGI app, and the connection closes once the body has arrived (with or without keep-alive); with h11
    the admission middleware refuses it the same way, one step later (and uvicorn may close before the
    body comes). Both count it in the metrics."""
    from romebert.deploy.admission import AdmissionMiddleware

    reached = []
    call = AdmissionMiddleware.__call__

    async def spied(self, scope, receive, send):
        if scope.get("path") == "/predict":
            reached.append(scope.get("method"))
        await call(self, scope, receive, send)

    monkeypatch.setattr(AdmissionMiddleware, "__call__", spied)
    service = Service(ServeConfig(str(export_dir), intra_op_threads=1, max_pending_requests=1, inline_bytes=0))
    gate = threading.Event()
    _count_prepares(service, gate)
    srv = Server(service, **({"http": "h11"} if http == "h11" else {}))
    body = json.dumps({"inputs": [sentence(1), sentence(2)]}).encode()
    try:
        runner, answers = _start(srv.url, [body])
        _until(lambda: service.admission.pending == 1)
        for keep_alive in (False, True):
            # (h11 keeps a keep-alive connection open after a refusal: nothing to wait for there)
            answer, rest = _head_then_body(srv.port, body, keep_alive, read_rest=http == "protocol")
            head, _, payload = answer.partition(b"\r\n\r\n")
            lines = head.lower().split(b"\r\n")
            assert lines[0].startswith(b"http/1.1 503") and b"retry-after: 1" in lines
            assert "1 requests pending; the service takes 1 at once" in json.loads(payload)["error"]
            assert rest == b"" if http == "protocol" else rest in (b"", None)  # closed, nothing more said
        assert _refused(srv, "admission") == 2
        gate.set()
        runner.join(30)
    finally:
        gate.set()
        srv.stop()
    assert [status for status, _, _ in answers] == [200]
    assert len(reached) == (1 if http == "protocol" else 3)


def _metrics(srv: Server) -> str:
    import httpx

    return httpx.get(srv.url + "/metrics", timeout=10).text


def test_a_burst_gets_correct_answers_and_fast_refusals_and_leaves_nothing_behind(export_dir, reference):
    """Bursts of 90 requests of 1, 8 or 64 inputs at once, three times, while the model is held until
    every request not admitted has its answer: the queue bound decides who is admitted (from the
    headers), no body refused at admission is parsed, every answer is right, and nothing stays counted."""
    service = Service(ServeConfig(str(export_dir), intra_op_threads=1, max_batch=16, max_queue=128, max_inputs=64))
    calls = _count_prepares(service)
    layer, gate = service.clf.segments.layer, threading.Event()

    def held_layer(index, state):  # the model waits until the refusals are out
        assert gate.wait(30)
        return layer(index, state)

    service.clf.segments.layer = held_layer
    srv = Server(service)
    sizes = (1, 8, 64)
    texts = [[sentence(5 * i + j, 2 + (i + j) % 8) for j in range(sizes[i % 3])] for i in range(90)]
    bodies = [json.dumps({"inputs": t}).encode() for t in texts]
    want = [expected(reference, t) for t in texts]
    parsed = late = 0
    try:
        for _ in range(3):
            gate.clear()
            before = _accounted(srv)
            runner, answers = _start(srv.url, bodies)
            _until(lambda b=before: _accounted(srv) - b == 90)  # each one refused, or admitted and held
            admitted = service.admission.pending
            assert 0 < admitted < 90 and not gate.is_set()
            gate.set()
            runner.join(60)
            statuses = [status for status, _, _ in answers]
            assert statuses.count(200) == admitted and statuses.count(503) == 90 - admitted
            for (status, body, retry), w in zip(answers, want):
                if status == 200:
                    assert [(r["label"], r["exit_layer"]) for r in body["results"]] == w
                else:
                    assert retry == "1" and re.search(
                        "inputs in flight( or arriving)?; the queue holds 128", body["error"]
                    )
            # parsed: the admitted ones, and those the full queue refused right after their own parsing
            # (their size said fewer inputs than they held); never a body refused at admission
            queue_refused = _refused(srv, "queue")
            parsed += admitted + queue_refused - late
            late = queue_refused
            assert calls[0] == parsed
            _until(lambda: service.admission.pending == 0)
            a = service.admission
            assert (a.pending, a.pending_bytes, a.reserved, service.batcher.in_flight) == (0, 0, 0, 0)
    finally:
        gate.set()
        srv.stop()


def _accounted(srv: Server) -> float:
    """Requests refused so far plus those pending, from one scrape (one consistent view); -1 while an
    admitted body is still being parsed (it may yet be refused by the full queue)."""
    text = _metrics(srv)
    if metric(text, "romebert_pending_bytes"):
        return -1.0
    shed = [metric(text, f'romebert_shed_total{{stage="{s}"}}') for s in ("admission", "queue")]
    return sum(shed) + metric(text, "romebert_pending_requests")


def _refused(srv: Server, stage: str | None = None) -> float:
    text = _metrics(srv)
    stages = [stage] if stage else ["admission", "queue"]
    return sum(metric(text, f'romebert_shed_total{{stage="{s}"}}') for s in stages)


def _until(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------ contract
def test_the_published_contract_is_what_the_server_accepts(export_dir):
    """schemathesis (seed 0, 200 examples per operation, positive and negative data, every check,
    positive-data acceptance and negative-data rejection included) on the app in-process; the service
    runs an accuracy guard, so answers carry its per-exit thresholds too."""
    import schemathesis
    from schemathesis.config import SchemathesisConfig
    from schemathesis.engine import events, from_schema
    from schemathesis.generation import GenerationMode

    guard = GuardOptions(guard_rate=0.5, max_disagreement=0.2, guard_every=5)
    # the limits keep every schema-valid body under the byte limit (JSON Schema cannot state it)
    service = Service(ServeConfig(str(export_dir), intra_op_threads=1, max_inputs=4, max_text_chars=40,
                                  max_body_bytes=16384, guard=guard))  # fmt: skip
    config = SchemathesisConfig()
    config.update(seed=0, max_failures=None)
    config.projects.override.checks.update(included_check_names=["all"])
    config.projects.override.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                               max_examples=200, deterministic=True, database="none")  # fmt: skip
    schema = schemathesis.openapi.from_asgi("/openapi.json", service.app(), config=config)
    failures, checks, statuses = [], {}, {}
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            for case_checks in event.recorder.checks.values():
                for check in case_checks:
                    checks[check.name] = checks.get(check.name, 0) + 1
                    if check.status.name != "SUCCESS":
                        failures.append((check.name, str(check.failure_info and check.failure_info.failure)))
            for interaction in event.recorder.interactions.values():
                key = (event.recorder.label, interaction.response and interaction.response.status_code)
                statuses[key] = statuses.get(key, 0) + 1
        elif isinstance(event, events.NonFatalError | events.FatalError):
            failures.append(("error", str(event)))
    service.batcher.close()
    assert not failures, failures[:5]
    for name in ("positive_data_acceptance", "negative_data_rejection", "response_schema_conformance",
                 "status_code_conformance", "not_a_server_error", "unsupported_method"):  # fmt: skip
        assert checks.get(name, 0) > 100, (name, checks)
    assert statuses[("POST /predict", 200)] > 100 and statuses[("POST /predict", 422)] > 100


@pytest.mark.parametrize(
    "body, accepted",
    [
        ({"text": "a", "inputs": ["b"]}, False),  # the case: both shapes
        ({"inputs": [["a"]]}, False),  # a pair needs two texts
        ({"inputs": [["a", "b"]]}, True),
        ({"inputs": [{"text": "a", "text_pair": "b"}]}, True),
        ({"inputs": [{"text": "a", "label": 1}]}, False),
        ({"text_pair": "a"}, False),
        ({"text": "a", "threshold": None}, False),
        ({"text": "a", "criterion": None}, False),
        ({"text": "a", "threshold": True}, False),
        ({"text": "a", "criterion": "entropy"}, True),  # the service's own criterion alone
        ({"text": "a", "criterion": "maxprob"}, False),  # another criterion needs a threshold
        ({"text": "a", "criterion": "maxprob", "threshold": 0.4}, False),  # under 1 / C
        ({"text": "a", "criterion": "maxprob", "threshold": 0.7}, True),
        ({"text": "a", "criterion": "patience", "threshold": 3}, True),
        ({"text": "a", "criterion": "patience", "threshold": 4}, False),  # more exits than the model has
        ({"inputs": []}, False),
        ({"inputs": ["a"] * 5}, False),
        ({"text": "x" * 41}, False),
    ],
)
def test_schema_and_server_agree_on_the_edges(small, body, accepted):
    """Hand-picked bodies at the edges of the contract: the document's schema and the server agree."""
    import jsonschema

    from romebert.deploy.openapi import openapi_spec

    service, client = small
    request = {"$ref": "#/components/schemas/Request", "components": openapi_spec(service)["components"]}
    valid = jsonschema.Draft7Validator(request).is_valid(body)
    status = client.post("/predict", content=json.dumps(body)).status_code
    assert (valid, status) == (accepted, 200 if accepted else 422)


@pytest.fixture(scope="module")
def small(export_dir):
    """A service with small limits, and its client in-process."""
    from starlette.testclient import TestClient

    service = Service(ServeConfig(str(export_dir), intra_op_threads=1, max_inputs=4, max_text_chars=40))
    yield service, TestClient(service.app())
    service.batcher.close()


def test_a_lone_surrogate_or_a_nan_is_refused_in_one_line(small):
    _, client = small
    res = client.post("/predict", content=b'{"text": "a\\ud800b"}')
    assert res.status_code == 422 and "not a Unicode text" in res.json()["error"]
    res = client.post("/predict", content=b'{"text": "a", "threshold": NaN}')
    assert res.status_code == 400 and "NaN is not JSON" in res.json()["error"]


@pytest.mark.parametrize("idle", [True, False])
def test_the_batcher_and_parse_threads_yield_to_the_event_loop(export_dir, idle):
    """--worker-idle (the default): the threads that run the model and parse bodies are in the SCHED_IDLE
    class; --no-worker-idle: --worker-nice nicer than the loop (Linux, where a thread has its own
    scheduling; CI runs there)."""
    import os
    import sys

    service = Service(ServeConfig(str(export_dir), intra_op_threads=1, worker_nice=7, worker_idle=idle, inline_bytes=0))
    threads: list[int] = []
    prepare = service.prepare
    service.prepare = lambda body: (threads.append(threading.get_native_id()), prepare(body))[1]
    srv = Server(service)
    try:
        import httpx

        assert httpx.post(srv.url + "/predict", json={"text": sentence(1)}, timeout=30).status_code == 200
        assert threads[0] != threading.get_native_id()  # parsed off this (the client's) thread
        if sys.platform.startswith("linux"):
            base = os.getpriority(os.PRIO_PROCESS, 0)
            for tid in (service.batcher._thread.native_id, threads[0]):
                if idle:
                    assert os.sched_getscheduler(tid) == os.SCHED_IDLE
                else:
                    assert os.sched_getscheduler(tid) == os.SCHED_OTHER
                    assert os.getpriority(os.PRIO_PROCESS, tid) == min(19, base + 7)
            assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the event loop's thread keeps its class
    finally:
        srv.stop()


def test_the_objects_alive_at_startup_leave_the_collectors_generations(export_dir):
    """gc.freeze at startup (deploy/memory.py): a burst's collections then walk only the burst's objects
    (results/serve_burst.md has what that did to refusal latency and RSS)."""
    import gc

    gc.unfreeze()
    srv = Server(Service(ServeConfig(str(export_dir), intra_op_threads=1)))
    try:
        assert gc.get_freeze_count() > 10_000  # the modules, the sessions' Python side, the app
    finally:
        srv.stop()
        gc.unfreeze()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only")
@pytest.mark.parametrize("preset", [None, "pymalloc"])
def test_a_process_restarts_once_with_its_objects_on_the_c_heap(preset):
    """restart_on_c_heap (deploy/memory.py): the same command line runs again with PYTHONMALLOC=malloc and
    glibc's small tcache, once; a PYTHONMALLOC the user set is kept, and nothing restarts."""
    import subprocess

    code = ("import os, sys; from romebert.deploy.memory import objects_on_c_heap, restart_on_c_heap; "
            "print(objects_on_c_heap(), os.environ.get('GLIBC_TUNABLES'), flush=True); restart_on_c_heap(); "
            "print('went on', sys.argv[1:])")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONMALLOC", "GLIBC_TUNABLES")}
    if preset:
        env["PYTHONMALLOC"] = preset
    out = subprocess.run([sys.executable, "-c", code, "a", "b"], env=env, capture_output=True, text=True, check=True)
    if preset:
        assert out.stdout.splitlines() == ["False None", "went on ['a', 'b']"]
    else:
        assert out.stdout.splitlines() == ["False None", "True glibc.malloc.tcache_count=2", "went on ['a', 'b']"]


@pytest.mark.parametrize("warm_up", [True, False])
def test_the_service_warms_up_before_its_first_request(export_dir, monkeypatch, warm_up):
    """--warm-up (the default): a full batch of the longest inputs runs through every layer while the
    service starts; --no-warm-up leaves the first calls to the first requests."""
    from romebert.runtime.onnx_runtime import OrtSegments

    shapes: list[tuple[int, tuple]] = []
    layer = OrtSegments.layer

    def spied(self, i, state, **kw):
        shapes.append((i, state.arrays["attention_mask"].shape))
        return layer(self, i, state, **kw)

    monkeypatch.setattr(OrtSegments, "layer", spied)
    service = Service(ServeConfig(str(export_dir), intra_op_threads=1, max_batch=4, warm_up=warm_up))
    full = (4, service.clf.max_seq_length)  # max_batch rows of the longest input
    assert shapes == ([(i, full) for i in range(service.num_layers)] if warm_up else [])
