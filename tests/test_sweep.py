"""The evaluation loop (sweep.py), the outputs (report.py) and main.py end to end."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import torchattacks

from attacks import build_attack
from conftest import write_tiny_checkpoint
from engine import Engine
from main import get_args_parser, sweep_config
from main import main as run_main
from report import Report
from splitdata import TensorSplit
from sweep import SweepSpec, run_split
from test_attacks import CLASS_NAMES, SEG_NAMES, segmentation_images, separable_images, tiny_classifier, \
    tiny_segmenter, train
from stats import wilson_interval
from utils import CheckpointError, ConfusionMatrix, ToolError, compute_metrics

EPS = [0.0, 2 / 255, 8 / 255, 32 / 255]


@pytest.fixture(scope="module")
def cls_setup():
    images, labels = separable_images(n=60, seed=1)
    model = train(tiny_classifier(), *separable_images())
    return model, TensorSplit(images, labels)


@pytest.fixture(scope="module")
def seg_setup():
    images, masks = segmentation_images(n=8, seed=1)
    model = train(tiny_segmenter(), *segmentation_images(), steps=40)
    return model, TensorSplit(images, masks)


def sweep(model, source, attack="pgd", task="classification", eps_list=EPS, calls=None, steps=4, factory=None,
          engine=Engine(batch_size=16), **spec_kw):
    """Run one split; returns its rows and state. ``attack`` may be a comma list."""
    names = CLASS_NAMES if task == "classification" else SEG_NAMES
    spec = SweepSpec(task=task, class_names=names, eps_list=eps_list, attacks=tuple(attack.split(",")), **spec_kw)

    def make_attack(name, eps):
        atk = factory() if factory else build_attack(name, model, eps, steps=steps, alpha=2.5 * eps / steps,
                                                      random_start=True, num_classes=len(names),
                                                      targeted=spec.targeted)
        if calls is None:
            return atk
        return lambda images, labels: calls.append(len(images)) or atk(images, labels)

    rows = []
    target_fn = (lambda y: (y + 1) % len(names)) if spec.targeted else None
    state = run_split(model, source, spec, engine, split="val", make_attack=make_attack, target_fn=target_fn,
                      on_row=rows.append)
    return rows, state


def clean_metrics(model, source, task, names):
    cm = ConfusionMatrix(len(names))
    with torch.no_grad():
        cm.update(source.targets, model(source.images).argmax(1))
    return compute_metrics(task, cm.mat, names)


def test_robust_accuracy_decreases_and_norms_stay_within_eps(cls_setup):
    model, loader = cls_setup
    rows, state = sweep(model, loader)
    examples = state["examples"]
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


@pytest.mark.parametrize("kind", ["fast", "library"])
def test_only_still_robust_samples_are_attacked(cls_setup, kind):
    model, loader = cls_setup
    fast_calls, slow_calls = [], []
    engine = Engine(kind=kind, batch_size=16)
    fast, _ = sweep(model, loader, attack="bim", engine=engine, calls=fast_calls if kind == "library" else None)
    slow, _ = sweep(model, loader, attack="bim", engine=engine, calls=slow_calls if kind == "library" else None,
                    attack_all=True)
    per_attack = ("seconds", "n_attacked", "linf_mean", "l2_mean", "linf_max", "l2_max")
    keys = [k for k in fast[0] if k not in per_attack]
    assert [{k: r[k] for k in keys} for r in fast] == [{k: r[k] for k in keys} for r in slow]
    assert sum(fast[i]["n_attacked"] for i in range(len(fast))) < sum(r["n_attacked"] for r in slow)
    assert sum(fast_calls) <= sum(slow_calls)


def test_targeted_success_rate_counts_hits_of_the_target(cls_setup):
    model, loader = cls_setup
    rows, _ = sweep(model, loader, eps_list=[0.0, 64 / 255], targeted=True)
    assert rows[0]["attack_success_rate"] == 0 and rows[1]["attack_success_rate"] > 0


@pytest.mark.parametrize("kind", ["fast", "library"])
def test_targeted_accuracy_never_rises_with_eps(cls_setup, kind):
    """A sample pushed off its label but not yet onto the target at a small eps stays wrong
    at larger eps (the old state overwrote its prediction, so accuracy could rise)."""
    model, loader = cls_setup
    eps_list = [0.0, 1 / 255, 2 / 255, 3 / 255, 4 / 255, 6 / 255, 8 / 255, 16 / 255]
    rows, state = sweep(model, loader, eps_list=eps_list, targeted=True, steps=2, engine=Engine(kind=kind))
    accuracies = [row["accuracy"] for row in rows]
    successes = [row["attack_success_rate"] for row in rows]
    assert accuracies == sorted(accuracies, reverse=True) and successes == sorted(successes)
    per_attack = state["attacks"]["pgd"]
    wrong = torch.isfinite(per_attack["wrong_eps"]) & state["eligible"]
    assert (wrong & ~per_attack["hit"]).any(), "some samples must be wrong without hitting the target"
    assert accuracies[-1] == pytest.approx(1 - (torch.isfinite(per_attack["wrong_eps"])).double().mean().item())


@pytest.mark.parametrize("spec_kw", [{"targeted": True}, {"attack_all": True}])
def test_each_example_shows_the_prediction_of_its_own_image(cls_setup, spec_kw):
    """Samples attacked again after a first wrong prediction (targeted ones not yet on the
    target; every sample with attack_all) must show their latest image's own prediction."""
    model, source = cls_setup
    eps_list = [0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255, 32 / 255]
    _, state = sweep(model, source, eps_list=eps_list, steps=2, examples=len(source), **spec_kw)
    examples = state["examples"]
    changed = 0
    for before, adv, pred in zip(examples["pred"], examples["adv"][1:], examples["pred"][1:]):
        with torch.no_grad():
            assert torch.equal(pred, model(adv).argmax(1))
        changed += int((pred != before).sum())
    assert changed > 0


