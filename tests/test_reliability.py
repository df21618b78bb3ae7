"""Reliability (issue 13): the output-folder lock, earlier runs, non-finite flags, a full disk,
bad checkpoint fields and the other inputs that used to end in a traceback or a silent loss.

Every case checks the one ``error:`` line, the exit code and that earlier outputs are intact.
"""
from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main as sweep_cli
import train as train_cli
import files
from checkpoint import load_checkpoint
from conftest import write_tiny_checkpoint
from files import atomic_torch_save, output_lock
from run_folder import load_best
from test_cli_errors import _assert_one_error_line, _run, assert_sweep_usage_error
from utils import CheckpointError, ToolError

ROOT = Path(__file__).resolve().parents[1]
NAN = float("nan")


# --------------------------------------------------------------------------- helpers
def train_argv(out: Path, data: Path, *extra: str) -> list[str]:
    return ["--task", "classification", "--depth", "18", "--data", str(data), "--image-size", "32",
            "--epochs", "1", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--out", str(out), *extra]


def sweep_argv(checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu", "--attack", "fgsm",
            "--eps-list", "0", "--limit", "6", "--examples", "2", *extra]


def snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Every file under ``folder``: relative name -> (inode, size, mtime). Atomic replacement
    changes the inode and an in-place write the mtime, without reading 100 MB checkpoints."""
    files = (p for p in sorted(folder.rglob("*")) if p.is_file())
    return {p.relative_to(folder).as_posix(): (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns)
            for p in files}


def temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*.tmp")]


def after_path(line: str, path: Path) -> str:
    """The message after ``path``, so a fragment cannot match the (test-named) folder instead."""
    assert str(path) in line, (path, line)
    return line.split(str(path), 1)[1]


def rewrite_checkpoint(path: Path, **changes) -> bytes:
    """Load ``path`` raw, apply ``changes`` (a value of ``...`` deletes the key), save it back.

    The old file is unlinked first: it may be a hard link into the shared ``trained_run``.
    """
    ckpt = torch.load(path, weights_only=True)
    for key, value in changes.items():
        if value is ...:
            del ckpt[key]
        else:
            ckpt[key] = value
    path.unlink()
    torch.save(ckpt, path)
    return path.read_bytes()


def fill_disk_at(monkeypatch, name: str) -> None:
    """Make the fsync of the temporary written for ``name`` fail with ENOSPC, like a full disk."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd to tell which file is synced")
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if f"/.{name}." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_synthetic_root) -> Path:
    """A finished one-epoch classification run (copied by the tests that change it)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    args = train_cli.get_args_parser().parse_args(train_argv(out, tiny_synthetic_root / "Train"))
    train_cli.main(args)
    return out


@pytest.fixture
def run_copy(tmp_path, trained_run) -> Path:
    """A private copy of ``trained_run`` made of hard links (its checkpoints are 130 MB each).

    Safe because the tools only ever replace files (atomic renames), never write into them.
    """
    return Path(shutil.copytree(trained_run, tmp_path / "run", copy_function=os.link))


@pytest.fixture
def train_data(tiny_synthetic_root) -> Path:
    return tiny_synthetic_root / "Train"


@pytest.fixture
def sweep_checkpoint(tmp_path, make_classification_data) -> Path:
    return write_tiny_checkpoint(tmp_path / "ckpt" / "best.pt", "classification", make_classification_data())


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, output folder) of a finished eps-0 sweep (copied by the tests that change it)."""
    from conftest import write_classification_tree

    root = tmp_path_factory.mktemp("swept")
    checkpoint = write_tiny_checkpoint(root / "best.pt", "classification", write_classification_tree(root / "data"))
    args = sweep_cli.get_args_parser().parse_args(sweep_argv(checkpoint, root / "out"))
    sweep_cli.main(args)
    return checkpoint, root / "out"


# --------------------------------------------------------------------------- 1. the lock
def _folder_with_outputs(out: Path) -> dict:
    (out / "checkpoints").mkdir(parents=True)
    (out / "results.json").write_text('{"config": {}, "rows": []}\n')
    (out / "checkpoints" / "best.pt").write_bytes(b"the holder's checkpoint")
    return snapshot(out)


