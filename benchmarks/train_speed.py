"""Training throughput of every method against plain fine-tuning, and the gain of length-grouped batches.

Everything is measured in this one run, on the same examples, so the ratios are comparable:

    HF_HUB_OFFLINE=1 python benchmarks/train_speed.py --task RTE --data-dir ../shared/glue --examples 320

"plain" is ordinary fine-tuning (one classifier on the last layer, cross-entropy): DeeBERT's first
stage. Each row trains one epoch over the same subset from the same initial weights.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
import transformers

from romebert.data.glue import read_split
from romebert.data.tasks import get_task
from romebert.model.modeling import MultiExitModel, default_backbone
from romebert.runtime.encoding import Collator, encode
from romebert.training.trainer import Trainer
from romebert.training.training_args import TrainingArguments

PLAIN = "plain"


def _time_one(method: str, dataset, collator, backbone: str, task, args: argparse.Namespace, group: bool) -> float:
    model = MultiExitModel.from_backbone(backbone, num_labels=task.num_labels, pooling="mean", task=task.name)
    with TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp,
            method=method,
            epochs=1,
            batch_size=args.batch_size,
            progress=False,
            group_by_length=group,
            save_total_limit=1,
            device="cpu",
        )
        trainer = Trainer(model, targs, dataset, collator)
        t0 = time.perf_counter()
        trainer.train()
        return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--task", default="RTE")
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "glue"))
    p.add_argument("--examples", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--model", default=None)
    p.add_argument("--repeats", type=int, default=2, help="timed passes per method (median reported)")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()

    task = get_task(args.task)
    backbone = args.model or default_backbone()
    tokenizer = transformers.AutoTokenizer.from_pretrained(backbone)
    examples = read_split(task, args.data_dir, "train")[: args.examples]
    dataset = encode(examples, tokenizer, task.labels, 128)
    collator = Collator(tokenizer)
    warm_up = encode(examples[:32], tokenizer, task.labels, 128)
    _time_one(PLAIN, warm_up, collator, backbone, task, args, True)

    configs = [
        (PLAIN, False),
        (PLAIN, True),
        ("deebert", True),
        ("deebert-sd", True),
        ("romebert-sd", True),
        ("romebert-sdgr", True),
        ("romebert-sdgr", False),
    ]
    times: dict[tuple[str, bool], list[float]] = {c: [] for c in configs}
    for r in range(args.repeats):
        shift = r % len(configs)  # rotate the order: a slow spell of the machine hits every method alike
        for method, group in configs[shift:] + configs[:shift]:
            seconds = _time_one(method, dataset, collator, backbone, task, args, group)
            times[(method, group)].append(seconds)
            print(
                f"[{r + 1}/{args.repeats}] {method:>14}  group_by_length={str(group):5}  {seconds:7.1f} s", flush=True
            )
    rows = []
    for (method, group), ts in times.items():
        seconds = statistics.median(ts)
        rows.append(
            {
                "method": method,
                "group_by_length": group,
                "seconds": seconds,
                "all_seconds": ts,
                "examples_per_s": len(dataset) / seconds,
            }
        )
    base = next(r["seconds"] for r in rows if r["method"] == PLAIN and r["group_by_length"])
    print(
        f"\nmedians of {args.repeats}; relative to plain fine-tuning with length grouping "
        f"({base:.1f} s for {len(dataset)} examples):"
    )
    for r in rows:
        r["relative_to_plain"] = r["seconds"] / base
        print(f"{r['method']:>14}  group_by_length={str(r['group_by_length']):5}  x{r['relative_to_plain']:.2f}")
    info = {
        "command": " ".join(sys.argv),
        "task": task.name,
        "examples": len(dataset),
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "rows": rows,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
