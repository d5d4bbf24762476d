"""Peak memory and rows/s of ``romebert predict EXPORT --input FILE`` on the torch-free runtime, against
the number of rows: streaming must keep peak RSS flat however large the file.

    HF_HUB_OFFLINE=1 python benchmarks/predict_memory.py --export EXPORT [--rows 10000,100000,1000000]
        [--arena-rows 10000,100000] [--batch-rows 10000] [--merge] [--out results/predict_memory]

``EXPORT``: an int8 export (``romebert export runs/quickstart-sst2 -o EXPORT --quantize int8``), or
``--run RUN`` to make one in the work folder. Inputs are CSVs of ``id,text`` rows, each text two SST-2
train sentences (``--glue``), written to a temporary folder. Every measurement is one
``romebert predict`` in its own process with torch, transformers and scipy made unimportable (the
runtime extra's path), whose own peak RSS (``getrusage``) it prints at exit. Also measured: the baseline
(import and load the export, no rows); the same files with ONNX Runtime's memory arenas on (its
defaults, what ``OrtSegments`` did before: ``--arena-rows``); a smaller engine batch (``--batch-rows``).
``--merge`` adds to the figures already in ``--out``.json (a long run measured on its own).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from romebert.core.environment import backbone_label, environment, now
from romebert.runtime.artefacts import ExportManifest

# One romebert process: torch-free, its own peak RSS on stderr's last line.
CHILD = r"""
import resource, sys
for name in ("torch", "transformers", "scipy", "safetensors"):
    sys.modules[name] = None  # the runtime extra has none of them: importing one fails
mode, argv = sys.argv[1], sys.argv[2:]
if mode == "arena":  # ONNX Runtime's default arenas and memory patterns
    import romebert.runtime.onnx_runtime as o
    init = o.OrtSegments.__init__
    o.OrtSegments.__init__ = lambda self, *a, **k: init(self, *a, **{"memory_arena": True, **k})
rc = 0
if mode == "load":
    from romebert import EarlyExitClassifier
    EarlyExitClassifier.from_pretrained(argv[0])
