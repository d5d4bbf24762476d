"""The accuracy guard under drift: `romebert serve` on traffic unlike the dev set its threshold was chosen on.

The stream: the export's dev sentences (the traffic the threshold was chosen for), then the task's
train sentences that the run did not train on, with their negation flipped ("is" <-> "is not", "n't"
dropped; sentences of 4 words or more where a flip applies): text the model has not seen, whose
sentiment its early layers, which lean on sentiment words, get wrong more often than its last does.
It is sent in order as requests of ``--request-size`` sentences by ``--concurrency`` clients, to one
service per setting:

- fixed: the export's dev threshold, no guard;
- guard at each ``--rates`` (``--guard-rate R --max-disagreement D``).

The truth is the final exit's answer to each sentence, computed offline (one pass, every input to the
last layer). For an int8 export that truth has a floor: its activations are quantized per batch, so the
final answer of a borderline input can change with its batch-mates; the report measures that floor
(two batchings of the stream, offline). Per setting: the disagreement of the answers served and the
layer speed-up, over the shifted part and in windows of ``--window`` inputs; for the guard, the request
after which every later window stays within D, and its extra work (layer work of the re-runs against
the layer work of the answers). None of this is a timing: it can run on a busy machine.

``--throughput`` measures timing instead (a quiet machine, pinned cores): closed-loop clients send the
shifted traffic for ``--duration`` seconds to the fixed service, to a guard that watches at R = 2 % but
never moves (``--guard-every`` beyond the run: its cost alone, at the dev thresholds), and to the
guard at D; inputs answered per second, and each against the fixed service.

    python benchmarks/serve_guard.py --export runs/bench-work/serve-sst2-int8                # accuracy
    python benchmarks/serve_guard.py --export runs/bench-work/serve-sst2-int8 --throughput \\
        --service-cpus 0 --client-cpus 1                                                     # timing

Writes results/serve_guard.{md,json} (``--throughput``: results/serve_guard_throughput.{md,json}).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import aiohttp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
THROUGHPUT_RATE = 0.02  # the R for the guard's cost
KEPT = ("guard_disagreement", "guard_disagreement_upper", "guard_window", "guard_rerun_layers_total",
        "guard_watched_total", "guard_dropped_total", "guard_updates_total", "exit_layer_sum",
        "exit_layer_count")  # fmt: skip


def flip_negation(text: str) -> str:
    """The sentence with its negation flipped: "is not" -> "is", "n't" dropped, else "is" -> "is not"."""
    flipped = re.sub(r"\b(is|was|are|were) not\b", r"\1", text)
    flipped = re.sub(r" n't\b", "", flipped)
    if flipped == text:
        flipped = re.sub(r"\b(is|was|are|were)\b", r"\1 not", text, count=1)
    return flipped


def shifted(texts: list[str], trained: set[str], limit: int) -> list[str]:
    """Sentences of 4 words or more, not trained on, whose negation flips, flipped."""
    out = []
    for t in texts:
        f = flip_negation(t)
        if f != t and len(t.split()) >= 4 and t not in trained:
            out.append(f)
    return out[:limit]


async def send(url: str, requests: list[list[str]], concurrency: int, timeout: float, scrape_every: int) -> dict:
    """Every request in order by ``concurrency`` clients; the answers, and the guard's metrics every
    ``scrape_every`` requests."""
    answers: list = [None] * len(requests)
    scrapes: list = []
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(len(requests)):
        queue.put_nowait(i)
    async with aiohttp.ClientSession(url, timeout=aiohttp.ClientTimeout(total=timeout)) as client:

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                async with client.post("/predict", json={"inputs": requests[i]}) as r:
                    body = await r.json()
                    if r.status != 200:
                        raise RuntimeError(f"request {i}: {r.status} {body}")
                answers[i] = [(x["label"], x["exit_layer"]) for x in body["results"]]
                if i % scrape_every == 0:
                    async with client.get("/metrics") as m:
                        scrapes.append({"request": i, **guard_metrics(await m.text())})

        await asyncio.gather(*[worker() for _ in range(concurrency)])
        deadline = time.perf_counter() + 30  # the re-runs still waiting finish once the stream is over
        while True:
            async with client.get("/metrics") as m:
                last = {"request": len(requests), **guard_metrics(await m.text())}
            seen = last.get("guard_window", 0) + last.get("guard_dropped_total", 0)
            if seen >= last.get("guard_watched_total", 0) or time.perf_counter() > deadline:
                break
            await asyncio.sleep(0.2)
        scrapes.append(last)
    return {"answers": answers, "scrapes": sorted(scrapes, key=lambda s: s["request"])}


def guard_metrics(text: str) -> dict:
    """The guard's state and work, and the layer work of the answers, from a Prometheus text."""
    out: dict = {"thresholds": {}}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, value = line.rsplit(" ", 1)
        if key.startswith('romebert_guard_threshold{exit="'):
            out["thresholds"][int(key.split('"')[1])] = float(value)
        elif key.removeprefix("romebert_") in KEPT:
            out[key.removeprefix("romebert_")] = float(value)
    out["thresholds"] = [out["thresholds"][k] for k in sorted(out["thresholds"])]
    return out