def test_second_sweep_into_a_locked_folder_stops_at_once(tmp_path):
    """A real second process, as in the issue (two main.py runs into one --out)."""
    out = tmp_path / "out"
    before = _folder_with_outputs(out)
    with output_lock(out):
        proc = subprocess.run([sys.executable, "main.py", "--out", str(out), "--device", "cpu", "--eps-list", "0"],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    _assert_one_error_line(proc.stderr.splitlines(), str(out), "in use by another run", f"pid {os.getpid()}",
                           "another --out")
    assert snapshot(out) == before


def test_training_into_a_locked_folder_stops_at_once(tmp_path, capsys):
    """flock conflicts between two opens in one process too, so this runs in-process."""
    out = tmp_path / "out"
    before = _folder_with_outputs(out)
    with output_lock(out):
        rc, lines = _run(train_cli, ["--out", str(out), "--device", "cpu", "--depth", "18"], capsys)
    assert rc == 1
    _assert_one_error_line(lines, str(out), "in use by another run", f"pid {os.getpid()}")
    assert snapshot(out) == before


def test_lock_in_the_same_process_names_this_pid_and_is_released_after_errors(tmp_path, capsys):
    out = tmp_path / "out"
    with output_lock(out):
        assert (out / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(ToolError, match=f"in use by another run \\(pid {os.getpid()}\\)"):
            with output_lock(out):
                pass
    assert not (out / ".lock").exists()
    rc, lines = _run(sweep_cli, ["--out", str(out), "--device", "cpu", "--eps-list", "0"], capsys)
    assert rc == 1 and "not found" in lines[0]  # the missing checkpoint, not a stale lock
    with output_lock(out):  # the failed run let go of the lock
        pass


def test_lock_is_released_when_the_holder_is_killed(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from files import output_lock\n"
                               f"with output_lock({str(out)!r}):\n print('locked', flush=True); time.sleep(120)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ToolError, match=f"pid {holder.pid}"):
            with output_lock(out):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / ".lock").exists()  # SIGKILL left the file behind, but not the lock
    with output_lock(out):
        assert (out / ".lock").read_text().strip() == str(os.getpid())


# --------------------------------------------------------------------------- stale temporaries
def test_stale_temporaries_are_removed_once_the_lock_is_held(tmp_path, capsys):
    out = tmp_path / "out"
    stale = [out / ".results.json.k2j4_x9a.tmp", out / "checkpoints" / ".last.pt.abcd1234.tmp",
             out / "Images" / ".training_curves.png.zz99yy88.tmp"]
    kept = [out / "notes.tmp", out / ".hidden.tmp", out / "other" / ".last.pt.abcd1234.tmp"]
    for path in stale + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    rc, lines = _run(train_cli, ["--depth", "18", "--data", str(tmp_path / "nodata"), "--out", str(out),
                                 "--device", "cpu", "--workers", "0"], capsys)
    assert rc == 1 and "does not exist" in lines[0]
    assert [p for p in stale if p.exists()] == []
    assert all(p.read_text() == "x" for p in kept)


def test_kill_during_the_first_checkpoint_write_gives_a_usable_resume_hint(tmp_path, train_data, capsys):
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / ".last.pt.q1w2e3r4.tmp").write_bytes(b"half a checkpoint")
    rc, lines = _run(train_cli, train_argv(out, train_data, "--resume"), capsys)
    assert rc == 1
    line = _assert_one_error_line(lines, str(out / "checkpoints" / "last.pt"), "not found", "drop --resume")
    assert "--checkpoint" not in line  # train.py has no such flag
    assert temporaries(out) == []


# --------------------------------------------------------------------------- 2. earlier runs
def test_fresh_run_refuses_a_folder_with_checkpoints(run_copy, train_data, capsys):
    before = snapshot(run_copy)
    rc, lines = _run(train_cli, train_argv(run_copy, train_data, "--seed", "1"), capsys)
    assert rc == 1
    _assert_one_error_line(lines, str(run_copy), "already holds checkpoints", "--resume", "--overwrite")
    assert snapshot(run_copy) == before


def test_training_seeds_share_their_split_and_split_seed_changes_it(tmp_path, trained_run, train_data, capsys):
    digests = {}
    for name, extra in (("seed", ["--seed", "1"]), ("split_seed", ["--split-seed", "1"])):
        rc, _ = _run(train_cli, train_argv(tmp_path / name, train_data, *extra), capsys)
        assert rc == 0
        digests[name] = load_checkpoint(tmp_path / name / "checkpoints" / "best.pt")["split_digests"]
    original = load_checkpoint(trained_run / "checkpoints" / "best.pt")["split_digests"]
    assert digests["seed"] == original
    assert digests["split_seed"]["test"] != original["test"]


def test_resume_and_overwrite_exclude_each_other(tmp_path, train_data, capsys):
    rc, lines = _run(train_cli, train_argv(tmp_path / "out", train_data, "--resume", "--overwrite"), capsys)
    assert rc == 2
    _assert_one_error_line(lines, "--resume", "--overwrite")
    assert not (tmp_path / "out").exists()


def _nan_validation(monkeypatch) -> None:
    real_evaluate = train_cli.evaluate

    def evaluate(*args, **kwargs):
        metrics = real_evaluate(*args, **kwargs)
        is_val = kwargs.get("desc", args[5] if len(args) > 5 else "eval") == "val"
        return {key: NAN for key in metrics} if is_val else metrics

    monkeypatch.setattr(train_cli, "evaluate", evaluate)


def test_no_finite_validation_metric_is_an_error_not_an_older_best(run_copy, train_data, capsys, monkeypatch):
    """The issue's case: the new run never writes best.pt; the earlier run's must not be tested."""
    _nan_validation(monkeypatch)
    rc, lines = _run(train_cli, train_argv(run_copy, train_data, "--overwrite", "--seed", "1"), capsys)
    assert rc == 1
    _assert_one_error_line(lines, "no epoch gave a finite validation accuracy", "log.csv")
    assert not (run_copy / "checkpoints" / "best.pt").exists(), "the earlier run's best.pt was left behind"
    assert not (run_copy / "metrics.json").exists(), "the earlier run's metrics were left behind"
    last = load_checkpoint(run_copy / "checkpoints" / "last.pt")
    assert last["args"]["seed"] == 1 and math.isnan(last["history"][0]["val_accuracy"])


def test_overwrite_keeps_the_earlier_run_until_the_new_one_finishes_an_epoch(run_copy, train_data, capsys,
                                                                               monkeypatch):
    """A corrupt validation image found in epoch 1 must not cost the earlier run: --overwrite
    removes it only when the new run writes its first checkpoint."""
    from utils import DataError

    def corrupt_val(*args, **kwargs):
        raise DataError("image val/0001.png is corrupt; replace it or delete it")

    before = snapshot(run_copy)
    monkeypatch.setattr(train_cli, "validate", corrupt_val)
    rc, lines = _run(train_cli, train_argv(run_copy, train_data, "--overwrite", "--seed", "1"), capsys)
    assert rc == 1
    _assert_one_error_line(lines, "is corrupt")
    assert snapshot(run_copy) == before


def test_best_pt_of_another_run_is_never_tested(run_copy):
    args = train_cli.get_args_parser().parse_args(train_argv(run_copy, Path("unused")))
    train_cli.validate_args(args)
    history = load_checkpoint(run_copy / "checkpoints" / "last.pt")["history"]
    assert load_best(args, run_copy / "checkpoints" / "best.pt", history)["epoch"] == 1
    # another value in [0, 1] whatever this one is (halving left a val accuracy of 0 unchanged)
    other = [{**history[0], "val_accuracy": (history[0]["val_accuracy"] + 0.5) % 1.0}]
    with pytest.raises(CheckpointError, match="not written by this run"):
        load_best(args, run_copy / "checkpoints" / "best.pt", other)


def test_resume_restores_best_pt_after_a_kill_between_the_two_writes(run_copy, train_data, capsys):
    """last.pt is written first; if best.pt of the same epoch is lost, --resume rebuilds it."""
    best = run_copy / "checkpoints" / "best.pt"
    best.unlink()
    rc, lines = _run(train_cli, train_argv(run_copy, train_data, "--resume"), capsys)
    assert rc == 0, lines
    assert load_checkpoint(best)["epoch"] == 1
    assert json.loads((run_copy / "metrics.json").read_text())["best_epoch"] == 1


# --------------------------------------------------------------------------- 3. flags
TRAIN_FLAGS = [
    (["--lr", "inf"], ["--lr", "finite", "inf"]),
    (["--lr", "nan"], ["--lr", "nan"]),
    (["--lr", "-1e-3"], ["--lr", "-0.001"]),
    (["--weight-decay", "nan"], ["--weight-decay", "nan"]),
    (["--weight-decay", "-0.1"], ["--weight-decay", ">= 0"]),
    (["--label-smoothing", "nan"], ["--label-smoothing", "[0, 1)"]),
    (["--dice-weight", "inf"], ["--dice-weight", "inf"]),
    (["--mean", "0.5", "nan", "0.5"], ["--mean", "nan"]),
    (["--std", "0.2", "0", "0.2"], ["--std", "> 0"]),
    (["--warmup-epochs", "-1"], ["--warmup-epochs", "-1"]),
    (["--seed", str(2**64)], ["--seed", str(2**64), "4294967295"]),
    (["--seed", "-1"], ["--seed", "-1"]),
    (["--split-seed", "-1"], ["--split-seed", "-1"]),
    (["--batch-size", "1"], ["--batch-size 1", "BatchNorm", "--batch-size 2"]),
]
SWEEP_FLAGS = [
    (["--alpha", "inf"], ["--alpha", "finite", "inf"]),
    (["--alpha", "nan"], ["--alpha", "nan"]),
    (["--seed", str(2**64)], ["--seed", str(2**64)]),
    (["--eps-list", "-1/255"], ["--eps-list", "'-1/255'"]),
    (["--eps-list", "0", "-1/255", "8/255"], ["--eps-list", "'-1/255'"]),
]


@pytest.mark.parametrize("argv, fragments", TRAIN_FLAGS, ids=[" ".join(argv) for argv, _ in TRAIN_FLAGS])
def test_train_flags_must_be_finite_and_in_range(tmp_path, capsys, argv, fragments):
    out = tmp_path / "out"
    rc, lines = _run(train_cli, ["--out", str(out), "--data", str(tmp_path), "--image-size", "32", *argv], capsys)
    assert rc == 2
    _assert_one_error_line(lines, *fragments)
    assert not out.exists()


@pytest.mark.parametrize("argv, fragments", SWEEP_FLAGS, ids=[" ".join(argv) for argv, _ in SWEEP_FLAGS])
def test_sweep_flags_must_be_finite_and_in_range(tmp_path, capsys, argv, fragments):
    assert_sweep_usage_error(tmp_path, capsys, argv, fragments)


def test_batch_size_one_is_fine_where_batchnorm_sees_several_pixels():
    args = train_cli.get_args_parser().parse_args(["--batch-size", "1", "--image-size", "64", "--depth", "18"])
    train_cli.validate_args(args)  # the smallest feature map is 2x2: BatchNorm can train


def test_one_sample_train_split_is_a_data_error(tmp_path, train_data, capsys):
    out = tmp_path / "out"
    rc, lines = _run(train_cli, train_argv(out, train_data, "--limit", "1"), capsys)
    assert rc == 1
    _assert_one_error_line(lines, "train split has a single sample", "BatchNorm", "--limit")
    assert snapshot(out) == {}


# --------------------------------------------------------------------------- 4. resume
@pytest.mark.parametrize("extra, recorded, asked", [
    (["--opt", "sgd"], "--opt adamw", "--opt sgd"),
    (["--lr", "0.01"], "--lr 0.001", "--lr 0.01"),
    (["--seed", "3"], "--seed 0", "--seed 3"),
    (["--split-seed", "3"], "--split-seed 0", "--split-seed 3"),
    (["--batch-size", "4"], "--batch-size 8", "--batch-size 4"),
    (["--class-weights"], "no --class-weights", "has --class-weights"),
    (["--limit", "5"], "no --limit", "--limit 5"),
])
def test_resume_with_a_different_numbers_changing_flag(run_copy, train_data, capsys, extra, recorded, asked):
    before = snapshot(run_copy)
    rc, lines = _run(train_cli, train_argv(run_copy, train_data, "--resume", "--epochs", "2", *extra), capsys)
    assert rc == 1
    _assert_one_error_line(lines, "last.pt", f"trained with {recorded}", asked, "--overwrite")
    assert snapshot(run_copy) == before


def test_resume_of_a_run_older_than_split_seed_keeps_its_seeds_split(run_copy, train_data, capsys):
    """Before --split-seed, --seed also seeded the split: such a run resumes only on that split."""
    last = run_copy / "checkpoints" / "last.pt"
    args = {k: v for k, v in torch.load(last, weights_only=True)["args"].items() if k != "split_seed"}
    before = rewrite_checkpoint(last, args={**args, "seed": 1})
    rc, lines = _run(train_cli, train_argv(run_copy, train_data, "--resume", "--epochs", "2", "--seed", "1"), capsys)
    assert rc == 1
    _assert_one_error_line(lines, "last.pt", "trained with --split-seed 1", "--split-seed 0")
    assert last.read_bytes() == before


def test_resume_with_an_optimizer_state_of_another_kind(run_copy, train_data, capsys):
    last = run_copy / "checkpoints" / "last.pt"
    args = {k: v for k, v in torch.load(last, weights_only=True)["args"].items() if k not in ("opt", "lr")}
    before = rewrite_checkpoint(last, args=args)
    rc, lines = _run(train_cli, train_argv(run_copy, train_data, "--resume", "--epochs", "2", "--opt", "sgd"),
                     capsys)
    assert rc == 1
    _assert_one_error_line(lines, str(last), "another optimizer", "--opt sgd")
    assert last.read_bytes() == before


@pytest.mark.parametrize("changes, fragments", [
    ({"optimizer": ...}, ["lacks the resume state", "optimizer"]),
    ({"history": ...}, ["lacks the resume state", "history"]),
    ({"best_metric": ...}, ["lacks the resume state", "best_metric"]),
    ({"history": []}, ["corrupt", "history"]),
    ({"scheduler": {"last_epoch": "2"}}, ["corrupt", "scheduler"]),
    ({"best_metric": NAN}, ["corrupt", "best_metric"]),
    ({"depth": 7}, ["corrupt", "depth"]),
], ids=["no-optimizer", "no-history", "no-best-metric", "empty-history", "bad-scheduler", "nan-best", "depth-7"])
def test_resume_from_a_bad_last_pt(run_copy, train_data, capsys, changes, fragments):
    last = run_copy / "checkpoints" / "last.pt"
    rewrite_checkpoint(last, **changes)
    before = snapshot(run_copy)
    rc, lines = _run(train_cli, train_argv(run_copy, train_data, "--resume", "--epochs", "2"), capsys)
    assert rc == 1
    message = after_path(_assert_one_error_line(lines), last)
    assert all(fragment in message for fragment in fragments), message
    assert snapshot(run_copy) == before


# --------------------------------------------------------------------------- checkpoint fields
def _nan_weights(ckpt: dict) -> dict:
    model = dict(ckpt["model"])
    name = next(k for k, v in model.items() if v.is_floating_point())
    model[name] = torch.full_like(model[name], NAN)
    return model


BAD_FIELDS = [
    ("task", "bogus"), ("task", 3), ("depth", 7), ("depth", "18"), ("class_names", ["a", "b", "c", "d", "e"]),
    ("class_names", "Basophil"), ("image_size", "32"), ("image_size", 0), ("mean", [0.5, 0.5]),
    ("mean", [NAN, 0.5, 0.5]), ("std", [0.25, 0.0, 0.25]), ("model", {"w": 1}), ("model", _nan_weights),
    ("args", ["--seed", "0"]), ("args", {"data": 5}), ("args", {"seed": "0"}), ("epoch", -1), ("metrics", None),
]


@pytest.mark.parametrize("field, value", BAD_FIELDS,
                         ids=[f"{f}-{'fn' if callable(v) else repr(v)[:20]}" for f, v in BAD_FIELDS])
def test_checkpoint_field_of_the_wrong_type_or_value(tmp_path, capsys, field, value):
    path = write_tiny_checkpoint(tmp_path / "best.pt", "classification")
    rewrite_checkpoint(path, **{field: value(torch.load(path, weights_only=True)) if callable(value) else value})
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)
    out = tmp_path / "out"
    rc, lines = _run(sweep_cli, sweep_argv(path, out), capsys)
    assert rc == 1, "a bad checkpoint is a checkpoint problem (exit 1), not a usage error (exit 2)"
    message = after_path(_assert_one_error_line(lines), path)
    assert "corrupt" in message and field in message, message
    assert snapshot(out) == {}


