"""Run by tests/test_distributed.py under torchrun (or alone): trains a tiny model, saves its weights."""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))

from test_trainer import _dataset  # noqa: E402

from romebert.runtime.encoding import Collator  # noqa: E402
from romebert.training.trainer import Trainer  # noqa: E402
from romebert.training.training_args import TrainingArguments  # noqa: E402

from conftest import tiny_model  # noqa: E402


def main(
    out: str, method: str, batch_size: int, accum: int, dropout: float = 0.0, save_steps: int = 0, resume: bool = False
) -> None:
    model = tiny_model(layers=3, dropout=dropout, seed=7)
    args = TrainingArguments(
        output_dir=out,
        method=method,
        epochs=2 if save_steps else 1,
        save_steps=save_steps,
        save_total_limit=100,
        batch_size=batch_size,
        learning_rate=1e-3,
        gradient_accumulation_steps=accum,
        progress=False,
        group_by_length=True,
        gr_anchor="exits",
        device="cpu",
    )
    trainer = Trainer(model, args, _dataset(n=30, seed=1), Collator(pad_token_id=0))
    trainer.train(resume=resume)
    # training left the process group it joined (a gloo group alive at exit can abort the process)
    (Path(out) / f"rank{trainer.dist.rank}.group_open").write_text(str(torch.distributed.is_initialized()))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(Path(out) / f"rank{trainer.dist.rank}.safetensors"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    extra = sys.argv[5:]  # optional: dropout save_steps resume
    main(
        sys.argv[1],
        sys.argv[2],
        int(sys.argv[3]),
        int(sys.argv[4]),
        float(extra[0]) if extra else 0.0,
        int(extra[1]) if len(extra) > 1 else 0,
        len(extra) > 2 and extra[2] == "1",
    )