def evaluate(served: list[tuple[str, int]], truth: list[str], layers: int, start: int, window: int, target: float
             ) -> dict:  # fmt: skip
    """Disagreement and speed-up over the stream from ``start`` (the shifted part) and per window, and
    the first window after which every window stays within ``target``."""
    labels = np.asarray([s[0] for s in served])
    exits = np.asarray([s[1] for s in served])
    differs = labels != np.asarray(truth)
    windows = []
    for a in range(start, len(served), window):
        b = min(a + window, len(served))
        windows.append({"from": a, "to": b, "disagreement": float(differs[a:b].mean()),
                        "speedup": layers / float(exits[a:b].mean())})  # fmt: skip
    within = [w["disagreement"] <= target for w in windows]
    settled = next((k for k in range(len(windows)) if all(within[k:])), None)
    after = windows[settled]["from"] if settled is not None else None
    tail = slice(after, None) if after is not None else slice(len(served), None)
    return {"disagreement": float(differs[start:].mean()), "speedup": layers / float(exits[start:].mean()),
            "windows": windows, "within_from_input": after,
            "after": {"disagreement": float(differs[tail].mean()) if after is not None else None,
                      "speedup": layers / float(exits[tail].mean()) if after is not None else None}}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", required=True, help="an ONNX export (the SST-2 quick-start model, int8)")
    p.add_argument("--max-disagreement", type=float, default=0.05, help="D: the guard's target")
    p.add_argument("--rates", default="0.02,0.1", help="guard rates R to measure")
    p.add_argument("--dev-examples", type=int, default=100_000, help="dev sentences first (all by default)")
    p.add_argument("--shift-examples", type=int, default=100_000, help="negation-flipped train sentences after")
    p.add_argument("--shift-from", default="train", help="the split whose sentences are flipped (train: those the "
                   "run did not train on)")  # fmt: skip
    p.add_argument("--request-size", type=int, default=8, help="sentences per request")
    p.add_argument("--concurrency", type=int, default=4, help="clients sending the stream in order")
    p.add_argument("--window", type=int, default=1000, help="inputs per window of the report")
    p.add_argument("--serve-args", default="", help="more `romebert serve` flags, e.g. '--guard-window 1000'")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--throughput", action="store_true", help="measure throughput instead (timing: a quiet machine)")
    p.add_argument("--duration", type=float, default=20.0, help="--throughput: seconds per service")
    p.add_argument("--clients", type=int, default=16, help="--throughput: closed-loop clients")
    serve_load.add_pinning(p, "the clients")
    p.add_argument("--out", default=None, help="default: results/serve_guard (or results/serve_guard_throughput)")
    args = p.parse_args(argv)
    serve_load.pin_client(args)
    sys.path.insert(0, str(ROOT / "src"))
    from romebert.core.environment import environment, now
    from romebert.core.files import write_atomic
    from romebert.data.spec import DataSpec
    from romebert.runtime.artefacts import ExportManifest

    manifest = ExportManifest.load(args.export)
    data = DataSpec(**manifest.data)
    dev = [e.text_a for e in data.examples(data.eval_splits()[0])][: args.dev_examples]
    if args.shift_from == "train":
        trained = {e.text_a for e in data.examples("train")}  # the run's training subset
        everything = [e.text_a for e in replace(data, max_train_examples=None).examples("train")]
    else:  # a split it was not trained on
        trained, everything = set(), [e.text_a for e in data.examples(args.shift_from)]
    shift = shifted(everything, trained, args.shift_examples)
    stream = dev + shift
    rates = [float(r) for r in args.rates.split(",")]
    report = {"created": now(), "command": shlex.join(["python", "benchmarks/serve_guard.py", *(argv or sys.argv[1:])]),
              "environment": environment(), "export": {"task": manifest.task, "precision": manifest.precision,
              "layers": manifest.num_layers, **manifest.early_exit.policy().params(), "source": manifest.source},
              "max_disagreement": args.max_disagreement, "dev_inputs": len(dev), "shift_inputs": len(shift),
              "request_size": args.request_size, "serve_args": args.serve_args, "threads": args.threads}  # fmt: skip
    if args.throughput:
        report.update(throughput(args, shift))
        out = Path(args.out or "results/serve_guard_throughput")
        text = throughput_markdown(report)
    else:
        report.update(accuracy(args, stream, len(dev), manifest.num_layers, rates))
        out = Path(args.out or "results/serve_guard")
        text = markdown(report)
    write_atomic(out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    write_atomic(out.with_suffix(".md"), text + "\n")
    print(text)
    return report


def accuracy(args, stream: list[str], start: int, layers: int, rates: list[float]) -> dict:
    from romebert.deploy.classifier import EarlyExitClassifier, _examples
    from romebert.runtime.encoding import encode
    from romebert.runtime.engine import dataset_exit_logits
    from romebert.runtime.policies import candidate_thresholds

    clf = EarlyExitClassifier.from_pretrained(args.export, intra_op_threads=args.threads)
    truth = clf.predict_with_exits(stream, threshold=0.0).labels  # every input to the last layer
    again = clf.predict_with_exits(stream, threshold=0.0, batch_size=8).labels
    floor = float(np.mean([a != b for a, b in zip(truth, again)]))
    # with hindsight: the loosest single threshold within D on the shifted part (what a guard is up against)
    dataset = encode(_examples(stream[start:]), clf.tokenizer, None, clf.max_seq_length)
    logits = dataset_exit_logits(clf.segments, dataset, clf.collator)
    policy, hindsight = clf.policy(), None
    for t in candidate_thresholds(policy.name, logits, num=100):
        exits, chosen = clf.policy(threshold=t).decide(logits)
        rate = float((chosen.argmax(-1) != logits[-1].argmax(-1)).mean())
        speedup = layers / float(exits.mean())
        if rate <= args.max_disagreement and (hindsight is None or speedup > hindsight["speedup"]):
            hindsight = {"threshold": t, "disagreement": rate, "speedup": speedup}
    requests = [stream[k : k + args.request_size] for k in range(0, len(stream), args.request_size)]
    settings = [("fixed", "fixed dev threshold", [])] + [
        (f"guard_{r:g}", f"guard R = {100 * r:g} %", ["--guard-rate", str(r), "--max-disagreement",
                                                     str(args.max_disagreement)]) for r in rates]  # fmt: skip
    results = {}
    for key, label, flags in settings:
        port = serve_load.free_port()
        proc = serve_load.start(args.export, port, 1, args.threads, flags + shlex.split(args.serve_args), None)
        try:
            sent = serve_load._run(send(f"http://127.0.0.1:{port}", requests, args.concurrency, args.timeout, 25))
        finally:
            proc.terminate()
            proc.wait(60)
        served = [a for answer in sent["answers"] for a in answer]
        row = {"label": label, **evaluate(served, truth, layers, start, args.window, args.max_disagreement)}
        last = sent["scrapes"][-1]
        if "guard_rerun_layers_total" in last:
            row["extra_work"] = last["guard_rerun_layers_total"] / max(last["exit_layer_sum"], 1.0)
            row["final_thresholds"] = last["thresholds"]
            row["within_from_request"] = (None if row["within_from_input"] is None
                                          else row["within_from_input"] // args.request_size)  # fmt: skip
        row["scrapes"] = sent["scrapes"]
        results[key] = row
        print(f"{label}: disagreement {row['disagreement']:.4f} speedup {row['speedup']:.2f} within D from input "
              f"{row['within_from_input']}", flush=True)  # fmt: skip
    return {"final_answer_floor": floor, "hindsight": hindsight, "settings": results}


NEVER = 10**9  # --guard-every for a guard that watches and re-runs but never moves a threshold


def throughput(args, shift: list[str]) -> dict:
    requests = [shift[k : k + args.request_size] for k in range(0, len(shift), args.request_size)]
    d = str(args.max_disagreement)
    guard = ["--guard-rate", str(THROUGHPUT_RATE), "--max-disagreement"]
    settings = [("fixed", "fixed dev threshold", []),
                ("guard_cost", "guard R = 2 %, never moving", [*guard, d, "--guard-every", str(NEVER)]),
                ("guard", f"guard R = 2 %, D = {d}", [*guard, d])]  # fmt: skip
    rows = {}
    for key, label, flags in settings:
        port = serve_load.free_port()
        proc = serve_load.start(args.export, port, 1, args.threads, flags + shlex.split(args.serve_args),
                                serve_load._cpus(args.service_cpus))  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            serve_load._run(closed_loop(url, requests, args.clients, 2.0, args.timeout))  # warm-up
            rows[key] = {"label": label, **serve_load._run(closed_loop(url, requests, args.clients, args.duration,
                                                                       args.timeout))}  # fmt: skip
        finally:
            proc.terminate()
            proc.wait(60)
        print(f"{label}: {rows[key]['inputs_per_s']:.1f} inputs/s", flush=True)
    base = rows["fixed"]["inputs_per_s"]
    for row in rows.values():
        row["against_fixed"] = row["inputs_per_s"] / base if base else None
    return {"duration_s": args.duration, "clients": args.clients, "service_cpus": args.service_cpus,
            "client_cpus": args.client_cpus, "throughput": rows}  # fmt: skip


async def closed_loop(url: str, requests: list[list[str]], clients: int, duration: float, timeout: float) -> dict:
    """``clients`` clients, each sending its next request as soon as its last is answered."""
    done = {"requests": 0, "inputs": 0, "errors": 0}
    stop = time.perf_counter() + duration
    async with aiohttp.ClientSession(url, timeout=aiohttp.ClientTimeout(total=timeout)) as client:

        async def one(c: int) -> None:
            k = c
            while time.perf_counter() < stop:
                async with client.post("/predict", json={"inputs": requests[k % len(requests)]}) as r:
                    await r.read()
                    if r.status == 200:
                        done["requests"] += 1
                        done["inputs"] += len(requests[k % len(requests)])
                    else:
                        done["errors"] += 1
                k += clients

        t0 = time.perf_counter()
        await asyncio.gather(*[one(c) for c in range(clients)])
        wall = time.perf_counter() - t0
    return {**done, "wall_s": wall, "inputs_per_s": done["inputs"] / wall}


def markdown(r: dict) -> str:
    env, ex, s = r["environment"], r["export"], r["settings"]
    d = r["max_disagreement"]
    lines = [
        "# The accuracy guard under drift (loopback)",
        "",
        f"Measured {r['created']} with `{r['command']}`.",
        "",
        f"- Machine: {env['cpu']}, {env['cpu_count']} logical CPUs; romebert {env['romebert']}, onnxruntime "
        f"{env['onnxruntime']}. No figure here is a timing.",
        f"- Service: `romebert serve` on the {ex['task']} export ({ex['precision']}, {ex['layers']} layers), "
        f"{ex['criterion']} threshold {ex['threshold']:.4g} chosen on dev; target D = {d:g}"
        f"{', ' + repr(r['serve_args']) if r.get('serve_args') else ''}.",
        f"- Stream, in order: {r['dev_inputs']} dev sentences, then {r['shift_inputs']} train sentences not trained "
        f"on, with their negation flipped; requests of {r['request_size']} sentences. Truth: the final exit's "
        "answer, offline.",
        f"- Floor: the final exit's own answer changes with its batch for {100 * r['final_answer_floor']:.2f} % of "
        "the stream (two batchings, offline): part of every disagreement below.",
    ]
    if r.get("hindsight"):
        h = r["hindsight"]
        lines.append(f"- With hindsight, the loosest single threshold within D on the shifted part: "
                     f"{h['threshold']:.4g} ({100 * h['disagreement']:.2f} %, {h['speedup']:.2f}x).")  # fmt: skip
    lines += ["", "| setting | disagreement (shifted part) | layer speed-up | within D from request | "
              "after it: disagreement / speed-up | guard's extra layer work | guard's estimate at the end (upper "
              "bound) | thresholds at the end |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in s.values():
        after, guarded = row["after"], "extra_work" in row
        tail = "n/a" if after["disagreement"] is None else f"{100 * after['disagreement']:.2f} %"
        tail += "" if after["speedup"] is None else f" / {after['speedup']:.2f}x"
        since = row.get("within_from_request")
        since_text = "-" if not guarded else ("never" if since is None else str(since))
        extra = f"{100 * row['extra_work']:.2f} %" if guarded else "-"
        final = ", ".join(f"{t:.3g}" for t in row.get("final_thresholds", [])) or "-"
        last = row["scrapes"][-1] if row.get("scrapes") else {}
        own = "-"
        if guarded and "guard_disagreement" in last:
            own = f"{100 * last['guard_disagreement']:.2f} % ({100 * last['guard_disagreement_upper']:.2f} %)"
        lines.append(f"| {row['label']} | {100 * row['disagreement']:.2f} % | {row['speedup']:.2f}x | {since_text} | "
                     f"{tail} | {extra} | {own} | {final} |")  # fmt: skip
    lines += ["", f"Windows of the shifted part (disagreement / speed-up; D = {100 * d:g} %):", ""]
    keys = list(s)
    lines.append("| inputs | " + " | ".join(s[k]["label"] for k in keys) + " |")
    lines.append("|---" * (len(keys) + 1) + "|")
    for i, w in enumerate(s[keys[0]]["windows"]):
        cells = [
            f"{100 * s[k]['windows'][i]['disagreement']:.1f} % / {s[k]['windows'][i]['speedup']:.2f}x" for k in keys
        ]
        lines.append(f"| {w['from']}-{w['to']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def throughput_markdown(r: dict) -> str:
    env, t = r["environment"], r["throughput"]
    pinned = "the clients share the cores with the service"
    if r.get("service_cpus") and r.get("client_cpus"):
        pinned = f"the service pinned to core(s) {r['service_cpus']}, the clients to {r['client_cpus']}"
    lines = ["# The accuracy guard's cost in throughput (loopback)", "",
             f"Measured {r['created']} with `{r['command']}`.", "",
             f"- Machine: {env['cpu']}, {env['cpu_count']} logical CPUs; {pinned}.",
             f"- Traffic: {r['clients']} closed-loop clients, requests of {r['request_size']} negation-flipped "
             f"sentences, {r['duration_s']:g} s per service.", "",
             "| service | inputs/s | against fixed |", "|---|---|---|"]  # fmt: skip
    for row in t.values():
        lines.append(f"| {row['label']} | {row['inputs_per_s']:.1f} | {row['against_fixed']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