def test_incomplete_checkpoint_names_the_missing_field(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "best.pt", "classification")
    rewrite_checkpoint(path, mean=...)
    with pytest.raises(CheckpointError, match="incomplete: it lacks mean"):
        load_checkpoint(path)


@pytest.mark.parametrize("seed", range(16))
def test_random_bytes_are_corrupt_not_unsafe(tmp_path, seed):
    path = tmp_path / "c.pt"
    path.write_bytes(random.Random(seed).randbytes(4096))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "corrupt" in str(info.value) and "could run code" not in str(info.value)


# --------------------------------------------------------------------------- results.json of the wrong shape
@pytest.mark.parametrize("content", [
    "[]", '"results"', '{"config": [], "rows": []}', '{"config": {}, "rows": {}}', '{"config": {}, "rows": [1]}',
    '{"config": {}, "rows": [{"split": "val"}]}', '{"config": {}, "rows": [{"split": "val", "eps": "0"}]}',
    '{"config": {}, "rows": [{"split": "val", "attack": ["pgd"], "eps": 0, "eps_255": 0}]}',
])
def test_resume_meets_a_results_json_of_the_wrong_shape(tmp_path, capsys, sweep_checkpoint, content):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text(content)
    rc, lines = _run(sweep_cli, sweep_argv(sweep_checkpoint, out, "--resume"), capsys)
    assert rc == 1
    _assert_one_error_line(lines, str(out / "results.json"), "--resume")
    assert (out / "results.json").read_text() == content


