"""Bursts against `romebert serve` on loopback: shedding before work, and RSS across repeated bursts (soak).

Each burst sends ``--requests`` requests at once, each with 1, 8, 64 or 256 SST-2 dev sentences (cycling
through ``--sizes``); ``--bursts`` bursts run one after the other, each once the previous one is fully
answered. The client (``--client``): by default one asyncio loop that opens a connection per request and
writes the request the moment it opens (microseconds of client work per request, so a latency is what
the service made it wait); ``aiohttp``: one aiohttp session without a connection limit, as the issue
measured (its event loop writes and reads 1,500 requests in turns, and its own backlog adds to every
latency). For every request: its status, its latency from
the moment the burst starts, and its body (a 200 must hold one result per input, in order, each the
label and exit layer of the same export run offline; a 503 must carry Retry-After and a JSON error).
Per burst: p50 / p99 / max of refused and of accepted requests, the inputs answered per second, and
the service's RSS (with its worker processes) after the burst. The targets:

- refused requests answered within 100 ms at p99;
- accepted requests within 2 s at p99, or within what the queue bound allows at the measured
  throughput (``max_queue / inputs per second``), whichever is larger;
- RSS after each burst past the first within 2 % of RSS after the first.

Client and service are pinned to separate cores as in ``serve_load.py``:

    python benchmarks/serve_burst.py --export runs/bench-work/serve-sst2-int8 \\
        --service-cpus 0 --client-cpus 1

Writes results/serve_burst.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"refused_p99_s": 0.1, "accepted_p99_s": 2.0, "rss_growth": 0.02}
CLIENTS = {"raw": "a connection per request, written as it opens", "aiohttp": "one session, no connection limit"}


class _Exchange(asyncio.Protocol):
    """One request on its own connection: written the moment the connection is made, timed to the last
    byte of the answer (``Connection: close``, so the answer ends with the connection or its length)."""

    def __init__(self, request: bytes, done: asyncio.Future) -> None:
        self.request, self.done, self.buffer, self.sent = request, done, bytearray(), 0.0

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.sent = time.perf_counter()
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        head, sep, body = bytes(self.buffer).partition(b"\r\n\r\n")
        if sep and not self.done.done():
            length = next((int(v) for k, _, v in (h.partition(b":") for h in head.split(b"\r\n")[1:])
                           if k.strip().lower() == b"content-length"), None)  # fmt: skip
            if length is not None and len(body) >= length:
                self.done.set_result((time.perf_counter(), bytes(self.buffer)))
                self.transport.close()

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            self.done.set_result((time.perf_counter(), bytes(self.buffer)))


async def burst_raw(host: str, port: int, bodies: list[bytes], sizes: list[int], timeout: float) -> list[dict]:
    """Every body at once, each on a connection opened for it: a few microseconds of client work per
    request, so the latencies are the service's (an aiohttp client adds its own event loop's backlog)."""
    loop = asyncio.get_running_loop()
    head = f"POST /predict HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\nConnection: close\r\n"
    out: list[dict] = [{} for _ in bodies]
    start = time.perf_counter()

    async def one(i: int) -> None:
        done: asyncio.Future = loop.create_future()
        request = (head + f"Content-Length: {len(bodies[i])}\r\n\r\n").encode() + bodies[i]
        try:
            _, protocol = await loop.create_connection(lambda: _Exchange(request, done), host, port)
            end, raw = await asyncio.wait_for(done, timeout)
            out[i] = _parse(raw)
            out[i].update(waited=end - start, latency=end - protocol.sent)
        except (OSError, TimeoutError) as exc:
            out[i] = {"status": type(exc).__name__, "body": b"", "waited": time.perf_counter() - start}
            out[i]["latency"] = out[i]["waited"]
        out[i]["size"] = sizes[i]

    await asyncio.gather(*[one(i) for i in range(len(bodies))])
    return out


def _parse(raw: bytes) -> dict:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    if not lines or len(lines[0].split()) < 2:
        return {"status": "no answer", "body": b""}
    headers = {k.strip().lower().decode(): v.strip().decode() for k, _, v in (h.partition(b":") for h in lines[1:])}
    return {"status": int(lines[0].split()[1]), "retry_after": headers.get("retry-after"), "body": body}


async def burst_aiohttp(url: str, bodies: list[bytes], sizes: list[int], timeout: float) -> list[dict]:
    """Every body at once from one aiohttp session (no connection limit), as the issue's client did."""
    sent: dict[int, float] = {}

    async def on_sent(session, ctx, params) -> None:
        sent[ctx.trace_request_ctx["i"]] = time.perf_counter()

    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(on_sent)
    connector = aiohttp.TCPConnector(limit=0)  # as many connections as requests
    out: list[dict] = [{} for _ in bodies]
    timeouts = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeouts, trace_configs=[trace]) as client:
        start = time.perf_counter()

        async def one(i: int) -> None:
            try:
                async with client.post("/predict", data=bodies[i], headers={"content-type": "application/json"},
                                       trace_request_ctx={"i": i}) as r:  # fmt: skip
                    payload = await r.read()
                    out[i] = {"status": r.status, "retry_after": r.headers.get("retry-after"), "body": payload}
            except (TimeoutError, aiohttp.ClientError) as exc:
                out[i] = {"status": type(exc).__name__, "body": b""}
            end = time.perf_counter()
            out[i].update(waited=end - start, latency=end - sent.get(i, start), size=sizes[i])

        await asyncio.gather(*[one(i) for i in range(len(bodies))])
    return out


