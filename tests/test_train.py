"""train.py end to end on a tiny synthetic sample: outputs, checkpoints, resume, --help."""
import argparse
import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from albumentations.pytorch import ToTensorV2

import dataset
import raabin
import train
from checkpoint import load_checkpoint, model_from_checkpoint
from stats import wilson_interval
from utils import CheckpointError

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
    key = "accuracy" if task == "classification" else "dice_mean"
    low, high = metrics[f"{key}_ci95_low"], metrics[f"{key}_ci95_high"]
    assert 0 <= low <= metrics[key] <= high <= 1 and low < high, "the test metric's 95 % interval"
    if task == "classification":
        n = len(dataset.build_splits("classification", tiny_synthetic_root / "Train", image_size=32)["test"])
        assert (low, high) == pytest.approx(wilson_interval(round(metrics["accuracy"] * n), n))
    for key, value in result.items():
        assert metrics[key] is None if value != value else metrics[key] == pytest.approx(value), key
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert [row["epoch"] for row in rows] == ["1"]
    assert (out / "Images" / "training_curves.png").stat().st_size > 0
    ckpt = load_checkpoint(out / "checkpoints" / "best.pt", task=task, depth=18, image_size=32)
    assert ckpt["epoch"] == 1 and len(ckpt["mean"]) == 3
    assert "optimizer" in ckpt and "scheduler" in ckpt
    assert set(ckpt["split_digests"]) == {"train", "val", "test"}  # main.py checks its splits against them
    torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    model = model_from_checkpoint(ckpt)
    assert torch.allclose(model.normalize.mean.flatten(), torch.tensor(ckpt["mean"]))


def test_copies_of_training_images_in_the_test_folder_are_named(tmp_path, tiny_synthetic_root, capsys):
    from test_dataset import _distinct_images

    train_images = sorted((tiny_synthetic_root / "Train" / "Lymphocyte").iterdir())[:2]
    test_root = _distinct_images(tmp_path / "Test", 2, first_seed=0)
    for image in train_images:
        (test_root / "Lymphocyte" / f"copy_{image.name}").write_bytes(image.read_bytes())
    out = tmp_path / "run"
    train.main(_args(out, tiny_synthetic_root, "classification", "--val-data",
                     str(_distinct_images(tmp_path / "Val", 2, first_seed=500)), "--test-data", str(test_root)))
    printed = capsys.readouterr().out
    assert "note: 2 test images are byte-identical to training images" in printed
    assert "val images are byte-identical" not in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val_copies_of_training_images"] == 0 and metrics["test_copies_of_training_images"] == 2


def _stopped_after_one_of_two_epochs(out, root, monkeypatch):
    """A two-epoch run interrupted (Ctrl-C) when its second epoch starts."""
    real, calls = train.train_one_epoch, []

    def interrupt_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(train, "train_one_epoch", interrupt_the_second)
        with pytest.raises(KeyboardInterrupt):
            train.main(_args(out, root, "classification", "--epochs", "2"))
    assert load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] == 1


def test_resume_continues_at_the_next_epoch(tmp_path, tiny_synthetic_root, monkeypatch):
    out = tmp_path / "run"
    _stopped_after_one_of_two_epochs(out, tiny_synthetic_root, monkeypatch)
    train.main(_args(out, tiny_synthetic_root, "classification", "--epochs", "2", "--resume"))
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] == 2


