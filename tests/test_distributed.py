"""Data parallelism on 2 CPU processes (gloo) equals one process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("dist_worker.py")
TOLERANCE = 1e-5  # float sums in another order (two half-batches reduced across ranks)


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _torchrun(n, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), *args]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("method", ["romebert-sdgr", "deebert"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, method):
    one, two = tmp_path / "one", tmp_path / "two"
    # 30 examples, global batch 8: the last global batch (6) splits 3 + 3; accumulation 2 on top
    subprocess.run(
        [sys.executable, str(WORKER), str(one), method, "8", "2"],
        env=_env(),
        check=True,
        capture_output=True,
        timeout=300,
    )
    _torchrun(2, str(WORKER), str(two), method, "4", "2")
    single = load_file(str(one / "rank0.safetensors"))
    rank0, rank1 = load_file(str(two / "rank0.safetensors")), load_file(str(two / "rank1.safetensors"))
    for rank in (0, 1):  # each rank left the gloo group before exiting (one still open can abort at exit)
        assert (two / f"rank{rank}.group_open").read_text() == "False"
    for key in single:
        assert torch.equal(rank0[key], rank1[key]), f"ranks disagree on {key}"
        assert torch.allclose(single[key], rank0[key], atol=TOLERANCE, rtol=0), f"{key} differs from 1 process"
    # and it did train: the exits moved away from their initial weights
    from conftest import tiny_model

    initial = tiny_model(layers=3, dropout=0.0, seed=7).state_dict()
    assert not torch.allclose(initial["exits.0.classifier.weight"], rank0["exits.0.classifier.weight"])


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_cli_under_a_launcher(tmp_path, tiny_backbone_dir, launcher):
    from glue_fixtures import write_glue_fixture

    write_glue_fixture(tmp_path / "glue", "SST-2", n=12)
    out = tmp_path / "run"
    args = [
        "-m",
        "romebert",
        "run",
        "--task",
        "SST-2",
        "--data-dir",
        str(tmp_path / "glue"),
        "--model",
        str(tiny_backbone_dir),
        "-o",
        str(out),
        "--max-seq-length",
        "32",
        "--batch-size",
        "2",
        "--epochs",
        "1",
        "--quiet",
        "--device",
        "cpu",
    ]
    if launcher == "torchrun":
        _torchrun(2, *args)
    else:  # accelerate's multi-GPU launcher is torchrun underneath; with --device cpu the ranks use gloo
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            *args,
        ]
        done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    assert '"world_size": 2' in (out / "train_summary.json").read_text()
    # rank 0 alone evaluated and wrote the test file
    assert (out / "eval" / "dev" / "sweep.json").exists() and (out / "predictions" / "SST-2.tsv").exists()


def test_two_process_resume_is_exact_with_dropout(tmp_path):
    """Ranks draw different dropout masks; a resumed 2-process run must restore each rank's own RNG."""
    import shutil

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    # 30 examples, global batch 8 (4 per rank), 2 epochs = 8 steps, a checkpoint every 3 steps
    _torchrun(2, str(WORKER), str(full), "romebert-sdgr", "4", "1", "0.1", "3", "0")
    ckpt = full / "checkpoints" / "stage0-step0000003"
    assert ckpt.is_dir(), sorted(p.name for p in (full / "checkpoints").iterdir())
    assert len(json.loads((ckpt / "trainer_state.json").read_text())["rank_rng"]) == 2
    # the run "died" after step 3 (mid-epoch 1): only that checkpoint survives
    shutil.copytree(ckpt, resumed / "checkpoints" / ckpt.name)
    _torchrun(2, str(WORKER), str(resumed), "romebert-sdgr", "4", "1", "0.1", "3", "1")
    for rank in (0, 1):
        a = load_file(str(full / f"rank{rank}.safetensors"))
        b = load_file(str(resumed / f"rank{rank}.safetensors"))
        for key in a:
            assert torch.equal(a[key], b[key]), f"rank {rank}: {key} differs after resume"


# ------------------------------------------------------------------------------ GPU hygiene, on the CPU
def test_each_rank_binds_its_own_gpu_before_the_process_group_starts(monkeypatch):
    import torch.distributed as dist

    from romebert.training.distributed import init_distributed

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", str(d))))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    ctx = init_distributed(torch.device("cuda", 1))
    assert calls == [("set_device", "cuda:1"), ("init", "nccl")]
    assert (ctx.rank, ctx.world_size) == (1, 2)
    calls.clear()
    init_distributed(torch.device("cpu"))
    assert calls == [("init", "gloo")]


def test_rng_capture_and_restore_touch_only_this_ranks_gpu(monkeypatch):
    from romebert.training.checkpoint import capture_rng, restore_rng

    read, written = [], []
    state4 = torch.arange(4, dtype=torch.uint8)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda d: read.append(str(d)) or state4)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: written.append((s.tolist(), str(d))))
    for every in ("get_rng_state_all", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, every, lambda *a: pytest.fail("every visible GPU's RNG was touched"))
    state = capture_rng(torch.device("cuda", 1))
    assert read == ["cuda:1"] and state["cuda"] == [0, 1, 2, 3]
    restore_rng(state, torch.device("cuda", 1))
    assert written == [([0, 1, 2, 3], "cuda:1")]
    # a checkpoint of an older version holds every GPU's state: this rank takes its own
    written.clear()
    restore_rng({**state, "cuda": [[9, 9, 9, 9], [5, 6, 7, 8]]}, torch.device("cuda", 1))
    assert written == [([5, 6, 7, 8], "cuda:1")]
    assert "cuda" not in capture_rng(torch.device("cpu"))