else:
    from romebert.cli import main
    rc = main(argv)
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(rc)
"""


def sst2_sentences(glue: Path) -> list[str]:
    with open(glue / "SST-2" / "train.tsv", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r[0].strip() for r in rows[1:]]


def write_input(path: Path, rows: int, sentences: list[str]) -> Path:
    """``rows`` rows of ``id,text``; text: two SST-2 sentences, paired differently on every pass."""
    n = len(sentences)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        for i in range(rows):
            w.writerow([f"r{i}", f"{sentences[i % n]} {sentences[(i * 7919 + 1 + i // n) % n]}"])
    return path


def run_child(mode: str, argv: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of one process."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", CHILD, mode, *argv], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"romebert failed ({mode} {' '.join(argv)}):\n{res.stderr[-3000:]}")
    line = [x for x in res.stderr.splitlines() if x.startswith("PEAK_RSS_KB")][-1]
    return int(line.split()[1]) / 1024, seconds


def measure(export: Path, src: Path, rows: int, mode: str, batch: int, work: Path) -> dict:
    out = work / f"out-{mode}-{batch}-{rows}.csv"
    argv = ["predict", str(export), "--input", str(src), "-o", str(out), "--text-column", "text",
            "--id-column", "id", "--eval-batch-size", str(batch), "--quiet"]  # fmt: skip
    rss, seconds = run_child(mode, argv)
    with open(out, encoding="utf-8", newline="") as f:
        written = sum(1 for _ in csv.reader(f)) - 1
    assert written == rows, (written, rows)
    out.unlink()
    row = {"rows": rows, "arena": mode == "arena", "batch_size": batch, "peak_rss_mib": round(rss, 1),
           "seconds": round(seconds, 1), "rows_per_s": round(rows / seconds, 1)}  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        "# Streaming prediction: peak memory against rows",
        "",
        " then ".join(f"`{c}`" for c in report["commands"]),
        f"(last run {report['date']}). Model: the int8 ONNX export of the SST-2 quick-start "
        f"run ({report['backbone']}, {report['model']}). Machine: {env['cpu']}, {env['cpus_usable']} usable CPUs; "
        f"Python {env['python']}, onnxruntime {env['onnxruntime']}, numpy {env['numpy']}. Raw figures: "
        "`predict_memory.json`.",
        "",
        "Each figure is one `romebert predict EXPORT --input FILE --text-column text --id-column id` process "
        "with torch, transformers and scipy unimportable (the `romebert[runtime]` path), its own peak RSS from "
        "`getrusage`. Inputs: CSV rows `id,text`, each text two SST-2 train sentences. Default chunk "
        "(2,048 rows) and engine batch (64) unless the table says otherwise. The wall time includes "
        "start-up and loading. This machine is shared with other jobs: the RSS figures hold under load, "
        "rows/s do not (they are indicative only).",
        "",
        f"Baseline (import romebert, load the export, score nothing): **{report['baseline_rss_mib']:.0f} MiB**.",
        "",
        "| rows | ONNX Runtime arenas | engine batch | peak RSS (MiB) | wall (s) | rows/s |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in sorted(report["runs"], key=lambda r: (r["arena"], r["batch_size"] != 64, r["batch_size"], r["rows"])):
        arena = "on (ORT's default, before)" if r["arena"] else "off (now)"
        lines.append(f"| {r['rows']:,} | {arena} | {r['batch_size']} | {r['peak_rss_mib']:,.0f} | "
                     f"{r['seconds']:,.0f} | {r['rows_per_s']:,.0f} |")  # fmt: skip
    lines += ["", *report.get("notes", [])]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", help="an int8 export of the SST-2 quick-start run")
    p.add_argument("--run", help="or a run to export (int8) into the work folder")
    p.add_argument("--glue", default="../shared/glue", help="GLUE folder (SST-2 train sentences)")
    p.add_argument("--rows", default="10000,100000,1000000")
    p.add_argument("--arena-rows", default="10000,100000", help="also with ONNX Runtime's arenas on ('' = none)")
    p.add_argument("--batch-rows", default="10000", help="also with engine batch 16 ('' = none)")
    p.add_argument("--work", help="folder for the inputs (default: a temporary one)")
    p.add_argument("--merge", action="store_true", help="add to the figures already in --out.json")
    p.add_argument("--out", default="results/predict_memory")
    args = p.parse_args(argv)
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        export = Path(args.export) if args.export else work / "export"
        if not args.export:
            from romebert.cli import main as romebert

            assert romebert(["export", args.run, "-o", str(export), "--quantize", "int8"]) == 0
        manifest = ExportManifest.load(export)
        sentences = sst2_sentences(Path(args.glue))
        baseline, _ = run_child("load", [str(export)])
        print(f"baseline (import + load, no rows): {baseline:.0f} MiB", flush=True)
        runs = []
        wanted = {(n, "stream", 64) for n in ints(args.rows)} | {(n, "arena", 64) for n in ints(args.arena_rows)}
        wanted |= {(n, "stream", 16) for n in ints(args.batch_rows)}
        for rows in sorted({n for n, _, _ in wanted}):
            src = write_input(work / f"in-{rows}.csv", rows, sentences)
            for n, mode, batch in sorted(wanted):
                if n == rows:
                    runs.append(measure(export, src, rows, mode, batch, work))
            src.unlink()
    out = Path(args.out)
    old = json.loads(out.with_suffix(".json").read_text()) if args.merge and out.with_suffix(".json").exists() else {}
    key = lambda r: (r["rows"], r["arena"], r["batch_size"])  # noqa: E731
    merged = {key(r): r for r in old.get("runs", [])} | {key(r): r for r in runs}
    command = (f"python benchmarks/predict_memory.py --export EXPORT --rows {args.rows!r} --arena-rows "
               f"{args.arena_rows!r} --batch-rows {args.batch_rows!r}" + " --merge" * args.merge)  # fmt: skip
    report = {
        "commands": [*old.get("commands", [old["command"]] if "command" in old else []), command],
        "date": now(),
        "environment": {k: v for k, v in environment("cpu").items() if k not in ("platform",)},
        "backbone": manifest.source.get("backbone") or backbone_label(None),
        "model": f"{manifest.num_layers} layers, {manifest.precision}, exit {manifest.early_exit.criterion} "
        f"{manifest.early_exit.threshold:.3f}",
        "baseline_rss_mib": round(baseline, 1),
        "runs": sorted(merged.values(), key=key),
        "notes": old.get("notes", []),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    return report


if __name__ == "__main__":
    main()
