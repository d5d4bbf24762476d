"""Real early-exit speed on this machine: the engine vs the full model vs the naive peer approach.

For batch sizes 1, 8 and 32 and thresholds picked (on the timed sentences' cached logits) to give about
1.5x, 2x and 3x *layer* speed-up, it times, over the same length-sorted batches,

* full            - the whole encoder and the final head only (what a plain classifier costs),
* naive           - every layer and every exit head, exits picked afterwards from the logits (the peer
                    approach: it costs more than the full model, whatever the threshold),
* engine          - ``EarlyExitEngine.run`` per batch: exited rows leave the batch after each layer,
* engine + refill - ``EarlyExitEngine.run_stream`` (batch size > 1): a layer's survivors from several
                    batches are gathered into full batches for the next layer (what ``predict`` uses),

and prints the measured wall-clock speed-up over the full model next to the layer speed-up (its
ceiling: the share of layer work skipped), their ratio, and analytic FLOPs of the shapes each path
actually ran. Every engine's exit layers are checked against the offline decisions.

    python benchmarks/inference_speed.py                       # runs/quickstart-sst2 when present
    python benchmarks/inference_speed.py --random-exits        # packaged MiniLM backbone, random exits
    python benchmarks/inference_speed.py --wait-idle 600       # on a shared machine

Writes results/inference_speed.{md,json}. Keep other work off the CPU while it runs (the report says
how many cores other processes kept busy during each measurement).
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
from romebert.modeling import MultiExitModel, pool_weights  # noqa: E402
from romebert.policies import ExitPolicy, get_policy  # noqa: E402
from romebert.tasks import get_task  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------- set-up
def load(run: str | None, size: str = "minilm"):
    """(model, tokenizer, max_seq_length, description)."""
    if run:
        from romebert.pipeline import load_run

        model, tokenizer, data = load_run(run, "cpu")
        return model.eval(), tokenizer, data.max_seq_length, f"trained run {run}"
    from transformers import AutoConfig, AutoTokenizer

    from romebert.modeling import MultiExitConfig, default_backbone

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(default_backbone())
    if size == "base":
        # BERT-base's shape (12 layers, hidden 768) with random weights: no such checkpoint is on this
        # machine, and the engine's cost per layer relative to the layer's own cost is what is measured.
        cfg = AutoConfig.for_model(
            "bert",
            vocab_size=tokenizer.vocab_size,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
        )
        model = MultiExitModel.from_config(cfg, MultiExitConfig(num_labels=2, pooling="mean"))
        return model.eval(), tokenizer, 128, "BERT-base-sized (12 layers, hidden 768), random weights and exits"
    model = MultiExitModel.from_backbone(default_backbone(), num_labels=2, pooling="mean")
    return model.eval(), tokenizer, 128, "packaged MiniLM-L6, random exits"


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
# Every path runs under inference_mode, as the engine does (it is a little cheaper than no_grad), and
# skips the backbone's mask builder for unpadded batches, as the engine does from its host-side lengths.
def _padded(batch: dict) -> bool:
    return not bool(batch["attention_mask"].all())


def _embedded(model: MultiExitModel, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(embeddings [B, T, H], the backbone's layer mask) of a batch: where every path starts."""
    hidden = model.embed(batch["input_ids"], batch.get("token_type_ids"))
    return hidden, model.attention_mask(hidden, batch["attention_mask"], _padded(batch))


@torch.inference_mode()
def oracle_forward(model: MultiExitModel, batch: dict, exit_layer: int) -> torch.Tensor:
    """One sample whose exit layer is known in advance: exactly that many layers and one head.

    No early-exit implementation can beat it; the engine's distance to it is the engine's own cost.
    """
    hidden, layer_mask = _embedded(model, batch)
    for i in range(exit_layer):
        hidden = model.run_layer(i, hidden, layer_mask)
    return model.exits[exit_layer - 1](hidden, batch["attention_mask"])


def full_forward(model: MultiExitModel, batch: dict) -> torch.Tensor:
    """A plain classifier: every layer, the final head only."""
    return oracle_forward(model, batch, model.num_layers)


@torch.inference_mode()
def oracle_heads_forward(model: MultiExitModel, heads: list, batch: dict, exit_layer: int) -> None:
    """The oracle plus every exit head up to the exit, run as the engine runs them (``inference_fn``,
    pooling weights shared): what deciding online costs at least, before any decision is taken."""
    hidden, layer_mask = _embedded(model, batch)
    weights = pool_weights(batch["attention_mask"], hidden.dtype) if model.config.pooling == "mean" else None
    for i in range(exit_layer):
        hidden = model.run_layer(i, hidden, layer_mask)
        heads[i](hidden, weights)