# --------------------------------------------------------------------------- disk full
def test_torch_save_through_a_full_disk_is_a_one_line_error(tmp_path, monkeypatch):
    """torch.save to a file *name* turns ENOSPC into an opaque RuntimeError; through a file
    object the OSError survives, and atomic_path reports it and keeps the old file."""
    path = tmp_path / "state.pt"
    atomic_torch_save(path, {"old": torch.zeros(3)})
    before = path.read_bytes()
    real_open = open

    class FullDisk:
        def __init__(self, fh):
            self.fh, self.written = fh, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 1000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.fh.write(data)

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr(files, "open", lambda file, mode="r", *a, **k: FullDisk(real_open(file, mode, *a, **k))
                        if mode == "wb" else real_open(file, mode, *a, **k), raising=False)
    with pytest.raises(ToolError, match="No space left on device.*previous state.pt is kept"):
        atomic_torch_save(path, {"new": torch.zeros(100_000)})
    assert path.read_bytes() == before and temporaries(tmp_path) == []


def test_full_disk_while_writing_a_checkpoint(run_copy, train_data, capsys, monkeypatch):
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if ".last.pt." in getattr(f, "name", str(f)):
            f.write(b"the first bytes")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    before = snapshot(run_copy)
    monkeypatch.setattr(torch, "save", save)
    rc, lines = _run(train_cli, train_argv(run_copy, train_data, "--resume", "--epochs", "2"), capsys)
    assert rc == 1
    _assert_one_error_line(lines, str(run_copy / "checkpoints" / "last.pt"), "No space left on device",
                           "previous last.pt is kept")
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("name", ["results.json", "AccClassif.png"])
def test_full_disk_while_writing_results_or_a_figure(tmp_path, capsys, monkeypatch, swept, name):
    checkpoint, out = swept[0], Path(shutil.copytree(swept[1], tmp_path / "out"))
    path = next(out.rglob(name))
    before = path.read_bytes()
    fill_disk_at(monkeypatch, name)
    rc, lines = _run(sweep_cli, sweep_argv(checkpoint, out, "--eps-list", "0", "1/255", "--resume"), capsys)
    assert rc == 1
    _assert_one_error_line(lines, str(path), "No space left on device", f"previous {name} is kept")
    assert path.read_bytes() == before and temporaries(out) == []


