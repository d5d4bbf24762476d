"""Interrupted training loses nothing: a real process is SIGKILLed mid-epoch and resumed bit-exactly."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from romebert.training.checkpoint import list_checkpoints, read_state

from glue_fixtures import write_glue_fixture

N_EXAMPLES = 240


def _command(data, backbone, out, method, *extra):
    return [
        sys.executable,
        "-m",
        "romebert",
        "train",
        "--task",
        "SST-2",
        "--data-dir",
        str(data),
        "--model",
        str(backbone),
        "--method",
        method,
        "-o",
        str(out),
        "--max-seq-length",
        "32",
        "--batch-size",
        "2",
        "--log-every",
        "1",
        "--epochs",
        "1",
        "--save-steps",
        "10",
        "--quiet",
        "--device",
        "cpu",
        "--seed",
        "3",
        *extra,
    ]


def _env():
    # one thread: CPU kernels are then deterministic run to run, so "equal" can mean bit-exact
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _kill_when(proc, out, predicate, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list_checkpoints(out)
        if found and predicate(read_state(found[-1])):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return read_state(found[-1])
        if proc.poll() is not None:
            pytest.fail(f"training ended before it could be killed (rc {proc.returncode})")
        time.sleep(0.01)
    proc.kill()
    pytest.fail("no checkpoint appeared in time")


@pytest.mark.parametrize(
    "method,kill_at",
    [
        ("romebert-sdgr", lambda s: s.global_step >= 20),  # mid-epoch of the only stage
        ("deebert", lambda s: s.stage_index == 0 and s.global_step >= 20),  # resume crosses the stage boundary
    ],
)
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_backbone_dir, method, kill_at):
    data = tmp_path / "glue"
    write_glue_fixture(data, "SST-2", n=N_EXAMPLES)
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(_command(data, tiny_backbone_dir, full, method), check=True, env=_env(), capture_output=True)

    proc = subprocess.Popen(
        _command(data, tiny_backbone_dir, cut, method), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    state = _kill_when(proc, cut, kill_at)
    assert not (cut / "model").exists(), "the killed run must not have finished"
    assert state.batches_done < N_EXAMPLES // 2  # killed inside the epoch
    done = subprocess.run(
        _command(data, tiny_backbone_dir, cut, method, "--resume"), env=_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]

    a, b = load_file(str(full / "model" / "model.safetensors")), load_file(str(cut / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"
    # the resumed run reports every stage, with the time spent before the kill counted
    whole = json.loads((full / "train_summary.json").read_text())
    resumed = json.loads((cut / "train_summary.json").read_text())
    assert [(s["stage"], s["steps"]) for s in resumed["stages"]] == [(s["stage"], s["steps"]) for s in whole["stages"]]
    assert resumed["stages"][0]["seconds"] >= state.seconds > 0
    assert resumed["stages"][0]["cpu_seconds"] >= state.cpu_seconds > 0
