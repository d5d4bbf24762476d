"""Python API: one deployable classifier, on PyTorch or on ONNX Runtime, with real early exit.

Example::

    from romebert import EarlyExitClassifier

    clf = EarlyExitClassifier.from_run("runs/quickstart-sst2")    # or from_pretrained(folder or export)
    clf.choose_threshold(target_speedup=2.0)                      # on dev only; kept in clf.exit_config
    clf.predict(["a gripping film", "dull and overlong"])          # -> ["1", "0"]
    clf.predict_proba("a gripping film")                           # -> array([0.03, 0.97])
    out = clf.predict_with_exits(texts); out.exit_layers           # labels, probabilities, exit layers
    clf.predict_file("reviews.csv", text_column="review")          # -> reviews.predictions.csv, streamed
    guard = clf.accuracy_guard(guard_rate=0.02, max_disagreement=0.02)
    clf.predict_with_exits(texts, guard=guard)                     # thresholds follow the traffic (guard.py)
    clf.save_pretrained("deploy/sst2")                             # model + tokenizer + early_exit.json

A classifier is its segments (``engine.Segments``: a PyTorch model or an ONNX export), its tokenizer
and its :class:`~romebert.runtime.artefacts.EarlyExitConfig`. This module imports no torch: a PyTorch model is
loaded (and torch imported) only when a folder holds one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from romebert.core.errors import RomebertError
from romebert.core.runs import RunFolder
from romebert.data.examples import Example
from romebert.data.spec import DataSpec
from romebert.data.tasks import get_task
from romebert.deploy.file_scoring import DEFAULT_CHUNK_ROWS, FileScorer, PredictionChunk
from romebert.deploy.guard import AccuracyGuard, GuardOptions
from romebert.deploy.predict_file import FileSummary, predict_file
from romebert.evaluation.exits import choice_record, choose_threshold, layer_stats
from romebert.runtime.artefacts import EARLY_EXIT_FILE, MANIFEST_FILE, EarlyExitConfig
from romebert.runtime.encoding import Collator, EncodedDataset, FastTokenizer, encode
from romebert.runtime.engine import EarlyExitEngine, dataset_exit_logits, dataset_exit_outputs
from romebert.runtime.exit_policy import OPTION_NAMES, ExitPolicy, Threshold
from romebert.runtime.policies import POLICIES, criterion_class
from romebert.runtime.scores import softmax

GUARD_CHUNK_BATCHES = 8  # batch prediction with a guard: thresholds may move every 8 batches of inputs

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


def _examples(texts: Sequence[TextInput]) -> list[Example]:
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
    """A multi-exit classifier with its tokenizer and early-exit config, served with batched early exit.

    ``segments``: a ``MultiExitModel`` (PyTorch) or ``onnx_runtime.OrtSegments``. ``labels``: class
    names in index order (None: regression). ``data``: where its dev data comes from (threshold choice
    and calibration need it). ``run``: the run folder it was trained in, if any. ``task``: the task it
    was trained for (default: a PyTorch model's ``config.task``). ``text_columns``: the (text, pair)
    columns of the user's files it was trained on (default: ``data``'s, for custom data).
    """

    def __init__(
        self,
        segments: Any,
        tokenizer: Any,
        labels: Sequence[str] | None,
        *,
        max_seq_length: int = 128,
        exit_config: EarlyExitConfig | None = None,
        pad_token_id: int | None = None,
        data: DataSpec | None = None,
        run: RunFolder | None = None,
        task: str | None = None,
        text_columns: Sequence[str | None] | None = None,
    ) -> None:
        self.model = segments if hasattr(segments, "segments") else None  # the PyTorch model, when it is one
        self.segments = segments.segments() if self.model is not None else segments
        self.tokenizer = tokenizer
        self.label_names = list(labels) if labels is not None else None
        self.max_seq_length = max_seq_length
        self.exit_config = exit_config or EarlyExitConfig()
        self.data = data
        self.run = run
        self.task_name = task if task is not None else getattr(getattr(segments, "config", None), "task", None)
        if text_columns is None and data is not None and data.is_custom and data.text_a:
            text_columns = (data.text_a, data.text_b)
        self.text_columns = (text_columns[0], text_columns[1]) if text_columns else None
        pad = pad_token_id if pad_token_id is not None else getattr(tokenizer, "pad_token_id", None)
        self.collator = Collator(tokenizer, pad_token_id=pad, return_tensors="np")

    # ------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "auto", **runtime: Any) -> EarlyExitClassifier:
        """Load a folder written by :meth:`save_pretrained`, an ONNX export (``romebert export``; runtime
        options ``intra_op_threads``, ``inter_op_threads``, ``spinning``, ``memory_arena``) or a run folder."""
        path = Path(path)
        if (path / MANIFEST_FILE).is_file():
            return cls._from_export(path, **runtime)
        if RunFolder(path).run_file.is_file():
            return cls.from_run(path, device)
        from romebert.model.modeling import CONFIG_NAME

        if not (path / CONFIG_NAME).is_file():
            raise RomebertError(f"{path}: neither a classifier folder, an export nor a run (no {CONFIG_NAME})")
        return cls._from_model_dir(path, device, None)

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "auto") -> EarlyExitClassifier:
        """The model of a trained run, with the run's data (for dev-side choices). Its calibration
        (``<run>/calibration.json``) is used where ``calibrated=True`` asks for it."""
        run = RunFolder(run_dir)
        return cls._from_model_dir(run.model, device, DataSpec.load(run.run_file), run)

    @classmethod
    def _from_model_dir(cls, folder: Path, device: str, data: DataSpec | None, run: RunFolder | None = None):
        from romebert.core.devices import resolve_device
        from romebert.model.loading import load_tokenizer
        from romebert.model.modeling import MultiExitModel

        model = MultiExitModel.from_pretrained(folder, map_location=resolve_device(device))
        exit_config = EarlyExitConfig.load(folder / EARLY_EXIT_FILE) if (folder / EARLY_EXIT_FILE).is_file() else None
        return cls.from_model(model, load_tokenizer(str(folder)), data, run, exit_config)

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, data: DataSpec | None = None, run: RunFolder | None = None,
                   exit_config: EarlyExitConfig | None = None) -> EarlyExitClassifier:  # fmt: skip
        """A PyTorch ``MultiExitModel`` in memory (a run just trained, say) with its tokenizer."""
        cfg = model.config
        labels = None if cfg.is_regression else (cfg.labels or [str(i) for i in range(cfg.num_labels)])
        max_len = data.max_seq_length if data is not None else int(cfg.extra.get("max_seq_length", 128))
        return cls(model, tokenizer, labels, max_seq_length=max_len, exit_config=exit_config, data=data, run=run,
                   text_columns=cfg.extra.get("text_columns"))  # fmt: skip

    @classmethod
    def _from_export(cls, folder: Path, **runtime: Any) -> EarlyExitClassifier:
        from romebert.runtime.onnx_runtime import OrtSegments

        segments = OrtSegments(folder, **runtime)
        m = segments.manifest
        tokenizer = FastTokenizer(folder / "tokenizer.json", m.pad_token_id)
        data = DataSpec(**m.data) if m.data else None
        return cls(segments, tokenizer, m.labels, max_seq_length=m.max_seq_length,
                   exit_config=replace(m.early_exit), pad_token_id=m.pad_token_id, data=data, task=m.task)  # fmt: skip

    def save_pretrained(self, directory: str | Path) -> None:
        """Model, tokenizer and ``early_exit.json`` in one folder (``from_pretrained`` reads it back)."""
        if self.model is None:
            raise RomebertError("an ONNX export is already a deployable folder; copy it instead")
        directory = Path(directory)
        self.model.config.extra["max_seq_length"] = self.max_seq_length
        if self.text_columns is not None:  # what predict_file reads by default
            self.model.config.extra["text_columns"] = list(self.text_columns)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(str(directory))
        self.exit_config.save(directory / EARLY_EXIT_FILE)

    # ------------------------------------------------------------------------------------- predict
    @property
    def num_layers(self) -> int:
        """The model's layers (its exits), also when the runtime runs it as one graph."""
        return self.segments.exit_layers[-1]

    @property
    def regression(self) -> bool:
        return self.segments.regression

    def policy(self, criterion: str | ExitPolicy | None = None, threshold: Threshold | None = None,
               **overrides: Any) -> ExitPolicy:  # fmt: skip
        """The exit config's policy, or with its criterion / threshold / options replaced."""
        if isinstance(criterion, ExitPolicy):
            return criterion
        return self.exit_config.policy(criterion=criterion, threshold=threshold, **overrides)

    def engine(self, criterion: str | ExitPolicy | None = None, threshold: Threshold | None = None,
               calibrated: bool | None = None, **overrides: Any) -> EarlyExitEngine:  # fmt: skip
        """The engine for the exit config (or an override). Temperatures: the exit config's by default;
        ``calibrated=False`` ignores them, ``True`` requires them (a run's calibration.json will do)."""
        use = calibrated if calibrated is not None else self.exit_config.temperatures is not None
        return EarlyExitEngine(self.segments, self.policy(criterion, threshold, **overrides),
                               self.temperatures() if use else None)  # fmt: skip

    def predict_with_exits(self, texts: TextInput | Sequence[TextInput], criterion: str | ExitPolicy | None = None,
                           threshold: Threshold | None = None, batch_size: int = 32, calibrated: bool | None = None,
                           guard: AccuracyGuard | None = None, **overrides: Any) -> Predictions:  # fmt: skip
        """Labels, probabilities and exit layers of ``texts`` (strings or (text, text) pairs), in order.

        Inputs are batched by length (less padding), run with :meth:`EarlyExitEngine.run_stream` (every
        layer call gets ``batch_size`` rows while enough remain) and scattered back to input order.
        ``guard`` (:meth:`accuracy_guard`): the inputs run in chunks under the guard's thresholds, which
        it moves between chunks; a share of them is watched (see ``deploy/guard.py``).
        """
        texts = [texts] if isinstance(texts, str) or _is_pair(texts) else list(texts)
        if guard is not None:
            if criterion is not None or threshold is not None or overrides:
                raise RomebertError("a guard moves the classifier's own thresholds; give no criterion or threshold")
            dataset = encode(_examples(texts), self.tokenizer, None, self.max_seq_length)
            return self._guarded(dataset, guard, batch_size, calibrated)
        engine = self.engine(criterion, threshold, calibrated, **overrides)
        return self.predict_examples(_examples(texts), engine, batch_size)

    def predict_examples(self, examples: Sequence[Example], engine: EarlyExitEngine, batch_size: int = 32
                         ) -> Predictions:  # fmt: skip
        """:meth:`predict_with_exits` of examples already read, with an engine already made."""
        dataset = encode(examples, self.tokenizer, None, self.max_seq_length)
        out = engine.run_dataset(dataset, self.collator, batch_size)
        return self._predictions(out.logits, out.exit_layer, out.layer_work)

    def accuracy_guard(self, options: GuardOptions | None = None, seed: int = 0, **settings: Any) -> AccuracyGuard:
        """A guard for this classifier's exit rule (:class:`~romebert.deploy.guard.GuardOptions` fields as
        ``settings``, e.g. ``guard_rate=0.02, max_disagreement=0.02``); give it to :meth:`predict_with_exits`."""
        policy = self.policy()
        opts = options or GuardOptions(**settings)
        return AccuracyGuard(policy, self.num_layers, self.threshold_bounds()[policy.name], opts, self.regression, seed)

    def threshold_bounds(self) -> dict[str, tuple[float, float]]:
        """Per criterion, the thresholds where its decisions can change on this model (with the exit
        config's options): what a service request may ask for, and where a guard may move."""
        options = {k: getattr(self.exit_config, k) for k in OPTION_NAMES}
        c = self.segments.num_labels
        return {name: cls.bounds(c, self.num_layers, **options) for name, cls in POLICIES.items()}

    def _guarded(self, dataset: EncodedDataset, guard: AccuracyGuard, batch_size: int, calibrated: bool | None
                 ) -> Predictions:  # fmt: skip
        """Chunks under the guard's thresholds; watched inputs that left early run again to the last exit."""
        use = calibrated if calibrated is not None else self.exit_config.temperatures is not None
        temps = self.temperatures() if use else None
        n, step = len(dataset), batch_size * GUARD_CHUNK_BATCHES
        logits, layers, work = [], [], 0
        for start in range(0, n, step):
            part = EncodedDataset(dataset.features[start : start + step])
            engine = EarlyExitEngine(self.segments, guard.policy(), temps)
            watch = np.flatnonzero(guard.watch(len(part)))
            out = engine.run_dataset(part, self.collator, batch_size, watch=watch)
            logits.append(out.logits)
            layers.append(out.exit_layer)
            work += out.layer_work
            if not watch.size:
                continue
            early = [int(i) for i in watch if out.exit_layer[i] < self.num_layers]
            sample = {int(i): out.watched[int(i)] for i in watch if out.exit_layer[i] == self.num_layers}
            if early:  # every exit's logits, as the engine scales them
                again = dataset_exit_logits(self.segments, EncodedDataset([part[i] for i in early]), self.collator,
                                            batch_size)  # fmt: skip
                if temps is not None:
                    again = again / np.asarray(temps, dtype=np.float32)[:, None, None]
                sample.update({i: again[:, j] for j, i in enumerate(early)})
                guard.note_rerun(len(early), len(early) * self.num_layers)
            rows = sorted(sample)
            if guard.add(np.stack([sample[i] for i in rows], axis=1), out.exit_layer[rows]):
                guard.update()
        if not logits:
            return self._predictions(np.zeros((0, self.segments.num_labels), np.float32), np.zeros(0, np.int64), 0)
        return self._predictions(np.concatenate(logits), np.concatenate(layers), work)

    def _predictions(self, logits: np.ndarray, layers: np.ndarray, work: int) -> Predictions:
        if self.label_names is None:
            return Predictions([float(v) for v in logits[:, 0]], None, layers, logits, self.num_layers, work)
        labels: list[str | float] = [self.label_names[int(i)] for i in logits.argmax(-1)]
        return Predictions(labels, softmax(logits), layers, logits, self.num_layers, work)

    def predict(self, texts: TextInput | Sequence[TextInput], **options: Any) -> Any:
        """Labels (class names, or values for regression); one label for one string or pair."""
        labels = self.predict_with_exits(texts, **options).labels
        return labels[0] if isinstance(texts, str) or _is_pair(texts) else labels

    def predict_proba(self, texts: TextInput | Sequence[TextInput], **options: Any) -> np.ndarray:
        """Class probabilities [N, C] of the exit each input left at ([C] for one string or pair)."""
        if self.label_names is None:
            raise RomebertError("a regression model has no class probabilities; use predict")
        probs = self.predict_with_exits(texts, **options).probabilities
        return probs[0] if isinstance(texts, str) or _is_pair(texts) else probs

    @property
    def pair_input(self) -> bool | None:
        """Whether the model was trained on text pairs (None: not known)."""
        if self.text_columns is not None:
            return self.text_columns[1] is not None
        name = self.task_name or (self.data.task if self.data is not None else None)
        try:
            return get_task(name).is_pair if name else None
        except RomebertError:
            return None

    def iter_predictions(self, path: str | Path, text_column: str | None = None, text_pair_column: str | None = None,
                         *, chunk_rows: int = DEFAULT_CHUNK_ROWS, batch_size: int = 64,
                         criterion: str | ExitPolicy | None = None, threshold: Threshold | None = None,
                         calibrated: bool | None = None, **overrides: Any) -> Iterator[PredictionChunk]:  # fmt: skip
        """The predictions of a CSV / TSV / JSON Lines file, one chunk of ``chunk_rows`` rows at a time
        (``chunk.rows``: (line, row) as read; ``chunk.predictions``: :class:`Predictions`). The text
        columns default to the ones the model was trained on (custom data)."""
        engine = self.engine(criterion, threshold, calibrated, **overrides)
        scorer = FileScorer(self, path, engine, text_column, text_pair_column, batch_size=batch_size)
        return scorer.chunks(chunk_rows)

    def predict_file(self, path: str | Path, output: str | Path | None = None, text_column: str | None = None,
                     text_pair_column: str | None = None, *, criterion: str | ExitPolicy | None = None,
                     threshold: Threshold | None = None, calibrated: bool | None = None, **options: Any
                     ) -> FileSummary:  # fmt: skip
        """Predict every row of a CSV / TSV / JSON Lines file into ``output`` (default
        ``./<stem>.predictions.<ext>``), in the input's format, streamed a chunk at a time and renamed
        into place when complete. ``options``: those of :func:`romebert.deploy.predict_file.predict_file`
        (``id_column``, ``keep_columns``, ``chunk_rows``, ``batch_size``, ``resume``, ``shard``,
        ``progress``). Returns where it went, the rows and the mean exit layer."""
        engine = self.engine(criterion, threshold, calibrated)
        return predict_file(self, engine, path, output, text_column, text_pair_column, **options)

    # -------------------------------------------------------------------------- dev-side choices
    def _split(self, split: str | None) -> str:
        if self.data is None:
            raise RomebertError("this classifier knows no dev data; load it with from_run (or from an export)")
        splits = self.data.eval_splits()
        if split is None:
            if not splits:
                raise RomebertError("this classifier's data has no dev split")
            return splits[0]
        return split

    def task(self) -> Any:
        """The task of this classifier on its data (a model of another task or label set is refused)."""
        if self.data is None:
            raise RomebertError("this classifier knows no task data (load it with from_run)")
        return self.data.task_for(self.task_name, self.label_names, self.segments.num_labels)

    def dev_logits(self, split: str | None = None, use_cache: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Every exit's logits [L, N, C] and labels [N] on a dev split (the evaluate cache when present)."""
        logits, labels, _ = self.dev_outputs(split, (), use_cache)
        return logits, labels

    def dev_outputs(self, split: str | None = None, features: Sequence[str] = (), use_cache: bool = True):
        """(logits [L, N, C], labels [N], {feature: [L, N]}) on a dev split: the evaluate cache when it holds
        everything asked, else one pass of the segments."""
        from romebert.evaluation.evaluate import load_cached, load_features

        split = self._split(split)
        cache = self.run.eval(split) if self.run is not None else None
        if use_cache and cache is not None and cache.has_cache():
            logits, labels = load_cached(cache)
            extra = load_features(cache, tuple(features))
            if logits.shape[0] == self.num_layers and logits.shape[2] == self.segments.num_labels:
                if set(extra) == set(features):
                    return logits, labels, extra
        task = self.task()
        dataset = encode(self.data.examples(split), self.tokenizer, task.labels, self.data.max_seq_length)
        if not dataset.has_labels:
            raise RomebertError(f"split {split} has no labels")
        labels = np.asarray([f["labels"] for f in dataset.features])
        logits, extra = dataset_exit_outputs(self.segments, dataset, self.collator, features=tuple(features))
        return logits, labels, extra

    def choose_threshold(self, criterion: str = "entropy", *, target_speedup: float | None = None,
                         max_metric_drop: float | None = None, split: str | None = None,
                         calibrated: bool | None = None, thresholds: Sequence[Threshold] | None = None,
                         confidence: float | None = None,
                         **policy_kwargs: Any) -> tuple[Threshold, dict[str, Any]]:  # fmt: skip
        """Choose a threshold on the dev split (never on test) and keep it in :attr:`exit_config`;
        returns (threshold, its sweep row). See :func:`romebert.evaluation.exits.choose_threshold`; with
        ``confidence`` (1 - delta) and ``max_metric_drop`` (epsilon) the choice carries a guarantee."""
        from romebert.evaluation.calibration import apply_temperatures

        split = self._split(split)
        logits, labels, features = self.dev_outputs(split, criterion_class(criterion).needs)
        use = calibrated if calibrated is not None else self.exit_config.temperatures is not None
        temps = self.temperatures() if use else None
        if temps is not None:
            logits = apply_temperatures(logits, temps)
        task = self.task()
        threshold, row = choose_threshold(logits, labels, task, criterion, target_speedup=target_speedup,
                                          max_metric_drop=max_metric_drop, thresholds=thresholds,
                                          confidence=confidence, features=features, **policy_kwargs)  # fmt: skip
        # the drop counts against this classifier's own final exit: the fp32 model itself, or an export's graphs
        chosen = choice_record(row, split, task, target_speedup, max_metric_drop,
                               reference="fp32" if self.model is not None else "exported")  # fmt: skip
        keep = {k: policy_kwargs[k] for k in OPTION_NAMES if k in policy_kwargs}
        if isinstance(confidence, str):
            keep["confidence"] = confidence  # patience-confidence's option, not a risk level
        self.exit_config = replace(self.exit_config, criterion=criterion, threshold=threshold, chosen=chosen,
                                   temperatures=temps, **keep)  # fmt: skip
        return threshold, row

    def calibrate(self, split: str | None = None, bins: int = 15, save: bool = True):
        """Fit one temperature per exit on dev and keep them in :attr:`exit_config`; for a run, also saved
        to ``<run>/calibration.json`` unless ``save=False``. Returns the report (ECE before and after)."""
        from romebert.evaluation.calibration import calibrate

        if self.regression:
            raise RomebertError("temperature calibration needs class logits; it does not apply to regression")
        split = self._split(split)
        logits, labels = self.dev_logits(split)
        report = calibrate(logits, labels, bins=bins, split=split)
        if save and self.run is not None:
            report.save(self.run.calibration)
        self.exit_config = replace(self.exit_config, temperatures=list(report.temperatures))
        return report

    def temperatures(self) -> list[float]:
        """The per-exit temperatures: the exit config's (after :meth:`calibrate`, or as loaded), else the
        run's ``calibration.json``."""
        temps = self.exit_config.temperatures
        if temps is None and self.run is not None and self.run.calibration.is_file():
            from romebert.evaluation.calibration import CalibrationReport

            temps = list(CalibrationReport.load(self.run.calibration).temperatures)
        if temps is None:
            raise RomebertError("no calibration: calibrate() first (or load a calibrated classifier)")
        if len(temps) != self.num_layers:
            raise RomebertError(f"calibration has {len(temps)} temperatures, the model {self.num_layers} exits")
        return list(temps)


def _is_pair(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and all(isinstance(s, str) for s in x)
