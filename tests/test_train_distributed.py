"""train.py under torchrun on CPU (gloo): a 2-process run (TRADES, so that the adversarial step and
the sharded robust check run under DDP too) trains, resumes and writes a checkpoint that main.py
sweeps; its metrics are the single-process ones; a failing rank ends the job."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dataset
import train
from adversarial import robust_metrics, split_source
from conftest import assert_ranks_stopped_with_one_line_errors
from checkpoint import load_checkpoint, model_from_checkpoint
from main import get_args_parser as sweep_parser
from main import main as run_sweep
from utils import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
COUNTS = {"Basophil": 6, "Eosinophil": 6, "Lymphocyte": 8, "Monocyte": 6, "Neutrophil": 10}
ADV = ["--adv", "trades", "--adv-steps", "1", "--adv-val-limit", "4"]


def train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--depth", "18", "--data", str(data), "--image-size", "32", "--epochs", "1", "--batch-size", "4",
            "--workers", "0", "--device", "cpu", "--out", str(out), *extra]


def torchrun_train(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*TORCHRUN, str(ROOT / "train.py"), *argv], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=300)


def single_process_test_metrics(best: Path, data: Path) -> dict:
    """The clean and robust test metrics of ``best``, evaluated by one process over the whole split."""
    ckpt = load_checkpoint(best)
    model, cpu = model_from_checkpoint(ckpt), torch.device("cpu")
    split = dataset.build_splits("classification", data, image_size=32)["test"]
    loader = dataset.make_loader(split, 3, train=False)
    clean = train.evaluate(model, loader, cpu, "classification", ckpt["class_names"], "test", interval=True)
    robust = robust_metrics(model, split_source(split, range(len(split)), in_memory=True), "classification",
                            ckpt["class_names"], 4 / 255, cpu, batch_size=3)
    return {**clean, **{f"test_robust_{key}": value for key, value in robust.items()}}


def test_two_processes_train_resume_and_main_sweeps_the_checkpoint(make_classification_data, tmp_path):
    data, out = make_classification_data(COUNTS), tmp_path / "run"
    done = torchrun_train(train_argv(data, out, *ADV), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("epoch 1/1") == 1, "only rank 0 prints"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    best = out / "checkpoints" / "best.pt"
    assert load_checkpoint(best)["args"]["world_size"] == 2
    expected = single_process_test_metrics(best, data)
    assert {key: metrics[key] for key in expected} == pytest.approx(expected, nan_ok=True)

    resumed = torchrun_train(train_argv(data, out, *ADV, "--epochs", "2", "--resume"), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("resuming from") == 1
    assert [row["epoch"] for row in csv.DictReader((out / "log.csv").open())] == ["1", "2"]
    assert load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] == 2

    with pytest.raises(CheckpointError, match="trained by 2 process"):
        train.main(train.get_args_parser().parse_args(train_argv(data, out, *ADV, "--epochs", "3", "--resume")))

    sweep = ["--checkpoint", str(best), "--out", str(tmp_path / "sweep"), "--device", "cpu", "--no-checks",
             "--eps-list", "0", "2/255", "--steps", "2", "--batch-size", "8"]
    report = run_sweep(sweep_parser().parse_args(sweep))
    assert {(row["split"], row["eps"]) for row in report.sorted_rows()} == {
        (split, eps) for split in ("val", "test") for eps in (0.0, 2 / 255)}


def test_a_failing_rank_ends_every_rank_quickly_with_one_line_errors(make_classification_data, tmp_path):
    data = make_classification_data(COUNTS)
    val = dataset.build_splits("classification", data, image_size=32)["val"]
    corrupt = Path(val.samples[-1][0])  # the last val sample: only rank 1's shard reads it
    corrupt.write_bytes(b"not an image")
    argv = train_argv(data, tmp_path / "run", "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25")
    start = time.monotonic()
    done = torchrun_train(argv, tmp_path)
    elapsed = time.monotonic() - start
    assert done.returncode != 0 and elapsed < 60
    assert_ranks_stopped_with_one_line_errors(done.stderr, corrupt, ROOT / "train.py")
    assert not (tmp_path / "run" / "metrics.json").exists()
