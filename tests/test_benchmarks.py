"""The benchmark scripts (not run by CI, so their logic is tested here): sweep_speed.py names its
results file after the machine, so that two CPU generations that a virtual machine gives one model
name do not overwrite each other's figures; synthetic_holdout.py scores checkpoints on a fresh sample."""
import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_tiny_checkpoint
from utils import run_cli

ROOT = Path(__file__).resolve().parents[1]


def _benchmark(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
flags\t\t: fpu avx512f avx512_bf16

processor\t: 1
cpu family\t: 99
model\t\t: 99
model name\t: Other
"""


@pytest.fixture()
def sweep_speed():
    return _benchmark("sweep_speed")


def test_cpuinfo_reads_the_first_processor(tmp_path, sweep_speed):
    info_file = tmp_path / "cpuinfo"
    info_file.write_text(ZEN4)
    info = sweep_speed._cpuinfo(info_file)
    assert (info["model name"], info["cpu family"], info["model"]) == ("AMD EPYC", "25", "17")
    assert sweep_speed._cpuinfo(tmp_path / "missing") == {}


def test_machine_name_tells_cpu_generations_apart(monkeypatch, sweep_speed):
    names = []
    for family, model in (("25", "17"), ("26", "2")):
        monkeypatch.setattr(sweep_speed, "_cpuinfo",
                            lambda f=family, m=model: {"model name": "AMD EPYC", "cpu family": f, "model": m})
        monkeypatch.setattr(sweep_speed, "cpu_has_native_bf16", lambda: True)
        names.append(sweep_speed.machine_name(torch.device("cpu")))
    threads = torch.get_num_threads()
    assert names == [f"amd-epyc-f25m17-bf16-{threads}threads", f"amd-epyc-f26m2-bf16-{threads}threads"]


def test_machine_name_without_family_keeps_the_model_name(monkeypatch, sweep_speed):
    monkeypatch.setattr(sweep_speed, "_cpuinfo", lambda: {"model name": "Some CPU"})
    monkeypatch.setattr(sweep_speed, "cpu_has_native_bf16", lambda: False)
    assert sweep_speed.machine_name(torch.device("cpu")) == f"some-cpu-{torch.get_num_threads()}threads"


def test_holdout_accuracy_counts_every_image_of_the_sample(tmp_path, tiny_synthetic_root):
    from dataset import CLASS_NAMES, build_transform
    from checkpoint import load_checkpoint, model_from_checkpoint

    holdout = _benchmark("synthetic_holdout")
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.pt", "classification")
    row = holdout.holdout_metrics(str(checkpoint), tiny_synthetic_root, batch_size=7)

    model = model_from_checkpoint(load_checkpoint(checkpoint)).eval()
    transform = build_transform("classification", 32, train=False)
    right, seen, recall = 0, 0, {}
    for label, name in enumerate(CLASS_NAMES):  # one image at a time, outside the loader
        files = sorted((tiny_synthetic_root / "Train" / name).glob("*.jpg"))
        with torch.no_grad():
            preds = [model(transform(image=np.asarray(Image.open(f).convert("RGB")))["image"][None]).argmax(1).item()
                     for f in files]
        recall[name] = sum(p == label for p in preds) / len(files)
        right, seen = right + sum(p == label for p in preds), seen + len(files)
    assert row["images"] == seen == 6 * len(CLASS_NAMES)
    assert row["accuracy"] == pytest.approx(right / seen)
    assert row["recall"] == pytest.approx(recall)
    assert row["ci95"][0] <= row["accuracy"] <= row["ci95"][1]


@pytest.mark.parametrize("argv,fragment", [(["--seed", "0"], "--seed 0 is the default sample"),
                                           (["--per-class", "0"], "--per-class")])
def test_holdout_refuses_bad_input_in_one_line(capsys, tmp_path, argv, fragment):
    holdout = _benchmark("synthetic_holdout")
    rc = run_cli(holdout.main, holdout.get_args_parser().parse_args([str(tmp_path / "x.pt"), *argv]))
    lines = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines


def test_results_name_keeps_two_image_sizes_apart(monkeypatch, sweep_speed):
    monkeypatch.setattr(sweep_speed, "machine_name", lambda device: "cpu-x")
    names = {sweep_speed.results_name(torch.device("cpu"), "classification", size) for size in (96, 128)}
    assert names == {"cpu-x-classification-96px.json", "cpu-x-classification-128px.json"}
