"""The training loop shared by every method: AdamW, linear schedule, clipping, accumulation, logging,
checkpoints and resume. What differs between methods lives in ``methods.py`` as data.
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from romebert.core.devices import autocast, resolve_device, resolve_precision
from romebert.core.errors import RomebertError
from romebert.model.modeling import MultiExitModel
from romebert.training.batching import Prefetcher
from romebert.training.checkpoint import (
    CHECKPOINT_DIR,
    TrainerState,
    capture_rng,
    list_checkpoints,
    load_latest,
    read_state,
    restore_rng,
    save_checkpoint,
)
from romebert.training.distributed import init_distributed, shard
from romebert.training.losses import (
    cosee_sample_weights,
    energy_signal,
    margin_loss,
    simulated_exit_layers,
    stage_losses,
    weighted_stage_losses,
)
from romebert.training.methods import Stage, get_method
from romebert.training.precision import LossScaler, allow_tf32
from romebert.training.projection import project_conflicting
from romebert.training.training_args import TrainingArguments


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(params: list[nn.Parameter], args: TrainingArguments) -> torch.optim.Optimizer:
    """AdamW; biases and normalisation weights (the 1-D parameters) are exempt from weight decay unless
    ``decay_bias_and_norm`` (the reference exempts exactly these: bias and LayerNorm.weight)."""
    groups: list[dict] = [{"params": params, "weight_decay": args.weight_decay}]
    if args.weight_decay and not args.decay_bias_and_norm:
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
    # fused AdamW runs on CPU and GPU and is several times faster than the per-tensor loop on CPU
    return torch.optim.AdamW(groups, lr=args.learning_rate, eps=args.adam_epsilon, fused=True)


def trainable_parameters(model: MultiExitModel, stage: Stage, grad_everywhere: bool = False) -> list[nn.Parameter]:
    """Set ``requires_grad`` for the stage and return the parameters it trains.

    ``grad_everywhere``: every parameter still gets a gradient (the reference's DeeBERT stage two, whose
    clipping norm counts the frozen encoder's gradients); only the returned ones are optimised.
    """
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
        p.requires_grad_(grad_everywhere or id(p) in ids)
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

    def ensure_grad_a(self) -> list[Tensor]:
        """The accumulated g_A on S (zeros where this process saw no data), for the all-reduce."""
        if self.grad_a is None:
            self.grad_a = [torch.zeros_like(p) for p in self.projected]
        return self.grad_a

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
    """Trains a :class:`MultiExitModel` with one of the methods of ``methods.py``.

    Under a multi-process launcher each rank trains on its share of every global batch
    (``batch_size`` per rank); gradients are summed in one collective per optimizer step
    (``distributed.py``), so every rank holds the same parameters.
    """

    def __init__(self, model: MultiExitModel, args: TrainingArguments, train_dataset: Dataset, collator) -> None:
        self.model = model
        self.args = args
        self.train_dataset = train_dataset
        self.collator = collator
        self.stages = get_method(args.method)
        args = self.args = args.for_task(model.config.task)
        if model.config.is_regression and any(args.weighting(s) != "none" for s in self.stages):
            raise RomebertError("sample weighting 'cosee' needs class predictions; it does not apply to regression")
        self.device = resolve_device(args.device)
        self.precision = resolve_precision(args.precision, self.device)
        self.scaler: LossScaler | None = None  # fp16's loss scale, per stage (its state is in the checkpoints)
        allow_tf32(self.device, args.tf32)
        self.dist = init_distributed(self.device)
        self.output_dir = Path(args.output_dir)
        self.log_path = self.output_dir / "train_log.jsonl"
        self.global_batch = args.batch_size * self.dist.world_size
        batches = math.ceil(len(train_dataset) / self.global_batch)
        self.total_steps = max(1, math.ceil(math.ceil(batches / args.gradient_accumulation_steps) * args.epochs))
        self.params: list[nn.Parameter] = []  # what the current stage optimises
        self.clipped: list[nn.Parameter] = []  # whose gradients count in the clipping norm (and are summed)
        # (perf_counter(), process_time()) at which the current stage would have started, if never interrupted
        self._stage_start = (0.0, 0.0)

    # ------------------------------------------------------------------------------------------
    def _epoch_batches(self, epoch: int) -> list[tuple[list[int], int]]:
        """(this rank's indices, global batch size) for every global batch of ``epoch``, in seeded order."""
        from romebert.training.batching import make_dataloader, set_epoch

        loader = make_dataloader(
            self.train_dataset,
            self.global_batch,
            self.collator,
            shuffle=True,
            seed=self.args.seed,
            group_by_length=self.args.group_by_length,
        )
        set_epoch(loader, epoch)
        order = list(loader.sampler)
        chunks = [order[i : i + self.global_batch] for i in range(0, len(order), self.global_batch)]
        return [(shard(chunk, self.dist), len(chunk)) for chunk in chunks]

    def _clips_frozen(self, stage: Stage) -> bool:
        return stage.frozen_backbone and self.args.clip_frozen_gradients

    def _make_optim(self, stage_index: int):
        stage = self.stages[stage_index]
        self.params = trainable_parameters(self.model, stage, grad_everywhere=self._clips_frozen(stage))
        self.clipped = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = make_optimizer(self.params, self.args)
        warmup = int(self.args.warmup_ratio * self.total_steps)
        return optimizer, get_linear_schedule_with_warmup(optimizer, warmup, self.total_steps)

    def _log(self, record: dict) -> None:
        if self.dist.is_main:
            with self.log_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _elapsed(self) -> tuple[float, float]:
        """Wall and CPU seconds of the current stage so far."""
        wall, cpu = self._stage_start
        return time.perf_counter() - wall, time.process_time() - cpu

    def _save(self, optimizer, scheduler, state: TrainerState) -> None:
        state.seconds, state.cpu_seconds = self._elapsed()
        # Every rank's RNG goes into rank 0's checkpoint (ranks draw different dropout masks), so a
        # resumed data-parallel run continues exactly; one small collective per save.
        rank_rng = self.dist.all_gather_json(capture_rng(self.device), self.device) if self.dist.enabled else []
        if self.dist.is_main:
            state.rank_rng = rank_rng
            save_checkpoint(self.output_dir, self.model, optimizer, scheduler, state, self.args.save_total_limit,
                            self.device)  # fmt: skip

    def _restore_rng(self, state: TrainerState) -> None:
        saved_world = len(state.rank_rng) or 1
        if saved_world != self.dist.world_size and self.dist.is_main:
            warnings.warn(
                f"checkpoint step {state.global_step} was written by {saved_world} process(es), resuming on "
                f"{self.dist.world_size}: data order and optimizer continue, dropout masks differ from an "
                "uninterrupted run",
                stacklevel=2,
            )
        if len(state.rank_rng) == self.dist.world_size:
            restore_rng(state.rank_rng[self.dist.rank], self.device)
        else:
            restore_rng(state.rng, self.device)

    def train(self, resume: bool = False) -> dict:
        """Run every stage of the method; returns a summary (wall time per stage, steps, last loss).

        ``resume``: continue from the newest loadable checkpoint in ``output_dir`` (same data order,
        RNG states, optimizer and schedule, so the result equals an uninterrupted run). Under a launcher,
        a finished run leaves the process group that this trainer joined.
        """
        args = self.args
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            args.save(self.output_dir / "training_args.json")
        if self.model.config.is_regression and self.model.config.target_scaling is None:
            # Deterministic in the data, so a resumed run (a fresh model) gets the same scaling.
            ds = self.train_dataset
            self.model.fit_target_scaling(np.asarray([ds[i]["labels"] for i in range(len(ds))], dtype=np.float64))
        self.model.to(self.device)
        self.dist.broadcast_module(self.model)
        resumed = load_latest(self.output_dir, self.model, self._make_optim) if resume else None
        if resumed is None and self.log_path.exists() and self.dist.is_main:
            self.log_path.unlink()  # a fresh run starts a fresh log
        summary: dict = {
            "method": args.method,
            "stages": [],
            "resumed_from_step": None,
            "world_size": self.dist.world_size,
            "precision": self.precision,
        }
        for stage_index, stage in enumerate(self.stages):
            if resumed is not None and stage_index < resumed[0].stage_index:
                continue
            if resumed is not None and stage_index == resumed[0].stage_index:
                state, optimizer, scheduler = resumed
                resumed = None
                summary["resumed_from_step"] = {"stage": stage.name, "step": state.global_step}
                summary["stages"] = list(state.finished)
                if state.stage_done:
                    done = {"stage": stage.name, "seconds": state.seconds, "cpu_seconds": state.cpu_seconds,
                            "steps": state.global_step}  # fmt: skip
                    summary["stages"].append(done)
                    continue
                self._restore_rng(state)
            else:
                set_seed(args.seed + stage_index + 1000 * self.dist.rank)  # ranks draw different dropout masks
                optimizer, scheduler = self._make_optim(stage_index)
                state = TrainerState(stage_index=stage_index, stage=stage.name, finished=list(summary["stages"]))
            # a resumed stage counts its earlier time
            self._stage_start = (time.perf_counter() - state.seconds, time.process_time() - state.cpu_seconds)
            last = self._train_stage(stage, state, optimizer, scheduler)
            seconds, cpu = self._elapsed()
            summary["stages"].append({"stage": stage.name, "seconds": seconds, "cpu_seconds": cpu,
                                      "steps": state.global_step, **last})  # fmt: skip
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.dist.close()  # training's collectives are over (only on success: a failed rank never waits here)
        return summary

    def _train_stage(self, stage: Stage, state: TrainerState, optimizer, scheduler) -> dict:
        args = self.args
        accum = args.gradient_accumulation_steps
        accumulator = GradientAccumulator(self.params, self.model.projection_parameters()) if stage.project else None
        self.scaler = LossScaler(**(state.loss_scale or {})) if self.precision == "fp16" else None
        n_epochs = math.ceil(args.epochs)
        last: dict = {}
        while state.epoch < n_epochs:
            epoch = state.epoch
            batches = self._epoch_batches(epoch)
            n_batches = len(batches)
            if args.epochs < epoch + 1:  # fractional last epoch
                n_batches = max(1, int(round(n_batches * (args.epochs - epoch))))
            bar = tqdm(
                total=n_batches,
                initial=state.batches_done,
                desc=f"{stage.name} epoch {epoch + 1}",
                disable=not (args.progress and self.dist.is_main),
                leave=False,
            )
            self.model.train()
            # loss terms + a non-finite flag, summed on the device: read once per optimizer step
            running = torch.zeros(len(_TERMS) + 1, dtype=torch.float64, device=self.device)
            feed = Prefetcher(self.collator, self.train_dataset, batches, state.batches_done, n_batches, self.device)
            for batch_index in range(state.batches_done, n_batches):
                if state.global_step >= self.total_steps:
                    break
                indices, global_size = batches[batch_index]
                group = min(accum, n_batches - batch_index // accum * accum)
                batch = feed.next()  # collated ahead, in pinned memory on a GPU
                if indices:  # a rank can get nothing from a short last batch; it still joins the collective
                    scale = len(indices) / global_size / group
                    running += self._backward(stage, batch, accumulator, scale, state, batch_index)
                bar.update(1)
                if (batch_index + 1) % accum and batch_index + 1 < n_batches:
                    continue
                self._synchronise(accumulator, running)
                if running[-1] > 0:
                    raise RomebertError(
                        f"non-finite loss at stage {stage.name!r}, epoch {epoch + 1}, step {state.global_step + 1}; "
                        f"training stopped, the last good checkpoint is in {self.output_dir / CHECKPOINT_DIR}"
                    )
                finite = True
                if self.scaler is not None:  # fp16: every gradient back to its true size before it is read
                    extra = accumulator.ensure_grad_a() if accumulator is not None else []
                    finite = self.scaler.unscale([p.grad for p in self.clipped] + extra)
                    self.scaler.update(finite)
                    state.loss_scale = self.scaler.state()
                gr = accumulator.apply() if accumulator is not None and finite else {}
                grad_norm = None
                if args.max_grad_norm > 0 and finite:
                    grad_norm = torch.nn.utils.clip_grad_norm_(self.clipped, args.max_grad_norm)
                if finite:
                    optimizer.step()
                else:  # an fp16 overflow: this step is skipped (its gradients are dropped), the scale halved
                    gr = {"skipped_step": True}
                    if accumulator is not None:
                        accumulator.grad_a = None
                with warnings.catch_warnings():  # a skipped first step still advances the schedule, on purpose
                    warnings.filterwarnings(
                        "ignore", message="Detected call of `lr_scheduler.step", category=UserWarning
                    )
                    scheduler.step()
                self.model.zero_grad(set_to_none=True)  # also the gradients no optimizer owns
                state.global_step += 1
                state.batches_done = batch_index + 1
                last = {k: round(float(v), 6) for k, v in zip(_TERMS, running) if k in self._active(stage)}
                running.zero_()
                if state.global_step % args.log_every == 0 or state.global_step == 1:
                    self._log(
                        {
                            "stage": stage.name,
                            "epoch": epoch + 1,
                            "step": state.global_step,
                            "lr": scheduler.get_last_lr()[0],
                            "grad_norm": None if grad_norm is None else float(grad_norm),
                            **last,
                            **gr,
                        }
                    )
                    bar.set_postfix(loss=f"{last['loss']:.4f}")
                if args.save_steps and state.global_step % args.save_steps == 0:
                    self._save(optimizer, scheduler, state)
            bar.close()
            state.epoch, state.batches_done = epoch + 1, 0
            if state.epoch_signal_range is not None:  # COSEE: next epoch's thresholds come from this one's range
                state.signal_range, state.epoch_signal_range = state.epoch_signal_range, None
            state.stage_done = state.epoch >= n_epochs
            self._save(optimizer, scheduler, state)
        return last

    @staticmethod
    def _active(stage: Stage) -> set[str]:
        return (
            {"loss"} | ({"final_loss"} if stage.final_loss else set()) | ({"exit_loss"} if stage.exit_loss else set())
        )

    def _backward(
        self, stage: Stage, batch: dict, accumulator, scale: float, state: TrainerState, batch_index: int
    ) -> Tensor:
        """Forward + backward one collated micro-batch with its loss scaled by ``scale`` (its share of the
        optimizer step's examples). Returns the scaled loss terms and a non-finite flag, on the device."""
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        labels = batch.pop("labels")
        with autocast(self.device, self.precision):
            logits = self.model(**batch, frozen_backbone=stage.frozen_backbone and not self._clips_frozen(stage))
        logits = logits.float()  # every loss term in fp32, whatever the forward ran in
        if self.args.weighting(stage) == "cosee":
            final, exits = self._cosee_losses(stage, logits, labels, state, batch_index)
        else:
            final, exits = stage_losses(stage, logits, labels, self.args.loss_settings)
        loss = sum(t for t in (final, exits) if t is not None)
        out = torch.stack(
            [(t.detach() if t is not None else loss.new_zeros(())).double() * scale for t in (final, exits, loss)]
        )
        bad = (~torch.isfinite(out)).any().to(torch.float64).view(1)  # read at the step, not here
        loss_scale = self.scaler.scale if self.scaler is not None else 1.0
        if accumulator is not None:
            loss_a, loss_b = (final, exits) if self.args.gr_anchor == "final" else (exits, final)
            accumulator.add(loss_a, loss_b, scale * loss_scale)
        else:
            (loss * (scale * loss_scale)).backward()
        return torch.cat([out, bad])

    def _cosee_losses(self, stage: Stage, logits: Tensor, labels: Tensor, state: TrainerState, batch_index: int):
        """COSEE's weighted stage losses (docs/cosee.md): every layer's per-sample loss weighted around the
        layer each sample would exit at, over a few thresholds drawn from the previous epoch's signal range,
        plus the signal margin on the exits' side."""
        args = self.args
        signals = energy_signal(logits[:-1].float())  # [L-1, B], lower = more confident
        lo, hi = state.signal_range or (0.0, 1.0)
        # drawn from their own generator, seeded by the step: every rank draws the same thresholds, and a
        # resumed run the same as an uninterrupted one, without touching dropout's random stream
        g = torch.Generator().manual_seed(hash((args.seed, state.stage_index, state.global_step, batch_index)) % 2**63)
        thresholds = (lo + (hi - lo) * torch.rand(args.cosee_thresholds, generator=g, dtype=torch.float64)).float()
        layers = simulated_exit_layers(signals, thresholds.to(signals.device))  # [M, B]
        beta = args.cosee_beta * state.global_step / self.total_steps  # 0 -> beta over the stage
        weights = cosee_sample_weights(layers, self.model.num_layers, beta)  # [L, B]
        final, exits = weighted_stage_losses(stage, logits, labels, args.loss_settings, weights)
        if exits is not None and args.cosee_margin_weight:
            exits = exits + args.cosee_margin_weight * margin_loss(signals, logits[:-1], labels, args.cosee_margin)
        seen = torch.aminmax(signals.detach())
        low, high = float(seen.min), float(seen.max)
        old = state.epoch_signal_range
        state.epoch_signal_range = [low, high] if old is None else [min(old[0], low), max(old[1], high)]
        return final, exits

    def _synchronise(self, accumulator, running: Tensor) -> None:
        """Sum gradients (and g_A for GR) and the logged loss terms over ranks: one collective."""
        if not self.dist.enabled:
            return
        for p in self.clipped:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        extra = accumulator.ensure_grad_a() if accumulator is not None else []
        stats = running.to(torch.float32)
        self.dist.all_reduce_sum([p.grad for p in self.clipped] + extra + [stats])
        running.copy_(stats.double())


_TERMS = ("final_loss", "exit_loss", "loss")


def find_latest_checkpoint(output_dir: str | Path) -> dict | None:
    """Newest complete checkpoint under ``output_dir`` as {stage_index, epoch, global_step, path}."""
    found = list_checkpoints(output_dir)
    if not found:
        return None
    state = read_state(found[-1])
    return {
        "stage_index": state.stage_index,
        "epoch": state.epoch,
        "global_step": state.global_step,
        "path": str(found[-1]),
    }
