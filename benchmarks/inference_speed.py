"""Real early-exit speed on this machine: the engine vs the full model vs the naive peer approach.

For batch sizes 1, 8 and 32 and thresholds picked (on the timed sentences' cached logits) to give about
1.5x, 2x and 3x *layer* speed-up, it times

* full   - the whole encoder and the final head only (what a plain classifier costs),
* naive  - every layer and every exit head, exits picked afterwards from the logits (the peer
           approach: it costs more than the full model, whatever the threshold),
* engine - ``romebert.engine.EarlyExitEngine``: exited rows leave the batch after each layer,

and prints the measured wall-clock speed-up over the full model next to the layer speed-up (its
physical ceiling: the share of layer work skipped), their ratio, and analytic FLOPs of the shapes each
approach actually ran. The engine's exit layers are checked against the offline decisions.

    python benchmarks/inference_speed.py --run runs/quickstart-sst2
    python benchmarks/inference_speed.py            # packaged MiniLM backbone with random exits

Writes results/inference_speed.{md,json}. Keep other work off the CPU while it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from romebert.api import choose_threshold  # noqa: E402
from romebert.data import Collator, encode, read_split  # noqa: E402
from romebert.engine import EarlyExitEngine  # noqa: E402
from romebert.evaluation import collect_logits, dataset_labels  # noqa: E402
from romebert.exits import layer_stats  # noqa: E402
from romebert.modeling import MultiExitModel  # noqa: E402
from romebert.policies import get_policy  # noqa: E402
from romebert.tasks import get_task  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------- set-up
def load(run: str | None):
    """(model, tokenizer, max_seq_length, description)."""
    if run:
        from romebert.pipeline import load_run

        model, tokenizer, data = load_run(run, "cpu")
        return model.eval(), tokenizer, data.max_seq_length, f"trained run {run}"
    from transformers import AutoTokenizer

    from romebert.modeling import default_backbone

    torch.manual_seed(0)
    model = MultiExitModel.from_backbone(default_backbone(), num_labels=2, pooling="mean")
    return model.eval(), AutoTokenizer.from_pretrained(default_backbone()), 128, "packaged MiniLM-L6, random exits"


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
    }


# ----------------------------------------------------------------------------------- the three paths
@torch.no_grad()
def full_forward(model: MultiExitModel, batch: dict) -> torch.Tensor:
    """A plain classifier: every layer, the final head only."""
    hidden = model.embed(batch["input_ids"], batch.get("token_type_ids"))
    layer_mask = model.attention_mask(hidden, batch["attention_mask"])
    for i in range(model.num_layers):
        hidden = model.run_layer(i, hidden, layer_mask)
    return model.exits[-1](hidden, batch["attention_mask"])


@torch.no_grad()
def naive_forward(model: MultiExitModel, batch: dict, policy) -> np.ndarray:
    """The peer approach: all layers and all heads, then exits picked from the logits."""
    logits = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))  # [L, B, C]
    return policy.decide(logits, regression=model.config.is_regression)[0]


# ------------------------------------------------------------------------------------------ FLOPs
def layer_flops(cfg, b: int, t: int) -> float:
    """One encoder layer on [b, t]: Q, K, V, O projections, the FFN, and the two attention matmuls."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    return 2.0 * b * t * (4 * h * h + 2 * h * i) + 4.0 * b * t * t * h


def head_flops(cfg, b: int, t: int, num_labels: int) -> float:
    """One exit head: masked mean pooling, pooler, classifier."""
    h = cfg.hidden_size
    return 2.0 * b * t * h + 2.0 * b * (h * h + h * num_labels)


