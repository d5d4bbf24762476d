"""The training loop shared by every method: AdamW, linear schedule, clipping, accumulation, logging,
per-epoch checkpoints. What differs between methods lives in ``methods.py`` as data.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from romebert.errors import RomebertError
from romebert.methods import GR_ANCHORS, LossSettings, Stage, get_method, stage_losses
from romebert.modeling import MultiExitModel
from romebert.projection import project_conflicting

CHECKPOINT_DIR = "checkpoints"
STATE_NAME = "trainer_state.json"


@dataclass
class TrainingArguments:
    """Defaults are the reference's (``method.md``): lr 2e-5, batch 8, 3 epochs, no warmup, clip 1.0."""

    output_dir: str
    method: str = "romebert-sdgr"
    epochs: float = 3.0
    learning_rate: float = 2e-5
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    gamma: float = 0.9
    temperature: float = 3.0
    kd_reduction: str = "mean"
    gr_anchor: str = "exits"  # GR anchor A (kept as is): "exits", "final", or "auto" (the task's default)
    group_by_length: bool = True
    log_every: int = 10
    save_total_limit: int = 1
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        get_method(self.method)
        if self.gr_anchor not in (*GR_ANCHORS, "auto"):
            raise RomebertError(f"gr_anchor must be one of {list(GR_ANCHORS)}, got {self.gr_anchor!r}")
        if self.kd_reduction not in ("mean", "batchmean"):
            raise RomebertError(f"kd_reduction must be 'mean' or 'batchmean', got {self.kd_reduction!r}")
        if self.batch_size < 1 or self.gradient_accumulation_steps < 1 or self.epochs <= 0:
            raise RomebertError("batch_size, gradient_accumulation_steps and epochs must be positive")

    def save(self, path: str | Path) -> None:
        _write_json(Path(path), asdict(self))

    @property
    def loss_settings(self) -> LossSettings:
        return LossSettings(self.gamma, self.temperature, self.kd_reduction)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(params: list[nn.Parameter], args: TrainingArguments) -> torch.optim.Optimizer:
    # fused AdamW runs on CPU and GPU and is several times faster than the per-tensor loop on CPU
    return torch.optim.AdamW(
        params, lr=args.learning_rate, eps=args.adam_epsilon, weight_decay=args.weight_decay, fused=True
    )


def trainable_parameters(model: MultiExitModel, stage: Stage) -> list[nn.Parameter]:
    """Set ``requires_grad`` for the stage and return the parameters it trains."""
    if stage.trains == "all":
        chosen = list(model.parameters())
    elif stage.trains == "backbone+final":
        chosen = list(model.backbone.parameters()) + model.final_head_parameters()
    elif stage.trains == "exits":
        chosen = model.early_exit_parameters()
    else:  # pragma: no cover - METHODS is fixed
        raise ValueError(stage.trains)
    ids = {id(p) for p in chosen}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    return chosen


class GradientAccumulator:
    """Two backward passes per micro-batch, g_A kept apart on S, one projection per optimizer step.

    Pass 1 differentiates A with respect to S only (S is all that needs g_A on its own, and skipping
    the rest, e.g. the dense word-embedding gradient, saves time). Pass 2 backpropagates A + B into
    ``.grad`` of every parameter, accumulating across micro-batches as usual. At the step, on S,
    g_B = total - g_A uses the *accumulated* g_A, so the projection sees exactly the gradients of the
    full (accumulated) batch: projecting each micro-batch and summing would not (the projection is not
    linear), and neither does the reference, which subtracted a per-micro-batch g_A from an
    accumulated total.
    """

    def __init__(self, params: list[nn.Parameter], projected: list[nn.Parameter]) -> None:
        trainable = {id(p) for p in params}
        self.projected = [p for p in projected if id(p) in trainable]
        self.grad_a: list[Tensor] | None = None

    def add(self, loss_a: Tensor, loss_b: Tensor, scale: float) -> None:
        if self.projected:
            ga = torch.autograd.grad(loss_a * scale, self.projected, retain_graph=True, allow_unused=True)
            ga = [g if g is not None else torch.zeros_like(p) for g, p in zip(ga, self.projected)]
            if self.grad_a is None:
                self.grad_a = list(ga)
            else:
                torch._foreach_add_(self.grad_a, ga)
        ((loss_a + loss_b) * scale).backward()

    def apply(self) -> dict[str, float | bool]:
        """Replace ``.grad`` on S by g_A + g_B'; returns the angle / norm statistics of g_A and g_B."""
        if self.grad_a is None:
            return {}
        totals = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.projected]
        grad_b = torch._foreach_sub(totals, self.grad_a)
        grad_b, stats = project_conflicting(self.grad_a, grad_b)
        for p, a, b in zip(self.projected, self.grad_a, grad_b):
            p.grad = a.add_(b)
        self.grad_a = None
        return stats.as_dict()


