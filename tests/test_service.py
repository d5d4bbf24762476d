"""`romebert serve` as a real server on loopback with a tiny exported model: every request shape, every
limit, overload, continuous batching with each request's own results, metrics, and shutdown."""

from __future__ import annotations

import asyncio
import math
import threading
import time

import httpx
import numpy as np
import pytest

from romebert.cli import main
from romebert.core.errors import RomebertError
from romebert.deploy.classifier import EarlyExitClassifier
from romebert.deploy.service import ServeConfig, Service

from glue_fixtures import sentence
from serve_fixtures import Server, expected, free_port, metric, post


@pytest.fixture(scope="module")
def export_dir(tiny_sst2_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "export"
    assert main(["export", str(tiny_sst2_run), "-o", str(out), "--threshold", "0.5", "--full-graph"]) == 0
    return out


@pytest.fixture(scope="module")
def server(export_dir):
    srv = Server(Service(ServeConfig(str(export_dir), max_batch=8, max_wait_ms=20, max_queue=64, max_inputs=16,
                                     max_text_chars=200, max_body_bytes=4000, intra_op_threads=1)))  # fmt: skip
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def reference(export_dir):
    return EarlyExitClassifier.from_pretrained(export_dir, intra_op_threads=1)


def test_every_request_shape(server, reference):
    one = post(server, {"text": "the cat sat ."})
    assert one.status_code == 200
    r = one.json()["results"]
    assert len(r) == 1 and set(r[0]) == {"label", "probabilities", "exit_layer"}
    assert abs(sum(r[0]["probabilities"].values()) - 1.0) < 1e-6
    assert (r[0]["label"], r[0]["exit_layer"]) == expected(reference, ["the cat sat ."])[0]
    pair = post(server, {"text": "a dog ran", "text_pair": "a man saw a bird"}).json()["results"]
    assert (pair[0]["label"], pair[0]["exit_layer"]) == expected(reference, [("a dog ran", "a man saw a bird")])[0]
    texts = [sentence(i, 2 + i) for i in range(6)]
    mixed = [texts[0], [texts[1], texts[2]], {"text": texts[3]}, {"text": texts[4], "text_pair": texts[5]}]
    got = post(server, {"inputs": mixed}).json()["results"]
    want = expected(reference, [texts[0], (texts[1], texts[2]), texts[3], (texts[4], texts[5])])
    assert [(g["label"], g["exit_layer"]) for g in got] == want
    # a threshold of the request's own (within bounds), and another criterion
    deep = post(server, {"inputs": texts, "threshold": 0.0}).json()
    assert deep["threshold"] == 0.0 and all(g["exit_layer"] == reference.num_layers for g in deep["results"])
    mp = post(server, {"inputs": texts, "criterion": "maxprob", "threshold": 0.6}).json()
    want = expected(reference, texts, criterion="maxprob", threshold=0.6)
    assert [(g["label"], g["exit_layer"]) for g in mp["results"]] == want


@pytest.mark.parametrize(
    "payload, status, message",
    [
        (b"{not json", 400, "malformed JSON"),
        ({"texts": ["x"]}, 422, "unknown fields"),
        ({"inputs": []}, 422, "non-empty list"),
        ({"inputs": ["a"] * 17}, 422, "at most 16 per request"),
        ({"text": "word " * 50}, 422, "at most 200"),
        ({"inputs": [3]}, 422, "inputs\\[0\\]: expected a text"),
        ({"text": "a", "threshold": 2.0}, 422, "must be a number in \\[0, 0.6931\\]"),
        ({"text": "a", "criterion": "margin", "threshold": 0.1}, 422, "'criterion' must be one of"),
        ({"text": "a", "criterion": "maxprob"}, 422, "needs a 'threshold'"),
        (b'{"text": "a"}' + b" " * 4000, 413, "at most 4000"),  # valid JSON, within the other limits
    ],
)
def test_limits_and_bad_requests(server, payload, status, message):
    import re

    res = post(server, payload)
    assert res.status_code == status
    assert re.search(message, res.json()["error"]), res.json()


def test_overload_answers_503_with_retry_after(export_dir):
    srv = Server(Service(ServeConfig(str(export_dir), max_queue=3, max_wait_ms=200, intra_op_threads=1)))
    try:

        async def burst():
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
                return await asyncio.gather(*[client.post("/predict", json={"inputs": ["a b c"] * 2})
                                              for _ in range(6)])  # fmt: skip

        statuses = [r.status_code for r in asyncio.run(burst())]
        assert 200 in statuses and 503 in statuses
        refused = next(r for r in asyncio.run(burst()) if r.status_code == 503)
        assert refused.headers["retry-after"] == "1" and "in flight" in refused.json()["error"]
    finally:
        srv.stop()


def test_concurrent_requests_share_batches_and_get_their_own_results(export_dir, reference):
    srv = Server(Service(ServeConfig(str(export_dir), max_batch=16, max_wait_ms=50, intra_op_threads=1)))
    texts = [[sentence(7 * i + j, 1 + (i + j) % 9) for j in range(1 + i % 3)] for i in range(24)]
    try:

        async def clients():
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
                return await asyncio.gather(*[client.post("/predict", json={"inputs": t}) for t in texts])

        answers = asyncio.run(clients())
        for t, a in zip(texts, answers):
            assert a.status_code == 200
            assert [(g["label"], g["exit_layer"]) for g in a.json()["results"]] == expected(reference, t)
        metrics = httpx.get(srv.url + "/metrics").text
        rows = _histogram(metrics, "romebert_batch_rows")
        assert rows["count"] > 0 and rows["sum"] / rows["count"] > 1.5  # inputs of several requests per call
    finally:
        srv.stop()


def _histogram(text: str, name: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        for part in ("count", "sum"):
            if line.startswith(f"{name}_{part} "):
                out[part] = float(line.split()[-1])
    return out


def test_health_ready_openapi_and_counting_metrics(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/ready").json()
    assert ready["status"] == "ready" and ready["criterion"] == "entropy" and ready["threshold"] == 0.5
    spec = httpx.get(server.url + "/openapi.json").json()
    assert spec["openapi"].startswith("3.") and "/predict" in spec["paths"]
    before = metric(httpx.get(server.url + "/metrics").text, 'romebert_requests_total{endpoint="predict",status="200"}')
    for _ in range(3):
        assert post(server, {"text": "good movie"}).status_code == 200
    post(server, b"{")
    text = httpx.get(server.url + "/metrics").text
    assert metric(text, 'romebert_requests_total{endpoint="predict",status="200"}') == before + 3
    assert metric(text, 'romebert_errors_total{status="400"}') >= 1
    assert _histogram(text, "romebert_request_latency_seconds")["count"] >= 3
    assert _histogram(text, "romebert_exit_layer")["count"] >= 3
    assert "romebert_queue_depth" in text


def test_shutdown_answers_the_requests_in_flight(export_dir):
    srv = Server(Service(ServeConfig(str(export_dir), max_batch=4, max_wait_ms=100, intra_op_threads=1)))

    async def clients():
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
            tasks = [asyncio.create_task(client.post("/predict", json={"inputs": [sentence(i)] * 3}))
                     for i in range(8)]  # fmt: skip
            await asyncio.sleep(0.05)  # they are in flight (the batcher waits up to 100 ms for company)
            srv.server.should_exit = True
            return await asyncio.gather(*tasks)

    answers = asyncio.run(clients())
    srv.thread.join(20)
    assert [a.status_code for a in answers] == [200] * 8
    assert all(len(a.json()["results"]) == 3 for a in answers)
    assert srv.service.batcher.in_flight == 0


def test_a_client_that_disconnects_does_not_break_its_batch(export_dir, reference):
    srv = Server(Service(ServeConfig(str(export_dir), max_batch=8, max_wait_ms=100, intra_op_threads=1)))
    texts = [sentence(i, 3 + i % 5) for i in range(5)]
    try:

        async def clients():
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
                quitter = asyncio.create_task(client.post("/predict", json={"inputs": texts}))
                stayer = asyncio.create_task(client.post("/predict", json={"inputs": texts[::-1]}))
                await asyncio.sleep(0.02)
                quitter.cancel()  # the connection goes away while its inputs wait in the batch
                return await stayer

        answer = asyncio.run(clients())
        assert answer.status_code == 200
        assert [(g["label"], g["exit_layer"]) for g in answer.json()["results"]] == expected(reference, texts[::-1])
        time.sleep(0.3)
        assert srv.service.batcher.in_flight == 0 and post(srv, {"text": "still fine"}).status_code == 200
    finally:
        srv.stop()


def test_full_depth_and_full_graph_services_give_the_final_exits_answers(export_dir, reference):
    # --full-depth runs the segments to the last layer, --full-graph the export's one-graph plain model:
    # the same answers (the final exit's), every input counted at the last layer.
    texts = [sentence(i) for i in range(7)]
    final = reference.predict_proba(texts, criterion="entropy", threshold=0.0)
    for flags in ({"full_depth": True}, {"full_graph": True}):
        service = Service(ServeConfig(str(export_dir), intra_op_threads=1, **flags))
        srv = Server(service)
        try:
            got = post(srv, {"inputs": texts}).json()["results"]
            assert {g["exit_layer"] for g in got} == {service.num_layers} and service.num_layers > 1
            probs = np.array([[g["probabilities"][n] for n in reference.label_names] for g in got])
            assert np.abs(probs - final).max() < 1e-4, flags
            assert post(srv, {"text": "a", "threshold": 0.3}).status_code == 422
            metrics = httpx.get(srv.url + "/metrics").text
            exits = _histogram(metrics, "romebert_exit_layer")
            assert exits["count"] == len(texts) and exits["sum"] == len(texts) * service.num_layers
        finally:
            srv.stop()


def test_full_graph_needs_an_export_that_has_one(export_dir, tiny_sst2_run, tmp_path):
    bare = tmp_path / "bare"
    assert main(["export", str(tiny_sst2_run), "-o", str(bare), "--threshold", "0.5"]) == 0
    with pytest.raises(RomebertError, match="no whole-model graph"):
        Service(ServeConfig(str(bare), full_graph=True))
    with pytest.raises(RomebertError, match="needs an ONNX export"):
        Service(ServeConfig(str(tiny_sst2_run), full_graph=True))


def test_a_run_folder_is_served_with_pytorch(tiny_sst2_run):
    srv = Server(Service(ServeConfig(str(tiny_sst2_run), intra_op_threads=1)))
    try:
        got = post(srv, {"inputs": ["the movie was good .", "bad"]}).json()["results"]
        ref = EarlyExitClassifier.from_run(tiny_sst2_run, device="cpu").predict_with_exits(
            ["the movie was good .", "bad"])  # fmt: skip
        assert [(g["label"], g["exit_layer"]) for g in got] == list(zip(ref.labels, ref.exit_layers.tolist()))
    finally:
        srv.stop()


def test_batcher_results_match_the_engine(export_dir, reference):
    """The continuous batcher (no HTTP) gives every input the engine's decision, whatever its arrival."""
    from romebert.data.examples import Example
    from romebert.deploy.serving import ContinuousBatcher
    from romebert.runtime.encoding import encode

    texts = [sentence(i, 1 + (i * 3) % 10) for i in range(40)]
    feats = encode([Example(str(i), t, None, None) for i, t in enumerate(texts)], reference.tokenizer, None, 32)
    batcher = ContinuousBatcher(reference.segments, reference.policy(), reference.collator, max_batch=8, max_wait_ms=2)
    jobs, done = [], threading.Event()
    left = [len(texts) // 4]

    def finished(job):
        left[0] -= 1
        if left[0] == 0:
            done.set()

    for k in range(0, len(texts), 4):
        jobs.append(batcher.submit(feats.features[k : k + 4], finished))
        time.sleep(0.001 * (k % 3))
    assert done.wait(30)
    batcher.close()
    got = [(int(np.argmax(lg)), k) for job in jobs for lg, k in zip(job.logits, job.exit_layer)]
    ref = reference.predict_with_exits(texts)
    assert got == [(reference.label_names.index(lab), int(k)) for lab, k in zip(ref.labels, ref.exit_layers)]


def test_per_request_criterion_and_threshold(server, reference):
    texts = [sentence(i, 2 + i % 7) for i in range(12)]
    for options in ({"threshold": 0.05}, {"criterion": "patience", "threshold": 2},
                    {"criterion": "patience-confidence", "threshold": 0.3}, {"criterion": "energy", "threshold": 0.3},
                    {"criterion": "agreement", "threshold": 0.6}, {"criterion": "cap", "threshold": 0.3}):  # fmt: skip
        res = post(server, {"inputs": texts, **options}).json()
        assert res["threshold"] == options["threshold"]
        assert [(g["label"], g["exit_layer"]) for g in res["results"]] == expected(reference, texts, **options)
    layers = [g["exit_layer"] for g in post(server, {"inputs": texts, "threshold": math.log(2)}).json()["results"]]
    assert layers == [1] * len(texts)  # the entropy of two classes is below ln 2 (the bound): all leave at exit 1


def test_a_request_is_answered_when_its_inputs_exit_not_when_the_batch_ends(reference):
    """Two requests in one batch: the one whose inputs all leave at exit 1 completes before the layer
    calls that the other still needs."""
    from romebert.data.examples import Example
    from romebert.deploy.serving import ContinuousBatcher
    from romebert.runtime.encoding import encode

    events: list[tuple[str, float]] = []
    feats = encode([Example(str(i), sentence(i, 4), None, None) for i in range(6)], reference.tokenizer, None).features
    batcher = ContinuousBatcher(reference.segments, reference.policy(), reference.collator, max_batch=8,
                                max_wait_ms=200, observe=lambda e, v: events.append((e, v)))  # fmt: skip
    done = threading.Event()
    early = batcher.submit(feats[:3], lambda job: events.append(("early done", 0)), thresholds=[math.log(2)] * 3)
    late = batcher.submit(feats[3:], lambda job: (events.append(("late done", 0)), done.set()), thresholds=[0.0] * 3)
    assert done.wait(30)
    batcher.close()
    calls = [i for i, (e, _) in enumerate(events) if e == "batch"]
    assert [events[i][1] for i in calls] == [6] + [3] * (reference.num_layers - 1)  # one batch, then the survivors
    assert calls[0] < events.index(("early done", 0)) < calls[1]
    assert early.exit_layer == [1, 1, 1] and late.exit_layer == [reference.num_layers] * 3


def test_several_worker_processes_share_one_port(export_dir, reference):
    """`romebert serve --workers 2`, as a user starts it: two uvicorn worker processes, each with its
    own model, answer on one port, and SIGTERM stops them all."""
    import os
    import signal
    import subprocess
    import sys

    import psutil

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "romebert", "serve", str(export_dir), "--port", str(port),
                             "--workers", "2"], stderr=subprocess.PIPE, env={**os.environ})  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        kids = psutil.Process(proc.pid).children(recursive=True)
        workers = [c for c in kids if "spawn_main" in " ".join(c.cmdline())]  # not the resource tracker
        assert len(workers) == 2, [c.cmdline() for c in kids]
        for w in [proc, *workers]:  # serve restarted itself with Python's objects on the C heap (memory.py)
            assert psutil.Process(w.pid).environ().get("PYTHONMALLOC") == "malloc"
        for text in [sentence(i) for i in range(12)]:  # a connection each: the kernel spreads them
            r = httpx.post(url + "/predict", json={"text": text}, timeout=30)
            assert r.status_code == 200
            got = r.json()["results"][0]
            assert (got["label"], got["exit_layer"]) == expected(reference, [text])[0]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(30) == 0, proc.stderr.read().decode()[-2000:]
        finally:
            proc.kill()