def test_min_norm_attack_runs_once_and_counts_only_perturbations_within_eps(cls_setup):
    model, loader = cls_setup
    calls = []
    eps_list = [0.0, 0.05, 0.5, 2.0, 8.0]
    rows, _ = sweep(model, loader, attack="cw", eps_list=eps_list, calls=calls, norm="L2", min_norm=("cw",),
                    factory=lambda: torchattacks.CW(model, c=1.0, steps=15, lr=0.1))
    assert len(calls) == math.ceil(sum(calls) / 16) and sum(calls) <= 60, "CW runs once, on clean-correct samples"
    accuracies = [row["accuracy"] for row in rows]
    assert accuracies == sorted(accuracies, reverse=True) and accuracies[-1] < accuracies[0]
    assert rows[1]["n_attacked"] == 0 or rows[1]["l2_mean"] <= 0.05
    for row in rows[1:]:
        assert row["l2_mean"] <= row["eps"] + 1e-6
    assert sum(row["n_attacked"] for row in rows) == round((rows[0]["accuracy"] - rows[-1]["accuracy"]) * 60)


def test_a_perturbation_beyond_eps_is_refused(cls_setup):
    model, loader = cls_setup
    spec = SweepSpec(task="classification", class_names=CLASS_NAMES, eps_list=[0.0, 4 / 255], attacks=("bad",))
    with pytest.raises(ToolError, match="attack bad at eps 0.0156.*exceeded"):
        run_split(model, loader, spec, split="val", make_attack=lambda n, eps: lambda x, y: (x + 0.1).clamp(0, 1))
    with pytest.raises(ToolError, match="NaN"):
        run_split(model, loader, spec, split="val", make_attack=lambda n, eps: lambda x, y: x * math.nan)


def test_segmentation_sweep_fills_the_dice_columns(seg_setup):
    model, loader = seg_setup
    rows, state = sweep(model, loader, task="segmentation", eps_list=[0.0, 16 / 255])
    examples = state["examples"]
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
        spec = SweepSpec(task=task, class_names=names, eps_list=[0.0, 8 / 255])
        model, loader = setup
        state = run_split(model, loader, spec, split="val", on_row=report.add_row,
                          make_attack=lambda n, eps: build_attack("pgd", model, eps, steps=2, alpha=eps,
                                                                  random_start=False, num_classes=len(names)))
        report.add_examples("val", state["examples"])
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
        key = "accuracy" if task == "classification" else "dice_mean"
        for row in saved["rows"]:
            low, high = row[f"{key}_ci95_low"], row[f"{key}_ci95_high"]
            assert 0 <= low <= high <= 1 and f"{row[key]:.4f} ({low:.3f}–{high:.3f})" in markdown
            if task == "classification":
                assert (low, high) == pytest.approx(wilson_interval(round(row["accuracy"] * row["n"]), row["n"]))
                assert low <= row["accuracy"] <= high
        assert ("Wilson's score interval" if task == "classification" else "percentile bootstrap") in markdown
        assert "ci95" not in markdown.split("## All rows")[1], "the intervals are not per-class Dice columns"