def test_a_new_sweep_never_silently_replaces_an_earlier_one(tmp_path, capsys, monkeypatch, swept):
    checkpoint, out = swept[0], Path(shutil.copytree(swept[1], tmp_path / "out"))
    before = snapshot(out)
    rc, lines = _run(sweep_cli, sweep_argv(checkpoint, out, "--attack", "pgd"), capsys)
    assert rc == 1
    _assert_one_error_line(lines, str(out), "already holds the results of an earlier sweep", "--resume",
                           "--overwrite")
    assert snapshot(out) == before
    # --overwrite, interrupted before it finishes: the tables are the new sweep's, and neither the
    # report nor a figure of the old one is left beside them
    monkeypatch.setattr(sweep_cli.Report, "finish", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    rc, lines = _run(sweep_cli, sweep_argv(checkpoint, out, "--attack", "pgd", "--overwrite"), capsys)
    assert rc == 130
    assert {row["attack"] for row in json.loads((out / "results.json").read_text())["rows"]} == {"pgd"}
    assert not (out / "report.md").exists() and not list((out / "Images").glob("*.png"))


# --------------------------------------------------------------------------- progress bars
def test_no_progress_bars_when_stderr_is_not_a_terminal(tmp_path, capsys, swept):
    """Bars on a non-terminal stderr (here pytest's capture) would glue '\r' lines to an error."""
    rc, lines = _run(sweep_cli, sweep_argv(swept[0], tmp_path / "out", "--eps-list", "0", "2/255"), capsys)
    assert rc == 0 and lines == []