def test_resume_refuses_another_number_of_workers(tmp_path, tiny_synthetic_root, monkeypatch):
    """Each DataLoader worker augments from its own seed: with another number of them the resumed
    run matches neither the old run nor a fresh one."""
    out = tmp_path / "run"
    _stopped_after_one_of_two_epochs(out, tiny_synthetic_root, monkeypatch)
    before = (out / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(CheckpointError, match="was trained with --workers 0 but this run has --workers 1"):
        train.main(_args(out, tiny_synthetic_root, "classification", "--epochs", "2", "--resume", "--workers", "1"))
    assert (out / "checkpoints" / "last.pt").read_bytes() == before


def test_resume_with_more_epochs_says_the_schedule_is_not_the_original(tmp_path, tiny_synthetic_root, capsys):
    out = tmp_path / "run"
    train.main(_args(out, tiny_synthetic_root, "classification", "--epochs", "1"))
    capsys.readouterr()
    train.main(_args(out, tiny_synthetic_root, "classification", "--epochs", "2", "--resume"))
    printed = capsys.readouterr().out
    assert "note: this run was started with --epochs 1; resuming with --epochs 2" in printed
    train.main(_args(out, tiny_synthetic_root, "classification", "--epochs", "2", "--resume"))
    assert "note: this run was started" not in capsys.readouterr().out, "the same --epochs: no note"


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
    _stopped_after_one_of_two_epochs(out, tiny_synthetic_root, monkeypatch)
    before = (out / "checkpoints" / "last.pt").read_bytes()
    real_loss = torch.nn.CrossEntropyLoss.forward
    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward",
                        lambda self, x, y: real_loss(self, x, y) * float("nan"))
    with pytest.raises(train.ToolError, match=r"non-finite training loss .* epoch 2 step 1"):
        train.main(_args(out, tiny_synthetic_root, "classification", "--epochs", "2", "--resume"))
    assert (out / "checkpoints" / "last.pt").read_bytes() == before


@pytest.mark.parametrize("flag,value", [("--label-smoothing", "1.5"), ("--lr", "-1"), ("--workers", "-1"),
                                        ("--out", " "), ("--image-size", "100000")])
def test_bad_training_flags_are_usage_errors(flag, value):
    with pytest.raises(train.UsageError, match=flag):
        train.validate_args(train.get_args_parser().parse_args([flag, value]))


def test_segmentation_class_weights_come_from_unaugmented_masks(tiny_synthetic_root):
    train_ds = dataset.build_splits("segmentation", tiny_synthetic_root, image_size=32)["train"]
    # An "augmentation" that keeps only a background corner: weights taken over it would be wrong.
    train_ds.transform = A.Compose([A.Crop(0, 0, 4, 4), A.Resize(32, 32, interpolation=cv2.INTER_NEAREST),
                                    A.ToFloat(max_value=255.0), ToTensorV2()])
    counts = np.zeros(3)
    for _, mask_path, _ in train_ds.samples:
        mask = cv2.resize(raabin.load_mask(mask_path), (32, 32), interpolation=cv2.INTER_NEAREST)
        counts += np.bincount(mask.reshape(-1), minlength=3)
    expected = counts.sum() / counts / 3
    args = argparse.Namespace(class_weights=True, task="segmentation", image_size=32)
    weights = train.class_weights(args, train_ds, 3)
    assert weights.tolist() == pytest.approx((expected / expected.mean()).tolist(), rel=1e-5)


