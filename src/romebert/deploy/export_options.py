"""What ``romebert export`` is asked for, declared once (its flags come from these fields). Torch-free, so
that the command line is built without torch."""

from __future__ import annotations

from dataclasses import dataclass

from romebert.core.errors import RomebertError
from romebert.core.options import check_choices, option
from romebert.deploy.quantize import DEFAULT_INT8, RECIPES

DEFAULT_OPSET = 17
DEFAULT_MAX_METRIC_DROP = 0.01  # a threshold is chosen on dev within one point of the fp32 final exit by default


@dataclass
class ExportOptions:
    """What ``romebert export`` is asked for (its flags come from these fields). The exit criterion and
    its options are the shared ones (``runtime.policies``)."""

    quantize: str = option("none", "int8: int8 encoder matrices (see docs/inference.md)", choices=("none", "int8"))
    int8_recipe: str = option(
        DEFAULT_INT8, "with --quantize int8: how (docs/inference.md compares them on dev)", choices=tuple(RECIPES)
    )
    threshold: float | None = option(None, "use this threshold as it is (no choice on dev)")
    target_speedup: float | None = option(None, "choose on dev: the least aggressive threshold reaching it")
    max_metric_drop: float | None = option(
        None,
        "choose on dev: the fastest threshold within this drop of the final exit's metric (see --drop-against; "
        f"default {DEFAULT_MAX_METRIC_DROP} when no other choice is given)",
    )
    drop_against: str = option(
        "fp32",
        "--max-metric-drop counts against the final exit of the fp32 model you trained, or of the exported "
        "(e.g. int8) graphs",
        choices=("fp32", "exported"),
    )
    risk_confidence: float | None = option(
        None,
        "with --max-metric-drop: choose a threshold certified to disagree with the final exit on at most that "
        "share of new inputs with this probability (Learn-then-Test on half of dev; docs/thresholds.md)",
        flag="--confidence",
    )
    calibrated: bool = option(False, "use the run's per-exit temperatures (calibration.json)")
    opset: int = option(DEFAULT_OPSET, "ONNX opset")
    full_graph: bool = option(
        False, "also write the whole model as one graph (full.onnx), for `serve --full-graph`: the plain-model baseline"
    )

    def __post_init__(self) -> None:
        check_choices(self)
        if self.threshold is not None and (self.target_speedup is not None or self.max_metric_drop is not None):
            raise RomebertError("give either --threshold or --target-speedup / --max-metric-drop, not both")
        if self.threshold is None and self.target_speedup is None and self.max_metric_drop is None:
            self.max_metric_drop = DEFAULT_MAX_METRIC_DROP
        if self.risk_confidence is not None and not 0 < self.risk_confidence < 1:
            raise RomebertError(f"--confidence must lie in (0, 1), got {self.risk_confidence}")
        if self.risk_confidence is not None and self.threshold is not None:
            raise RomebertError(
                "--confidence certifies a threshold chosen on dev: give --max-metric-drop, not --threshold"
            )

    @property
    def precision(self) -> str:
        return "int8" if self.quantize == "int8" else "fp32"
