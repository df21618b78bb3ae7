"""main.py with several attacks: usage errors, per-attack and worst rows, curves and the checklist."""
from __future__ import annotations

import json

import numpy as np
import pytest

import main as sweep_cli
from conftest import write_tiny_checkpoint
from dataset import build_splits
from report import config_fingerprint
from test_cli_errors import _assert_one_error_line, _run, assert_sweep_usage_error
import utils
from utils import run_cli, segmentation_metrics

USAGE = [
    pytest.param(["--attack", "pgd,nope"], ["--attack 'nope' is unknown", "fgsm, pgd"], id="unknown-in-list"),
    pytest.param(["--attack", "pgd,segpgd"], ["--attack segpgd does not support classification", "pgd"],
                 id="segmentation-attack-for-classification"),
    pytest.param(["--task", "segmentation", "--attack", "pgd,apgd"], ["--attack apgd does not support segmentation"],
                 id="classification-attack-for-segmentation"),
    pytest.param(["--attack", "pgd,fgsm,pgd"], ["--attack lists pgd more than once"], id="duplicate"),
    pytest.param(["--attack", "pgd,pgdl2"], ["mixes norms (L2, Linf)"], id="mixed-norms"),
    pytest.param(["--check-limit", "0"], ["--check-limit must be >= 1, got 0"], id="check-limit"),
    pytest.param(["--targeted", "--target-class", "7"], ["--target-class must be in [0, 4], got 7"],
                 id="target-class-out-of-range"),
    pytest.param(["--max-memory", "-1"], ["--max-memory"], id="max-memory"),
    pytest.param(["--resume", "--overwrite"], ["--resume continues", "--overwrite replaces", "give one"],
                 id="resume-and-overwrite"),
    pytest.param(["--out", " "], ["--out is empty"], id="empty-out"),
    pytest.param(["--precision", "fp16", "--device", "cpu"], ["--precision fp16 needs a CUDA device"], id="fp16-cpu"),
    pytest.param(["--precision", "bf16", "--device", "cpu"], ["--precision bf16 is not usable on this CPU"],
                 id="bf16-without-native-support"),
]


@pytest.mark.parametrize("argv, fragments", USAGE)
def test_attack_list_usage_errors_come_before_any_output(tmp_path, capsys, monkeypatch, argv, fragments):
    monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda: False)  # the same errors on every CPU
    assert_sweep_usage_error(tmp_path, capsys, argv, fragments)


def test_segmentation_sweep_with_three_attacks_writes_rows_figure_and_checklist(tmp_path, capsys,
                                                                                  make_segmentation_data):
    checkpoint = write_tiny_checkpoint(tmp_path / "seg.pt", "segmentation", make_segmentation_data())
    out = tmp_path / "out"
    argv = ["--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu",  # the task: the checkpoint's
            "--attack", "pgd,segpgd,cospgd", "--eps-list", "0", "2/255", "8/255", "--steps", "2",
            "--check-limit", "4", "--splits", "test"]
    rc, lines = _run(sweep_cli, argv, capsys)
    assert rc == 0, lines
    saved = json.loads((out / "results.json").read_text())
    assert [(row["attack"], row["eps_255"]) for row in saved["rows"]] == [
        (attack, eps) for eps in (0, 2, 8) for attack in ("pgd", "segpgd", "cospgd", "worst")]
    worst = [row for row in saved["rows"] if row["attack"] == "worst"]
    for eps_255, row in zip((0, 2, 8), worst):
        same_eps = [r["dice_mean"] for r in saved["rows"] if r["eps_255"] == eps_255 and r["attack"] != "worst"]
        assert row["dice_mean"] <= max(same_eps) + 1e-12
    assert [check["id"] for check in saved["checks"]] == list("abcdefgh")
    assert all(check["status"] in ("PASS", "WARN", "SKIP") for check in saved["checks"])
    report = (out / "report.md").read_text()
    assert "## Gradient-masking checklist" in report and "| pgd | segpgd | cospgd | worst |" in report
    assert "On a stratified subset of 4 test samples, with the sweep's own PGD results" in report
    assert saved["config"]["checklist"] == {"split": "test", "samples": 4, "reuses_sweep_pgd": True}
    assert (out / "Images" / "AccSegme.png").read_bytes()[:4] == b"\x89PNG"
    assert saved["config"]["attacks"] == ["pgd", "segpgd", "cospgd"] and saved["config"]["engine"] == "fast"
    test_split = build_splits("segmentation", saved["config"]["data"], image_size=32)["test"]
    assert saved["config"]["split_digests"] == {"test": test_split.split_digest}

    with np.load(out / "per_sample.npz", allow_pickle=False) as per_sample:
        assert per_sample["test/eps"].tolist() == pytest.approx([0, 2 / 255, 8 / 255])
        for row in saved["rows"]:  # every row's Dice, recomputed from the per-image matrices
            cms = per_sample[f"test/{row['attack']}/cms"][[0, 2, 8].index(row["eps_255"])]
            assert cms.shape == (row["n"], 3, 3)
            assert segmentation_metrics(cms.sum(0))["dice_mean"] == pytest.approx(row["dice_mean"], abs=1e-12)

    rc, lines = _run(sweep_cli, [*argv, "--resume", "--no-checks"], capsys)
    assert rc == 0, lines
    again = json.loads((out / "results.json").read_text())
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(again["rows"]) == strip(saved["rows"]) and "checks" not in again


