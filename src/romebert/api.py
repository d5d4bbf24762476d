"""Python API: load a trained run, predict with real early exit, calibrate, choose a threshold on dev.

Example::

    from romebert.api import EarlyExitClassifier

    clf = EarlyExitClassifier.from_run("runs/quickstart-sst2")
    threshold, row = clf.choose_threshold(target_speedup=2.0)  # on dev only
    out = clf.predict(["a gripping film", "dull"], threshold=threshold)
    out.labels, out.probabilities, out.exit_layers
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from romebert.calibration import CALIBRATION_FILE, CalibrationReport, apply_temperatures, calibrate
from romebert.data import Collator, Example, encode
from romebert.engine import EarlyExitEngine
from romebert.errors import RomebertError
from romebert.evaluation import collect_logits, dataset_labels
from romebert.exits import MetricFn, layer_stats, per_exit_metrics, sweep
from romebert.modeling import MultiExitModel
from romebert.policies import ExitPolicy, Threshold, candidate_thresholds, get_policy

TextInput = str | tuple[str, str]


@dataclass
class Predictions:
    """Early-exit predictions in input order."""

    labels: list[str | float]  # label strings (classification) or values (regression)
    probabilities: np.ndarray | None  # [N, C] softmax of the exit each input left at; None for regression
    exit_layers: np.ndarray  # [N] int64, 1-based
    logits: np.ndarray  # [N, C] the chosen exit's logits (temperature-scaled when calibrated)
    num_layers: int = 0
    layer_work: int = 0  # rows x layers the encoder actually ran

    @property
    def layer_speedup(self) -> float:
        """N * L / sum of exit layers (1.0 = no saving)."""
        if len(self.exit_layers) == 0:
            return 1.0
        return float(layer_stats(self.exit_layers, self.num_layers)["speedup"])

    def __len__(self) -> int:
        return len(self.labels)


# ------------------------------------------------------------------------------- choosing a threshold


def pick_from_sweep(
    rows: Sequence[dict[str, Any]],
    final_metric: float,
    target_speedup: float | None = None,
    max_metric_drop: float | None = None,
) -> dict[str, Any]:
    """The sweep row to use (rows need "metric" and "speedup").

    ``max_metric_drop`` (same units as the metric, e.g. 0.01 = one accuracy point) keeps rows with
    ``final_metric - metric <= max_metric_drop``. Then ``target_speedup`` picks the least aggressive
    row reaching it (smallest speed-up >= target, best metric on ties); without a target, the fastest
    row left (best metric on ties).
    """
    if target_speedup is None and max_metric_drop is None:
        raise RomebertError("give target_speedup and/or max_metric_drop")
    if not rows:
        raise RomebertError("no sweep rows to choose from")
    ok = list(rows)
    if max_metric_drop is not None:
        ok = [r for r in ok if final_metric - r["metric"] <= max_metric_drop + 1e-12]
        if not ok:
            best = max(r["metric"] for r in rows)
            raise RomebertError(
                f"no threshold keeps the metric within {max_metric_drop} of the final exit's {final_metric:.4f} "
                f"(best {best:.4f})"
            )
    if target_speedup is not None:
        reach = [r for r in ok if r["speedup"] >= target_speedup - 1e-12]
        if not reach:
            fastest = max(r["speedup"] for r in ok)
            budget = "" if max_metric_drop is None else f" within a metric drop of {max_metric_drop}"
            raise RomebertError(
                f"no threshold reaches a layer speed-up of {target_speedup}{budget} (at most {fastest:.3f}x)"
            )
        return min(reach, key=lambda r: (r["speedup"], -r["metric"]))
    return max(ok, key=lambda r: (r["speedup"], r["metric"]))


def choose_threshold(
    all_logits: np.ndarray,
    labels: np.ndarray,
    task: Any,
    criterion: str = "entropy",
    *,
    target_speedup: float | None = None,
    max_metric_drop: float | None = None,
    thresholds: Sequence[Threshold] | None = None,
    metric_fn: MetricFn | None = None,
    **policy_kwargs: Any,
) -> tuple[Threshold, dict[str, Any]]:
    """Pick a threshold of ``criterion`` on dev logits [L, N, C] -> (threshold, its sweep row).

    Candidates default to a fine data-driven grid (score quantiles; k = 1..L for patience). See
    :func:`pick_from_sweep` for the rule.
    """
    logits = np.asarray(all_logits)
    if thresholds is None:
        thresholds = candidate_thresholds(
            criterion, logits, task.is_regression, **{k: v for k, v in policy_kwargs.items() if k == "confidence"}
        )
    policies = [get_policy(criterion, t, **policy_kwargs) for t in thresholds]
    rows = sweep(logits, labels, task, policies, metric_fn=metric_fn)
    per_exit = per_exit_metrics(logits, labels, task, metric_fn=metric_fn)
    if metric_fn is None:
        from romebert.metrics import main_metric

        final = float(main_metric(task, per_exit[-1]))
    else:
        final = float(per_exit[-1][task.metric])
    row = pick_from_sweep(rows, final, target_speedup, max_metric_drop)
    return row["threshold"], {**row, "final_metric": final}


# ------------------------------------------------------------------------------------ the classifier


def _examples(texts: Sequence[TextInput]) -> list[Example]:
    if isinstance(texts, str):
        raise RomebertError("texts must be a list of strings or of (text, text) pairs, not a single string")
    out: list[Example] = []
    for i, t in enumerate(texts):
        if isinstance(t, str):
            out.append(Example(f"input-{i}", t, None, None))
        elif isinstance(t, tuple | list) and len(t) == 2 and all(isinstance(s, str) for s in t):
            out.append(Example(f"input-{i}", t[0], t[1], None))
        else:
            raise RomebertError(f"input {i}: expected a string or a (text, text) pair, got {type(t).__name__}")
    return out


class EarlyExitClassifier:
    """A trained multi-exit model with its tokenizer, served with batched early exit."""

    def __init__(
        self,
        model: MultiExitModel,
        tokenizer: Any,
        max_seq_length: int = 128,
        run_dir: str | Path | None = None,
        data: Any = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.data = data  # the run's DataSpec (dev data for calibration / threshold choice)
        self.collator = Collator(tokenizer)
        self._calibration: CalibrationReport | None = None
        cfg = model.config
        self.label_names: list[str] | None = None
        if not cfg.is_regression:
            self.label_names = list(cfg.labels) if cfg.labels else [str(i) for i in range(cfg.num_labels)]

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "auto") -> EarlyExitClassifier:
        """Load ``<run>/model`` and the run's data description (written by ``romebert train``)."""
        from romebert.pipeline import load_run

        model, tokenizer, data = load_run(run_dir, device)
        return cls(model, tokenizer, data.max_seq_length, run_dir, data)

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------------------------ predict
    def engine(
        self,
        criterion: str | ExitPolicy = "entropy",
        threshold: Threshold = 0.15,
        calibrated: bool = False,
        **policy_kwargs: Any,
    ) -> EarlyExitEngine:
        """The engine for one criterion / threshold (``calibrated``: use ``<run>/calibration.json``)."""
        policy = criterion if isinstance(criterion, ExitPolicy) else get_policy(criterion, threshold, **policy_kwargs)
        return EarlyExitEngine(self.model, policy, self.temperatures() if calibrated else None)

    def predict(
        self,
        texts: Sequence[TextInput],
        criterion: str | ExitPolicy = "entropy",
        threshold: Threshold = 0.15,
        batch_size: int = 32,
        calibrated: bool = False,
        **policy_kwargs: Any,
    ) -> Predictions:
        """Labels, probabilities and exit layers of ``texts`` (strings or (text, text) pairs), in order.

        Inputs are batched by length (less padding), run with :meth:`EarlyExitEngine.run_stream` (every
        layer call gets ``batch_size`` rows while enough remain) and scattered back to input order.
        """
        engine = self.engine(criterion, threshold, calibrated, **policy_kwargs)
        dataset = encode(_examples(texts), self.tokenizer, None, self.max_seq_length)
        out = engine.run_dataset(dataset, self.collator, batch_size)
        logits, layers = out.logits.cpu().numpy(), out.exit_layer.numpy()
        if self.label_names is None:
            labels: list[str | float] = [float(v) for v in logits[:, 0]]
            probs = None
        else:
            probs = torch.softmax(torch.from_numpy(logits).double(), dim=-1).numpy()
            labels = [self.label_names[int(i)] for i in logits.argmax(-1)]
        return Predictions(labels, probs, layers, logits, self.num_layers, out.layer_work)

    # -------------------------------------------------------------------------- dev-side choices
    def _split(self, split: str | None) -> str:
        if self.data is None:
            raise RomebertError("this classifier has no run data; pass dev logits and labels instead")
        splits = self.data.eval_splits()
        if split is None:
            if not splits:
                raise RomebertError("this run has no dev split")
            return splits[0]
        return split

    def dev_logits(self, split: str | None = None, use_cache: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Every exit's logits [L, N, C] and labels [N] on a dev split (the evaluate cache when present)."""
        split = self._split(split)
        cache = self.run_dir / "eval" / split if self.run_dir is not None else None
        if use_cache and cache is not None and (cache / "logits.npy").is_file() and (cache / "labels.npy").is_file():
            logits, labels = np.load(cache / "logits.npy"), np.load(cache / "labels.npy")
            if logits.shape[0] == self.num_layers and logits.shape[2] == self.model.config.num_labels:
                return logits, labels
        from romebert.pipeline import run_task

        task = run_task(self.model, self.data)
        dataset = encode(self.data.examples(split), self.tokenizer, task.labels, self.max_seq_length)
        labels = dataset_labels(dataset)
        if labels is None:
            raise RomebertError(f"split {split} has no labels")
        return collect_logits(self.model, dataset, self.collator), labels

    def task(self) -> Any:
        from romebert.pipeline import run_task

        if self.data is None:
            raise RomebertError("this classifier has no run data (load it with from_run)")
        return run_task(self.model, self.data)

    def choose_threshold(
        self,
        criterion: str = "entropy",
        *,
        target_speedup: float | None = None,
        max_metric_drop: float | None = None,
        split: str | None = None,
        calibrated: bool = False,
        thresholds: Sequence[Threshold] | None = None,
        **policy_kwargs: Any,
    ) -> tuple[Threshold, dict[str, Any]]:
        """Choose a threshold on the run's dev split (never on test); see :func:`choose_threshold`."""
        logits, labels = self.dev_logits(split)
        if calibrated:
            logits = apply_temperatures(logits, self.temperatures())
        return choose_threshold(
            logits,
            labels,
            self.task(),
            criterion,
            target_speedup=target_speedup,
            max_metric_drop=max_metric_drop,
            thresholds=thresholds,
            **policy_kwargs,
        )

    # -------------------------------------------------------------------------------- calibration
    def calibration_path(self) -> Path:
        if self.run_dir is None:
            raise RomebertError("this classifier has no run folder to keep a calibration in")
        return self.run_dir / CALIBRATION_FILE

    def calibrate(self, split: str | None = None, bins: int = 15, save: bool = True) -> CalibrationReport:
        """Fit one temperature per exit on dev; saved to ``<run>/calibration.json`` unless ``save=False``."""
        if self.model.config.is_regression:
            raise RomebertError("temperature calibration needs class logits; it does not apply to regression")
        split = self._split(split)
        logits, labels = self.dev_logits(split)
        report = calibrate(logits, labels, bins=bins, split=split)
        if save:
            report.save(self.calibration_path())
        self._calibration = report
        return report

    def temperatures(self) -> list[float]:
        """The per-exit temperatures of the last :meth:`calibrate`, or of ``<run>/calibration.json``."""
        report = self._calibration
        if report is None:
            report = CalibrationReport.load(self.calibration_path())
            self._calibration = report
        if len(report.temperatures) != self.num_layers:
            raise RomebertError(
                f"calibration has {len(report.temperatures)} temperatures, the model {self.num_layers} exits"
            )
        return list(report.temperatures)
