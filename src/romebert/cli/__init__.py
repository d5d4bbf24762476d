"""``romebert`` command line: train, evaluate, sweep, predict, export, serve, run (train, evaluate and
predict in one go) and compare. ``parser`` declares the flags (all from dataclass fields), ``commands``
runs each job, and :func:`main` turns every user-facing failure into one line."""

from __future__ import annotations

import os
import sys

from romebert.core.errors import RomebertError

# A missing module -> the extra that installs it (the base install serves ONNX exports only).
_EXTRAS = {name: "train" for name in ("torch", "transformers", "safetensors", "scipy", "matplotlib", "tqdm")}
_EXTRAS.update(onnx="export", onnxruntime="runtime", starlette="serve", uvicorn="serve", prometheus_client="serve")


def main(argv: list[str] | None = None) -> int:
    """Run one command; ``argv`` None: this process's own command line, which ``serve`` may restart the
    interpreter with (``--system-allocator``); a list never restarts anything."""
    from romebert.cli.commands import COMMANDS
    from romebert.cli.parser import build_parser

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ns = build_parser().parse_args(argv)
    ns.own_process = argv is None
    try:
        COMMANDS[ns.command](ns)
    except RomebertError as exc:
        print(f"romebert: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("romebert: interrupted; the newest complete checkpoint is kept (rerun with --resume)", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:
        extra = _EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"romebert: error: '{ns.command}' needs {exc.name}: pip install 'romebert[{extra}]'", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
