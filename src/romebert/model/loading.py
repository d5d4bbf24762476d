"""Loading what a run or a saved folder holds: a backbone's tokenizer, and a trained run's model, tokenizer
and data description."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from romebert.core.devices import resolve_device
from romebert.core.errors import RomebertError
from romebert.core.runs import RunFolder
from romebert.data.spec import DataSpec
from romebert.model.modeling import MultiExitModel


def load_tokenizer(name_or_path: str):
    """The fast tokenizer of a backbone (hub name or folder) or of a saved model folder."""
    try:
        return AutoTokenizer.from_pretrained(name_or_path, use_fast=True)
    except (OSError, ValueError) as exc:
        raise RomebertError(f"cannot load a tokenizer from {name_or_path!r}: {str(exc).splitlines()[0]}") from None


def load_run(run_dir: str | Path, device: str = "auto") -> tuple[MultiExitModel, object, DataSpec]:
    """The trained model, its tokenizer and the data description of a run folder."""
    run = RunFolder(run_dir)
    data = DataSpec.load(run.run_file)
    model = MultiExitModel.from_pretrained(run.model, map_location=resolve_device(device))
    return model, load_tokenizer(str(run.model)), data