# --------------------------------------------------------------------------- main.py end to end
@pytest.fixture
def checkpoint_file(tmp_path, make_classification_data):
    return write_tiny_checkpoint(tmp_path / "ckpt.pt", "classification", make_classification_data(size=(24, 24)))


def cli(*argv):
    return get_args_parser().parse_args([str(a) for a in argv])


def test_main_end_to_end_and_resume_checks(tmp_path, checkpoint_file):
    out = tmp_path / "out"
    base = ["--checkpoint", checkpoint_file, "--out", out, "--device", "cpu", "--limit", "4",
            "--eps-list", "0", "8/255", "--examples", "2", "--batch-size", "4", "--no-checks"]
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


def test_resume_refuses_to_drop_finished_rows_it_is_not_asked_for(tmp_path, checkpoint_file):
    out = tmp_path / "out"
    base = ["--checkpoint", checkpoint_file, "--out", out, "--device", "cpu", "--limit", "4", "--steps", "2",
            "--examples", "0", "--batch-size", "4", "--no-checks"]
    run_main(cli(*base, "--eps-list", "0", "8/255"))
    before = (out / "results.json").read_bytes()
    with pytest.raises(ToolError, match=r"would drop finished rows .*\(val at 0, 8/255\); give their --splits"):
        run_main(cli(*base, "--eps-list", "0", "8/255", "--splits", "test", "--resume"))
    with pytest.raises(ToolError, match=r"\(val at 8/255; test at 8/255\)"):
        run_main(cli(*base, "--eps-list", "0", "--resume"))
    assert (out / "results.json").read_bytes() == before
    grown = run_main(cli(*base, "--eps-list", "0", "8/255", "16/255", "--resume"))
    assert [(r["split"], r["eps_255"]) for r in grown.sorted_rows()] == [
        ("val", 0), ("val", 8), ("val", 16), ("test", 0), ("test", 8), ("test", 16)]


# --------------------------------------------------------------------------- several attacks
def test_classification_worst_case_needs_every_attack_survived(cls_setup):
    model, source = cls_setup
    eps_list = [0.0, 8 / 255, 12 / 255, 16 / 255]
    rows, state = sweep(model, source, attack="fgsm,pgd,bim", eps_list=eps_list, steps=2)
    assert [row["attack"] for row in rows[:4]] == ["fgsm", "pgd", "bim", "worst"] and len(rows) == 4 * len(eps_list)
    single = {name: sweep(model, source, attack=name, eps_list=eps_list, steps=2)[1] for name in ("fgsm", "pgd", "bim")}
    labels = state["labels"]
    for i, eps in enumerate(eps_list):
        by_attack = {row["attack"]: row for row in rows[4 * i:4 * i + 4]}
        survived = torch.ones(len(labels), dtype=torch.bool)
        for name, alone in single.items():
            correct = alone["attacks"][name]["wrong_eps"] > eps
            assert by_attack[name]["accuracy"] == pytest.approx(correct.double().mean().item())
            survived &= correct
        assert by_attack["worst"]["accuracy"] == pytest.approx(survived.double().mean().item())
        assert by_attack["worst"]["accuracy"] <= min(by_attack[n]["accuracy"] for n in single)
    gaps = [max(r["accuracy"] for r in rows[4 * i:4 * i + 3]) - rows[4 * i + 3]["accuracy"] for i in range(4)]
    assert max(gaps) > 0, "the test needs attacks that disagree somewhere"


def numpy_mean_dice(cm) -> float:
    """Mean foreground Dice of one confusion matrix, NaN-skipping, with numpy only."""
    import numpy as np

    cm = np.asarray(cm, dtype=float)
    dice = [2 * cm[c, c] / (cm[c].sum() + cm[:, c].sum()) for c in (1, 2) if cm[c].sum() + cm[:, c].sum() > 0]
    return float(np.mean(dice)) if dice else 1.0


