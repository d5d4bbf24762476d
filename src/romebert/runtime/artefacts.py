"""What a deployable classifier carries besides its weights, in one format: the early-exit config
(criterion, threshold, temperatures, and how the threshold was chosen on dev) and, for an ONNX export,
the manifest that wraps it (graphs with checksums, precision, opset, fusions, versions).

    <classifier>/early_exit.json      EarlyExitConfig            (EarlyExitClassifier.save_pretrained)
    <export>/manifest.json            ExportManifest, whose "early_exit" is the same EarlyExitConfig

Torch-free: the ONNX runtime reads both. Files are written atomically.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from romebert.core.errors import RomebertError
from romebert.core.files import dataclass_from_json, read_json, sha256, write_atomic
from romebert.runtime.criteria import EntropyPolicy
from romebert.runtime.exit_policy import OPTION_NAMES, ExitPolicy, PolicyOptions
from romebert.runtime.policies import CRITERIA, get_policy

EARLY_EXIT_FILE = "early_exit.json"
MANIFEST_FILE = "manifest.json"
EXPORT_FORMAT = "romebert-onnx"
EXPORT_FORMAT_VERSION = 2  # 2: quantization, dev_metrics and single_row_graph (version 1 folders still load)


@dataclass
class EarlyExitConfig(PolicyOptions):
    """How a deployed classifier decides when a sample leaves: a criterion, its threshold (one, or one
    per exit) and the criteria's options (:class:`~romebert.runtime.exit_policy.PolicyOptions`)."""

    criterion: str = "entropy"
    threshold: float | list[float] = EntropyPolicy.default_threshold
    temperatures: list[float] | None = None  # one per exit, fitted on dev (calibration.py)
    # How the threshold was chosen on dev, with what it gave there (``evaluation.exits.choice_record``):
    # {"split", "target_speedup" and/or "max_metric_drop", or "given", "metric", "speedup", "final_metric",
    # "reference" (what the drop counts against: "fp32" or "exported"), "reference_metric", ...}.
    chosen: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise RomebertError(f"criterion must be one of {list(CRITERIA)}, got {self.criterion!r}")
        if self.temperatures is not None and (not self.temperatures or min(self.temperatures) <= 0):
            raise RomebertError(f"temperatures must be positive numbers, got {self.temperatures}")
        self.policy()  # a bad threshold fails here, not at the first request

    def policy(self, **overrides: Any) -> ExitPolicy:
        """The exit policy, with fields of this config replaced by ``overrides`` (e.g. ``threshold=0.3``)."""
        d = {**asdict(self), **{k: v for k, v in overrides.items() if v is not None}}
        return get_policy(d["criterion"], d["threshold"], **{k: d[k] for k in OPTION_NAMES})

    @classmethod
    def from_policy(cls, policy: ExitPolicy, **fields: Any) -> EarlyExitConfig:
        params = {k: v for k, v in policy.params().items() if k in {f.name for f in dataclasses.fields(cls)}}
        return cls(**params, **fields)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> EarlyExitConfig:
        return dataclass_from_json(cls, data, where, "early-exit")

    def save(self, path: str | Path) -> None:
        write_atomic(Path(path), json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> EarlyExitConfig:
        return cls.from_dict(read_json(Path(path)), str(path))


@dataclass
class GraphFile:
    file: str
    sha256: str
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


@dataclass
class ExportManifest:
    """``manifest.json`` of an ONNX export (``romebert export``)."""

    task: str | None
    labels: list[str] | None  # class names in index order; None for regression
    num_layers: int
    num_labels: int
    hidden_size: int
    pooling: str
    max_seq_length: int
    precision: str  # "fp32" | "int8"
    opset: int
    early_exit: EarlyExitConfig
    graphs: list[GraphFile]  # segment 1 .. L
    tokenizer_files: list[GraphFile]  # checksummed like the graphs
    pad_token_id: int = 0
    data: dict[str, Any] | None = None  # the run's DataSpec, so `romebert predict EXPORT` knows the task's files
    fusions: list[dict[str, int]] = field(default_factory=list)  # fused operators per graph
    versions: dict[str, str] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)  # the run it came from (method, backbone package)
    # The whole model as one graph, final head only (``export --full-graph``): what a service without
    # early exit runs (``serve --full-graph``), the honest baseline for the segments.
    full_graph: GraphFile | None = None
    # int8 only: the recipe (deploy/quantize.py), its settings, its calibration and the nodes kept fp32
    quantization: dict[str, Any] | None = None
    # every exit's dev metrics, of the fp32 model the export came from and of the export itself:
    # {"split", "metric", "fp32": [{metric: value} per exit], "exported": [...]}
    dev_metrics: dict[str, Any] | None = None
    # the whole early exit for one input in one graph (deploy/single_row.py; onnx_runtime runs it)
    single_row_graph: GraphFile | None = None
    format: str = EXPORT_FORMAT
    format_version: int = EXPORT_FORMAT_VERSION

    @property
    def regression(self) -> bool:
        return self.num_labels == 1

    def save(self, folder: Path) -> None:
        write_atomic(folder / MANIFEST_FILE, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path, verify: bool = True) -> ExportManifest:
        """Read ``<folder>/manifest.json``; with ``verify``, check that every listed file is there and
        matches its checksum (one line naming the file otherwise)."""
        folder = Path(folder)
        path = folder / MANIFEST_FILE
        if not folder.is_dir():
            raise RomebertError(f"{folder}: no such export folder")
        if not path.is_file():
            raise RomebertError(f"{path}: not found (is {folder} an export made by 'romebert export'?)")
        data = read_json(path)
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        if found != EXPORT_FORMAT:
            raise RomebertError(f"{path}: not a romebert export manifest (format {found!r})")
        version = data.get("format_version")
        if not isinstance(version, int) or version > EXPORT_FORMAT_VERSION:
            raise RomebertError(
                f"{path}: format_version {version} is newer than this romebert understands "
                f"({EXPORT_FORMAT_VERSION}); upgrade romebert"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RomebertError(f"{path}: unknown fields {unknown}")
        try:
            data["early_exit"] = EarlyExitConfig.from_dict(data.get("early_exit"), f"{path}: early_exit")
            data["graphs"] = [GraphFile(**g) for g in data["graphs"]]
            data["tokenizer_files"] = [GraphFile(**g) for g in data["tokenizer_files"]]
            for key in ("full_graph", "single_row_graph"):
                if data.get(key) is not None:
                    data[key] = GraphFile(**data[key])
            manifest = cls(**data)
        except (KeyError, TypeError) as exc:
            raise RomebertError(f"{path}: malformed manifest ({exc})") from None
        if len(manifest.graphs) != manifest.num_layers:
            raise RomebertError(f"{path}: {len(manifest.graphs)} graphs for {manifest.num_layers} layers")
        temps = manifest.early_exit.temperatures
        if temps is not None and len(temps) != manifest.num_layers:
            raise RomebertError(f"{path}: early_exit.temperatures needs one per exit ({manifest.num_layers})")
        if verify:
            extra = filter(None, [manifest.full_graph, manifest.single_row_graph])
            for f in [*manifest.graphs, *manifest.tokenizer_files, *extra]:
                target = folder / f.file
                if not target.is_file():
                    raise RomebertError(f"{target}: missing (the export is incomplete; export it again)")
                if sha256(target) != f.sha256:
                    raise RomebertError(f"{target}: checksum mismatch (corrupt, or not the file this export wrote)")
        return manifest
