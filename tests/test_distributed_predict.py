"""The Ray Data integration on a local Ray cluster: ``predict_dataset`` (``map_batches`` with one
export loaded per actor) gives what ``romebert predict --input --keep-columns`` writes for the same file."""

from __future__ import annotations

import csv

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import ray

from romebert.cli import main
from romebert.data.custom import cell_text
from romebert.deploy.classifier import EarlyExitClassifier
from romebert.jobs.distributed_predict import predict_dataset
from romebert.runtime.scores import entropy

from glue_fixtures import sentence

SPECIAL = ["the cat, the dog and a bird .", "the movie was good\nand very fun .", "it is not bad 😍 !"]


def test_ray_data_predictions_equal_romebert_predict(tiny_sst2_run, tmp_path):
    texts = [sentence(i) for i in range(37)] + SPECIAL
    # a threshold that half of the rows meet at the first exit, so rows leave early and late
    first = EarlyExitClassifier.from_run(tiny_sst2_run, "cpu").predict_with_exits(texts, threshold=10.0).logits
    export = tmp_path / "export"
    assert (
        main(["export", str(tiny_sst2_run), "-o", str(export), "--threshold", repr(float(np.median(entropy(first))))])
        == 0
    )
    src = tmp_path / "reviews.csv"
    with open(src, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "review"])
        writer.writerows([f"r{i}", t] for i, t in enumerate(texts))
    out = tmp_path / "reviews.predictions.csv"
    assert main(["predict", str(export), "--input", str(src), "-o", str(out), "--text-column", "review",
                 "--keep-columns", "--quiet"]) == 0  # fmt: skip
    with open(out, encoding="utf-8", newline="") as f:
        expected = list(csv.DictReader(f))
    assert len({r["exit_layer"] for r in expected}) > 1  # rows leave early and late

    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2**20)
    try:
        ds = ray.data.read_csv(src, parse_options=pacsv.ParseOptions(newlines_in_values=True),
                               convert_options=pacsv.ConvertOptions(column_types={"id": pa.string()}))  # fmt: skip
        got = predict_dataset(ds.repartition(2), export, "review", concurrency=2).to_pandas()
    finally:
        ray.shutdown()
    assert list(got.columns) == list(expected[0])
    rows = sorted(({c: cell_text(v) for c, v in zip(got.columns, values)} for values in got.itertuples(index=False)),
                  key=lambda r: int(r["id"][1:]))  # fmt: skip
    assert rows == expected