def test_segmentation_worst_case_is_an_achievable_choice_below_every_attack(seg_setup):
    """Brute force over every per-image choice of attack (2^8): the worst row is one of them,
    no single image's switch lowers it, and it is below each attack's row and the per-image rule."""
    import itertools

    model, source = seg_setup
    eps_list = [0.0, 4 / 255, 16 / 255]
    rows, state = sweep(model, source, attack="fgsm,pgd", task="segmentation", eps_list=eps_list, steps=3)
    worst_rows = [row for row in rows if row["attack"] == "worst"]
    n = len(source)
    for i, eps in enumerate(eps_list):
        cms = [state["attacks"][name]["cms"][i] for name in ("fgsm", "pgd")]
        dice_of = {}
        for combo in itertools.product(range(2), repeat=n):
            dice_of[combo] = numpy_mean_dice(sum(cms[a][image] for image, a in enumerate(combo)))
        worst = worst_rows[i]["dice_mean"]
        matches = [combo for combo, dice in dice_of.items() if dice == pytest.approx(worst, abs=1e-12)]
        assert matches, "the worst row must be the Dice of some per-image choice"
        combo = matches[0]
        for image in range(n):
            switched = combo[:image] + (1 - combo[image],) + combo[image + 1:]
            assert dice_of[switched] >= worst - 1e-12
        per_image = tuple(min((0, 1), key=lambda a: numpy_mean_dice(cms[a][image])) for image in range(n))
        assert worst <= min(dice_of[(0,) * n], dice_of[(1,) * n], dice_of[per_image]) + 1e-12
        assert worst >= min(dice_of.values()) - 1e-12
        chosen = torch.stack([cms[a][image] for image, a in enumerate(combo)]).sum(0)
        assert worst_rows[i]["pixel_accuracy"] == pytest.approx(compute_metrics("segmentation", chosen,
                                                                               SEG_NAMES)["pixel_accuracy"])
    assert worst_rows[-1]["dice_mean"] < worst_rows[0]["dice_mean"]


class Bucket(torch.nn.Module):
    """A segmenter whose pixel class is the third of [0, 1] its first channel falls in."""

    def forward(self, x):
        centres = ((torch.arange(3, dtype=x.dtype) + 0.5) / 3).view(1, 3, 1, 1)
        return -(x[:, 0:1] - centres).abs() * 100


def test_segmentation_worst_row_is_never_above_an_attacks_row():
    """Attack a loses image 0's one-pixel nucleus, attack b 30 of its 60 cytoplasm pixels: a is
    worse for that image's own Dice, b for the split's; the worst row must follow the split."""
    masks = torch.zeros(2, 10, 10, dtype=torch.long)
    masks[0, :6], masks[0, 9, 9] = 1, 2
    masks[1, :3], masks[1, 5:] = 1, 2
    images = ((masks.float() + 0.5) / 3).unsqueeze(1).repeat(1, 3, 1, 1)
    images[1, 2] = 0.01  # tells the scripted attacks which image is which

    def make_attack(name, eps):
        def atk(x, y):
            adv = x.clone()
            first = x[:, 2, 0, 0] != 0.01
            if name == "a":
                adv[first, 0, 9, 9] = 0.5
            else:
                adv[first, 0, :3] = 1 / 6
            return adv
        return atk

    spec = SweepSpec(task="segmentation", class_names=SEG_NAMES, eps_list=[0.0, 0.5], attacks=("a", "b"), examples=0)
    rows = []
    run_split(Bucket(), TensorSplit(images, masks), spec, Engine(batch_size=4), split="test",
              make_attack=make_attack, on_row=rows.append)
    last = {row["attack"]: row["dice_mean"] for row in rows if row["eps"] == 0.5}
    assert last["b"] < last["a"] < 1.0
    assert last["worst"] == pytest.approx(last["b"])


def test_classification_examples_are_clean_correct_and_cycle_through_classes(cls_setup):
    model, source = cls_setup
    _, state = sweep(model, source, eps_list=[0.0, 8 / 255], examples=5)
    index = state["ex_index"]
    assert (state["clean_pred"][index] == state["labels"][index]).all()
    assert len(set(state["labels"][index].tolist())) == min(5, len(set(state["labels"].tolist())))
    assert "clean-correct" in state["examples"]["caption"]