def check(rows: list[dict], want: list[list[tuple[str, int]]], labels: list[str], layers: int) -> dict:
    """Statuses; answers that are wrong (a 200 without one well-formed result per input, a 503 without
    Retry-After and a JSON error); and the share of answers equal to the export's offline (below 1 for an
    int8 export: its activations are quantized per batch, so a borderline input can change with its
    batch-mates)."""
    statuses: dict[str, int] = {}
    wrong, same, total = 0, 0, 0
    for row, expected in zip(rows, want):
        statuses[str(row["status"])] = statuses.get(str(row["status"]), 0) + 1
        if row["status"] == 200:
            got = [(r["label"], r["exit_layer"]) for r in json.loads(row["body"])["results"]]
            wrong += len(got) != len(expected) or any(g not in labels or not 1 <= k <= layers for g, k in got)
            same += sum(g == e for g, e in zip(got, expected))
            total += len(expected)
        elif row["status"] == 503:
            wrong += row["retry_after"] is None or "error" not in json.loads(row["body"])
    return {"statuses": statuses, "wrong_answers": wrong, "same_as_offline": same / total if total else None}


def summary(rows: list[dict]) -> dict:
    def pct(values: list[float]) -> dict:
        v = np.asarray(values)
        return {k: float(np.percentile(v, q)) if v.size else None for k, q in (("p50", 50), ("p99", 99), ("max", 100))}

    ok = [r for r in rows if r["status"] == 200]
    refused = [r for r in rows if r["status"] == 503]
    inputs = sum(r["size"] for r in ok)
    last = max((r["waited"] for r in ok), default=0.0)
    return {"accepted": pct([r["latency"] for r in ok]), "refused": pct([r["latency"] for r in refused]),
            "accepted_waited": pct([r["waited"] for r in ok]), "refused_waited": pct([r["waited"] for r in refused]),
            "accepted_inputs": inputs, "inputs_per_s": inputs / last if last else 0.0}  # fmt: skip


def rss(pid: int) -> int:
    import psutil

    proc = psutil.Process(pid)
    return proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))


