"""Checkpoint write time and size, and 2-process data-parallel CPU throughput against 1 process.

    HF_HUB_OFFLINE=1 python benchmarks/checkpoint_io.py [--json results/checkpoint_io.json]

Checkpoints: the default backbone (all-MiniLM-L6-v2, 6 layers, hidden 384) and a randomly initialised
BERT-base-sized model (12 layers, hidden 768), each with a real AdamW state (one optimizer step taken),
written by the trainer's ``save_checkpoint`` (safetensors + optimizer/scheduler + RNG, then rename).
Throughput: romebert-sdgr on synthetic batches of 64 tokens with the default backbone, one process
(2 threads) against two gloo processes (1 thread each) with the same global batch, in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import BertConfig

from romebert.model.modeling import MultiExitConfig, MultiExitModel
from romebert.training.checkpoint import TrainerState, save_checkpoint
from romebert.training.trainer import make_optimizer
from romebert.training.training_args import TrainingArguments

WORKER = r"""
import sys, time, torch
from romebert.runtime.encoding import Collator, EncodedDataset
from romebert.model.modeling import MultiExitModel
from romebert.training.trainer import Trainer
from romebert.training.training_args import TrainingArguments
n, per_rank = int(sys.argv[2]), int(sys.argv[3])
g = torch.Generator().manual_seed(0)
feats = [{"input_ids": [101] + torch.randint(1000, 20000, (62,), generator=g).tolist() + [102],
          "attention_mask": [1] * 64, "labels": i % 2} for i in range(n)]
model = MultiExitModel.from_backbone(num_labels=2)
args = TrainingArguments(output_dir=sys.argv[1], epochs=1, batch_size=per_rank, progress=False, device="cpu",
                         save_total_limit=1)
t0 = time.perf_counter()
Trainer(model, args, EncodedDataset(feats), Collator(pad_token_id=0)).train()
print("SECONDS", time.perf_counter() - t0)
"""


def checkpoint_row(name: str, model: MultiExitModel) -> dict:
    opt = make_optimizer(list(model.parameters()), TrainingArguments(output_dir="x"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ids = torch.randint(1000, 2000, (2, 16))
    model(ids).sum().backward()
    opt.step()
    with tempfile.TemporaryDirectory() as tmp:
        times = []
        for step in range(3):
            t0 = time.perf_counter()
            path = save_checkpoint(tmp, model, opt, sched, TrainerState(global_step=step + 1), keep=1)
            times.append(time.perf_counter() - t0)
        size = sum(f.stat().st_size for f in path.iterdir())
    params = sum(p.numel() for p in model.parameters())
    row = {"model": name, "parameters": params, "checkpoint_mb": size / 2**20, "write_s_median": sorted(times)[1]}
    print(f"{name:>28}  {params / 1e6:6.1f}M params  {row['checkpoint_mb']:8.1f} MiB  {row['write_s_median']:6.2f} s")
    return row


def throughput(world: int, n: int, global_batch: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(2 // world), "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "worker.py"
        script.write_text(WORKER)
        base = [str(script), str(Path(tmp) / "run"), str(n), str(global_batch // world)]
        cmd = (
            [sys.executable, *base]
            if world == 1
            else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world), *base]
        )
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    seconds = max(float(line.split()[1]) for line in out.splitlines() if line.startswith("SECONDS"))
    print(f"{world} process(es): {n / seconds:6.1f} examples/s ({seconds:.1f} s for {n})")
    return n / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--json")
    p.add_argument("--examples", type=int, default=256)
    args = p.parse_args()
    rows = [checkpoint_row("all-MiniLM-L6-v2 (default)", MultiExitModel.from_backbone(num_labels=2))]
    base = BertConfig()  # BERT-base sizes, random weights
    rows.append(checkpoint_row("BERT-base-sized, random", MultiExitModel.from_config(base, MultiExitConfig(2))))
    one = throughput(1, args.examples, 16)
    two = throughput(2, args.examples, 16)
    print(f"2 processes / 1 process: {two / one:.2f}x")
    info = {
        "command": " ".join(sys.argv),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "checkpoints": rows,
        "throughput": {"one_process": one, "two_processes": two, "ratio": two / one},
    }
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