def test_per_sample_outcomes_give_every_rows_accuracy(tmp_path, capsys, make_classification_data):
    """per_sample.npz holds, per attack and for the worst case, the smallest eps at which each
    sample is wrong: the share of samples with wrong_eps > eps is the row's accuracy."""
    checkpoint = write_tiny_checkpoint(tmp_path / "cls.pt", "classification", make_classification_data())
    out = tmp_path / "out"
    rc, lines = _run(sweep_cli, ["--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu",
                                 "--attack", "pgd,fgsm", "--eps-list", "0", "2/255", "8/255", "--steps", "2",
                                 "--no-checks"], capsys)
    assert rc == 0, lines
    rows = json.loads((out / "results.json").read_text())["rows"]
    with np.load(out / "per_sample.npz", allow_pickle=False) as per_sample:
        for split in ("val", "test"):
            labels = per_sample[f"{split}/labels"]
            assert labels.dtype == np.int64 and set(labels.tolist()) <= set(range(5))
            worst = per_sample[f"{split}/worst/wrong_eps"]
            assert np.array_equal(worst, np.minimum(per_sample[f"{split}/pgd/wrong_eps"],
                                                    per_sample[f"{split}/fgsm/wrong_eps"]))
            for row in (r for r in rows if r["split"] == split):
                wrong_eps = per_sample[f"{split}/{row['attack']}/wrong_eps"]
                assert len(wrong_eps) == len(labels) == row["n"]
                assert np.mean(wrong_eps > row["eps"]) == pytest.approx(row["accuracy"], abs=1e-12)


def test_alpha_as_a_fraction_of_eps_sets_each_eps_step_and_is_recorded(tmp_path, capsys, monkeypatch,
                                                                      make_classification_data):
    """--alpha eps/4 keeps PGD-10's default step at every eps in one sweep whatever --steps is
    (check d's rerun advice), and results.json records the rule, not one eps's number."""
    checkpoint = write_tiny_checkpoint(tmp_path / "cls.pt", "classification", make_classification_data())
    built = []
    real_build = sweep_cli.build_attack

    def recording_build(name, model, eps, **kwargs):
        built.append((name, eps, kwargs["steps"], kwargs["alpha"]))
        return real_build(name, model, eps, **kwargs)

    monkeypatch.setattr(sweep_cli, "build_attack", recording_build)
    out = tmp_path / "out"
    rc, lines = _run(sweep_cli, ["--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu",
                                 "--eps-list", "0", "2/255", "8/255", "--steps", "3", "--alpha", "eps/4",
                                 "--no-checks"], capsys)
    assert rc == 0, lines
    attacked = {(eps, steps, alpha) for name, eps, steps, alpha in built if name == "pgd" and eps > 0}
    assert attacked >= {(2 / 255, 3, 0.5 / 255), (8 / 255, 3, 2 / 255)}
    assert all(alpha == eps / 4 for eps, _, alpha in attacked)
    result = json.loads((out / "results.json").read_text())
    assert result["config"]["alpha"] == "eps/4"
    assert "alpha eps/4" in (out / "report.md").read_text()