def test_resume_accepts_another_batch_size_only_where_numbers_do_not_depend_on_it(tmp_path, checkpoint_file):
    base = ["--checkpoint", checkpoint_file, "--device", "cpu", "--limit", "6", "--eps-list", "0", "8/255",
            "--steps", "2", "--no-checks", "--random-start", "--splits", "test"]
    out = tmp_path / "pgd"
    first = run_main(cli(*base, "--out", out, "--batch-size", "4"))
    assert first.config["numbers_depend_on_batch_size"] is False
    resumed = run_main(cli(*base, "--out", out, "--batch-size", "3", "--resume"))
    fresh = run_main(cli(*base, "--out", tmp_path / "fresh", "--batch-size", "3"))
    strip = lambda report: [{k: v for k, v in r.items() if k != "seconds"} for r in report.sorted_rows()]  # noqa: E731
    assert strip(resumed) == strip(first) == strip(fresh)

    out = tmp_path / "apgd"
    assert run_main(cli(*base, "--out", out, "--batch-size", "4", "--attack", "apgd")).config[
        "numbers_depend_on_batch_size"] is True
    with pytest.raises(ToolError, match=r"different config \(batch_size: 4 vs 3\)"):
        run_main(cli(*base, "--out", out, "--batch-size", "3", "--attack", "apgd", "--resume"))


def test_folded_batchnorm_is_recorded_and_a_resume_must_match_it(tmp_path, checkpoint_file):
    base = ["--checkpoint", checkpoint_file, "--device", "cpu", "--limit", "6", "--eps-list", "0", "2/255", "8/255",
            "--steps", "3", "--no-checks", "--splits", "test", "--batch-size", "4"]
    folded = run_main(cli(*base, "--out", tmp_path / "folded"))
    plain = run_main(cli(*base, "--out", tmp_path / "plain", "--no-fold-batchnorm"))
    assert folded.config["fold_batchnorm"] is True and plain.config["fold_batchnorm"] is False
    assert [r["accuracy"] for r in folded.sorted_rows()] == [r["accuracy"] for r in plain.sorted_rows()]
    with pytest.raises(ToolError, match=r"different config \(fold_batchnorm: True vs False\)"):
        run_main(cli(*base, "--out", tmp_path / "folded", "--no-fold-batchnorm", "--resume"))
    library = run_main(cli(*base, "--out", tmp_path / "library", "--engine", "library"))
    assert library.config["fold_batchnorm"] is False


def test_a_new_sweeps_first_row_removes_the_per_sample_outcomes_of_an_earlier_one(tmp_path):
    """Until it finishes, a sweep's tables must not sit next to another sweep's per_sample.npz
    (--compare would pair those outcomes with these tables)."""
    import numpy as np

    np.savez(tmp_path / "per_sample.npz", **{"test/eps": np.zeros(1)})
    report = Report(tmp_path, "classification", {"task": "classification", "class_names": CLASS_NAMES},
                    splits=["test"], eps_list=[0.0])
    assert (tmp_path / "per_sample.npz").exists(), "nothing is removed before a row is written"
    report.add_row({"split": "test", "attack": "pgd", "eps": 0.0, "n": 2, "accuracy": 0.5, "seconds": 0.0})
    assert (tmp_path / "results.csv").exists() and not (tmp_path / "per_sample.npz").exists()


def test_results_record_the_precision_each_attack_really_ran_in():
    """Autocast applies to the fast engine's PGD family; an attack without a fast path (APGD)
    runs its library object in fp32, which results.json must say rather than the flag's bf16."""
    args = get_args_parser().parse_args(["--attack", "pgd,apgd"])
    args.attacks, args.eps_values, args.norm = ["pgd", "apgd"], [0.0], "Linf"
    engine = Engine(autocast=torch.bfloat16)
    config = sweep_config(args, {"class_names": ["a", "b"]}, "sha", engine, {"pgd": True, "apgd": False})
    assert config["precision"] == "bfloat16"
    assert config["attack_precision"] == {"pgd": "bfloat16", "apgd": "float32"}
    config = sweep_config(args, {"class_names": ["a", "b"]}, "sha", Engine(), {"pgd": True, "apgd": False})
    assert config["attack_precision"] == {"pgd": "float32", "apgd": "float32"}
