"""The evaluation loop (sweep.py), the outputs (report.py) and main.py end to end."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import torchattacks
from torch.utils.data import DataLoader, TensorDataset

from attacks import build_attack
from conftest import write_tiny_checkpoint
from main import get_args_parser
from main import main as run_main
from report import Report
from sweep import SweepSpec, run_split
from test_attacks import CLASS_NAMES, SEG_NAMES, segmentation_images, separable_images, tiny_classifier, \
    tiny_segmenter, train
from utils import CheckpointError, ConfusionMatrix, ToolError, compute_metrics

EPS = [0.0, 2 / 255, 8 / 255, 32 / 255]


@pytest.fixture(scope="module")
def cls_setup():
    images, labels = separable_images(n=60, seed=1)
    model = train(tiny_classifier(), *separable_images())
    return model, DataLoader(TensorDataset(images, labels), batch_size=16)


@pytest.fixture(scope="module")
def seg_setup():
    images, masks = segmentation_images(n=8, seed=1)
    model = train(tiny_segmenter(), *segmentation_images(), steps=40)
    return model, DataLoader(TensorDataset(images, masks), batch_size=4)


def sweep(model, loader, attack="pgd", task="classification", eps_list=EPS, calls=None, steps=4, factory=None,
          **spec_kw):
    names = CLASS_NAMES if task == "classification" else SEG_NAMES
    spec = SweepSpec(task=task, class_names=names, eps_list=eps_list, attack=attack, **spec_kw)

    def make_attack(eps):
        atk = factory() if factory else build_attack(attack, model, eps, steps=steps, alpha=2.5 * eps / steps,
                                                      random_start=True, num_classes=len(names),
                                                      targeted=spec.targeted)
        if calls is None:
            return atk
        return lambda images, labels: calls.append(len(images)) or atk(images, labels)

    rows = []
    target_fn = (lambda y: (y + 1) % len(names)) if spec.targeted else None
    examples = run_split(model, loader, spec, split="val", make_attack=make_attack, target_fn=target_fn,
                         on_row=rows.append)
    return rows, examples


def clean_metrics(model, loader, task, names):
    cm = ConfusionMatrix(len(names))
    with torch.no_grad():
        for images, targets in loader:
            cm.update(targets, model(images).argmax(1))
    return compute_metrics(task, cm.mat, names)


def test_robust_accuracy_decreases_and_norms_stay_within_eps(cls_setup):
    model, loader = cls_setup
    rows, examples = sweep(model, loader)
    assert [row["eps"] for row in rows] == EPS
    accuracies = [row["accuracy"] for row in rows]
    assert accuracies == sorted(accuracies, reverse=True) and accuracies[0] > accuracies[-1]
    for row in rows:
        assert row["linf_mean"] <= row["linf_max"] <= row["eps"] + 1e-6
        assert 0 <= row["attack_success_rate"] <= 1 and row["n"] == 60
    assert rows[0]["n_attacked"] == 0 and rows[1]["n_attacked"] > 0
    for row in rows[1:]:
        if row["n_attacked"]:  # PGD uses its whole L-inf budget on some pixel
            assert row["linf_max"] == pytest.approx(row["eps"], abs=1e-6)
    assert len(examples["eps"]) == len(EPS) and examples["adv"][0].shape == (4, 3, 16, 16)


def test_eps_zero_row_equals_clean_evaluation_exactly(cls_setup):
    model, loader = cls_setup
    calls = []
    rows, _ = sweep(model, loader, eps_list=[0.0], calls=calls)
    clean = clean_metrics(model, loader, "classification", CLASS_NAMES)
    assert calls == [] and rows[0]["attack_success_rate"] == 0
    assert {key: rows[0][key] for key in clean} == pytest.approx(clean, nan_ok=True, rel=0, abs=0)


def test_only_still_robust_samples_are_attacked(cls_setup):
    model, loader = cls_setup
    fast_calls, slow_calls = [], []
    fast, _ = sweep(model, loader, attack="bim", calls=fast_calls)
    slow, _ = sweep(model, loader, attack="bim", calls=slow_calls, attack_all=True)
    per_attack = ("seconds", "n_attacked", "linf_mean", "l2_mean", "linf_max", "l2_max")
    keys = [k for k in fast[0] if k not in per_attack]
    assert [{k: r[k] for k in keys} for r in fast] == [{k: r[k] for k in keys} for r in slow]
    assert sum(fast_calls) < sum(slow_calls)


def test_targeted_success_rate_counts_hits_of_the_target(cls_setup):
    model, loader = cls_setup
    rows, _ = sweep(model, loader, eps_list=[0.0, 64 / 255], targeted=True)
    assert rows[0]["attack_success_rate"] == 0 and rows[1]["attack_success_rate"] > 0


def test_min_norm_attack_runs_once_and_counts_only_perturbations_within_eps(cls_setup):
    model, loader = cls_setup
    calls = []
    eps_list = [0.0, 0.05, 0.5, 2.0, 8.0]
    rows, _ = sweep(model, loader, attack="cw", eps_list=eps_list, calls=calls, norm="L2", eps_bounded=False,
                    factory=lambda: torchattacks.CW(model, c=1.0, steps=15, lr=0.1))
    assert len(calls) == len(loader) and sum(calls) <= 60, "CW runs once per batch, on clean-correct samples"
    accuracies = [row["accuracy"] for row in rows]
    assert accuracies == sorted(accuracies, reverse=True) and accuracies[-1] < accuracies[0]
    assert rows[1]["n_attacked"] == 0 or rows[1]["l2_mean"] <= 0.05
    for row in rows[1:]:
        assert row["l2_mean"] <= row["eps"] + 1e-6
    assert sum(row["n_attacked"] for row in rows) == round((rows[0]["accuracy"] - rows[-1]["accuracy"]) * 60)


def test_a_perturbation_beyond_eps_is_refused(cls_setup):
    model, loader = cls_setup
    spec = SweepSpec(task="classification", class_names=CLASS_NAMES, eps_list=[0.0, 4 / 255], attack="bad")
    with pytest.raises(ToolError, match="attack bad at eps 0.0156.*exceeded"):
        run_split(model, loader, spec, split="val", make_attack=lambda eps: lambda x, y: (x + 0.1).clamp(0, 1))
    with pytest.raises(ToolError, match="NaN"):
        run_split(model, loader, spec, split="val", make_attack=lambda eps: lambda x, y: x * math.nan)


def test_segmentation_sweep_fills_the_dice_columns(seg_setup):
    model, loader = seg_setup
    rows, examples = sweep(model, loader, task="segmentation", eps_list=[0.0, 16 / 255])
    clean = clean_metrics(model, loader, "segmentation", SEG_NAMES)
    assert {key: rows[0][key] for key in clean} == pytest.approx(clean, nan_ok=True, rel=0, abs=0)
    for key in ("pixel_accuracy", "dice_cytoplasm", "dice_nucleus", "dice_mean", "iou_cytoplasm",
                "iou_nucleus", "iou_mean", "flipped_fraction", "linf_mean", "l2_mean", "seconds"):
        assert all(isinstance(row[key], float) and not math.isnan(row[key]) for row in rows), key
    assert rows[0]["flipped_fraction"] == 0 and rows[1]["flipped_fraction"] > 0
    assert rows[1]["dice_mean"] < rows[0]["dice_mean"]
    assert examples["pred"][1].shape == (4, 16, 16)


def test_report_writes_parseable_outputs(tmp_path, cls_setup, seg_setup):
    for task, setup, names in (("classification", cls_setup, CLASS_NAMES), ("segmentation", seg_setup, SEG_NAMES)):
        out = tmp_path / task
        config = {"task": task, "attack": "pgd", "class_names": names, "checkpoint_sha256": "x"}
        report = Report(out, task, config, splits=["val"], eps_list=[0.0, 8 / 255])
        spec = SweepSpec(task=task, class_names=names, eps_list=[0.0, 8 / 255], attack="pgd")
        model, loader = setup
        examples = run_split(model, loader, spec, split="val", on_row=report.add_row,
                             make_attack=lambda eps: build_attack("pgd", model, eps, steps=2, alpha=eps,
                                                                  random_start=False, num_classes=len(names)))
        report.add_examples("val", examples)
        report.finish()
        with open(out / "results.csv") as fh:
            table = list(csv.DictReader(fh))
        assert [float(r["eps"]) for r in table] == [0.0, 8 / 255] and table[1]["eps_255"] == "8.0"
        assert list(table[0])[:5] == ["split", "attack", "eps", "eps_255", "n"]
        saved = json.loads((out / "results.json").read_text())
        assert saved["config"]["attack"] == "pgd" and len(saved["rows"]) == 2
        curve = "AccClassif.png" if task == "classification" else "AccSegme.png"
        for name in (curve, "images.png"):
            assert (out / "Images" / name).read_bytes()[:4] == b"\x89PNG"
        markdown = (out / "report.md").read_text()
        assert f"Images/{curve}" in markdown and "Images/images.png" in markdown and "| split |" in markdown


# --------------------------------------------------------------------------- main.py end to end
@pytest.fixture
def checkpoint_file(tmp_path, make_classification_data):
    return write_tiny_checkpoint(tmp_path / "ckpt.pt", "classification", make_classification_data(size=(24, 24)))


def cli(*argv):
    return get_args_parser().parse_args([str(a) for a in argv])


def test_main_end_to_end_and_resume_checks(tmp_path, checkpoint_file):
    out = tmp_path / "out"
    base = ["--checkpoint", checkpoint_file, "--out", out, "--device", "cpu", "--limit", "4",
            "--eps-list", "0", "8/255", "--examples", "2", "--batch-size", "4"]
    run_main(cli(*base, "--steps", "2"))
    first = json.loads((out / "results.json").read_text())
    assert [(r["split"], r["eps_255"]) for r in first["rows"]] == [("val", 0), ("val", 8), ("test", 0), ("test", 8)]
    assert len(first["config"]["checkpoint_sha256"]) == 64 and first["config"]["versions"]["torchattacks"]
    assert (out / "Images" / "AccClassif.png").is_file() and (out / "report.md").is_file()
    run_main(cli(*base, "--steps", "2", "--resume"))
    again = json.loads((out / "results.json").read_text())
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(again["rows"]) == strip(first["rows"])
    with pytest.raises(ToolError, match=r"different config \(steps: 2 vs 3\); use another --out or drop --resume"):
        run_main(cli(*base, "--steps", "3", "--resume"))
    with pytest.raises(CheckpointError, match="classification.*segmentation"):
        run_main(cli(*base, "--task", "segmentation"))