class Trainer:
    """Trains a :class:`MultiExitModel` with one of the methods of ``methods.py``."""

    def __init__(self, model: MultiExitModel, args: TrainingArguments, train_dataset: Dataset, collator) -> None:
        self.model = model
        self.args = args
        self.train_dataset = train_dataset
        self.collator = collator
        self.stages = get_method(args.method)
        self.device = resolve_device(args.device)
        self.output_dir = Path(args.output_dir)
        self.log_path = self.output_dir / "train_log.jsonl"

    # ------------------------------------------------------------------------------------------
    def _dataloader(self, epoch: int) -> DataLoader:
        from romebert.data import make_dataloader

        loader = make_dataloader(
            self.train_dataset,
            self.args.batch_size,
            self.collator,
            shuffle=True,
            seed=self.args.seed,
            group_by_length=self.args.group_by_length,
        )
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        return loader

    def _log(self, record: dict) -> None:
        with self.log_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def train(self, resume: bool = False) -> dict:
        """Run every stage of the method; returns a summary (wall time per stage, steps, last loss)."""
        args = self.args
        self.output_dir.mkdir(parents=True, exist_ok=True)
        args.save(self.output_dir / "training_args.json")
        self.model.to(self.device)
        start = find_latest_checkpoint(self.output_dir) if resume else None
        if start is None and self.log_path.exists():
            self.log_path.unlink()  # a fresh run starts a fresh log
        summary: dict = {"method": args.method, "stages": []}
        steps_per_epoch = math.ceil(
            math.ceil(len(self.train_dataset) / args.batch_size) / args.gradient_accumulation_steps
        )
        n_epochs = math.ceil(args.epochs)
        total_steps = max(1, math.ceil(steps_per_epoch * args.epochs))
        for stage_index, stage in enumerate(self.stages):
            if start is not None and stage_index < start["stage_index"]:
                continue
            set_seed(args.seed + stage_index)
            params = trainable_parameters(self.model, stage)
            optimizer = make_optimizer(params, args)
            scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * total_steps), total_steps)
            first_epoch, global_step = 0, 0
            if start is not None and stage_index == start["stage_index"]:
                first_epoch, global_step = load_checkpoint(start["path"], self.model, optimizer, scheduler)
                start = None
                if first_epoch >= n_epochs:
                    continue
            accumulator = GradientAccumulator(params, self.model.projection_parameters()) if stage.project else None
            t0 = time.perf_counter()
            last: dict = {}
            for epoch in range(first_epoch, n_epochs):
                global_step, last = self._train_epoch(
                    stage, stage_index, epoch, params, optimizer, scheduler, accumulator, global_step, total_steps
                )
                save_checkpoint(
                    self.output_dir,
                    self.model,
                    optimizer,
                    scheduler,
                    stage_index,
                    stage.name,
                    epoch + 1,
                    global_step,
                    args.save_total_limit,
                )
            summary["stages"].append(
                {"stage": stage.name, "seconds": time.perf_counter() - t0, "steps": global_step, **last}
            )
        for p in self.model.parameters():
            p.requires_grad_(True)
        return summary

    def _train_epoch(
        self, stage, stage_index, epoch, params, optimizer, scheduler, accumulator, global_step, total_steps
    ):
        args = self.args
        self.model.train()
        loader = self._dataloader(epoch)
        settings = args.loss_settings
        accum = args.gradient_accumulation_steps
        n_batches = len(loader)
        if args.epochs < epoch + 1:  # fractional last epoch
            n_batches = max(1, int(round(n_batches * (args.epochs - epoch))))
        bar = tqdm(total=n_batches, desc=f"{stage.name} epoch {epoch + 1}", disable=not args.progress, leave=False)
        last: dict = {}
        running: dict[str, float] = {}
        for batch_index, batch in enumerate(loader):
            if batch_index >= n_batches or global_step >= total_steps:
                break
            batch = {k: v.to(self.device) for k, v in batch.items()}
            labels = batch.pop("labels")
            logits = self.model(**batch, frozen_backbone=stage.frozen_backbone)
            final, exits = stage_losses(stage, logits, labels, settings)
            terms = {k: v for k, v in (("final_loss", final), ("exit_loss", exits)) if v is not None}
            loss = sum(terms.values())
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise RomebertError(
                    f"non-finite loss ({loss_value}) at stage {stage.name!r}, epoch {epoch + 1}, "
                    f"step {global_step + 1}; "
                    f"the last good checkpoint is kept in {self.output_dir / CHECKPOINT_DIR}"
                )
            # the last group of an epoch may be short: scale by its real size so it is a mean too
            group = min(accum, n_batches - (batch_index // accum) * accum)
            if accumulator is not None:
                loss_a, loss_b = (final, exits) if args.gr_anchor == "final" else (exits, final)
                accumulator.add(loss_a, loss_b, 1.0 / group)
            else:
                (loss / group).backward()
            for k, v in terms.items():
                running[k] = running.get(k, 0.0) + float(v.detach()) / group
            running["loss"] = running.get("loss", 0.0) + loss_value / group
            if (batch_index + 1) % accum and batch_index + 1 < n_batches:
                continue
            gr = accumulator.apply() if accumulator is not None else {}
            grad_norm = (
                float(torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)) if args.max_grad_norm > 0 else 0.0
            )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            bar.update(min(accum, n_batches - bar.n))
            last = {k: round(v, 6) for k, v in running.items()}
            if global_step % args.log_every == 0 or global_step == 1:
                self._log(
                    {
                        "stage": stage.name,
                        "epoch": epoch + 1,
                        "step": global_step,
                        "lr": scheduler.get_last_lr()[0],
                        "grad_norm": grad_norm,
                        **last,
                        **gr,
                    }
                )
                bar.set_postfix(loss=f"{last['loss']:.4f}")
            running = {}
        bar.close()
        return global_step, last


# ----------------------------------------------------------------------------------------------
# checkpoints: one folder per epoch, written under a temporary name and renamed when complete
def save_checkpoint(
    output_dir: Path,
    model: MultiExitModel,
    optimizer,
    scheduler,
    stage_index: int,
    stage: str,
    epoch: int,
    global_step: int,
    keep: int,
) -> Path:
    root = output_dir / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"stage{stage_index}-epoch{epoch:03d}"
    tmp = root / (final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    _write_json(
        tmp / STATE_NAME, {"stage_index": stage_index, "stage": stage, "epoch": epoch, "global_step": global_step}
    )
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    complete = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.endswith(".tmp"))
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_latest_checkpoint(output_dir: str | Path) -> dict | None:
    """Newest complete checkpoint (stage, epoch) under ``output_dir``, or None."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return None
    found = []
    for p in root.iterdir():
        state = p / STATE_NAME
        if p.name.endswith(".tmp") or not state.is_file():
            continue
        try:
            s = json.loads(state.read_text(encoding="utf-8"))
            found.append((s["stage_index"], s["epoch"], str(p)))
        except (json.JSONDecodeError, KeyError):
            continue
    if not found:
        return None
    stage_index, epoch, path = max(found)
    return {"stage_index": stage_index, "epoch": epoch, "path": path}


def load_checkpoint(path: str | Path, model: MultiExitModel, optimizer, scheduler) -> tuple[int, int]:
    """Restore model, optimizer and scheduler; returns (epochs done, global step)."""
    path = Path(path)
    loaded = MultiExitModel.from_pretrained(path, map_location="cpu")
    model.load_state_dict(loaded.state_dict())
    device = next(model.parameters()).device
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    state = json.loads((path / STATE_NAME).read_text(encoding="utf-8"))
    return int(state["epoch"]), int(state["global_step"])


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
