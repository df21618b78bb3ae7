"""Crash and resume: a training run SIGKILLed mid-epoch and resumed ends exactly like an
uninterrupted run with the same seed (deterministic mode, CPU)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _command(data, out, *extra):
    return [sys.executable, "train.py", "--task", "classification", "--depth", "18", "--data", str(data),
            "--image-size", "32", "--epochs", "3", "--batch-size", "2", "--workers", "0", "--device", "cpu",
            "--deterministic", "--seed", "7", "--out", str(out), *extra]


def _metrics(out):
    metrics = json.loads((out / "metrics.json").read_text())
    metrics.pop("train_seconds")
    return metrics


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path, tiny_synthetic_root):
    data = tiny_synthetic_root / "Train"
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    uninterrupted = subprocess.Popen(_command(data, full), cwd=ROOT, env=_env(),  # runs beside the crash
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = subprocess.Popen(_command(data, crashed), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = crashed / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # well inside epoch 2
    assert proc.poll() is None, "training finished before it could be killed; make the epoch longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (crashed / "metrics.json").exists()
    killed_at = torch.load(last, weights_only=True)["epoch"]
    assert killed_at < 3

    resumed = subprocess.run(_command(data, crashed, "--resume"), cwd=ROOT, env=_env(),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at epoch {killed_at + 1}" in resumed.stdout
    assert uninterrupted.wait() == 0
    assert _metrics(crashed) == _metrics(full)
    full_ckpt = torch.load(full / "checkpoints" / "last.pt", weights_only=True)
    resumed_ckpt = torch.load(last, weights_only=True)
    for name, tensor in full_ckpt["model"].items():
        assert torch.equal(tensor, resumed_ckpt["model"][name]), name
