"""Per-exit temperature scaling fitted on dev, and the expected calibration error (ECE) per exit.

Temperature scaling divides exit i's logits by T_i > 0 (one number per exit, fitted by minimising the
dev negative log-likelihood). The argmax never changes, so per-exit accuracy is untouched; what changes
is how confident each exit looks, hence which samples a confidence criterion (entropy, maxprob, ...)
lets go early. The fit is saved as ``<run>/calibration.json`` and used by the engine / API on request.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from romebert.core.errors import RomebertError
from romebert.runtime.scores import log_softmax

CALIBRATION_FILE = "calibration.json"
# T is searched in [e^-4, e^4] ~ [0.018, 55]: far beyond any useful temperature, yet bounded.
_LOG_T_BOUNDS = (-4.0, 4.0)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` ([N] class ids) under softmax(logits / T), [N, C]."""
    log_p = log_softmax(np.asarray(logits, dtype=np.float64) / temperature)
    return float(-log_p[np.arange(log_p.shape[0]), np.asarray(labels, dtype=np.int64)].mean())


def expected_calibration_error(logits: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE of softmax(logits) [N, C] against class ids [N]: sum_b |B|/N * |accuracy_b - confidence_b|.

    Equal-width confidence bins over (0, 1] (the usual 15 by default); confidence = max probability.
    """
    if bins < 1:
        raise RomebertError(f"bins must be >= 1, got {bins}")
    log_p = log_softmax(logits)
    conf = np.exp(log_p.max(axis=-1))  # [N]
    correct = (log_p.argmax(axis=-1) == np.asarray(labels)).astype(np.float64)
    n = conf.shape[0]
    if n == 0:
        return 0.0
    # Bin b holds confidences in (b/bins, (b+1)/bins]; ceil - 1 puts exactly 1.0 into the top bin.
    which = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    gap = np.bincount(which, weights=correct - conf, minlength=bins)  # sum over the bin of (acc - conf)
    return float(np.abs(gap).sum() / n)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T) (1-D bounded search over log T)."""
    from scipy.optimize import minimize_scalar  # fitting needs scipy; applying temperatures does not

    x = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if x.shape[0] == 0:
        raise RomebertError("cannot fit a temperature on zero examples")
    res = minimize_scalar(
        lambda log_t: nll(x, y, math.exp(log_t)), bounds=_LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-5}
    )
    t = math.exp(float(res.x))
    # Never return something worse than no scaling (the search is bounded, the NLL is convex in 1/T).
    return t if nll(x, y, t) <= nll(x, y, 1.0) else 1.0


@dataclass
class CalibrationReport:
    """One temperature per exit and the dev calibration before / after, per exit."""

    temperatures: list[float]
    ece_before: list[float]
    ece_after: list[float]
    nll_before: list[float]
    nll_after: list[float]
    bins: int = 15
    split: str = "dev"
    num_examples: int = 0

    def save(self, path: str | Path) -> None:
        from romebert.core.files import write_json

        write_json(Path(path), asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> CalibrationReport:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(**data)
        except FileNotFoundError:
            raise RomebertError(f"{path}: no calibration; fit one first (EarlyExitClassifier.calibrate)") from None
        except (json.JSONDecodeError, TypeError) as exc:
            raise RomebertError(f"{path}: not a valid calibration file ({exc})") from None

    def table(self) -> str:
        """A small text table: exit, T, ECE before -> after, NLL before -> after."""
        lines = ["exit  temperature  ECE before  ECE after  NLL before  NLL after"]
        for i, t in enumerate(self.temperatures):
            lines.append(
                f"{i + 1:>4}  {t:>11.3f}  {self.ece_before[i]:>10.4f}  {self.ece_after[i]:>9.4f}  "
                f"{self.nll_before[i]:>10.4f}  {self.nll_after[i]:>9.4f}"
            )
        return "\n".join(lines)


def calibrate(all_logits: np.ndarray, labels: np.ndarray, bins: int = 15, split: str = "dev") -> CalibrationReport:
    """Fit one temperature per exit on cached dev logits [L, N, C] with class ids [N]."""
    logits = np.asarray(all_logits, dtype=np.float64)
    if logits.ndim != 3:
        raise RomebertError(f"all_logits must have shape [layers, examples, classes], got {tuple(logits.shape)}")
    if logits.shape[2] < 2:
        raise RomebertError("temperature calibration needs class logits; it does not apply to regression")
    y = np.asarray(labels)
    if y.shape != (logits.shape[1],):
        raise RomebertError(f"labels must be one class id per example ({logits.shape[1]}), got shape {y.shape}")
    temps = [fit_temperature(layer, y) for layer in logits]
    return CalibrationReport(
        temperatures=temps,
        ece_before=[expected_calibration_error(x, y, bins) for x in logits],
        ece_after=[expected_calibration_error(x / t, y, bins) for x, t in zip(logits, temps)],
        nll_before=[nll(x, y) for x in logits],
        nll_after=[nll(x, y, t) for x, t in zip(logits, temps)],
        bins=bins,
        split=split,
        num_examples=int(logits.shape[1]),
    )


def apply_temperatures(all_logits: np.ndarray, temperatures: list[float] | None) -> np.ndarray:
    """Cached logits [L, N, C] with exit i divided by T_i, float32 like the engine's (None: unchanged)."""
    if temperatures is None:
        return np.asarray(all_logits)
    t = np.asarray(temperatures, dtype=np.float32).reshape(-1, 1, 1)
    if t.shape[0] != np.shape(all_logits)[0]:
        raise RomebertError(f"temperatures: need one per exit ({np.shape(all_logits)[0]}), got {t.shape[0]}")
    return (np.asarray(all_logits, dtype=np.float32) / t).astype(np.float32)
