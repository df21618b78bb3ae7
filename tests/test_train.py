"""train.py end to end on a tiny synthetic sample: outputs, checkpoints, resume, --help."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from checkpoint import load_checkpoint, model_from_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _args(out, data, task, *extra):
    data_root = data / "Train" if task == "classification" else data
    return train.get_args_parser().parse_args([
        "--task", task, "--depth", "18", "--data", str(data_root), "--image-size", "32", "--epochs", "1",
        "--batch-size", "8", "--workers", "0", "--device", "cpu", "--out", str(out), *extra])


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_one_epoch_smoke_run_writes_everything(tmp_path, tiny_synthetic_root, task):
    out = tmp_path / task
    result = train.main(_args(out, tiny_synthetic_root, task))
    metrics = json.loads((out / "metrics.json").read_text())
    expected = {"accuracy", "balanced_accuracy"} if task == "classification" else {
        "pixel_accuracy", "dice_cytoplasm", "dice_nucleus", "dice_mean", "iou_mean"}
    assert expected | {"train_seconds"} <= metrics.keys()
    assert metrics.keys() == result.keys()
    for key, value in result.items():
        assert metrics[key] is None if value != value else metrics[key] == pytest.approx(value), key
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert [row["epoch"] for row in rows] == ["1"]
    assert (out / "Images" / "training_curves.png").stat().st_size > 0
    ckpt = load_checkpoint(out / "checkpoints" / "best.pt", task=task, depth=18, image_size=32)
    assert ckpt["epoch"] == 1 and len(ckpt["mean"]) == 3
    assert "optimizer" in ckpt and "scheduler" in ckpt and "rng" in ckpt
    torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    model = model_from_checkpoint(ckpt)
    assert torch.allclose(model.normalize.mean.flatten(), torch.tensor(ckpt["mean"]))


def test_resume_continues_at_the_next_epoch(tmp_path, tiny_synthetic_root):
    out = tmp_path / "run"
    train.main(_args(out, tiny_synthetic_root, "classification", "--epochs", "1"))
    train.main(_args(out, tiny_synthetic_root, "classification", "--epochs", "2", "--resume"))
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] == 2


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, tiny_synthetic_root):
    proc = subprocess.run([sys.executable, "train.py", "--depth", "18", "--resume", "--out", str(tmp_path),
                           "--data", str(tiny_synthetic_root / "Train")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error:") and "not found" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("script", ["train.py", "main.py"])
def test_help(script):
    proc = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0
    assert "--task" in proc.stdout and "--device" in proc.stdout


def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_checkpoint(tmp_path, tiny_synthetic_root,
                                                                         monkeypatch):
    out = tmp_path / "run"
    train.main(_args(out, tiny_synthetic_root, "classification"))
    before = (out / "checkpoints" / "last.pt").read_bytes()
    real_loss = torch.nn.CrossEntropyLoss.forward
    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward",
                        lambda self, x, y: real_loss(self, x, y) * float("nan"))
    with pytest.raises(train.ToolError, match=r"non-finite training loss .* epoch 2 step 1"):
        train.main(_args(out, tiny_synthetic_root, "classification", "--epochs", "2", "--resume"))
    assert (out / "checkpoints" / "last.pt").read_bytes() == before


@pytest.mark.parametrize("flag,value", [("--label-smoothing", "1.5"), ("--lr", "-1"), ("--workers", "-1")])
def test_bad_training_flags_are_usage_errors(flag, value):
    with pytest.raises(train.UsageError, match=flag):
        train.validate_args(train.get_args_parser().parse_args([flag, value]))