def measured_flops(model: MultiExitModel, batch: dict) -> float:
    """FLOPs torch counts for one full forward (checks the analytic count)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        full_forward(model, batch)
    return float(counter.get_total_flops())


# ------------------------------------------------------------------------------------------ timing
def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_batch_size(model, dataset, collator, bs: int, policies: dict, repeats: int, order: str) -> dict:
    """Time every path over the whole set at batch size ``bs``; returns per-path medians and shapes."""
    n = len(dataset)
    idx = np.argsort(np.asarray(dataset.lengths), kind="stable") if order == "sorted" else np.arange(n)
    batches = []
    for s in range(0, n, bs):
        rows = idx[s : s + bs]
        batches.append((rows, collator([dataset[int(i)] for i in rows])))
    engines = {name: EarlyExitEngine(model, p) for name, p in policies.items()}

    def run_full():
        for _, b in batches:
            full_forward(model, b)

    def run_naive(policy):
        def go():
            for _, b in batches:
                naive_forward(model, b, policy)

        return go

    def run_engine(engine):
        def go():
            for _, b in batches:
                engine.run(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))

        return go

    # the naive path's cost does not depend on the threshold: time it once, with the middle policy
    mid = list(policies)[len(policies) // 2]
    paths = {"full": run_full, "naive": run_naive(policies[mid])}
    paths.update({f"engine@{name}": run_engine(e) for name, e in engines.items()})
    warm = batches[: max(1, min(len(batches), 64 // bs))]
    for _, b in warm:  # warm-up: allocator, thread pool, first-call paths
        full_forward(model, b)
        naive_forward(model, b, policies[mid])
        for e in engines.values():
            e.run(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
    times: dict[str, list[float]] = {k: [] for k in paths}
    names = list(paths)
    for r in range(repeats):
        for k in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order: drift hits all alike
            times[k].append(timed(paths[k]))

    # one more engine pass to record decisions and the shapes actually run
    out: dict = {"num_batches": len(batches), "times": times, "engine": {}}
    for name, engine in engines.items():
        layers = np.zeros(n, dtype=np.int64)
        shapes: list[tuple[int, int]] = []
        for rows, b in batches:
            o = engine.run(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
            layers[rows] = o.exit_layer.numpy()
            shapes += o.shapes
        out["engine"][name] = {"exit_layers": layers, "shapes": shapes}
    out["batch_shapes"] = [tuple(b["input_ids"].shape) for _, b in batches]
    return out


# ------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_run = ROOT / "runs" / "quickstart-sst2"
    p.add_argument(
        "--run",
        default=str(default_run) if default_run.is_dir() else None,
        help="trained run folder (default: runs/quickstart-sst2 when present)",
    )
    p.add_argument("--random-exits", action="store_true", help="ignore --run: packaged backbone, random exits")
    p.add_argument("--data-dir", default=None, help="GLUE folder with SST-2/dev.tsv (default: ../shared/glue)")
    p.add_argument("--criterion", default="entropy")
    p.add_argument("--patience", type=int, default=2, help="patience-confidence: k")
    p.add_argument("--speedups", default="1.5,2,3", help="target layer speed-ups")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--examples", type=int, default=256, help="dev sentences timed (a seeded random subset)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--order",
        choices=["sorted", "input"],
        default="sorted",
        help="batches of length-sorted sentences (as predict does) or in dev order",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "results" / "inference_speed"), help="writes <out>.md and <out>.json")
    ns = p.parse_args(argv)
    t_start = time.perf_counter()
    load_before = os.getloadavg()

    run = None if ns.random_exits else ns.run
    model, tokenizer, max_len, what = load(run)
    task = get_task("SST-2")
    data_dir = ns.data_dir or str(ROOT.parent / "shared" / "glue")
    examples = read_split(task, data_dir, "dev")
    rng = np.random.default_rng(ns.seed)
    n = min(len(examples), ns.examples)
    chosen = np.sort(rng.choice(len(examples), n, replace=False))  # a seeded random subset, dev order
    examples = [examples[int(i)] for i in chosen]
    collator = Collator(tokenizer)
    dataset = encode(examples, tokenizer, task.labels, max_len)
    labels = dataset_labels(dataset)
    cached = collect_logits(model, dataset, collator)  # [L, N, C]: for thresholds and the decision check
    num_layers = model.num_layers
    cfg = model.backbone.config
    policy_kw = {"patience": ns.patience}

    # thresholds for the target layer speed-ups, picked on the timed sentences' cached logits
    targets = [float(s) for s in ns.speedups.split(",")]
    policies, picked = {}, {}
    for s in targets:
        thr, row = choose_threshold(cached, labels, task, ns.criterion, target_speedup=s, **policy_kw)
        name = f"{s:g}x"
        policies[name] = get_policy(ns.criterion, thr, **policy_kw)
        picked[name] = {
            "threshold": thr,
            "dev_metric": row["metric"],
            "final_metric": row["final_metric"],
            "layer_speedup_on_timed_set": row["speedup"],
        }
        print(
            f"target {name}: {ns.criterion} threshold {thr:.5g} -> layer speed-up {row['speedup']:.3f}, "
            f"accuracy {row['metric']:.4f} (final exit {row['final_metric']:.4f})",
            flush=True,
        )

    b8 = collator([dataset[i] for i in range(min(8, n))])
    flop_check = measured_flops(model, b8)
    analytic8 = num_layers * layer_flops(cfg, *b8["input_ids"].shape) + head_flops(cfg, *b8["input_ids"].shape, 2)
    print(
        f"FLOP check on one batch: analytic {analytic8 / 1e9:.3f} GFLOP, torch FlopCounter "
        f"{flop_check / 1e9:.3f} GFLOP",
        flush=True,
    )

    results = []
    for bs in [int(b) for b in ns.batch_sizes.split(",")]:
        t0 = time.perf_counter()
        r = bench_batch_size(model, dataset, collator, bs, policies, ns.repeats, ns.order)
        med = {k: statistics.median(v) for k, v in r["times"].items()}
        full_flops = sum(num_layers * layer_flops(cfg, b, t) + head_flops(cfg, b, t, 2) for b, t in r["batch_shapes"])
        naive_flops = sum(
            num_layers * (layer_flops(cfg, b, t) + head_flops(cfg, b, t, 2)) for b, t in r["batch_shapes"]
        )
        rows = [
            {
                "batch_size": bs,
                "path": "full",
                "key": "full",
                "examples": n,
                "seconds": med["full"],
                "speedup": 1.0,
                "gflops": full_flops / 1e9,
                "flop_speedup": 1.0,
            },
            {
                "batch_size": bs,
                "path": "naive (all layers + all heads, pick after)",
                "key": "naive",
                "examples": n,
                "seconds": med["naive"],
                "speedup": med["full"] / med["naive"],
                "gflops": naive_flops / 1e9,
                "flop_speedup": full_flops / naive_flops,
            },
        ]
        for name, policy in policies.items():
            eng = r["engine"][name]
            ref, _ = policy.decide(cached)
            mismatches = int((eng["exit_layers"] != ref).sum())
            lstats = layer_stats(eng["exit_layers"], num_layers)
            e_flops = sum(layer_flops(cfg, b, t) + head_flops(cfg, b, t, 2) for b, t in eng["shapes"])
            sec = med[f"engine@{name}"]
            rows.append(
                {
                    "batch_size": bs,
                    "path": f"engine @ {name}",
                    "key": f"engine@{name}",
                    "examples": n,
                    "seconds": sec,
                    "threshold": picked[name]["threshold"],
                    "speedup": med["full"] / sec,
                    "layer_speedup": lstats["speedup"],
                    "ratio": (med["full"] / sec) / lstats["speedup"],
                    "vs_naive": med["naive"] / sec,
                    "gflops": e_flops / 1e9,
                    "flop_speedup": full_flops / e_flops,
                    "exit_counts": lstats["counts"],
                    "decision_mismatches_vs_offline": mismatches,
                }
            )
        for row in rows:
            row["ms_per_example"] = 1e3 * row["seconds"] / n
            row["all_seconds"] = r["times"][row.pop("key")]
        results += rows
        print(
            f"\nbatch size {bs} ({n} sentences, {r['num_batches']} batches, {ns.repeats} repeats, "
            f"{time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        print(_table(rows), flush=True)

    info = {
        "command": "python benchmarks/inference_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": what,
        "num_layers": num_layers,
        "criterion": ns.criterion,
        "order": ns.order,
        "repeats": ns.repeats,
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "flop_check": {"analytic": analytic8, "torch_flop_counter": flop_check},
        "thresholds": picked,
        "seconds_total": time.perf_counter() - t_start,
    }
    write_outputs(Path(ns.out), info, results)
    print(f"\nwritten {ns.out}.md and {ns.out}.json in {info['seconds_total']:.0f} s", flush=True)
    return 0


def _table(rows: list[dict]) -> str:
    head = (
        "| batch | path | ms / example | measured speed-up | layer speed-up | ratio | vs naive | GFLOPs | "
        "FLOP speed-up | exits per layer |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['batch_size']} | {r['path']} | {r['ms_per_example']:.2f} | {r['speedup']:.2f}x | "
            + (
                f"{r['layer_speedup']:.2f}x | **{r['ratio']:.2f}** | {r['vs_naive']:.2f}x | "
                if "layer_speedup" in r
                else "- | - | - | "
            )
            + f"{r['gflops']:.1f} | {r['flop_speedup']:.2f}x | {r.get('exit_counts', '-')} |"
        )
    return "\n".join(lines)


def write_outputs(out: Path, info: dict, rows: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {**info, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    m = info["machine"]
    md = [
        "# Early-exit inference speed (CPU)",
        "",
        f"`{info['command']}` — {info['date']}, {info['seconds_total']:.0f} s.",
        "",
        f"Machine: {m['cpu']}, {m['logical_cores']} logical cores, torch threads {m['torch_threads']}; "
        f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}. "
        f"Load average before / after: {', '.join(f'{x:.2f}' for x in info['load_average_before'])} / "
        f"{', '.join(f'{x:.2f}' for x in info['load_average_after'])}.",
        "",
        f"Model: {info['model']} ({info['num_layers']} layers). Data: SST-2 dev sentences (a seeded random subset), "
        f"batches of {'length-sorted' if info['order'] == 'sorted' else 'dev-order'} sentences. Criterion: "
        f"{info['criterion']}; thresholds picked on the timed sentences' cached logits for the target layer speed-ups:",
        "",
    ]
    for name, p in info["thresholds"].items():
        md.append(
            f"- {name}: threshold {p['threshold']:.5g}, layer speed-up {p['layer_speedup_on_timed_set']:.3f}, "
            f"accuracy {p['dev_metric']:.4f} (final exit {p['final_metric']:.4f})"
        )
    md += [
        "",
        "Paths: **full** = every layer + the final head (a plain classifier); **naive** = every layer + every "
        "exit head, exits picked afterwards (the peer approach); **engine** = `EarlyExitEngine` (exited rows "
        "leave the batch after each layer, trailing padding trimmed). Times are medians of "
        f"{info['repeats']} interleaved repeats after a warm-up. *Measured speed-up* = full time / path time; "
        "*layer speed-up* = N·L / Σ exit layers (the ceiling); *ratio* = measured / layer speed-up; "
        "FLOPs are analytic (projections, FFN and attention matmuls of the shapes each path actually ran, plus "
        f"heads); on one batch the analytic count was {info['flop_check']['analytic'] / 1e9:.3f} GFLOP vs "
        f"torch's FlopCounter {info['flop_check']['torch_flop_counter'] / 1e9:.3f} GFLOP.",
        "",
        _table(rows),
        "",
        "Engine exit layers equal the offline decisions on the cached logits for every row: "
        + (
            "yes"
            if all(r.get("decision_mismatches_vs_offline", 0) == 0 for r in rows)
            else "NO (see decision_mismatches_vs_offline in the JSON)"
        )
        + ".",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(md))


def _jsonable(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(type(o))


if __name__ == "__main__":
    sys.exit(main())