@pytest.mark.parametrize("workers", [0, 1])
def test_seed_epoch_alone_fixes_the_epochs_randomness(tiny_synthetic_root, workers):
    """Why --resume needs no saved RNG state: an epoch's shuffling, augmentation and torch draws
    depend on (seed, epoch) only, whatever ran before."""
    train_ds = dataset.build_splits("classification", tiny_synthetic_root / "Train", image_size=16,
                                    limit=8)["train"]
    loader = dataset.make_loader(train_ds, 4, train=True, workers=workers, seed=3)
    args = argparse.Namespace(seed=3)

    def epoch_draws(epoch):
        train.seed_epoch(args, epoch, loader)
        return [torch.cat([images.flatten(), labels.float()]) for images, labels in loader] + [torch.rand(4)]

    first = epoch_draws(1)
    torch.rand(100), np.random.rand(100), random.random()
    epoch_draws(0)
    again, other = epoch_draws(1), epoch_draws(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_cudnn_benchmark_is_on_unless_deterministic():
    saved = torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled()
    try:
        train.configure_determinism(False)
        assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
        train.configure_determinism(True)
        assert not torch.backends.cudnn.benchmark and torch.are_deterministic_algorithms_enabled()
    finally:
        torch.backends.cudnn.benchmark = saved[0]
        torch.use_deterministic_algorithms(saved[1])


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_deterministic_on_cuda_sets_cublas_and_lets_the_segmenter_run(monkeypatch, capsys, task):
    """PyTorch refuses cuBLAS matmuls without CUBLAS_WORKSPACE_CONFIG, and has no deterministic
    CUDA kernel for bilinear-upsampling backward or 2-D NLL loss (the segmenter's first batch)."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        train.configure_determinism(True, torch.device("cuda"), task)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled() == (task == "segmentation")
        assert ("no deterministic CUDA kernels" in capsys.readouterr().out) == (task == "segmentation")
        monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
        train.configure_determinism(True, torch.device("cpu"), task)
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ and not torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.backends.cudnn.benchmark = saved[0]
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])


def test_amp_on_a_cpu_takes_bf16_only_where_it_is_native(monkeypatch):
    """An AVX512 CPU without AVX512-BF16 emulates bf16, slower than fp32: --amp is ignored there."""
    import training_utils

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(training_utils, "cpu_has_native_bf16", lambda: False)
    assert training_utils.autocast_dtype(torch.device("cpu"), True) is None
    monkeypatch.setattr(training_utils, "cpu_has_native_bf16", lambda: True)
    assert training_utils.autocast_dtype(torch.device("cpu"), True) == torch.bfloat16
    assert training_utils.autocast_dtype(torch.device("cpu"), False) is None


def test_best_checkpoint_tolerance_is_one_sample_of_the_set_it_is_counted_on():
    assert train.selection_tolerance("classification", 100) == pytest.approx(1 / 100)
    assert train.selection_tolerance("classification", 100, robust_limit=64) == pytest.approx(1 / 64)  # --adv
    assert train.selection_tolerance("classification", 40, robust_limit=64) == pytest.approx(1 / 40)
    assert train.selection_tolerance("segmentation", 100, robust_limit=64) == 0


@pytest.mark.parametrize("task,expected", [
    ("classification", {"epochs": 30, "batch_size": 16, "image_size": 96, "warmup_epochs": 2, "lr": 1e-3}),
    ("segmentation", {"epochs": 25, "batch_size": 32, "image_size": 128, "warmup_epochs": 1, "lr": 2e-3}),
])
def test_defaults_depend_on_the_task_and_flags_win(task, expected):
    args = train.get_args_parser().parse_args(["--task", task])
    train.validate_args(args)
    assert {key: getattr(args, key) for key in expected} == expected
    args = train.get_args_parser().parse_args(["--task", task, "--batch-size", "8", "--image-size", "40"])
    train.validate_args(args)
    assert (args.batch_size, args.image_size) == (8, 40)


def test_best_checkpoint_prefers_a_later_epoch_within_one_val_sample(tmp_path, tiny_synthetic_root, monkeypatch):
    out = tmp_path / "run"
    args = _args(out, tiny_synthetic_root, "classification", "--epochs", "4")
    n_val = len(train.dataset.build_splits("classification", tiny_synthetic_root / "Train", image_size=32)["val"])
    scripted = iter([0.5, 0.9, 0.9 - 1 / n_val, 0.9 - 2 / n_val, 0.0])  # 4 val epochs, then test
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: dict.fromkeys(
        ["accuracy", "balanced_accuracy"], next(scripted)))
    train.main(args)
    best = load_checkpoint(out / "checkpoints" / "best.pt")
    assert best["epoch"] == 3 and best["best_metric"] == pytest.approx(0.9)


def test_pretrained_encoders_normalise_with_imagenet_statistics_unless_given(tiny_synthetic_root):
    """ImageNet weights expect ImageNet-normalised inputs; a model from scratch uses the train split's."""
    from model import IMAGENET_MEAN, IMAGENET_STD
    from training_utils import channel_stats

    train_split = dataset.build_splits("classification", tiny_synthetic_root / "Train", image_size=16)["train"]

    def stats(*extra):
        args = _args(Path("unused"), tiny_synthetic_root, "classification", "--image-size", "16", *extra)
        return train.normalisation_stats(args, train_split)

    own = channel_stats(train_split, "classification", 16)
    assert stats() == (own[0], own[1]) and own[0] != list(IMAGENET_MEAN)
    assert stats("--pretrained") == (list(IMAGENET_MEAN), list(IMAGENET_STD))
    assert stats("--pretrained", "--mean", "0.5", "0.5", "0.5") == ([0.5] * 3, list(IMAGENET_STD))
    assert stats("--mean", "0.5", "0.5", "0.5") == ([0.5] * 3, own[1])
    assert stats("--mean", "0.5", "0.5", "0.5", "--std", "0.2", "0.2", "0.2") == ([0.5] * 3, [0.2] * 3)
