"""Training checkpoints that survive a kill at any instant.

A checkpoint is a folder ``<run>/checkpoints/stage<S>-step<N>/`` holding the model (safetensors +
JSON config), optimizer and scheduler states, and ``trainer_state.json`` (stage, epoch, batches done in
the epoch, global step, every RNG state). It is written under a ``.tmp`` name and renamed only when
complete, so a folder without the suffix is whole. On resume the newest one that loads is used; a
corrupt or truncated one is skipped with a warning and the previous one is tried.

No pickle is ever loaded: optimizer and scheduler states go through ``torch.load(weights_only=True)``,
which only accepts tensors and plain containers.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from romebert.core.errors import RomebertError
from romebert.model.modeling import MultiExitModel

CHECKPOINT_DIR = "checkpoints"
STATE_NAME = "trainer_state.json"
_NAME = re.compile(r"^stage(\d+)-step(\d+)$")


@dataclass
class TrainerState:
    """Where training stands; enough to continue bit-exactly."""

    stage_index: int = 0
    stage: str = ""
    epoch: int = 0  # the epoch in progress (0-based)
    batches_done: int = 0  # batches of ``epoch`` already consumed
    global_step: int = 0  # optimizer steps taken in this stage
    stage_done: bool = False
    # Training-loop wall time of this stage up to the checkpoint, summed over resumptions, and the summaries
    # of the stages finished before it: a resumed run reports what an uninterrupted one would (less the
    # work lost after the last checkpoint).
    seconds: float = 0.0
    # The same stage's CPU time (all the process's threads): unlike wall time, a stopped process
    # (SIGSTOP) or a job on another core does not inflate it, so comparisons on a shared machine hold.
    cpu_seconds: float = 0.0
    finished: list = field(default_factory=list)
    # COSEE's sample weighting: the signal range its thresholds are drawn from this epoch (the range seen
    # in the previous one; [0, 1] in the first), and the range seen so far in this one
    loss_scale: dict | None = None  # fp16's LossScaler state (training/precision.py)
    signal_range: list | None = None
    epoch_signal_range: list | None = None
    rng: dict = field(default_factory=dict)  # the writing process's (rank 0's) RNG states
    rank_rng: list = field(default_factory=list)  # data parallel: every rank's RNG states, in rank order


def capture_rng(device: torch.device | None = None) -> dict:
    """This process's RNG states: Python, numpy, torch's CPU generator and, on a GPU, the generator of
    ``device`` alone (each rank owns one GPU; touching the others would create a context on each)."""
    state = {
        "python": _jsonable(random.getstate()),
        "numpy": _jsonable(np.random.get_state()),
        "torch": torch.get_rng_state().tolist(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).tolist()
    return state


def restore_rng(state: dict, device: torch.device | None = None) -> None:
    """Restore what :func:`capture_rng` recorded; the GPU state goes to ``device`` (this rank's GPU)."""
    if not state:
        return
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    cuda = state.get("cuda")
    if cuda and device is not None and device.type == "cuda":
        if isinstance(cuda[0], list):  # written by older versions: every visible GPU's state
            cuda = cuda[device.index or 0]
        torch.cuda.set_rng_state(torch.tensor(cuda, dtype=torch.uint8), device)


def save_checkpoint(
    output_dir: str | Path,
    model: MultiExitModel,
    optimizer,
    scheduler,
    state: TrainerState,
    keep: int = 2,
    device: torch.device | None = None,
) -> Path:
    """Write a complete checkpoint atomically, then drop all but the newest ``keep``; ``device``: the
    writing process's own device, whose RNG state is saved."""
    root = Path(output_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"stage{state.stage_index}-step{state.global_step:07d}"
    tmp = root / (final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    state.rng = capture_rng(device)
    (tmp / STATE_NAME).write_text(json.dumps(asdict(state)) + "\n", encoding="utf-8")
    _fsync_dir(tmp)
    if final.exists():  # the same step saved twice (epoch end right after a step save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir():
            found.append(((int(m.group(1)), int(m.group(2))), p))
    return [p for _, p in sorted(found)]


def read_state(path: str | Path) -> TrainerState:
    path = Path(path) / STATE_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return TrainerState(**data)
    except (OSError, json.JSONDecodeError, TypeError, UnicodeDecodeError) as exc:
        raise RomebertError(f"{path}: unreadable trainer state ({exc})") from None


def load_latest(
    output_dir: str | Path, model: MultiExitModel, make_optim
) -> tuple[TrainerState, object, object] | None:
    """Restore the newest loadable checkpoint into ``model``; returns (state, optimizer, scheduler).

    ``make_optim(stage_index)`` builds the stage's fresh optimizer and scheduler (it also sets which
    parameters train) so their saved states can be loaded into them. Bad checkpoints are skipped.
    """
    for path in reversed(list_checkpoints(output_dir)):
        try:
            state = read_state(path)
            loaded = MultiExitModel.from_pretrained(path, map_location="cpu")
            if loaded.state_dict().keys() != model.state_dict().keys():
                raise RomebertError(f"{path}: a checkpoint of another model")
            model.load_state_dict(loaded.state_dict())
            optimizer, scheduler = make_optim(state.stage_index)
            device = next(model.parameters()).device
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
            scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        except (RomebertError, OSError, RuntimeError, ValueError, KeyError) as exc:
            warnings.warn(f"skipping checkpoint {path}: {str(exc).splitlines()[0]}", stacklevel=2)
            continue
        return state, optimizer, scheduler
    return None


def _fsync_dir(path: Path) -> None:
    # make the files durable before the rename publishes the folder (a power cut, not just a kill)
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def _jsonable(obj):
    if isinstance(obj, tuple | list):
        return [_jsonable(x) for x in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    return obj


def _tuples(obj):
    return tuple(_tuples(x) for x in obj) if isinstance(obj, list) else obj