def python_allocator(pid: int) -> str:
    """The service's allocator for Python objects, as its environment set it (``romebert serve`` restarts
    itself with PYTHONMALLOC=malloc unless told not to)."""
    import psutil

    env = psutil.Process(pid).environ()
    return f"PYTHONMALLOC={env['PYTHONMALLOC']}" if "PYTHONMALLOC" in env else "pymalloc"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", required=True, help="an ONNX export (int8) to serve")
    p.add_argument("--requests", type=int, default=1500, help="requests per burst, all sent at once")
    p.add_argument("--sizes", default="1,8,64,256", help="inputs per request, cycling")
    p.add_argument("--bursts", type=int, default=5, help="bursts, one after the other (the soak)")
    p.add_argument("--pause", type=float, default=2.0, help="seconds between bursts (and before reading RSS)")
    p.add_argument("--timeout", type=float, default=120.0, help="client timeout per request, seconds")
    p.add_argument("--client", choices=("raw", "aiohttp"), default="raw",
                   help="raw: a connection per request, written as it opens (the service's latency); aiohttp: one "
                   "aiohttp session, as the issue measured (its own event loop's backlog included)")  # fmt: skip
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per worker")
    p.add_argument("--serve-args", default="", help="more `romebert serve` flags, e.g. '--max-queue 512'")
    serve_load.add_pinning(p, "the client")
    p.add_argument("--out", default="results/serve_burst")
    args = p.parse_args(argv)
    serve_load.pin_client(args)
    sys.path.insert(0, str(ROOT / "src"))
    from romebert.core.environment import environment, now
    from romebert.core.files import write_atomic
    from romebert.data.spec import DataSpec
    from romebert.deploy.classifier import EarlyExitClassifier
    from romebert.deploy.service import ServeConfig
    from romebert.runtime.artefacts import ExportManifest

    manifest = ExportManifest.load(args.export)
    data = DataSpec(**manifest.data)
    texts = [e.text_a for e in data.examples(data.eval_splits()[0])]
    sizes = [int(s) for s in args.sizes.split(",")]
    per_request = [
        [texts[(7 * i + j) % len(texts)] for j in range(sizes[i % len(sizes)])] for i in range(args.requests)
    ]
    bodies = [json.dumps({"inputs": t}).encode() for t in per_request]
    # what each request must get: the export's own answers, offline
    reference = EarlyExitClassifier.from_pretrained(args.export, intra_op_threads=args.threads)
    unique = sorted({t for ts in per_request for t in ts})
    out = reference.predict_with_exits(unique)
    answer = {t: (label, int(k)) for t, label, k in zip(unique, out.labels, out.exit_layers)}
    want = [[answer[t] for t in ts] for ts in per_request]
    flags = shlex.split(args.serve_args)
    max_queue = ServeConfig("", **_flag_values(flags)).max_queue
    port = serve_load.free_port()
    proc = serve_load.start(args.export, port, args.workers, args.threads, flags, serve_load._cpus(args.service_cpus))
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        serve_load._run(serve_load.open_loop(url, texts, 20, 1.0, args.timeout))  # warm-up
        before = rss(proc.pid)
        allocator = python_allocator(proc.pid)
        for b in range(args.bursts):
            size = [len(t) for t in per_request]
            if args.client == "raw":
                results = serve_load._run(burst_raw("127.0.0.1", port, bodies, size, args.timeout))
            else:
                results = serve_load._run(burst_aiohttp(url, bodies, size, args.timeout))
            time.sleep(args.pause)
            row = {
                "burst": b + 1,
                **check(results, want, reference.label_names, manifest.num_layers),
                **summary(results),
                "rss_bytes": rss(proc.pid),
            }
            rows.append(row)
            ms = serve_load._ms
            print(f"burst {b + 1}: {row['statuses']}, wrong {row['wrong_answers']}, refused p99 "
                  f"{ms(row['refused']['p99'])} ms, accepted p99 {ms(row['accepted']['p99'])} ms, "
                  f"{row['inputs_per_s']:.0f} inputs/s, RSS {row['rss_bytes'] / 2**20:.1f} MiB",
                  flush=True)  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(60)
    report = {"created": now(), "command": shlex.join(["python", "benchmarks/serve_burst.py", *(argv or sys.argv[1:])]),
              "environment": environment(), "export": {"task": manifest.task, "precision": manifest.precision,
              "layers": manifest.num_layers, **manifest.early_exit.policy().params(), "source": manifest.source},
              "requests": args.requests, "sizes": sizes, "bursts": args.bursts, "max_queue": max_queue,
              "workers": args.workers, "threads": args.threads, "serve_args": args.serve_args,
              "service_cpus": args.service_cpus, "client_cpus": args.client_cpus, "rss_before_bytes": before,
              "client": args.client, "python_allocator": allocator,
              "rows": rows, "verdict": verdict(rows, max_queue)}  # fmt: skip
    path = Path(args.out)
    write_atomic(path.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    write_atomic(path.with_suffix(".md"), markdown(report) + "\n")
    print(markdown(report))
    return report


def _flag_values(flags: list[str]) -> dict:
    """The ServeConfig settings among `romebert serve` flags (for the queue bound the report uses)."""
    from romebert.cli.parser import build_parser
    from romebert.core import options
    from romebert.deploy.service import ServeConfig

    ns = build_parser().parse_args(["serve", "x", *flags])
    return options.values(ns, ServeConfig)


def verdict(rows: list[dict], max_queue: int) -> dict:
    """Each target, met or not, over every burst."""
    refused = max((r["refused"]["p99"] or 0.0 for r in rows), default=0.0)
    rate = min((r["inputs_per_s"] for r in rows if r["inputs_per_s"]), default=0.0)
    allowed = max(TARGETS["accepted_p99_s"], max_queue / rate if rate else 0.0)
    accepted = max((r["accepted"]["p99"] or 0.0 for r in rows), default=0.0)
    first = rows[0]["rss_bytes"] if rows else 0
    growth = max((r["rss_bytes"] / first - 1.0 for r in rows[1:]), default=0.0) if first else 0.0
    return {"refused_p99_s": refused, "refused_ok": refused <= TARGETS["refused_p99_s"],
            "accepted_p99_s": accepted, "accepted_allowed_s": allowed, "accepted_ok": accepted <= allowed,
            "rss_growth_after_first": growth, "rss_ok": growth <= TARGETS["rss_growth"],
            "answers_ok": all(r["wrong_answers"] == 0 for r in rows)}  # fmt: skip


def markdown(r: dict) -> str:
    env, ex, v = r["environment"], r["export"], r["verdict"]
    pinned = "the client shares the cores with the service"
    if r.get("service_cpus") and r.get("client_cpus"):
        pinned = f"the service pinned to core(s) {r['service_cpus']}, the client to {r['client_cpus']}"
    ms = serve_load._ms
    lines = [
        "# Bursts against the service: shedding before work, and RSS across bursts (loopback)",
        "",
        f"Measured {r['created']} with `{r['command']}`.",
        "",
        f"- Machine: {env['cpu']}, {env['cpu_count']} logical CPUs; romebert {env['romebert']}, onnxruntime "
        f"{env['onnxruntime']}; {pinned}.",
        f"- Service: `romebert serve` on ONNX Runtime {ex['precision']}, {r['workers']} worker(s) x {r['threads']} "
        f"thread(s), {ex['criterion']} threshold {ex['threshold']}, --max-queue {r['max_queue']}"
        f"{', ' + repr(r['serve_args']) if r.get('serve_args') else ''}; Python objects: "
        f"{r.get('python_allocator', 'not recorded')}.",
        f"- Traffic: {r['bursts']} bursts of {r['requests']} requests sent at once by one {r['client']} client "
        f"({CLIENTS[r['client']]}), each with "
        f"{', '.join(map(str, r['sizes']))} {ex['task']} dev sentences in turn; latency from the burst's start.",
        "",
        "Latency: from the moment a request was written to its answer (what the service made it wait); in "
        "brackets the p99 from the burst's start, the client's own queueing included.",
        "",
        "| burst | 200 | 503 | other | wrong answers | same as offline | refused p50 / p99 / max ms | "
        "accepted p50 / p99 / max ms | inputs/s | RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        s, a, f = row["statuses"], row["accepted"], row["refused"]
        other = sum(n for k, n in s.items() if k not in ("200", "503"))
        same = "n/a" if row["same_as_offline"] is None else f"{100 * row['same_as_offline']:.1f} %"
        lines.append(f"| {row['burst']} | {s.get('200', 0)} | {s.get('503', 0)} | {other} | {row['wrong_answers']} | "
                     f"{same} | {ms(f['p50'])} / {ms(f['p99'])} / {ms(f['max'])} ({ms(row['refused_waited']['p99'])}) "
                     f"| {ms(a['p50'])} / {ms(a['p99'])} / {ms(a['max'])} ({ms(row['accepted_waited']['p99'])}) | "
                     f"{row['inputs_per_s']:.0f} | {row['rss_bytes'] / 2**20:.1f} |")  # fmt: skip
    mark = {True: "met", False: "NOT met"}
    lines += [
        "",
        "## Against the targets",
        "",
        f"- Refused requests: p99 {ms(v['refused_p99_s'])} ms over every burst (target <= "
        f"{1e3 * TARGETS['refused_p99_s']:.0f} ms): {mark[v['refused_ok']]}.",
        f"- Accepted requests: p99 {ms(v['accepted_p99_s'])} ms (target <= {ms(v['accepted_allowed_s'])} ms: 2 s, or "
        f"--max-queue {r['max_queue']} over the slowest burst's inputs/s if larger): {mark[v['accepted_ok']]}.",
        f"- RSS: {r['rss_before_bytes'] / 2**20:.1f} MiB before the first burst; after later bursts at most "
        f"{100 * v['rss_growth_after_first']:+.2f} % from after the first (target <= "
        f"{100 * TARGETS['rss_growth']:.0f} %): {mark[v['rss_ok']]}.",
        f"- Every 200 with one well-formed result per input, every 503 with Retry-After and a JSON error: "
        f"{mark[v['answers_ok']]}.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