def test_a_sweep_names_test_images_that_copy_training_images(tmp_path, capsys, make_classification_data):
    from test_dataset import _distinct_images

    copied = make_classification_data()  # every class folder holds the same images: copies across splits
    for name, data in (("copied", copied), ("distinct", _distinct_images(tmp_path / "distinct", 8, first_seed=0))):
        checkpoint = write_tiny_checkpoint(tmp_path / f"{name}.pt", "classification", data)
        out = tmp_path / name
        capsys.readouterr()
        rc = run_cli(sweep_cli.main, sweep_cli.get_args_parser().parse_args([
            "--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu", "--eps-list", "0", "--no-checks"]))
        assert rc == 0
        lines = capsys.readouterr().out.splitlines()
        splits = build_splits("classification", data, image_size=32)
        expected = {split: len(splits[split].training_copies) for split in ("val", "test")}
        config = json.loads((out / "results.json").read_text())["config"]
        assert config["copies_of_training_images"] == expected
        report = (out / "report.md").read_text()
        if name == "copied":
            assert expected["val"] > 0 and expected["test"] > 0
            assert any(line.startswith(f"note: {expected['test']} test images are byte-identical") for line in lines)
            assert f"**Data warning:** {expected['val']} val and {expected['test']} test images" in report
        else:
            assert expected == {"val": 0, "test": 0}
            assert not any("byte-identical" in line for line in lines) and "Data warning" not in report


def test_a_task_flag_that_contradicts_the_checkpoint_is_one_line_error(tmp_path, capsys):
    checkpoint = write_tiny_checkpoint(tmp_path / "seg.pt", "segmentation")
    out = tmp_path / "out"
    rc, lines = _run(sweep_cli, ["--task", "classification", "--checkpoint", str(checkpoint), "--out", str(out),
                                 "--device", "cpu"], capsys)
    assert rc == 1
    _assert_one_error_line(lines, "is a segmentation model but --task is classification", "--task segmentation")


def test_a_streamed_split_with_no_example_to_show_sweeps(tmp_path, capsys, make_classification_data):
    """A split over --max-memory is read from disk; with --examples 0 (or no clean-correct sample)
    it is asked for a batch of no samples, which must not reach DataLoader's batch_size=0 error."""
    checkpoint = write_tiny_checkpoint(tmp_path / "cls.pt", "classification", make_classification_data())
    rows = {}
    for name, extra in (("streamed", ["--max-memory", "0"]), ("in-memory", [])):
        out = tmp_path / name
        rc, lines = _run(sweep_cli, ["--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu",
                                     "--eps-list", "0", "8/255", "--steps", "2", "--examples", "0", "--splits", "test",
                                     "--no-checks", *extra], capsys)
        assert rc == 0, lines
        rows[name] = [{k: v for k, v in row.items() if k != "seconds"}
                      for row in json.loads((out / "results.json").read_text())["rows"]]
    assert rows["streamed"] == rows["in-memory"] and len(rows["streamed"]) == 2


def test_separate_val_and_test_roots_come_from_the_checkpoint_and_can_be_moved(tmp_path, capsys,
                                                                              make_classification_data):
    """A model trained with --val-data/--test-data is attacked on those roots; once the data has
    moved (another machine, another cwd), main.py's own --val-data/--test-data point at it."""
    train_root = make_classification_data(name="Train")
    val_root = make_classification_data({"Basophil": 2, "Neutrophil": 3}, name="Val")
    test_root = make_classification_data({"Eosinophil": 4, "Lymphocyte": 2}, name="Test")
    checkpoint = write_tiny_checkpoint(tmp_path / "cls.pt", "classification", train_root, val_root, test_root)
    argv = ["--checkpoint", str(checkpoint), "--device", "cpu", "--eps-list", "0", "--steps", "1", "--no-checks"]

    def sweep(out: str, *extra: str) -> tuple[int, list[str]]:
        return _run(sweep_cli, [*argv, "--out", str(tmp_path / out), *extra], capsys)

    rc, lines = sweep("from-checkpoint")
    assert rc == 0, lines
    first = json.loads((tmp_path / "from-checkpoint" / "results.json").read_text())
    config, n = first["config"], {row["split"]: row["n"] for row in first["rows"]}
    assert (config["val_data"], config["test_data"]) == (str(val_root), str(test_root))
    assert n == {"val": 5, "test": 6}

    moved = test_root.rename(tmp_path / "elsewhere")
    rc, lines = sweep("gone")
    assert rc == 1
    _assert_one_error_line(lines, "--test-data", "does not exist")
    rc, lines = sweep("moved", "--test-data", str(moved))
    assert rc == 0, lines
    saved = json.loads((tmp_path / "moved" / "results.json").read_text())
    assert saved["config"]["test_data"] == str(moved) and saved["config"]["val_data"] == str(val_root)
    assert {row["split"]: row["n"] for row in saved["rows"]} == n
    # --resume refuses to mix rows of two test roots; sweeps without separate roots keep their fingerprint.
    assert config_fingerprint(saved["config"]) != config_fingerprint(config)
    without_roots = {key: value for key, value in config.items() if key not in ("val_data", "test_data")}
    assert config_fingerprint({**without_roots, "val_data": None, "test_data": None}) == \
        config_fingerprint(without_roots)
