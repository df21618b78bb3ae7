"""main.py --compare: finished sweeps side by side."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

import main as sweep_cli
from test_cli_errors import _assert_one_error_line, _run

FIELDS = ["split", "attack", "eps", "eps_255", "n", "accuracy", "dice_mean"]


def write_run(folder, key, values, attacks=("pgd",), eps_255=(0, 4, 8)):
    folder.mkdir(parents=True)
    with open(folder / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["split", "attack", "eps", "eps_255", "n", key])
        writer.writeheader()
        for split in ("val", "test"):
            for i, eps in enumerate(eps_255):
                for j, attack in enumerate(attacks):
                    writer.writerow({"split": split, "attack": attack, "eps": eps / 255, "eps_255": eps, "n": 10,
                                     key: values[i] - 0.01 * j})
    return folder


def test_compare_writes_a_figure_and_a_side_by_side_table(tmp_path, capsys):
    standard = write_run(tmp_path / "standard", "accuracy", [0.95, 0.40, 0.10])
    robust = write_run(tmp_path / "pgd-at", "accuracy", [0.90, 0.80, 0.60], attacks=("pgd", "apgd", "worst"))
    out = tmp_path / "cmp"
    rc, lines = _run(sweep_cli, ["--compare", str(standard), str(robust), "--out", str(out)], capsys)
    assert rc == 0, lines
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    table = (out / "compare.md").read_text()
    assert "| eps | standard | pgd-at |" in table
    assert "| 8/255 | 0.1000 | 0.5800 |" in table, "a run with several attacks is shown by its worst rows"
    assert "worst of pgd, apgd" not in table and "pgd, apgd" in table


def test_compare_shows_each_runs_interval_where_it_has_one(tmp_path, capsys):
    with_ci = write_run(tmp_path / "new", "accuracy", [0.95, 0.40, 0.10])
    rows = list(csv.DictReader((with_ci / "results.csv").read_text().splitlines()))
    with open(with_ci / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*rows[0], "accuracy_ci95_low", "accuracy_ci95_high"])
        writer.writeheader()
        writer.writerows({**row, "accuracy_ci95_low": float(row["accuracy"]) - 0.1,
                          "accuracy_ci95_high": float(row["accuracy"]) + 0.05} for row in rows)
    older = write_run(tmp_path / "old", "accuracy", [0.90, 0.80, 0.60])  # written before the intervals
    out = tmp_path / "cmp"
    rc, lines = _run(sweep_cli, ["--compare", str(with_ci), str(older), "--out", str(out)], capsys)
    assert rc == 0, lines
    table = (out / "compare.md").read_text()
    assert "| 4/255 | 0.4000 (0.300–0.450) | 0.8000 |" in table
    assert "paired" in table


def test_a_run_without_worst_rows_yet_is_not_labelled_as_a_worst_case(tmp_path):
    from compare import Run

    unfinished = Run(write_run(tmp_path / "killed", "accuracy", [0.9, 0.5, 0.1], attacks=("pgd", "apgd")))
    assert unfinished.shown == "pgd" and "worst" not in unfinished.label.replace("no worst-case rows", "")
    finished = Run(write_run(tmp_path / "done", "accuracy", [0.9, 0.5, 0.1], attacks=("pgd", "apgd", "worst")))
    assert finished.label == "done (worst of pgd, apgd)"


@pytest.mark.parametrize("case", ["missing", "tasks", "no-attack-column", "bad-eps", "not-text"])
def test_compare_refuses_folders_without_results_or_of_other_tasks(tmp_path, capsys, case):
    first = write_run(tmp_path / "a", "accuracy", [0.9, 0.5, 0.1])
    malformed = {"no-attack-column": ("split,eps,eps_255,n,accuracy\nval,0.0,0,10,0.9\n", "no attack column"),
                 "bad-eps": ("split,attack,eps,eps_255,n,accuracy\nval,pgd,abc,0,10,0.9\n", "eps 'abc' is not a number"),
                 "not-text": (b"\xff\xfe\x00garbage", "is not a main.py results table")}
    if case == "missing":
        second, fragment = tmp_path / "empty", f"no results.csv in {tmp_path / 'empty'}"
        second.mkdir()
    elif case in malformed:
        second, (content, fragment) = tmp_path / "bad", malformed[case]
        second.mkdir()
        target = second / "results.csv"
        target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
    else:
        second, fragment = write_run(tmp_path / "b", "dice_mean", [0.9, 0.8, 0.7]), "needs runs of one task"
    out = tmp_path / "cmp"
    rc, lines = _run(sweep_cli, ["--compare", str(first), str(second), "--out", str(out)], capsys)
    assert rc == 2
    _assert_one_error_line(lines, fragment)
    assert not out.exists()


def _write_config(folder, **config):
    (folder / "results.json").write_text(json.dumps({"config": config, "rows": []}))


def test_runs_measured_differently_are_named_not_like_for_like(tmp_path, capsys):
    a = write_run(tmp_path / "a", "accuracy", [0.95, 0.40, 0.10])
    b = write_run(tmp_path / "b", "accuracy", [0.95, 0.30, 0.05], attacks=("pgd", "apgd", "worst"))
    _write_config(a, attacks=["pgd"], steps=10, alpha="2.5*eps/steps", targeted=False, data="d", limit=None)
    _write_config(b, attacks=["pgd", "apgd"], steps=50, alpha="2.5*eps/steps", targeted=False, data="d", limit=None)
    with open(b / "results.csv") as fh:
        text = fh.read()
    (b / "results.csv").write_text(text.replace(",10,", ",9,"))
    out = tmp_path / "cmp"
    capsys.readouterr()
    assert sweep_cli.main(sweep_cli.get_args_parser().parse_args(["--compare", str(a), str(b), "--out", str(out)]))
    printed = capsys.readouterr().out.splitlines()
    table = (out / "compare.md").read_text()
    assert "Not like for like" in table
    assert '- steps: a 10, b 50' in table
    assert '- attacks: a ["pgd"], b ["pgd", "apgd"]' in table
    assert "- samples in val: a 10, b 9" in table and "- samples in test: a 10, b 9" in table
    assert "alpha" not in table and "data:" not in table, "settings that agree are not listed"
    assert any(line.startswith("note: the runs are not like for like (attacks: a") for line in printed), printed


def test_classification_runs_with_other_eps_below_a_shared_eps_are_not_like_for_like(tmp_path, capsys):
    """A classification row keeps the samples fooled at every smaller swept eps: with 2/255 swept
    too, the 4/255 and 8/255 rows had more attack. Another eps only above the shared ones is fine."""
    a = write_run(tmp_path / "a", "accuracy", [0.95, 0.40, 0.10])
    finer = write_run(tmp_path / "finer", "accuracy", [0.95, 0.60, 0.35, 0.10], eps_255=(0, 2, 4, 8))
    longer = write_run(tmp_path / "longer", "accuracy", [0.95, 0.40, 0.10, 0.0], eps_255=(0, 4, 8, 16))
    seg = [write_run(tmp_path / name, "dice_mean", values, eps_255=eps) for name, values, eps in
           (("s", [0.9, 0.8, 0.7], (0, 4, 8)), ("s-finer", [0.9, 0.85, 0.8, 0.7], (0, 2, 4, 8)))]
    tables = {}
    for name, runs in (("finer", [a, finer]), ("longer", [a, longer]), ("seg", seg)):
        assert sweep_cli.main(sweep_cli.get_args_parser().parse_args(
            ["--compare", *map(str, runs), "--out", str(tmp_path / name)]))
        tables[name] = (tmp_path / name / "compare.md").read_text()
    assert "- eps swept in test (more eps below a shared one is more attack" in tables["finer"]
    assert "a 0/255 4/255 8/255, finer 0/255 2/255 4/255 8/255" in tables["finer"]
    assert "eps swept" not in tables["longer"], "16/255 only above the shared eps changes no shared row"
    assert "eps swept" not in tables["seg"], "segmentation attacks every image afresh at every eps"


def test_runs_tested_on_other_images_are_not_like_for_like(tmp_path, capsys):
    """Two training runs with another --split-seed hold other test images: their curves differ by
    the samples alone, which compare.md must say even when every attack setting agrees."""
    runs = [write_run(tmp_path / name, "accuracy", [0.95, 0.40, 0.10]) for name in ("a", "b", "c")]
    digests = ({"val": "1111aaaa0000", "test": "2222bbbb0000"}, {"val": "1111aaaa0000", "test": "3333cccc0000"}, None)
    for folder, split_digests in zip(runs, digests):
        extra = {"split_digests": split_digests} if split_digests else {}
        _write_config(folder, attacks=["pgd"], steps=10, data="d", limit=None, **extra)
    out = tmp_path / "cmp"
    assert sweep_cli.main(sweep_cli.get_args_parser().parse_args(["--compare", *map(str, runs), "--out", str(out)]))
    table = (out / "compare.md").read_text()
    assert "- images in test (another --split-seed or data at training): a 2222bbbb, b 3333cccc" in table
    assert "images in val" not in table


def test_runs_measured_alike_carry_no_note(tmp_path, capsys):
    a = write_run(tmp_path / "a", "accuracy", [0.95, 0.40, 0.10])
    b = write_run(tmp_path / "b", "accuracy", [0.90, 0.80, 0.60])
    for folder in (a, b):
        _write_config(folder, attacks=["pgd"], steps=10, targeted=False, data="d", limit=None)
    c = write_run(tmp_path / "c", "accuracy", [0.90, 0.80, 0.60])  # no results.json: nothing to compare
    out = tmp_path / "cmp"
    capsys.readouterr()
    argv = ["--compare", str(a), str(b), str(c), "--out", str(out)]
    assert sweep_cli.main(sweep_cli.get_args_parser().parse_args(argv))
    assert "Not like for like" not in (out / "compare.md").read_text()
    assert "note:" not in capsys.readouterr().out


# --------------------------------------------------------------------------- paired differences
def write_paired_run(folder, outcomes, digest="d1", task="classification", eps_8=8 / 255):
    """A finished run (one attack, eps 0 and 8/255 on test) with its per_sample.npz:
    ``outcomes`` are wrong_eps per sample (classification) or cms per eps (segmentation)."""
    key = "accuracy" if task == "classification" else "dice_mean"
    folder.mkdir(parents=True)
    n = len(outcomes) if task == "classification" else outcomes.shape[1]
    with open(folder / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["split", "attack", "eps", "eps_255", "n", key])
        writer.writeheader()
        writer.writerows({"split": "test", "attack": "pgd", "eps": eps / 255, "eps_255": eps, "n": n, key: 0.5}
                         for eps in (0, 8))
    (folder / "results.json").write_text(json.dumps({"config": {"split_digests": {"test": digest}}}))
    arrays = {"test/eps": np.array([0, eps_8])}
    if task == "classification":
        arrays.update({"test/labels": np.zeros(n, dtype=np.int64), "test/pgd/wrong_eps": np.asarray(outcomes)})
    else:
        arrays["test/pgd/cms"] = outcomes
    np.savez(folder / "per_sample.npz", **arrays)
    return folder


def _wrong_eps(right_at_8):
    """Right clean, and right or wrong at 8/255."""
    return np.where(np.asarray(right_at_8), np.inf, 8 / 255)


def test_compare_gives_paired_differences_with_mcnemar_and_newcombe(tmp_path, capsys):
    from stats import paired_difference_interval

    # at 8/255: 9 right in both, 1 only in the first run, 8 only in the second, 2 in neither
    first = [1] * 9 + [1] + [0] * 8 + [0] * 2
    second = [1] * 9 + [0] + [1] * 8 + [0] * 2
    base = write_paired_run(tmp_path / "standard", _wrong_eps(first))
    robust = write_paired_run(tmp_path / "pgd-at", _wrong_eps(second))
    other_images = write_paired_run(tmp_path / "split1", _wrong_eps(second), digest="d2")
    older = write_run(tmp_path / "older", "accuracy", [0.9, 0.5, 0.1])
    out = tmp_path / "cmp"
    rc, lines = _run(sweep_cli, ["--compare", str(base), str(robust), str(other_images), str(older),
                                 "--out", str(out)], capsys)
    assert rc == 0, lines
    table = (out / "compare.md").read_text()
    low, high = paired_difference_interval(9, 1, 8, 2)
    # Holm over the section's two rows: 2 * 0.0215 for the smaller p, and 1 for the tie at 0/255
    assert f"| 8/255 | pgd-at | +0.3500 | {low:+.3f} to {high:+.3f} | 1 | 8 | 0.0215 | 0.043 |" in table
    assert "| 0/255 | pgd-at | +0.0000 |" in table and "| 0 | 0 | 1 | 1 |" in table
    assert "- split1: not paired, they were tested on other images" in table
    assert "- older: not paired, older has no readable per_sample.npz (a sweep writes it when it finishes" in table


def test_paired_rows_count_each_run_at_its_own_eps(tmp_path):
    """8/255 typed as a decimal differs from 8/255 in the last digits; the rows still pair, and
    each run's samples are judged against its own eps, not the first run's."""
    from compare import load_runs, paired_differences

    first = [1] * 9 + [1] + [0] * 8 + [0] * 2
    second = [1] * 9 + [0] + [1] * 8 + [0] * 2
    decimal = 8 / 255 + 5e-10
    base = write_paired_run(tmp_path / "fraction", _wrong_eps(first))
    typed = write_paired_run(tmp_path / "decimal", np.where(np.asarray(second), np.inf, decimal), eps_8=decimal)
    rows = paired_differences(*load_runs([str(base), str(typed)]), "test")
    assert [(row["only_first"], row["only_other"]) for row in rows] == [(0, 0), (1, 8)]
    assert rows[1]["difference"] == pytest.approx(0.35)


def test_compare_pairs_segmentation_runs_by_a_bootstrap_over_images(tmp_path, capsys):
    cms = np.zeros((2, 6, 3, 3), dtype=np.int64)
    cms[:, :, 0, 0], cms[:, :, 1, 1], cms[:, :, 2, 2], cms[:, :, 2, 1] = 400, 50, 30, 10
    better = cms.copy()
    better[1, :, 2, 2], better[1, :, 2, 1] = 35, 5  # at 8/255 5 more nucleus pixels per image
    first = write_paired_run(tmp_path / "a", cms, task="segmentation")
    second = write_paired_run(tmp_path / "b", better, task="segmentation")
    trimmed = write_paired_run(tmp_path / "c", cms[:, :4], task="segmentation")
    out = tmp_path / "cmp"
    rc, lines = _run(sweep_cli, ["--compare", str(first), str(second), str(trimmed), "--out", str(out)], capsys)
    assert rc == 0, lines
    table = (out / "compare.md").read_text()
    assert "| 0/255 | b | +0.0000 | +0.000 to +0.000 | 1 |" in table
    gain = 2 * 35 / (2 * 35 + 5) / 2 - 2 * 30 / (2 * 30 + 10) / 2  # nucleus Dice up, cytoplasm Dice up too
    gain += (2 * 50 / (2 * 50 + 5) - 2 * 50 / (2 * 50 + 10)) / 2
    assert f"| 8/255 | b | {gain:+.4f} | {gain:+.3f} to {gain:+.3f} | 0.0" in table, \
        "identical images: the interval collapses on the difference, and every swap but none and all is milder"
    assert "- c: not paired, a has 6 test samples and c 4 (another --limit?)" in table


@pytest.mark.parametrize("task,key,bad", [
    ("classification", "test/eps", np.array(8 / 255)),
    ("classification", "test/pgd/wrong_eps", np.array(["inf"] * 20)),
    ("classification", "test/labels", np.zeros(20)),
    ("classification", "test/labels", np.zeros(21, dtype=np.int64)),
    ("segmentation", "test/pgd/cms", np.zeros((2, 6, 3), dtype=np.int64)),
    ("segmentation", "test/pgd/cms", np.zeros((2, 6, 3, 3))),
    ("segmentation", "test/pgd/cms", np.zeros((3, 6, 3, 3), dtype=np.int64)),
], ids=["0-d eps", "text wrong_eps", "float labels", "a label too many", "3-d cms", "float cms", "cms of 3 eps"])
def test_a_run_with_malformed_per_sample_arrays_is_not_paired(tmp_path, capsys, task, key, bad):
    outcomes = _wrong_eps([1] * 10 + [0] * 10) if task == "classification" else np.ones((2, 6, 3, 3), np.int64)
    good = write_paired_run(tmp_path / "good", outcomes, task=task)
    broken = write_paired_run(tmp_path / "broken", outcomes, task=task)
    with np.load(broken / "per_sample.npz") as data:
        arrays = {name: data[name] for name in data.files}
    np.savez(broken / "per_sample.npz", **{**arrays, key: bad})
    out = tmp_path / "cmp"
    rc, lines = _run(sweep_cli, ["--compare", str(good), str(broken), "--out", str(out)], capsys)
    assert rc == 0, lines
    assert "- broken: not paired, broken has no readable per_sample.npz" in (out / "compare.md").read_text()


def test_paired_differences_of_two_real_sweeps_match_their_tables(tmp_path, capsys, make_classification_data):
    from conftest import write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(tmp_path / "cls.pt", "classification", make_classification_data())
    folders = []
    for steps in ("1", "4"):
        folders.append(tmp_path / f"steps{steps}")
        rc, lines = _run(sweep_cli, ["--checkpoint", str(checkpoint), "--out", str(folders[-1]), "--device", "cpu",
                                     "--eps-list", "0", "4/255", "16/255", "--steps", steps, "--no-checks"], capsys)
        assert rc == 0, lines
    out = tmp_path / "cmp"
    rc, lines = _run(sweep_cli, ["--compare", *map(str, folders), "--out", str(out)], capsys)
    assert rc == 0, lines
    from compare import load_runs, paired_differences

    first, second = load_runs(list(map(str, folders)))
    for split in ("val", "test"):
        accuracy = [{float(r["eps"]): float(r["accuracy"]) for r in run.rows if r["split"] == split}
                    for run in (first, second)]
        rows = paired_differences(first, second, split)
        assert [row["eps"] for row in rows] == sorted(accuracy[0])
        for row in rows:
            assert row["difference"] == pytest.approx(accuracy[1][row["eps"]] - accuracy[0][row["eps"]], abs=1e-12)
            assert row["low"] <= row["difference"] <= row["high"]
    assert "## Paired differences from steps1" in (out / "compare.md").read_text()


def test_an_interrupted_sweep_is_marked_unfinished_until_resumed(tmp_path, capsys, monkeypatch,
                                                                 make_classification_data):
    from conftest import write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(tmp_path / "cls.pt", "classification", make_classification_data())
    folders = {name: tmp_path / name for name in ("finished", "interrupted")}
    argv = ["--checkpoint", str(checkpoint), "--device", "cpu", "--eps-list", "0", "4/255", "--steps", "1",
            "--no-checks"]
    assert _run(sweep_cli, [*argv, "--out", str(folders["finished"])], capsys)[0] == 0
    log_row, logged = sweep_cli.log_row, []

    def interrupted_after_two_rows(*args, **kwargs):
        log_row(*args, **kwargs)
        logged.append(args)
        if len(logged) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(sweep_cli, "log_row", interrupted_after_two_rows)
    assert _run(sweep_cli, [*argv, "--out", str(folders["interrupted"])], capsys)[0] != 0
    results = {name: json.loads((folder / "results.json").read_text()) for name, folder in folders.items()}
    assert results["finished"]["complete"] is True and results["interrupted"]["complete"] is False
    assert len(results["interrupted"]["rows"]) == 2 < len(results["finished"]["rows"])

    out = tmp_path / "cmp"
    capsys.readouterr()
    assert sweep_cli.main(sweep_cli.get_args_parser().parse_args(
        ["--compare", *map(str, folders.values()), "--out", str(out)])) is not None
    printed = capsys.readouterr().out
    assert f"note: {folders['interrupted']} hold an interrupted sweep" in printed
    bullets = {line.split("**")[1]: line for line in (out / "compare.md").read_text().splitlines()
               if line.startswith("- **")}
    assert "unfinished" in bullets["interrupted"] and "unfinished" not in bullets["finished"]

    monkeypatch.setattr(sweep_cli, "log_row", log_row)
    assert _run(sweep_cli, [*argv, "--out", str(folders["interrupted"]), "--resume"], capsys)[0] == 0
    assert json.loads((folders["interrupted"] / "results.json").read_text())["complete"] is True
