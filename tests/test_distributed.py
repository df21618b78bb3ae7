"""torchrun on CPU (gloo): sharded sweeps give the 1-process table; a failing rank ends the job."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_ranks_stopped_with_one_line_errors, write_tiny_checkpoint
from distributed import Dist
from main import get_args_parser
from main import main as run_main

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@contextlib.contextmanager
def one_thread():
    """Run as each torchrun rank does (ENV): the thread count changes the convolutions'
    summation order, hence the last digits, whatever the number of processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def strip(rows: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if key != "seconds"} for row in rows]


def test_shards_are_contiguous_unpadded_and_cover_the_split():
    for n in (2, 5, 7, 64):
        for world in (1, 2, 3):
            if n < world:
                continue
            shards = [Dist(rank=r, world_size=world).shard(n) for r in range(world)]
            assert [i for shard in shards for i in shard] == list(range(n))
            assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from conftest import write_classification_tree, write_segmentation_tree

    root = tmp_path_factory.mktemp("dist")
    cls_data = write_classification_tree(root / "cls", {"Basophil": 6, "Eosinophil": 6, "Lymphocyte": 8,
                                                        "Monocyte": 6, "Neutrophil": 10})
    return {"classification": write_tiny_checkpoint(root / "cls.pt", "classification", cls_data),
            "segmentation": write_tiny_checkpoint(root / "seg.pt", "segmentation",
                                                  write_segmentation_tree(root / "seg"))}


def sweep_args(task: str, checkpoint: Path, out: Path, random_start: bool) -> list[str]:
    attacks = "pgd,fgsm" if task == "classification" else "pgd,segpgd"
    return ["--task", task, "--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu",
            "--attack", attacks, "--eps-list", "0", "2/255", "8/255", "--steps", "3", "--batch-size", "3",
            "--examples", "3", "--check-limit", "4", *(["--random-start"] if random_start else [])]


@pytest.mark.parametrize("random_start", [False, True], ids=["no-random-start", "random-start"])
@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_two_processes_give_the_one_process_table(task, random_start, checkpoints, tmp_path):
    argv = sweep_args(task, checkpoints[task], tmp_path / "one", random_start)
    with one_thread():
        one = run_main(get_args_parser().parse_args(argv))
    argv = sweep_args(task, checkpoints[task], tmp_path / "two", random_start)
    done = subprocess.run([*TORCHRUN, str(ROOT / "main.py"), *argv], cwd=tmp_path, env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["config"]["world_size"] == 2 and one.config["world_size"] == 1
    assert strip(two["rows"]) == strip(one.sorted_rows())
    assert two["checks"] == one.checks
    assert done.stdout.count("wrote ") == 1, "only rank 0 prints and writes"
    with np.load(tmp_path / "one" / "per_sample.npz") as first, np.load(tmp_path / "two" / "per_sample.npz") as second:
        assert sorted(first.files) == sorted(second.files) and any(key.startswith("test/") for key in first.files)
        for key in first.files:
            assert np.array_equal(first[key], second[key]), key


def test_a_failing_rank_ends_every_rank_quickly(checkpoints, tmp_path):
    from dataset import build_splits

    checkpoint = checkpoints["classification"]
    test_split = build_splits("classification", checkpoint.parent / "cls", image_size=32)["test"]
    corrupt = Path(test_split.samples[-1][0])  # the last test sample belongs to rank 1's shard
    original = corrupt.read_bytes()
    corrupt.write_bytes(b"not an image")
    try:
        argv = sweep_args("classification", checkpoint, tmp_path / "out", False)
        start = time.monotonic()
        done = subprocess.run([*TORCHRUN, str(ROOT / "main.py"), *argv], cwd=tmp_path, env=ENV,
                              capture_output=True, text=True, timeout=300)
        elapsed = time.monotonic() - start
    finally:
        corrupt.write_bytes(original)
    assert done.returncode != 0 and elapsed < 60
    assert_ranks_stopped_with_one_line_errors(done.stderr, corrupt, ROOT / "main.py")


def test_cuda_under_torchrun_with_fewer_gpus_than_local_processes_is_a_usage_error(monkeypatch):
    import torch

    import distributed
    from utils import UsageError
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(distributed, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UsageError, match="4 processes but 2 GPU"):
        distributed.init_distributed("cuda")
