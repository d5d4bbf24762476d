"""The runs of a comparison: which exist (:class:`RunKey`), where each stands, whether a finished one may be
reused (its fingerprint), training / evaluating the rest, and reading back the numbers the report needs.
Inside each run folder, paths come from :class:`romebert.core.runs.RunFolder`."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from romebert.core.environment import default_backbone, environment, now
from romebert.core.errors import RomebertError
from romebert.core.runs import RunFolder
from romebert.jobs.compare.config import PLAIN, CompareConfig
from romebert.jobs.compare.report import write_report
from romebert.training.methods import get_method
from romebert.training.training_args import TrainingArguments

# TrainingArguments fields that need not match for a finished run to be reused: where it was written and
# how it was logged or checkpointed; the backbone and pooling are compared through run.json.
_NOT_FINGERPRINTED = ("output_dir", "preset", "backbone", "pooling", "log_every", "save_steps", "save_total_limit",
                      "device", "progress")  # fmt: skip
_DATA_FINGERPRINT = (
    "task",
    "hub",
    "train_file",
    "text_a",
    "text_b",
    "label_column",
    "labels",
    "regression",
    "metric",
    "max_seq_length",
    "max_train_examples",
    "subset_seed",
)


@dataclass(frozen=True)
class RunKey:
    """One run of a comparison."""

    pooling: str
    method: str
    seed: int

    def path(self, out: Path) -> Path:
        return out / "runs" / self.pooling / self.method / f"seed{self.seed}"

    def label(self) -> str:
        return f"{self.pooling} pooling, {self.method}, seed {self.seed}"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RomebertError(f"{path}: cannot read ({exc})") from None


def _same_backbone(a: str | None, b: str | None) -> bool:
    def norm(x: str | None) -> str | None:
        # a local folder may be named relative or absolute; hub names stay as they are
        return str(Path(x).resolve()) if x and Path(x).exists() else x

    return norm(a) == norm(b)


class Comparison:
    """Runs (or reuses) every run of a :class:`CompareConfig`, then writes the report."""

    def __init__(self, cfg: CompareConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.backbone = cfg.training.backbone or default_backbone()
        self.task = cfg.data.task_spec()
        self.splits = cfg.data.eval_splits()
        # train_run resolves "auto" before it saves training_args.json; resolve the same way to compare
        self.gr_anchor = cfg.training.for_task(self.task.name).gr_anchor
        self.plan = [
            RunKey(pooling, method, seed)
            for seed in cfg.seeds  # seeds outermost: an interrupted comparison has every method for some seeds
            for pooling in cfg.poolings
            for method in cfg.all_methods
        ]
        self.recorded = self._recorded_runs()

    def folder(self, key: RunKey) -> RunFolder:
        return RunFolder(key.path(self.out))

    def training_arguments(self, key: RunKey) -> TrainingArguments:
        return dataclasses.replace(
            self.cfg.training,
            output_dir=str(key.path(self.out)),
            method=key.method,
            seed=key.seed,
            pooling=key.pooling,
            gr_anchor=self.gr_anchor,
            keep_checkpoints=key.method == PLAIN,  # the two-stage methods continue from plain's
            device=self.cfg.device,
            progress=self.cfg.progress,
        )

    def state(self, key: RunKey) -> str:
        """Where a run stands: finished, trained (model saved, evaluation incomplete), recorded (finished
        elsewhere: its record is in report.json, its folder is not here) or absent (train it)."""
        run = self.folder(key)
        if run.train_summary.is_file():
            if all(run.eval(s).sweep.is_file() for s in self.splits):
                return "finished"
            if run.is_trained():
                return "trained"
        # a folder here, even half-written, is this machine's newer attempt at the run: it wins
        return "recorded" if key in self.recorded and not run.root.exists() else "absent"

    def _recorded_runs(self) -> dict[RunKey, dict[str, Any]]:
        """Finished runs of an earlier report.json in the output folder, when it was made with these settings.

        Run folders hold the models (90 MB each) and are not committed; the report holds every number of
        every run. So a comparison spread over several machines or sessions continues from its committed
        report: a run recorded there is not trained again, though its folder is gone."""
        from romebert.jobs.compare.report import comparable, report_settings

        path = self.out / "report.json"
        if not path.is_file():
            return {}
        old = _read_json(path)
        here = comparable(json.loads(json.dumps(report_settings(self))))  # as JSON reads back: lists, not tuples
        there = comparable(old["settings"]) if isinstance(old.get("settings"), dict) else None
        if there != here:
            differs = sorted(k for k in here if there is None or there.get(k) != here[k])
            print(f"{path}: made with other settings ({', '.join(differs)}); its runs are not reused", flush=True)
            return {}
        found = {}
        for rec in old.get("runs", []):
            if rec.get("status") != "missing":
                found[RunKey(rec["pooling"], rec["method"], int(rec["seed"]))] = rec
        return found

    def check_reusable(self, key: RunKey) -> None:
        """A run trained with other settings must not be mixed into this comparison."""
        run = self.folder(key)
        args = asdict(self.training_arguments(key))
        expected = {k: v for k, v in args.items() if k not in _NOT_FINGERPRINTED}
        stored = _read_json(run.training_args)
        diffs = [f"{k}: {stored[k]!r} there, {v!r} here" for k, v in expected.items() if k in stored and stored[k] != v]
        info = _read_json(run.run_file)
        if info.get("pooling") != key.pooling:
            diffs.append(f"pooling: {info.get('pooling')!r} there, {key.pooling!r} here")
        if not _same_backbone(info.get("backbone"), self.backbone):
            diffs.append(f"backbone: {info.get('backbone')!r} there, {self.backbone!r} here")
        want = asdict(self.cfg.data)
        for k in _DATA_FINGERPRINT:
            if k in info.get("data", {}) and info["data"][k] != want[k]:
                diffs.append(f"{k}: {info['data'][k]!r} there, {want[k]!r} here")
        if diffs:
            raise RomebertError(
                f"{run.root} was trained with other settings ({'; '.join(diffs)}); "
                "use another --output-dir or delete that run folder"
            )

    def resumable(self, key: RunKey) -> bool:
        """An interrupted run continues from its last checkpoint when it was started with this comparison's
        settings (the trainer resumes bit-exactly, and its stage times add up across the interruption)."""
        from romebert.training.checkpoint import list_checkpoints, read_state  # imports torch: not at CLI start-up

        run = self.folder(key)
        found = list_checkpoints(run.root)
        if not found or not run.training_args.is_file() or not run.run_file.is_file():
            return False
        try:
            self.check_reusable(key)
            # a checkpoint without stage times (written before they were kept) would leave the cost unknown
            return read_state(found[-1]).seconds > 0
        except RomebertError:
            return False

    def shares_first_stage(self, key: RunKey) -> bool:
        """Whether ``key``'s first stage is ``plain``'s whole training: DeeBERT's stage one is plain
        fine-tuning, with the same seed, data order and initialisation, so a comparison trains it once per
        seed and pooling and every two-stage method continues from plain's checkpoint (bit-identical to
        training it again; the stage's time is plain's, so the reported cost is unchanged)."""
        stages = get_method(key.method)
        return (
            key.method != PLAIN
            and PLAIN in self.cfg.all_methods
            and len(stages) > 1
            and stages[0] == get_method(PLAIN)[0]
        )

    def _plain_key(self, key: RunKey) -> RunKey:
        return RunKey(key.pooling, PLAIN, key.seed)

    def _start_from_plain(self, key: RunKey) -> bool:
        """Seed ``key``'s run folder with plain's end-of-training checkpoint; False when there is none."""
        from romebert.core.files import write_json
        from romebert.training.checkpoint import list_checkpoints, read_state

        if not self.shares_first_stage(key):
            return False
        plain = self.folder(self._plain_key(key))
        found = list_checkpoints(plain.root)
        if not found or self.state(self._plain_key(key)) == "absent":
            return False
        state = read_state(found[-1])
        if not (state.stage_index == 0 and state.stage_done and state.seconds > 0):
            return False
        run = self.folder(key)
        tmp = run.root.with_name(run.root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(found[-1], tmp / run.checkpoints.name / found[-1].name)
        if plain.train_log.is_file():  # the run's log then holds both stages
            shutil.copy2(plain.train_log, RunFolder(tmp).train_log)
        write_json(RunFolder(tmp).compare_record, {"first_stage_from": PLAIN})
        tmp.replace(run.root)
        return True

    def _drop_plain_checkpoint(self, key: RunKey) -> None:
        """Once every method that continues from plain's checkpoint is trained, it is not needed."""
        if key.method != PLAIN and not self.shares_first_stage(key):
            return
        same = (key.pooling, key.seed)
        sharers = [k for k in self.plan if self.shares_first_stage(k) and (k.pooling, k.seed) == same]
        if all(self.folder(k).train_summary.is_file() for k in sharers):
            shutil.rmtree(self.folder(self._plain_key(key)).checkpoints, ignore_errors=True)

    def run(self) -> dict:
        """Train / evaluate / reuse every run, then write report.md, report.json and the figures."""
        t0 = time.perf_counter()
        states = {key: self.state(key) for key in self.plan}
        # check every reusable run before training anything: a mismatch fails in seconds, not hours in
        for key, st in states.items():
            if st in ("finished", "trained"):
                self.check_reusable(key)
        if self.cfg.report_only and all(st not in ("finished", "recorded") for st in states.values()):
            raise RomebertError(f"{self.out}: no finished runs to report on")
        env = environment(self.cfg.device)
        records = []
        for i, key in enumerate(self.plan, start=1):
            status = self.ensure(key, states[key], env, f"[{i}/{len(self.plan)}]")
            records.append(self.read_run(key, status))
            if status in ("trained", "evaluated") and i < len(self.plan):
                # the report so far (the rest "missing"): a comparison stopped now continues from it elsewhere
                later = self.plan[i:]
                pending = [self.read_run(k, "recorded" if states[k] == "recorded" else "missing") for k in later]
                write_report(self, records + pending, env, time.perf_counter() - t0, final=False)
        wall = time.perf_counter() - t0
        return write_report(self, records, env, wall)

    def ensure(self, key: RunKey, state: str, env: dict, prefix: str) -> str:
        """Bring one run to "finished"; returns what was done: trained, evaluated, reused or missing."""
        from romebert.core.files import write_json
        from romebert.jobs import pipeline

        run = self.folder(key)
        if state == "recorded":
            print(f"{prefix} {key.label()}: finished elsewhere, reused from report.json", flush=True)
            return "recorded"
        if self.cfg.report_only:
            if state != "finished":
                print(f"{prefix} {key.label()}: not finished, left out of the report", flush=True)
                return "missing"
            self._resweep_if_needed(run)
            return "reused"
        if state == "finished":
            self._resweep_if_needed(run)
            print(f"{prefix} {key.label()}: finished earlier, reused", flush=True)
            return "reused"
        meta: dict[str, Any] = {}
        from_plain = False
        source: Any = run.root  # what evaluation loads: the folder, or the run just trained
        if state == "absent":
            resume = self.resumable(key)
            if not resume:
                # half-finished leftovers (a stale eval/, another setting's files) would mix with the new run's
                shutil.rmtree(run.root, ignore_errors=True)
                resume = from_plain = self._start_from_plain(key)
            doing = "training"
            if resume:
                doing = "continuing from plain's fine-tuning" if from_plain else "resuming from its last checkpoint"
            print(f"{prefix} {key.label()}: {doing} ...", flush=True)
            meta = self._meta(run) if resume else {}
            t = time.perf_counter()
            trained = pipeline.train_run(self.cfg.data, self.training_arguments(key), resume=resume)
            summary, source = trained.summary, trained
            meta["train_wall_seconds"] = time.perf_counter() - t  # this process's share, if resumed
            meta["resumed_from_step"] = summary.get("resumed_from_step")
            if key.method == PLAIN:  # its newest stays until every method that continues from it is trained
                from romebert.training.checkpoint import list_checkpoints

                for old in list_checkpoints(run.root)[:-1]:
                    shutil.rmtree(old, ignore_errors=True)
            self._drop_plain_checkpoint(key)
            print(f"{prefix} {key.label()}: trained in {summary['seconds']:.0f} s", flush=True)
        else:
            meta = self._meta(run)
        t = time.perf_counter()
        pipeline.evaluate_run(
            source, thresholds=list(self.cfg.thresholds), batch_size=self.cfg.eval_batch_size, device=self.cfg.device
        )
        meta.update(
            eval_wall_seconds=time.perf_counter() - t,
            finished_at=now(),
            environment=env if state == "absent" else meta.get("environment"),
        )
        write_json(run.compare_record, meta)
        print(f"{prefix} {key.label()}: evaluated in {meta['eval_wall_seconds']:.0f} s", flush=True)
        return "trained" if state == "absent" else "evaluated"

    @staticmethod
    def _meta(run: RunFolder) -> dict[str, Any]:
        return _read_json(run.compare_record) if run.compare_record.is_file() else {}

    def _resweep_if_needed(self, run: RunFolder) -> None:
        """Runs swept with another threshold grid are re-swept from their cached logits (no model pass)."""
        from romebert.evaluation.evaluate import sweep_cached

        for split in self.splits:
            rows = _read_json(run.eval(split).sweep)
            if [r["threshold"] for r in rows] != [float(t) for t in self.cfg.thresholds]:
                sweep_cached(run.eval(split), self.task, list(self.cfg.thresholds))

    def read_run(self, key: RunKey, status: str) -> dict[str, Any]:
        """The numbers of one run that the report needs (metric values are fractions)."""
        if status == "recorded":
            return {**self.recorded[key], "status": "reused"}
        run = self.folder(key)
        rec: dict[str, Any] = {**asdict(key), "status": status, "dir": str(run.root.relative_to(self.out))}
        if status == "missing":
            return rec
        summary = _read_json(run.train_summary)
        epochs = float(_read_json(run.training_args)["epochs"])
        meta = self._meta(run)
        stages = [
            {"stage": s["stage"], "seconds": float(s["seconds"]), "cpu_seconds": s.get("cpu_seconds"),
             "steps": s.get("steps")} for s in summary["stages"]
        ]  # fmt: skip
        cpu = [s["cpu_seconds"] for s in stages]  # None in runs written before romebert recorded it
        rec.update(
            epochs=epochs,
            num_train_examples=summary.get("num_train_examples"),
            train_seconds=summary.get("seconds"),  # whole train_run: tokenizing, loading, training, saving
            stages=stages,
            seconds_per_epoch=sum(s["seconds"] for s in stages) / epochs,
            stage_seconds_per_epoch={s["stage"]: s["seconds"] / epochs for s in stages},
            cpu_seconds_per_epoch=None if None in cpu else sum(cpu) / epochs,
            eval_wall_seconds=meta.get("eval_wall_seconds"),
            finished_at=meta.get("finished_at"),
            environment=meta.get("environment"),
            first_stage_from=meta.get("first_stage_from"),
            splits={},
        )
        for split in self.splits:
            per_exit = _read_json(run.eval(split).per_exit)
            rows = _read_json(run.eval(split).sweep)
            timing = _read_json(run.eval(split).timing) if run.eval(split).timing.is_file() else {}
            rec["splits"][split] = {
                "criteria": self._criteria(run, split),
                "per_exit": [r[self.task.metric] for r in per_exit],
                "per_exit_all": per_exit,
                "sweep": [{k: r[k] for k in ("threshold", "speedup", "metric", "layer_ratio", "counts")} for r in rows],
                "examples": timing.get("examples"),
                "full_pass_seconds": timing.get("full_pass_seconds"),
            }
        return rec

    def _criteria(self, run: RunFolder, split: str) -> dict[str, Any] | None:
        """Every asked criterion from the run's cached logits (None when only entropy's main sweep is asked)."""
        cfg = self.cfg
        if cfg.criteria == ["entropy"] and cfg.risk_confidence is None:
            return None
        from romebert.evaluation.evaluate import load_cached, load_features
        from romebert.jobs.compare.criteria import criteria_record

        logits, labels = load_cached(run.eval(split))
        return criteria_record(logits, labels, self.task, cfg.criteria, cfg.max_metric_drop, cfg.risk_confidence,
                               load_features(run.eval(split)))  # fmt: skip


def run_compare(cfg: CompareConfig) -> dict[str, Any]:
    """Train / reuse every run and write the report; returns report.json's content."""
    comp = Comparison(cfg)
    if not cfg.report_only:  # every run trains on train and is evaluated on dev: check them all now
        cfg.data.check_inputs(["train", *cfg.data.eval_splits()])
    try:
        return comp.run()
    except KeyboardInterrupt:
        print(
            "romebert compare: interrupted; rerun the same command to continue (finished runs are kept)",
            file=sys.stderr,
        )
        raise
