"""Batch scoring beyond one machine on Ray Data (``pip install "romebert[ray]"``): ``map_batches`` with
:class:`ExportPredictor`, a callable class that Ray builds once per actor, so every worker loads the ONNX
export once (torch-free, ONNX Runtime) and scores each batch with the code ``romebert predict --input``
runs::

    import ray
    from romebert.jobs.distributed_predict import predict_dataset

    ds = ray.data.read_csv("reviews/")                     # or read_parquet, read_json, from_pandas ...
    out = predict_dataset(ds, "exports/sst2-int8", text_column="review", concurrency=8)
    out.write_csv("predictions/")                          # every input column, then the prediction's

Each output row is the input row followed by ``prediction``, ``prob_<label>`` per class (none for
regression) and ``exit_layer``: the columns and values ``romebert predict --input --keep-columns`` writes.
Ray is imported by :func:`predict_dataset` only; the predictor needs pandas, which Ray Data brings.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from romebert.data.custom import JSONL, Records
from romebert.deploy.classifier import EarlyExitClassifier
from romebert.deploy.file_scoring import DEFAULT_CHUNK_ROWS, FileColumns, RowScorer, resolve_columns


class ExportPredictor:
    """Scores pandas batches with an export, loaded once (in the constructor: once per Ray actor).

    ``text_column`` / ``text_pair_column`` default to the columns the model was trained on (custom
    data); ``criterion`` / ``threshold`` to the export's exit config; ``intra_op_threads``: ONNX
    Runtime threads per actor (give each actor as many CPUs in ``predict_dataset``'s ``num_cpus``).
    """

    def __init__(self, export: str | Path, text_column: str | None = None, text_pair_column: str | None = None,
                 criterion: str | None = None, threshold: Any = None, batch_size: int = 64,
                 intra_op_threads: int = 1) -> None:  # fmt: skip
        self.clf = EarlyExitClassifier.from_pretrained(export, intra_op_threads=intra_op_threads)
        self.engine = self.clf.engine(criterion, threshold)
        self.text, self.pair, self.batch_size = text_column, text_pair_column, batch_size
        self._scorers: dict[tuple[str, ...], RowScorer] = {}

    def scorer(self, columns: list[str]) -> RowScorer:
        """The scorer of batches with these columns (checked once per column set)."""
        key = tuple(columns)
        if key not in self._scorers:
            records = Records(Path("batch"), JSONL, columns)  # rows as dicts of typed values, like JSON Lines
            cols: FileColumns = resolve_columns(self.clf, records, self.text, self.pair, keep=True)
            self._scorers[key] = RowScorer(self.clf, records, cols, self.engine, self.batch_size)
        return self._scorers[key]

    def __call__(self, batch: Any) -> Any:
        """A pandas DataFrame in, the same rows with the prediction's columns added out."""
        import pandas as pd

        columns = [str(c) for c in batch.columns]
        scorer = self.scorer(columns)
        rows = [(i + 1, dict(zip(columns, map(_plain, values))))
                for i, values in enumerate(batch.itertuples(index=False, name=None))]  # fmt: skip
        return pd.DataFrame(scorer.output_rows(scorer.score(rows)), columns=scorer.output_columns)


def _plain(value: Any) -> Any:
    """A data frame's cell as a plain Python value: missing (None, NaN, pandas' NA) as None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if type(value).__name__ in ("NAType", "NaTType"):
        return None
    return value.item() if hasattr(value, "item") and getattr(value, "ndim", 1) == 0 else value


def predict_dataset(dataset: Any, export: str | Path, text_column: str | None = None,
                    text_pair_column: str | None = None, *, criterion: str | None = None, threshold: Any = None,
                    chunk_rows: int = DEFAULT_CHUNK_ROWS, batch_size: int = 64, concurrency: int = 1,
                    num_cpus: float = 1, intra_op_threads: int | None = None) -> Any:  # fmt: skip
    """``dataset`` (a ``ray.data.Dataset``) with the early-exit predictions of ``export`` added: a pool
    of ``concurrency`` actors, each with the export loaded once, scores batches of ``chunk_rows`` rows
    (the engine's batches: ``batch_size``). Lazy, as Ray datasets are: write or iterate the result."""
    from ray.data import ActorPoolStrategy

    threads = intra_op_threads or max(1, int(num_cpus))
    kwargs = {"export": str(export), "text_column": text_column, "text_pair_column": text_pair_column,
              "criterion": criterion, "threshold": threshold, "batch_size": batch_size,
              "intra_op_threads": threads}  # fmt: skip
    return dataset.map_batches(ExportPredictor, fn_constructor_kwargs=kwargs, batch_size=chunk_rows,
                               batch_format="pandas", compute=ActorPoolStrategy(size=concurrency),
                               num_cpus=num_cpus)  # fmt: skip