@torch.inference_mode()
def naive_forward(model: MultiExitModel, batch: dict, policy) -> np.ndarray:
    """The peer approach: all layers and all heads, then exits picked from the logits."""
    logits = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))  # [L, B, C]
    return policy.decide(logits, regression=model.config.is_regression)[0]


class ReplayPolicy(ExitPolicy):
    """Benchmark only: each row leaves at a given layer, replayed from another model's real decisions.

    A random model of BERT-base's shape has no meaningful exits; replaying the trained small model's
    exits (scaled to the depth) keeps what matters for speed: which sentences leave early, and so the
    link between length and exit. Exits are fed with :meth:`load` in the order the engine starts its
    rows. A step still computes the entropy of its logits, so it costs what the entropy criterion costs
    (plus one comparison).
    """

    name = "replay"

    def __init__(self) -> None:
        super().__init__(0.0)
        self._queue = np.zeros(0, dtype=np.int64)

    def load(self, layers: np.ndarray) -> None:
        self._queue = np.asarray(layers, dtype=np.int64)

    def _init_rows(self, n: int, device) -> dict[str, torch.Tensor]:
        if n == 0:  # the engine's constructor checks the policy with an empty state
            return {}
        take, self._queue = self._queue[:n], self._queue[n:]
        if take.size != n:
            raise RuntimeError("replay: more rows than loaded exits")
        return {"target": torch.from_numpy(take).to(device)}

    def _step(self, layer: int, logits: torch.Tensor, state) -> torch.Tensor:
        p = torch.softmax(logits, dim=-1, dtype=torch.float64)
        torch.special.xlogy(p, p).sum(-1)  # the entropy criterion's work, result unused
        return state.rows["target"] == layer + 1


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
def cpu_snapshot() -> tuple[float, float, float]:
    """(wall, busy CPU-seconds of the whole machine, CPU-seconds of this process) for contention checks."""
    busy = float("nan")
    try:
        v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        busy = (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    except (OSError, ValueError, IndexError):
        pass
    t = os.times()
    return time.perf_counter(), busy, t.user + t.system


def wait_idle(max_seconds: float, need_idle_cores: float = 1.8) -> float:
    """Wait (up to ``max_seconds``) until two 2-second samples in a row see the machine idle."""
    t_end, ok = time.perf_counter() + max_seconds, 0
    cores = os.cpu_count() or 1
    while time.perf_counter() < t_end:
        start = cpu_snapshot()
        time.sleep(2.0)
        idle = cores - other_load(start)
        ok = ok + 1 if idle >= min(need_idle_cores, cores - 0.2) else 0
        if ok >= 2:
            break
    return time.perf_counter() - (t_end - max_seconds)


def other_load(start: tuple[float, float, float]) -> float:
    """Average number of cores other processes kept busy since ``start`` (0 = the machine was ours)."""
    wall, busy, own = cpu_snapshot()
    return max(0.0, ((busy - start[1]) - (own - start[2])) / max(wall - start[0], 1e-9))


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_batch_size(
    model,
    dataset,
    collator,
    bs: int,
    policies: dict,
    repeats: int,
    order: str,
    refill: bool,
    oracle: dict | None,
    replay: dict | None = None,
    naive_policy=None,
) -> dict:
    """Time every path over the whole set at batch size ``bs``; per-path times, decisions and shapes.

    Paths are interleaved in rotating order, per batch at batch size 1 (a noisy machine then slows all
    paths alike) and per pass otherwise (``run_stream`` needs the whole stream). ``replay``: per policy
    name, the exit layer of every row, for :class:`ReplayPolicy` policies.
    """
    n = len(dataset)
    idx = np.argsort(np.asarray(dataset.lengths), kind="stable") if order == "sorted" else np.arange(n)
    batches = []
    for s in range(0, n, bs):
        rows = idx[s : s + bs]
        batches.append((rows, collator([dataset[int(i)] for i in rows])))
    triples = [(b["input_ids"], b["attention_mask"], b.get("token_type_ids")) for _, b in batches]
    engines = {name: EarlyExitEngine(model, p) for name, p in policies.items()}
    mid = list(policies)[len(policies) // 2]  # the naive path's cost does not depend on the threshold
    heads = [h.inference_fn() for h in model.exits]

    naive_policy = naive_policy or policies[mid]

    def feed(name: str, js: list[int]) -> None:
        """Replay: queue the exits of these batches' rows, in the order the engine will start them."""
        if replay is not None:
            policies[name].load(np.concatenate([replay[name][batches[j][0]] for j in js]))

    def run_one(e: EarlyExitEngine, name: str, j: int):
        feed(name, [j])
        return e.run(*triples[j])

    def run_all(e: EarlyExitEngine, name: str, js: list[int]):
        feed(name, js)
        return e.run_stream([triples[j] for j in js], bs)

    # every path: (chunk of batch indices) -> None
    paths = {
        "full": lambda js: [full_forward(model, batches[j][1]) for j in js],
        "naive": lambda js: [naive_forward(model, batches[j][1], naive_policy) for j in js],
    }
    for name, e in engines.items():
        paths[f"engine@{name}"] = lambda js, e=e, name=name: [run_one(e, name, j) for j in js]
        if oracle is not None:  # batch size 1: one row per batch
            lay = oracle[name]
            paths[f"oracle@{name}"] = lambda js, lay=lay: [
                oracle_forward(model, batches[j][1], int(lay[batches[j][0][0]])) for j in js
            ]
            if name == mid:
                paths[f"heads@{name}"] = lambda js, lay=lay: [
                    oracle_heads_forward(model, heads, batches[j][1], int(lay[batches[j][0][0]])) for j in js
                ]
        if refill:
            paths[f"refill@{name}"] = lambda js, e=e, name=name: run_all(e, name, js)
    warm = list(range(max(1, min(len(batches), 64 // bs))))
    for f in paths.values():  # warm-up: allocator, thread pool, first-call paths
        f(warm)
    chunks = [[j] for j in range(len(batches))] if bs == 1 else [list(range(len(batches)))]
    names = list(paths)
    times: dict[str, list[float]] = {k: [] for k in paths}
    for r in range(repeats):
        total = dict.fromkeys(names, 0.0)
        for c, chunk in enumerate(chunks):
            shift = (r + c) % len(names)  # rotate the order: drift and bursts hit all paths alike
            for k in names[shift:] + names[:shift]:
                total[k] += timed(lambda k=k, chunk=chunk: paths[k](chunk))
        for k in names:
            times[k].append(total[k])

    # one more pass of each engine path to record its decisions and the shapes it ran
    everything = list(range(len(batches)))
    order_all = np.concatenate([rows for rows, _ in batches])  # run_stream's output order
    decisions = {}
    for k in names:
        if k.startswith("engine@"):
            outs = paths[k](everything)
            layers = np.zeros(n, dtype=np.int64)
            for (rows, _), o in zip(batches, outs):
                layers[rows] = o.exit_layer.numpy()
            decisions[k] = (layers, [s for o in outs for s in o.shapes])
        elif k.startswith("refill@"):
            o = paths[k](everything)
            layers = np.zeros(n, dtype=np.int64)
            layers[order_all] = o.exit_layer.numpy()
            decisions[k] = (layers, o.shapes)
    return {
        "num_batches": len(batches),
        "times": times,
        "decisions": decisions,
        "batch_shapes": [tuple(b["input_ids"].shape) for _, b in batches],
    }


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
    p.add_argument(
        "--replay-from",
        default=str(default_run) if default_run.is_dir() else None,
        help="with --size base: replay this trained run's exits (default: runs/quickstart-sst2 when present)",
    )
    p.add_argument(
        "--size",
        choices=["minilm", "base"],
        default="minilm",
        help="with --random-exits: the packaged MiniLM, or a random model of BERT-base's shape",
    )
    p.add_argument("--data-dir", default=None, help="GLUE folder with SST-2/dev.tsv (default: ../shared/glue)")
    p.add_argument("--criterion", default="entropy")
    p.add_argument("--patience", type=int, default=2, help="patience-confidence: k")
    p.add_argument("--speedups", default="1.5,2,3", help="target layer speed-ups")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--examples", type=int, default=256, help="dev sentences timed (a seeded random subset)")
    p.add_argument(
        "--examples-bs1", type=int, default=128, help="of which the first this many at batch size 1 (the slowest)"
    )
    p.add_argument("--repeats", type=int, default=5, help="timed passes at batch size 1 (each interleaved per batch)")
    p.add_argument(
        "--repeats-batched",
        type=int,
        default=15,
        help="timed passes at batch sizes > 1: these interleave per pass (seconds each), so the noise of a "
        "shared machine needs more of them for a stable median",
    )
    p.add_argument(
        "--order",
        choices=["sorted", "input"],
        default="sorted",
        help="batches of length-sorted sentences (as predict does) or in dev order",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        help="on a shared machine: before each batch size, wait up to this many seconds for idle CPUs",
    )
    p.add_argument("--no-calibration", action="store_true", help="skip the per-exit temperature calibration report")
    p.add_argument("--out", default=str(ROOT / "results" / "inference_speed"), help="writes <out>.md and <out>.json")
    ns = p.parse_args(argv)
    t_start = time.perf_counter()
    load_before = os.getloadavg()

    run = None if ns.random_exits else ns.run
    model, tokenizer, max_len, what = load(run, ns.size)
    task = get_task("SST-2")
    data_dir = ns.data_dir or str(ROOT.parent / "shared" / "glue")
    examples = read_split(task, data_dir, "dev")
    rng = np.random.default_rng(ns.seed)
    n = min(len(examples), ns.examples)
    chosen = np.sort(rng.choice(len(examples), n, replace=False))  # a seeded random subset, dev order
    rest = [examples[int(i)] for i in np.setdiff1d(np.arange(len(examples)), chosen)]
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

    # A random model of BERT-base's shape: replay the trained small model's exits on the same sentences.
    replay, naive_policy = None, None
    if ns.size == "base" and ns.random_exits and ns.replay_from:
        src, src_tokenizer, src_len, _ = load(ns.replay_from)
        if num_layers % src.num_layers:
            raise SystemExit(f"--replay-from: {src.num_layers} layers do not divide {num_layers}")
        src_set = encode(examples, src_tokenizer, task.labels, src_len)
        src_cached = collect_logits(src, src_set, Collator(src_tokenizer))
        scale = num_layers // src.num_layers
        replay, naive_policy = {}, policies[list(policies)[len(policies) // 2]]
        for s in targets:
            name = f"{s:g}x"
            thr, row = choose_threshold(src_cached, labels, task, ns.criterion, target_speedup=s, **policy_kw)
            replay[name] = get_policy(ns.criterion, thr, **policy_kw).decide(src_cached)[0] * scale  # [N]
            policies[name] = ReplayPolicy()
            picked[name] = {
                "threshold": thr,
                "replayed_from": ns.replay_from,
                "dev_metric": row["metric"],
                "final_metric": row["final_metric"],
                "layer_speedup_on_timed_set": row["speedup"],
            }
            print(f"target {name}: exits replayed from {ns.replay_from} (threshold {thr:.5g}) x{scale}", flush=True)
        what += f"; exits replayed from the trained run {ns.replay_from} (its exit k -> layer {scale}k)"

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
        if ns.wait_idle > 0:
            waited = wait_idle(ns.wait_idle)
            print(f"(waited {waited:.0f} s for idle CPUs)", flush=True)
        t0 = time.perf_counter()
        snap = cpu_snapshot()
        n_bs = min(n, ns.examples_bs1) if bs == 1 else n
        repeats = ns.repeats if bs == 1 else ns.repeats_batched
        ds, logits_bs = type(dataset)(dataset.features[:n_bs]), cached[:, :n_bs]
        offline = {  # every policy's decisions on the cached logits (replayed exits as given)
            name: replay[name][:n_bs] if replay is not None else p.decide(logits_bs)[0] for name, p in policies.items()
        }
        oracle = offline if bs == 1 else None
        r = bench_batch_size(model, ds, collator, bs, policies, repeats, ns.order, bs > 1, oracle, replay, naive_policy)
        med = {k: statistics.median(v) for k, v in r["times"].items()}
        full_flops = sum(num_layers * layer_flops(cfg, b, t) + head_flops(cfg, b, t, 2) for b, t in r["batch_shapes"])
        naive_flops = sum(
            num_layers * (layer_flops(cfg, b, t) + head_flops(cfg, b, t, 2)) for b, t in r["batch_shapes"]
        )
        common = {"batch_size": bs, "examples": n_bs}
        rows = [
            {**common, "path": "full", "key": "full", "speedup": 1.0, "gflops": full_flops / 1e9, "flop_speedup": 1.0},
            {
                **common,
                "path": "naive (all layers + all heads, pick after)",
                "key": "naive",
                "speedup": med["full"] / med["naive"],
                "gflops": naive_flops / 1e9,
                "flop_speedup": full_flops / naive_flops,
            },
        ]
        lengths = np.asarray(ds.lengths, dtype=np.float64)  # real tokens per sentence

        def token_speedup(layers: np.ndarray, lengths: np.ndarray = lengths) -> float:
            # A layer's cost grows with the tokens it runs, and short sentences tend to leave earlier:
            # sum(T_i * L) / sum(T_i * exit_i) is the ceiling an implementation without padding can reach.
            return float((lengths * num_layers).sum() / (lengths * layers).sum())

        oracle_keys = [k for k in r["times"] if k.startswith(("oracle@", "heads@"))]
        for key in oracle_keys:
            kind, name = key.split("@")
            lstats = layer_stats(oracle[name], num_layers)
            label = "exit layers known in advance" if kind == "oracle" else "+ every exit head up to the exit"
            rows.append(
                {
                    **common,
                    "path": f"oracle @ {name} ({label})",
                    "key": key,
                    "speedup": med["full"] / med[key],
                    "layer_speedup": lstats["speedup"],
                    "token_speedup": token_speedup(oracle[name]),
                    "ratio": (med["full"] / med[key]) / lstats["speedup"],
                    "vs_naive": med["naive"] / med[key],
                    "gflops": float("nan"),
                    "flop_speedup": float("nan"),
                }
            )
        for key, (layers, shapes) in r["decisions"].items():
            mode, name = key.split("@")
            ref = offline[name]
            lstats = layer_stats(layers, num_layers)
            e_flops = sum(layer_flops(cfg, b, t) + head_flops(cfg, b, t, 2) for b, t in shapes)
            rows.append(
                {
                    **common,
                    "path": f"{'engine' if mode == 'engine' else 'engine + refill'} @ {name}",
                    "key": key,
                    "threshold": picked[name]["threshold"],
                    "speedup": med["full"] / med[key],
                    "layer_speedup": lstats["speedup"],
                    "token_speedup": token_speedup(layers),
                    "ratio": (med["full"] / med[key]) / lstats["speedup"],
                    "vs_naive": med["naive"] / med[key],
                    "gflops": e_flops / 1e9,
                    "flop_speedup": full_flops / e_flops,
                    "layer_calls": len(shapes),
                    "exit_counts": lstats["counts"],
                    "decision_mismatches_vs_offline": int((layers != ref).sum()),
                }
            )
            if f"oracle@{name}" in med:  # the engine's speed as a fraction of the best possible
                rows[-1]["vs_oracle"] = med[f"oracle@{name}"] / med[key]
        for row in rows:
            row["seconds"] = med[row["key"]]
            # speed-up in each interleaved repeat (paired with the full model's time of that repeat)
            paired = np.asarray(r["times"]["full"]) / np.asarray(r["times"][row["key"]])
            row["speedup_range"] = [float(paired.min()), float(paired.max())]
            row["ms_per_example"] = 1e3 * row["seconds"] / n_bs
            row["all_seconds"] = r["times"][row.pop("key")]
        contention = other_load(snap)
        for row in rows:
            row["other_processes_cores"] = contention
        results += rows
        print(
            f"\nbatch size {bs} ({n_bs} sentences, {r['num_batches']} batches, {repeats} repeats, "
            f"{time.perf_counter() - t0:.0f} s; other processes kept {contention:.2f} cores busy)",
            flush=True,
        )
        print(_table(rows), flush=True)

    info = {
        "command": "python benchmarks/inference_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": what,
        "num_layers": num_layers,
        "criterion": ns.criterion,
        "examples": n,
        "examples_bs1": min(n, ns.examples_bs1),
        "order": ns.order,
        "repeats": ns.repeats,
        "repeats_batched": ns.repeats_batched,
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "flop_check": {"analytic": analytic8, "torch_flop_counter": flop_check},
        "thresholds": picked,
        "seconds_total": time.perf_counter() - t_start,
    }
    one = collator([dataset[int(np.argsort(dataset.lengths)[n // 2])]])  # a sentence of median length
    info["call_costs"] = call_costs(model, one, naive_policy or policies[list(policies)[0]])  # a real criterion
    info["exit_head_share"] = head_share(model)
    for name, c in info["call_costs"].items():
        warm = f", warm loop {c['warm_loop_us']:.1f} us" if "warm_loop_us" in c else ""
        print(f"batch size 1, {name}: {c['after_a_layer_us']:.1f} us after a layer{warm}", flush=True)
    if not ns.no_calibration and rest:
        info["calibration"] = calibration_report(model, tokenizer, collator, rest, task, max_len, cached, labels)
    info["seconds_total"] = time.perf_counter() - t_start
    write_outputs(Path(ns.out), info, results)
    print(f"\nwritten {ns.out}.md and {ns.out}.json in {info['seconds_total']:.0f} s", flush=True)
    return 0


def _table(rows: list[dict]) -> str:
    head = (
        "| batch | path | ms / example | measured speed-up (min-max of repeats) | layer speed-up | ratio "
        "| token-weighted speed-up | vs naive | GFLOPs | FLOP speed-up | exits per layer |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lo, hi = r.get("speedup_range", (r["speedup"], r["speedup"]))
        lines.append(
            f"| {r['batch_size']} | {r['path']} | {r['ms_per_example']:.2f} | {r['speedup']:.2f}x "
            f"({lo:.2f}-{hi:.2f}) | "
            + (
                f"{r['layer_speedup']:.2f}x | **{r['ratio']:.2f}** | {r['token_speedup']:.2f}x | "
                f"{r['vs_naive']:.2f}x | "
                if "layer_speedup" in r
                else "- | - | - | - | "
            )
            + (f"{r['gflops']:.1f} | {r['flop_speedup']:.2f}x | " if r["gflops"] == r["gflops"] else "- | - | ")
            + f"{r.get('exit_counts', '-')} |"
        )
    return "\n".join(lines)


# call_costs' rows that _decision_cost reads
HEAD_CALL = "exit head (pooling, pooler, classifier)"
STEP_CALL = "policy step"
SMALL_CALL = "one small torch op (logits > 0)"
LAYER_CALL = "one encoder layer, right after another layer"
LAYER_AFTER_DECISION = "one encoder layer, right after an exit head + policy step"


def call_costs(model: MultiExitModel, batch: dict, policy, repeats: int = 300) -> dict:
    """Microseconds of the calls the engine makes between two layers, timed right after a layer and
    in a warm loop. The difference is why a hot-loop micro-benchmark underestimates the engine's cost:
    a layer streams megabytes of weights through the caches and pushes out the code and data the next
    small call needs."""
    heads = [h.inference_fn() for h in model.exits]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pooler = model.exits[0].pooler
    wp, bp = pooler.weight.t(), pooler.bias
    calls = {
        HEAD_CALL: lambda h, w, lg, st: heads[0](h, w),
        STEP_CALL: lambda h, w, lg, st: policy.step(0, lg, st),
        SMALL_CALL: lambda h, w, lg, st: lg > 0,
        f"the head's pooler matmul alone ([1, H] x [H, H], {wp.numel() * wp.element_size() // 1024} KiB of weights)": (
            lambda h, w, lg, st: torch.addmm(bp, h[:, 0], wp)
        ),
    }
    out = {}
    with torch.inference_mode():
        hidden, layer_mask = _embedded(model, batch)
        weights = pool_weights(mask, hidden.dtype) if model.config.pooling == "mean" else None
        logits = heads[0](hidden, weights)
        state = policy.init_state(ids.shape[0], model.num_layers, model.config.is_regression)
        for name, f in calls.items():
            after = []
            for r in range(repeats):
                h = model.run_layer(r % model.num_layers, hidden, layer_mask)
                t0 = time.perf_counter_ns()
                f(h, weights, logits, state)
                after.append(time.perf_counter_ns() - t0)
            for _ in range(100):
                f(hidden, weights, logits, state)
            t0 = time.perf_counter_ns()
            for _ in range(repeats):
                f(hidden, weights, logits, state)
            warm = (time.perf_counter_ns() - t0) / repeats
            out[name] = {"after_a_layer_us": statistics.median(after) / 1e3, "warm_loop_us": warm / 1e3}
        # The calls between two layers also slow the next layer down (its code and data were pushed
        # out in turn): time layers right after another layer, and right after a head + policy step.
        plain, decided = [], []
        for r in range(repeats):
            h = model.run_layer(r % model.num_layers, hidden, layer_mask)
            t0 = time.perf_counter_ns()
            h = model.run_layer((r + 1) % model.num_layers, h, layer_mask)
            plain.append(time.perf_counter_ns() - t0)
            policy.step(0, heads[0](h, weights), state)[0].item()
            t0 = time.perf_counter_ns()
            model.run_layer((r + 2) % model.num_layers, h, layer_mask)
            decided.append(time.perf_counter_ns() - t0)
        out[LAYER_CALL] = {"after_a_layer_us": statistics.median(plain) / 1e3}
        out[LAYER_AFTER_DECISION] = {"after_a_layer_us": statistics.median(decided) / 1e3}
    return out


def head_share(model: MultiExitModel) -> float:
    """An exit head's parameters over an encoder layer's (pooler H x H + classifier against 12 H^2):
    what every decision reads on top of the layer itself."""
    return sum(p.numel() for p in model.exits[0].parameters()) / sum(p.numel() for p in model.layers[0].parameters())


def calibration_report(model, tokenizer, collator, fit_examples, task, max_len, cached, labels) -> dict:
    """Temperatures fitted on the dev sentences NOT timed; ECE / NLL per exit on the timed ones."""
    from romebert.calibration import apply_temperatures, calibrate, expected_calibration_error, nll

    fit_set = encode(fit_examples, tokenizer, task.labels, max_len)
    report = calibrate(collect_logits(model, fit_set, collator), dataset_labels(fit_set))
    scaled = apply_temperatures(cached, report.temperatures)
    return {
        "fitted_on": len(fit_set),
        "evaluated_on": int(cached.shape[1]),
        "temperatures": report.temperatures,
        "ece_before": [expected_calibration_error(x, labels) for x in cached],
        "ece_after": [expected_calibration_error(x, labels) for x in scaled],
        "nll_before": [nll(x, labels) for x in cached],
        "nll_after": [nll(x, labels) for x in scaled],
    }


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
        f"Model: {info['model']} ({info['num_layers']} layers). Data: {info['examples']} SST-2 dev sentences (a seeded "
        f"random subset; the first {info['examples_bs1']} of them at batch size 1), "
        f"batches of {'length-sorted' if info['order'] == 'sorted' else 'dev-order'} sentences. Criterion: "
        f"{info['criterion']}; thresholds picked on the timed sentences' cached logits for the target layer speed-ups:",
        "",
    ]
    for name, p in info["thresholds"].items():
        md.append(
            f"- {name}: threshold {p['threshold']:.5g}, layer speed-up {p['layer_speedup_on_timed_set']:.3f}, "
            f"accuracy {p['dev_metric']:.4f} (final exit {p['final_metric']:.4f})"
            + (f" — of {p['replayed_from']}, whose exits are replayed" if "replayed_from" in p else "")
        )
    md += [
        "",
        "Paths: **full** = every layer + the final head (a plain classifier); **naive** = every layer + every "
        "exit head, exits picked afterwards (the peer approach); **engine** = `EarlyExitEngine` (exited rows "
        "leave the batch after each layer, trailing padding trimmed; `run`, one batch at a time); **engine + "
        "refill** = `EarlyExitEngine.run_stream` over all batches (what `predict` uses: a layer's survivors wait "
        "until a full batch of them runs the next layer, so deep layers do not run on a few rows). "
        "**oracle** (batch 1) = every sample runs exactly the layers of its exit and one head, exit known in "
        "advance: the best any early-exit implementation could do here (its ratio is the real ceiling; the "
        "engine's distance to it is the engine's own cost); **oracle + every head** adds the exit heads the "
        "engine must run to decide online. Times are medians of "
        f"{info['repeats']} repeats at batch size 1, {info['repeats_batched']} otherwise, after a warm-up, the "
        "paths interleaved in rotating order (per batch at batch size 1, per pass otherwise: a pass takes "
        "seconds, and this shared machine's speed drifts by 10-20 % within seconds, so more of them). "
        "*Measured speed-up* = full time / path time; "
        "*layer speed-up* = N·L / Σ exit layers (the ceiling); *ratio* = measured / layer speed-up; "
        "*token-weighted speed-up* = Σ T_i·L / Σ T_i·exit_i over the sentences' real lengths T_i (a layer costs "
        "about in proportion to its tokens, and short sentences tend to leave earlier, so this is the tighter "
        "ceiling at batch size 1); "
        "FLOPs are analytic (projections, FFN and attention matmuls of the shapes each path actually ran, plus "
        f"heads); on one batch the analytic count was {info['flop_check']['analytic'] / 1e9:.3f} GFLOP vs "
        f"torch's FlopCounter {info['flop_check']['torch_flop_counter'] / 1e9:.3f} GFLOP.",
        "",
        _table(rows),
        "",
        "Other processes kept "
        + ", ".join(f"{r['other_processes_cores']:.2f} (batch {r['batch_size']})" for r in rows if r["path"] == "full")
        + " cores busy on average while each batch size was timed (0 = the machine was ours).",
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
    md += _targets(rows)
    costs = info.get("call_costs")
    if costs:
        md += [
            "Cost of the calls the engine makes between two layers (batch size 1, one sentence of median "
            "length; median over repeats): timed right after an encoder layer, as the engine runs them, "
            "and in a warm loop, as a micro-benchmark would. A layer streams its weights through the "
            "caches, so the next small call finds its code and data gone; this, not arithmetic, is most "
            "of the engine's cost per layer at batch size 1.",
            "",
            "| call | after a layer (us) | warm loop (us) |",
            "|---|---|---|",
        ]
        for name, c in costs.items():
            warm = f"{c['warm_loop_us']:.1f}" if "warm_loop_us" in c else "-"
            md.append(f"| {name} | {c['after_a_layer_us']:.1f} | {warm} |")
        md += ["", *_decision_cost(costs, info.get("exit_head_share"), rows), ""]
    cal = info.get("calibration")
    if cal:
        md += [
            f"Per-exit temperature scaling (fitted on the {cal['fitted_on']} dev sentences not timed, "
            f"evaluated on the {cal['evaluated_on']} timed ones; ECE with 15 bins):",
            "",
            "| exit | temperature | ECE before | ECE after | NLL before | NLL after |",
            "|---|---|---|---|---|---|",
        ]
        for i, t in enumerate(cal["temperatures"]):
            md.append(
                f"| {i + 1} | {t:.3f} | {cal['ece_before'][i]:.4f} | {cal['ece_after'][i]:.4f} | "
                f"{cal['nll_before'][i]:.4f} | {cal['nll_after'][i]:.4f} |"
            )
        md.append("")
    out.with_suffix(".md").write_text("\n".join(md))


def _decision_cost(costs: dict, share: float | None, rows: list[dict]) -> list[str]:
    """What one online decision costs at batch size 1, from the call costs above, and how much of the
    engine's distance to the oracle it accounts for."""
    after = {name: c["after_a_layer_us"] for name, c in costs.items()}
    head, step, small = after[HEAD_CALL], after[STEP_CALL], after[SMALL_CALL]
    plain = after[LAYER_CALL]
    slowed = after[LAYER_AFTER_DECISION] - plain
    per_layer = head + step - small  # the policy step's first-call cost is paid by the head
    text = (
        f"One decision at batch size 1 costs about {per_layer:.0f} us, {per_layer / plain:.1%} of a layer "
        f"({plain:.0f} us): the head and the policy step ({head:.0f} + {step:.0f} us), less one first-call "
        f"cost ({small:.0f} us) that the step does not pay again right after the head. A layer right after "
        f"a decision took {slowed:+.0f} us against one right after another layer. The engine pays a "
        "decision at every layer a sample passes; the oracle pays one head, at the exit."
    )
    if share is not None:
        text += (
            f" Much of it is memory, not overhead: an exit head holds {share:.1%} of a layer's parameters "
            "(its H x H pooler against the layer's 12 H^2), read afresh after every layer (the pooler "
            "matmul row: after a layer against warm)."
        )
    lines = [text]
    # Engine ~ oracle + every decision taken - the one head the oracle runs as well. A row decides
    # at each layer it passes but the last (the final head takes everyone left).
    oracle = _by_target(rows, 1, "oracle @")
    full = next((r["ms_per_example"] for r in rows if r["batch_size"] == 1 and r["path"] == "full"), None)
    predicted, measured, decisions, budget = [], [], [], []
    for target, r in _by_target(rows, 1, "engine @").items():
        if target not in oracle or "exit_counts" not in r:
            continue
        counts = r["exit_counts"]
        d = sum(c * min(k + 1, len(counts) - 1) for k, c in enumerate(counts)) / sum(counts)
        decisions.append(f"{d:.2f}")
        predicted.append(f"{oracle[target]['ms_per_example'] + (d * per_layer - head) / 1e3:.2f}")
        measured.append(f"{r['ms_per_example']:.2f}")
        if full is not None:  # the time a 0.9 ratio allows, shared among the decisions
            allowed = full / (0.9 * r["layer_speedup"]) - oracle[target]["ms_per_example"]
            budget.append(f"{(allowed * 1e3 + head) / d:.0f}")
    if predicted:
        lines += [
            "",
            f"Oracle time + decisions per sentence ({' / '.join(decisions)}) x this cost - the one head the "
            f"oracle runs too predicts {' / '.join(predicted)} ms per sentence for the engine at batch size 1; "
            f"it measured {' / '.join(measured)} ms.",
        ]
        if budget:
            lines[-1] += (
                f" A ratio of 0.9 would allow {' / '.join(budget)} us per decision, head included "
                f"(this exit head alone: {head:.0f} us)."
            )
    return lines


def _by_target(rows: list[dict], bs: int, prefix: str) -> dict[str, dict]:
    """The rows of one path at batch size ``bs``, by target speed-up ("2x"), in the table's order.
    ``prefix``: "engine @", "engine + refill @" or "oracle @" (the oracle without the extra heads)."""
    return {
        r["path"].removeprefix(prefix).split(" (")[0]: r
        for r in rows
        if r["batch_size"] == bs and r["path"].startswith(prefix) and "every exit head" not in r["path"]
    }


def _targets(rows: list[dict]) -> list[str]:
    """The issue's targets (ratio >= 0.9 at batch size 1, >= 0.8 at batch size 32) against this run."""

    def values(bs: int, prefix: str, field: str = "ratio") -> str:
        vals = [r[field] for r in _by_target(rows, bs, prefix).values() if field in r]
        return " / ".join(f"{v:.2f}" for v in vals) if vals else "-"

    return [
        "Against the targets (ratios at the thresholds above, in their order):",
        "",
        f"- batch size 1, target >= 0.9: engine {values(1, 'engine @')}. The oracle (no decision, no exit head "
        f"beyond the one it uses) reaches {values(1, 'oracle @')}: the ceiling for anything that runs these layers. "
        f"The engine runs at {values(1, 'engine @', 'vs_oracle')} of the oracle's speed.",
        f"- batch size 32, target >= 0.8: engine + refill (what `predict` uses) {values(32, 'engine + refill')}; "
        f"engine, one batch at a time, {values(32, 'engine @')}.",
        "",
    ]


def _jsonable(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(type(o))


if __name__ == "__main__":
    sys.exit(main())
