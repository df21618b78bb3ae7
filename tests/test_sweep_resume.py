"""A killed sweep resumed with --resume gives the same table as an uninterrupted one."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from attacks import build_attack
from conftest import write_tiny_checkpoint
from report import config_fingerprint
from splitdata import TensorSplit
from sweep import SweepSpec, run_split
from test_attacks import CLASS_NAMES, separable_images, tiny_classifier, train

PROJECT_ROOT = Path(__file__).resolve().parents[1]
EPS = [0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255, 32 / 255]


def without_seconds(rows: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if key != "seconds"} for row in rows]


class Killed(Exception):
    pass


@pytest.mark.parametrize("random_start", [True, False])
def test_resumed_split_state_is_bit_identical(tmp_path, random_start):
    """With random starts the per-sample and per-row seeds make resuming exact; without, the
    resumed run recomputes the first steps that the uninterrupted one kept from earlier eps."""
    images, labels = separable_images(n=24, seed=3)
    model = train(tiny_classifier(), *separable_images(n=60), steps=40)
    loader = TensorSplit(images, labels)
    spec = SweepSpec(task="classification", class_names=CLASS_NAMES, eps_list=EPS, attacks=("pgd", "apgd"),
                     fingerprint=config_fingerprint({"attacks": ["pgd", "apgd"]}))

    def make_attack(name, eps):
        return build_attack(name, model, eps, steps=3, alpha=eps, random_start=random_start, num_classes=5)

    def run(state_dir, resume=False, stop_after=None):
        rows = []

        def on_row(row):
            rows.append(row)
            if stop_after is not None and len(rows) == stop_after:
                raise Killed

        try:
            run_split(model, loader, spec, split="val", make_attack=make_attack, on_row=on_row,
                      state_dir=state_dir, resume=resume)
        except Killed:
            pass
        return rows

    full = run(tmp_path / "full")
    run(tmp_path / "part", stop_after=6)  # after 1/255: the resume starts at 2/255
    assert (tmp_path / "part" / "val.pt").is_file()
    resumed = run(tmp_path / "part", resume=True)
    assert without_seconds(resumed) == without_seconds(full)
    other = SweepSpec(**{**spec.__dict__, "fingerprint": "different"})
    rows = []
    run_split(model, loader, other, split="val", make_attack=make_attack, on_row=rows.append,
              state_dir=tmp_path / "part", resume=True)
    assert without_seconds(rows) == without_seconds(full), "a foreign state is recomputed, not trusted"


@pytest.fixture
def segmentation_checkpoint(tmp_path, make_segmentation_data):
    return write_tiny_checkpoint(tmp_path / "seg.pt", "segmentation", make_segmentation_data(size=(24, 24)))


def sweep_command(checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(PROJECT_ROOT / "main.py"), "--task", "segmentation", "--checkpoint", str(checkpoint),
            "--out", str(out), "--device", "cpu", "--steps", "4", "--random-start", "--batch-size", "2",
            "--examples", "2", "--attack", "pgd,segpgd", "--no-checks", "--eps-list",
            *[f"{e * 255:g}/255" for e in EPS], *extra]


def finished_rows(out: Path) -> list[dict]:
    try:
        return json.loads((out / "results.json").read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return []


def test_sigkilled_sweep_resumes_to_the_uninterrupted_table(tmp_path, segmentation_checkpoint):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed_out, full_out = tmp_path / "killed", tmp_path / "full"
    uninterrupted = subprocess.Popen(sweep_command(segmentation_checkpoint, full_out), cwd=tmp_path, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # runs beside the kill
    proc = subprocess.Popen(sweep_command(segmentation_checkpoint, killed_out), cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(finished_rows(killed_out)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the sweep finished before it could be killed; make it longer"
    assert 2 <= len(finished_rows(killed_out)) < 2 * 3 * len(EPS)
    subprocess.run(sweep_command(segmentation_checkpoint, killed_out, "--resume"), cwd=tmp_path, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert uninterrupted.wait() == 0
    resumed, full = finished_rows(killed_out), finished_rows(full_out)
    assert len(full) == 2 * 3 * len(EPS) and {row["attack"] for row in full} == {"pgd", "segpgd", "worst"}
    assert without_seconds(resumed) == without_seconds(full)
    assert (killed_out / "report.md").is_file() and (killed_out / "Images" / "AccSegme.png").is_file()
