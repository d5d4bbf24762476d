"""``romebert export``: a trained run as a self-contained ONNX folder for the torch-free runtime.

    <export>/manifest.json        task, labels, pooling, the early-exit config (criterion, threshold and
                                  how it was chosen on dev, temperatures), precision, opset, fusions,
                                  versions and a sha256 per file (artefacts.ExportManifest)
    <export>/segment_01.onnx ...  one graph per layer with its exit head (export_graphs.py)
    <export>/tokenizer.json ...   the tokenizer

    <export>/early_exit.onnx      the whole early exit for one input, in one graph (single_row.py)

Each graph goes through ONNX Runtime's transformer optimizer (attention, LayerNorm, GELU fusions; the
manifest lists what fused in each graph) and, with ``precision="int8"``, an int8 recipe (quantize.py,
calibrated on training sentences). On the run's dev split (export_dev.py) the exporter measures every
exit against the fp32 model and chooses the threshold with the exported graphs' own logits, since a
threshold does not carry over unchanged between precisions. The folder is built under a temporary name
and renamed when complete, so an interrupted export never leaves a folder that loads.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from romebert import __version__
from romebert.core.environment import backbone_label
from romebert.core.errors import RomebertError
from romebert.core.files import sha256
from romebert.core.runs import RunFolder
from romebert.data.spec import DataSpec
from romebert.deploy.export_graphs import FullModel, segment_io, segment_modules, uses_fused_segments
from romebert.deploy.export_options import DEFAULT_OPSET, ExportOptions
from romebert.deploy.quantize import DEFAULT_INT8, Batch, calibration_batches, quantize_segments, recipe
from romebert.model.modeling import MultiExitModel
from romebert.runtime.artefacts import MANIFEST_FILE, EarlyExitConfig, ExportManifest, GraphFile
from romebert.runtime.encoding import mean_pool_weights
from romebert.runtime.engine import all_exit_logits
from romebert.runtime.exit_policy import OPTION_NAMES

PRECISIONS = ("fp32", "int8")
FULL_GRAPH_FILE = "full.onnx"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
_DYNAMIC = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
            "token_type_ids": {0: "batch", 1: "tokens"}, "state": {0: "batch", 1: "tokens"},
            "next_state": {0: "batch", 1: "tokens"}, "pool_weights": {0: "batch", 1: "tokens"},
            "logits": {0: "batch"}, "nsp": {0: "batch"}}  # fmt: skip


def _onnx_tools():
    try:
        import onnx  # noqa: F401
        import onnxruntime.quantization  # noqa: F401
        from onnxruntime.transformers.optimizer import optimize_model
    except ImportError as exc:
        raise RomebertError("export needs onnx and onnxruntime: pip install 'romebert[export]'") from exc
    return optimize_model


def _probe_inputs(model: MultiExitModel) -> tuple[Tensor, Tensor, Tensor]:
    """A small batch with one padded row, to trace the graphs with (shapes are dynamic)."""
    vocab = model.backbone.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(5, vocab - 1), vocab, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return ids, mask, torch.zeros_like(ids)


def export_graph(module: torch.nn.Module, args: tuple, inputs: list[str], outputs: list[str], path: Path,
                 opset: int) -> None:  # fmt: skip
    """One traced ONNX graph with dynamic batch and token axes."""
    import warnings

    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python control flow in the backbone
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes={k: v for k, v in _DYNAMIC.items() if k in inputs + outputs},
            do_constant_folding=True,
        )


def optimize_graph(path: Path, model: MultiExitModel, skip_layer_norm: bool = False) -> dict[str, int]:
    """ONNX Runtime's transformer fusions, in place; returns the fused operators that appeared.

    ``skip_layer_norm``: also fuse residual Add + LayerNormalization into SkipLayerNormalization, as the
    optimizer does by default. romebert's graphs leave them apart: ONNX Runtime's CPU kernel for the
    fused op is slower than the two it replaces (benchmarks/inference_speed.py times the full model
    both ways); the result is the same function."""
    optimize_model = _onnx_tools()
    from onnxruntime.transformers.fusion_options import FusionOptions

    cfg = model.backbone.config
    options = FusionOptions("bert")
    options.enable_skip_layer_norm = options.enable_bias_skip_layer_norm = skip_layer_norm
    opt = optimize_model(str(path), model_type="bert", num_heads=cfg.num_attention_heads, hidden_size=cfg.hidden_size,
                         optimization_options=options)  # fmt: skip
    opt.save_model_to_file(str(path))
    return {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import transformers

    return {
        "romebert": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }


def export_model(
    model: MultiExitModel,
    tokenizer_dir: Path,
    out: str | Path,
    *,
    precision: str = "fp32",
    max_seq_length: int = 128,
    opset: int = DEFAULT_OPSET,
    early_exit: EarlyExitConfig | None = None,
    on_dev: Callable[[Path, ExportManifest], None] | None = None,
    data: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
    optimize: bool = True,
    full_graph: bool = False,
    int8_recipe: str = DEFAULT_INT8,
    calibration: Sequence[Batch] | None = None,
    single_row: bool = True,
) -> ExportManifest:
    """Write ``model`` as an export folder ``out``.

    ``on_dev(folder, manifest)``, if given, measures the finished graphs on dev and may set the manifest's
    early-exit config and dev metrics (``export_dev.py``); otherwise ``early_exit`` (default: the
    reference's entropy 0.15) is used as it is. ``full_graph``: also the whole model as one graph
    (``full.onnx``), the baseline a service without early exit runs. ``int8_recipe`` and ``calibration``
    (padded batches of training sentences, for the recipes that need them): how ``precision="int8"``
    quantizes (``quantize.py``). ``single_row``: also the one-graph early exit for batches of one row
    (classification).
    """
    if precision not in PRECISIONS:
        raise RomebertError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    rec = recipe(int8_recipe)
    if precision == "int8" and rec.needs_calibration and not calibration:
        raise RomebertError(f"int8 recipe {rec.name} needs calibration sentences (export_run takes them from the "
                            "run's training split); or choose int8_recipe='dynamic-per-channel'")  # fmt: skip
    out = Path(out)
    _check_target(out)
    # traced on the CPU in eval mode with eager attention; the caller's model is put back as it was
    device, training = next(model.parameters()).device, model.training
    attention = model.backbone.config._attn_implementation
    model.to("cpu").eval()
    _use_eager_attention(model)
    _remove_stale(out)
    tmp = Path(
        tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent if out.parent.exists() else None)
    )
    try:
        graphs, fusions, quantization = _write_graphs(model, tmp, precision, opset, optimize, rec.name, calibration)
        full = None
        if full_graph:
            export_full_model(model, tmp / FULL_GRAPH_FILE, precision, opset, rec.name, calibration)
            full = GraphFile(FULL_GRAPH_FILE, sha256(tmp / FULL_GRAPH_FILE), _graph_inputs(tmp / FULL_GRAPH_FILE),
                             ["logits"])  # fmt: skip
        tok_files = []
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, tmp / name)
                tok_files.append(GraphFile(name, sha256(tmp / name)))
        if not any(f.file == "tokenizer.json" for f in tok_files):
            raise RomebertError(f"{tokenizer_dir}: no tokenizer.json (a fast tokenizer is needed for the runtime)")
        cfg = model.config
        manifest = ExportManifest(
            task=cfg.task,
            labels=list(cfg.labels) if cfg.labels is not None else None,
            num_layers=model.num_layers,
            num_labels=cfg.num_labels,
            hidden_size=model.backbone.config.hidden_size,
            pooling=cfg.pooling,
            max_seq_length=max_seq_length,
            precision=precision,
            opset=opset,
            early_exit=early_exit or EarlyExitConfig(),
            graphs=graphs,
            tokenizer_files=tok_files,
            pad_token_id=_pad_token_id(tokenizer_dir),
            data=data,
            fusions=fusions,
            versions=_versions(),
            source={**(source or {}), "encoder": _encoder_label(model)},
            full_graph=full,
            quantization=quantization,
        )
        if single_row and not manifest.regression:  # (its exit rules are entropy and maxprob on class logits)
            from romebert.deploy.single_row import SINGLE_ROW_FILE, build_single_row

            build_single_row(tmp, manifest, tmp / SINGLE_ROW_FILE)
            manifest.single_row_graph = GraphFile(SINGLE_ROW_FILE, sha256(tmp / SINGLE_ROW_FILE),
                                                  *_graph_io(tmp / SINGLE_ROW_FILE))  # fmt: skip
        _verify(model, tmp, manifest)
        if on_dev is not None:
            on_dev(tmp, manifest)
        manifest.save(tmp)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        model.backbone.config._attn_implementation = attention
        model.to(device).train(training)
    return manifest


def export_run(
    run_dir: str | Path,
    out: str | Path,
    options: ExportOptions | None = None,
    criterion: str = "entropy",
    policy_options: dict[str, Any] | None = None,
    batch_size: int = 64,
) -> ExportManifest:
    """Export a finished run; the threshold is ``options.threshold`` as given, or chosen on the run's dev
    split with the exported graphs (``target_speedup`` and/or ``max_metric_drop``, the drop counted
    against the fp32 model's final exit unless ``drop_against="exported"``; default: the largest layer
    speed-up within 0.01 of it). int8 is calibrated on sentences of the run's training split."""
    from romebert.deploy.export_dev import dev_step
    from romebert.model.loading import load_run

    opts = options or ExportOptions()
    folder = RunFolder(run_dir).require_trained()
    model, tokenizer, data = load_run(folder.root, "cpu")
    policy_kw = {k: v for k, v in (policy_options or {}).items() if k in OPTION_NAMES}
    temperatures = None
    if opts.calibrated:
        from romebert.evaluation.calibration import CalibrationReport

        temperatures = list(CalibrationReport.load(folder.calibration).temperatures)
    fixed = None
    if opts.threshold is not None:
        fixed = EarlyExitConfig(criterion=criterion, threshold=opts.threshold, temperatures=temperatures,
                                chosen={"given": True}, **policy_kw)  # fmt: skip
    on_dev = dev_step(model, folder, data, tokenizer, opts, criterion, policy_kw, temperatures, batch_size)
    calibration = None
    rec = recipe(opts.int8_recipe)
    if opts.precision == "int8" and rec.needs_calibration:
        calibration = calibration_batches(data.examples("train"), tokenizer, data.max_seq_length,
                                          rec.calibration_examples)  # fmt: skip
    source = {"run": folder.root.name, "backbone": backbone_label(model.config.backbone)}
    if folder.training_args.is_file():
        import json

        source["method"] = json.loads(folder.training_args.read_text(encoding="utf-8")).get("method")
    return export_model(
        model,
        folder.model,
        out,
        precision=opts.precision,
        max_seq_length=data.max_seq_length,
        opset=opts.opset,
        early_exit=fixed,
        on_dev=on_dev,
        data=_portable(data),
        source=source,
        full_graph=opts.full_graph,
        int8_recipe=rec.name,
        calibration=calibration,
    )


# ------------------------------------------------------------------------------------------ internals
def _use_eager_attention(model: MultiExitModel) -> None:
    # The export writes its own attention (export_graphs.py); eager keeps the backbone's other code
    # paths free of fused kernels the tracer cannot see through.
    model.backbone.config._attn_implementation = "eager"


def _write_graphs(model: MultiExitModel, folder: Path, precision: str, opset: int, optimize: bool, int8_recipe: str,
                  calibration: Sequence[Batch] | None):  # fmt: skip
    """The segment graphs (fp32, then int8 by the recipe) -> (GraphFiles, fusions per graph, the int8 record)."""
    names, outs, fusions = [], [], []
    ids, mask, types = _probe_inputs(model)
    mean = model.config.pooling == "mean"
    weights = (torch.from_numpy(mean_pool_weights(mask.numpy())),) if mean else ()
    args: tuple = (ids, mask, types, *weights)
    fp32 = (lambda n: folder / n) if precision == "fp32" else (lambda n: folder / f"fp32-{n}")
    with torch.no_grad():
        for i, module in enumerate(segment_modules(model)):
            inputs, outputs = segment_io(i, model.num_layers, mean)
            names.append(f"segment_{i + 1:02d}.onnx")
            outs.append(outputs)
            export_graph(module, args, inputs, outputs, fp32(names[-1]), opset)
            fusions.append(optimize_graph(fp32(names[-1]), model) if optimize else {})
            if i < model.num_layers - 1:
                args = (module(*args)[0], mask, *weights)
    quantization = None
    if precision == "int8":
        quantization = quantize_segments([fp32(n) for n in names], [folder / n for n in names], recipe(int8_recipe),
                                         calibration, mean)  # fmt: skip
        for n in names:
            fp32(n).unlink()
    # the graph's own inputs: the exporter drops one the graph does not use (token_type_ids of a family
    # without token types), and the runtime feeds exactly what the manifest lists
    graphs = [GraphFile(n, sha256(folder / n), _graph_inputs(folder / n), o) for n, o in zip(names, outs, strict=True)]
    return graphs, fusions, quantization


def _graph_inputs(path: Path) -> list[str]:
    """Names of a graph's inputs (not its initializers), in order."""
    return _graph_io(path)[0]


def _graph_io(path: Path) -> tuple[list[str], list[str]]:
    """Names of a graph's inputs (not its initializers) and outputs, in order."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    return [i.name for i in graph.input if i.name not in weights], [o.name for o in graph.output]


def _encoder_label(model: MultiExitModel) -> str:
    """The encoder family and the segment form its graphs take, e.g. "bert (fused BERT segments)"."""
    form = "fused BERT segments" if uses_fused_segments(model) else "generic segments"
    return f"{model.backbone.config.model_type} ({form})"


def _verify(model: MultiExitModel, folder: Path, manifest: ExportManifest) -> None:
    """The exported graphs against the model on the probe batch: every exit's logits (fp32: 1e-3); the
    one graph against the final exit; the one-row graph, row by row, at exit 1 and at the last exit."""
    from romebert.runtime.engine import EarlyExitEngine
    from romebert.runtime.onnx_runtime import OrtSegments
    from romebert.runtime.policies import get_policy

    ids, mask, types = _probe_inputs(model)
    probe = [(ids.numpy(), mask.numpy(), types.numpy())]
    segments = OrtSegments(folder, manifest, intra_op_threads=1)
    got = all_exit_logits(segments, probe)
    with torch.no_grad():
        ref = model(ids, mask, types).numpy()
    err = float(np.abs(got - ref).max())
    if manifest.full_graph is not None:  # the one graph against the final exit
        full = all_exit_logits(OrtSegments(folder, manifest, intra_op_threads=1, one_graph=True), probe)
        err = max(err, float(np.abs(full[0] - ref[-1]).max()))
    if manifest.single_row_graph is not None:  # threshold inf: every row leaves at exit 1; 0: none leaves early
        for threshold, exit_index in ((float("inf"), 0), (0.0, -1)):
            engine = EarlyExitEngine(segments, get_policy("entropy", threshold))
            for r in range(ids.shape[0]):
                out = engine.run(*(a[r : r + 1] for a in probe[0]))
                err = max(err, float(np.abs(out.logits[0] - ref[exit_index, r]).max()))
    if manifest.precision == "fp32" and not err < 1e-3:
        raise RomebertError(f"export check failed: the graphs' logits differ from the model's by {err:.3g}")
    manifest.source["probe_max_abs_diff"] = err


def _portable(data: DataSpec) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(data)


def _pad_token_id(tokenizer_dir: Path) -> int:
    from transformers import AutoTokenizer

    pad = AutoTokenizer.from_pretrained(str(tokenizer_dir)).pad_token_id
    if pad is None:
        raise RomebertError(f"{tokenizer_dir}: the tokenizer has no padding token")
    return int(pad)


def _check_target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_FILE).is_file())):
        raise RomebertError(f"{out}: exists and is not an export folder; choose another --output")


def _remove_stale(out: Path) -> None:
    """Delete the temporary folders that earlier exports to ``out`` left when they were killed (each name
    holds its process id; a folder whose process still runs is another export at work, and stays)."""
    if not out.parent.is_dir():
        return
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        pid = tmp.name[len(f".{out.name}.tmp-") :].split("-", 1)[0]
        if tmp.is_dir() and (not pid.isdigit() or not _alive(int(pid))):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process starts a new export: nothing of its own is in progress
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished folder into place (replacing an older export there) with renames only."""
    out.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{time.time_ns()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_full_model(model: MultiExitModel, path: Path, precision: str = "fp32", opset: int = DEFAULT_OPSET,
                      int8_recipe: str = DEFAULT_INT8, calibration: Sequence[Batch] | None = None,
                      skip_layer_norm: bool = False) -> dict:  # fmt: skip
    """The whole model as ONE graph, final head only, optimized (and quantized by ``int8_recipe``): what a
    user would deploy instead of early exit (the benchmark's baseline: ``quantize.BASELINE_INT8``, the
    recipe optimum applies, with the optimizer's default fusions, ``skip_layer_norm=True``). Returns the
    fused operators."""
    model = model.to("cpu").eval()
    _use_eager_attention(model)
    inputs, outputs = ["input_ids", "attention_mask", "token_type_ids"], ["logits"]
    fp32 = path if precision == "fp32" else path.with_name("fp32-" + path.name)
    with torch.no_grad():
        export_graph(FullModel(model), _probe_inputs(model), inputs, outputs, fp32, opset)
    fused = optimize_graph(fp32, model, skip_layer_norm)
    if precision == "int8":
        quantize_segments([fp32], [path], recipe(int8_recipe), calibration, model.config.pooling == "mean")
        fp32.unlink()
    return fused
