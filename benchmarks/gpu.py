"""The GPU check that fits a short loan (issue 25): in one command, on one GPU, without a network,

    source .gpu/setup.sh; python benchmarks/gpu.py --device cuda          # results/gpu.{md,json}

1. training steps/s at fp32, bf16 and fp16, for the quick-start model (the packaged MiniLM) and a
   BERT-base-sized one (12 layers, hidden 768, random weights), batch 32 x 128 tokens, romebert-sdgr's loss;
2. the quick-start run's dev accuracy per exit trained at bf16 against fp32 (SST-2, 16,000 sentences,
   1 epoch, mixed);
3. the engine against the full model (final head only, eager) at batch sizes 1, 32 and 256 on SST-2 dev, at
   the entropy threshold that gives 2x layer speed-up on dev, in the training precision.

`--quick` shrinks everything to seconds (for a check on the CPU: `--device cpu --quick`). Nothing is
downloaded: the backbone is the packaged one, the data is `$ROMEBERT_GLUE_DIR` or `--data-dir`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import BertConfig

from romebert.core.devices import autocast, resolve_device
from romebert.core.environment import backbone_label, environment
from romebert.core.files import write_atomic, write_json
from romebert.data.spec import DataSpec
from romebert.evaluation.exits import choose_threshold
from romebert.evaluation.logits import collect_logits
from romebert.jobs.pipeline import train_run
from romebert.model.modeling import MultiExitConfig, MultiExitModel
from romebert.runtime.encoding import Collator, encode
from romebert.runtime.engine import EarlyExitEngine, in_length_order
from romebert.runtime.policies import get_policy
from romebert.training.losses import stage_losses
from romebert.training.methods import METHODS, LossSettings
from romebert.training.precision import LossScaler
from romebert.training.training_args import TrainingArguments

PRECISIONS = ("fp32", "bf16", "fp16")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steps_per_second(model: MultiExitModel, device: torch.device, precision: str, batch: int, tokens: int,
                     steps: int) -> float:  # fmt: skip
    """Optimizer steps per second of romebert-sdgr's joint loss (without the projection's second pass)."""
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(5, model.backbone.config.vocab_size, (batch, tokens), device=device)
    mask, labels = torch.ones_like(ids), torch.randint(0, 2, (batch,), device=device)
    stage, scaler = METHODS["romebert-sd"][0], LossScaler() if precision == "fp16" else None
    for i in range(steps + 3):  # 3 warm-up steps
        if i == 3:
            _sync(device)
            t0 = time.perf_counter()
        with autocast(device, precision):
            logits = model(ids, mask)
        final, exits = stage_losses(stage, logits.float(), labels, LossSettings())
        ((final + exits) * (scaler.scale if scaler else 1.0)).backward()
        if scaler is None or scaler.unscale([p.grad for p in model.parameters()]):
            opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    return steps / (time.perf_counter() - t0)


def _time(fn, device: torch.device, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def engine_against_full(model, dataset, device, precision, threshold, batch_sizes, repeats) -> list[dict]:
    """ms per sentence of the full model (final head only) and of the engine at ``threshold``."""
    collator = Collator(pad_token_id=0, return_tensors="np")
    engine = EarlyExitEngine(model.segments(precision), get_policy("entropy", threshold))

    def full(batches) -> None:
        with torch.inference_mode(), autocast(device, precision):
            for ids, mask, types in batches:
                t = [torch.from_numpy(x).to(device) if x is not None else None for x in (ids, mask, types)]
                model(*t)[-1].float().cpu()

    rows = []
    for bs in batch_sizes:
        n = len(dataset)
        t_full = _time(lambda bs=bs: in_length_order(dataset, collator, bs, full), device, repeats)
        t_early = _time(lambda bs=bs: engine.run_dataset(dataset, collator, bs), device, repeats)
        layers = float(engine.run_dataset(dataset, collator, bs).exit_layer.mean())
        rows.append({"batch_size": bs, "full_ms": 1e3 * t_full / n, "engine_ms": 1e3 * t_early / n,
                     "speedup": t_full / t_early, "layer_speedup": model.num_layers / layers,
                     "full_at_mean_depth_ms": 1e3 * t_full / n * layers / model.num_layers})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--data-dir", default=os.environ.get("ROMEBERT_GLUE_DIR", "../shared/glue"))
    p.add_argument("--out", default="results/gpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a check of the script, not a measurement")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    quick = args.quick
    report: dict = {"environment": environment(args.device), "quick": quick, "steps_per_second": {}}
    # 1. training steps/s
    base = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    if quick:
        base = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    models = {
        "quick-start (packaged MiniLM)": lambda: MultiExitModel.from_backbone(None, num_labels=2, pooling="mean"),
        "BERT-base-sized (random)": lambda: MultiExitModel.from_config(base, MultiExitConfig(2, "mean")),
    }
    for name, make in models.items():
        for precision in PRECISIONS:
            sps = steps_per_second(
                make(), device, precision, 4 if quick else 32, 16 if quick else 128, 2 if quick else 20
            )
            report["steps_per_second"].setdefault(name, {})[precision] = sps
            print(f"{name} {precision}: {sps:.2f} steps/s", flush=True)
    # 2. the quick-start run at fp32 and bf16
    data = DataSpec(task="SST-2", data_dir=args.data_dir, max_train_examples=64 if quick else 16000)
    per_exit, runs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "bf16"):
            targs = TrainingArguments(output_dir=f"{tmp}/{precision}", epochs=1, batch_size=16, learning_rate=5e-5,
                                      device=args.device, precision=precision, progress=False)  # fmt: skip
            t0 = time.perf_counter()
            runs[precision] = trained = train_run(data, targs)
            dev = trained.data.examples("dev")[: 64 if quick else None]
            dataset = encode(dev, trained.tokenizer, trained.data.task_spec().labels, 128)
            labels = np.asarray([f["labels"] for f in dataset.features])
            logits = collect_logits(trained.model, dataset, Collator(trained.tokenizer), 64, precision)
            accuracy = [float((x.argmax(-1) == labels).mean()) for x in logits]
            per_exit[precision] = {"seconds": time.perf_counter() - t0, "accuracy": accuracy, "examples": len(dev)}
            print(f"quick-start at {precision}: exits {[round(100 * a, 2) for a in accuracy]}", flush=True)
            if precision == "fp32":
                engine_data = (dataset, logits, labels)
        report["quick_start"] = per_exit
        # 3. engine against the full model, on the fp32 run's model at the dev threshold for 2x
        trained = runs["fp32"]
        dataset, logits, labels = engine_data
        threshold, _ = choose_threshold(logits, labels, trained.data.task_spec(), target_speedup=2.0)
        model = trained.model.to(device).eval()
        report["engine"] = {}
        for precision in ("fp32", "bf16"):
            report["engine"][precision] = engine_against_full(model, dataset, device, precision, threshold,
                                                              (1, 32, 256), 1 if quick else 3)  # fmt: skip
            for r in report["engine"][precision]:
                print(f"engine {precision} bs {r['batch_size']}: {r['speedup']:.2f}x the full model "
                      f"(layer speed-up {r['layer_speedup']:.2f}x)", flush=True)  # fmt: skip
    report["backbone"] = backbone_label(None)
    out = Path(args.out)
    write_json(out.with_suffix(".json"), report)
    write_atomic(out.with_suffix(".md"), render(report))
    print(f"written {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 0


def render(rep: dict) -> str:
    env = rep["environment"]
    quick = " QUICK MODE: a check of the script, not a measurement." if rep["quick"] else ""
    machine = f"{env.get('gpu') or env['cpu']} ({env['device']})"
    lines = [
        "# GPU check (benchmarks/gpu.py)",
        "",
        f"Machine: {machine}; torch {env['torch']}, transformers {env['transformers']}; {rep.get('backbone')}.{quick}",
        "",
        "## Training steps/s (batch 32 x 128 tokens)",
        "",
        "| model | fp32 | bf16 | fp16 |",
        "|---|---|---|---|",
    ]
    for name, row in rep["steps_per_second"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[p]:.2f}" for p in PRECISIONS) + " |")
    lines += [
        "",
        "## Quick-start dev accuracy per exit (%)",
        "",
        "| precision | exits 1..L | seconds |",
        "|---|---|---|",
    ]
    for p, r in rep["quick_start"].items():
        lines.append(f"| {p} | {' / '.join(f'{100 * a:.1f}' for a in r['accuracy'])} | {r['seconds']:.0f} |")
    header = ["precision", "batch", "full ms/sentence", "engine ms/sentence", "speed-up", "layer speed-up",
              "engine / full at mean depth"]  # fmt: skip
    lines += ["", "## Engine against the full model (SST-2 dev, entropy threshold for 2x on dev)", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for p, rows in rep["engine"].items():
        for r in rows:
            cells = [p, str(r["batch_size"]), f"{r['full_ms']:.3f}", f"{r['engine_ms']:.3f}", f"{r['speedup']:.2f}x",
                     f"{r['layer_speedup']:.2f}x", f"{r['engine_ms'] / r['full_at_mean_depth_ms']:.2f}"]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
