"""Bad command lines: one ``error:`` line on stderr, exit 2 (usage) or 1 (runtime), no traceback.

Most cases run in-process through ``run_cli`` (as ``__main__`` does); a few real subprocess
runs prove the end-to-end exit code and the absence of a traceback.
"""
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import main as sweep_cli
import train as train_cli
from conftest import write_tiny_checkpoint
from utils import CheckpointError, DataError, ToolError, UsageError, run_cli

ROOT = Path(__file__).resolve().parents[1]
CLASS_NAMES = ["Basophil", "Eosinophil", "Lymphocyte", "Monocyte", "Neutrophil"]
SEG_NAMES = ["background", "cytoplasm", "nucleus"]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ckpts")
    return {task: write_tiny_checkpoint(folder / f"{task}.pt", task) for task in ("classification", "segmentation")}


def _run(module, argv: list[str], capsys) -> tuple[int, list[str]]:
    """Parse ``argv`` and run ``module.main`` the way ``__main__`` does: (exit code, stderr lines)."""
    capsys.readouterr()
    try:
        rc = run_cli(module.main, module.get_args_parser().parse_args(argv))
    except SystemExit as exc:  # argparse errors
        rc = exc.code
    return rc, capsys.readouterr().err.splitlines()


def _assert_one_error_line(lines: list[str], *fragments: str) -> str:
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("error: ") and line.strip() != "error:", line
    assert "Traceback" not in line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


def _files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


# --------------------------------------------------------------------------- usage errors (exit 2)
SWEEP_USAGE = [
    pytest.param(["--task", "bogus"], ["--task", "bogus", "classification"], id="task"),
    pytest.param(["--attack", "nope"], ["--attack", "nope", "pgd"], id="attack"),
    pytest.param(["--eps-list", "0", "abc"], ["--eps-list", "'abc'", "8/255"], id="eps-unparsable"),
    pytest.param(["--eps-list", "1/0"], ["--eps-list", "'1/0'"], id="eps-div-zero"),
    pytest.param(["--eps-list", "nan"], ["--eps-list", "'nan'"], id="eps-nan"),
    pytest.param(["--eps-list", "-0.1"], ["--eps-list", "'-0.1'", "[0, 1]"], id="eps-negative"),
    pytest.param(["--eps-list", "0", "300/255"], ["--eps-list", "'300/255'", "[0, 1]"], id="eps-above-1"),
    pytest.param(["--steps", "0"], ["--steps", ">= 1", "0"], id="steps-0"),
    pytest.param(["--steps", "-3"], ["--steps", "-3"], id="steps-negative"),
    pytest.param(["--alpha", "0"], ["--alpha", "> 0"], id="alpha-0"),
    pytest.param(["--alpha", "-0.01"], ["--alpha", "-0.01"], id="alpha-negative"),
    pytest.param(["--alpha", "eps4"], ["--alpha", "'eps4'", "eps/4", "2/255"], id="alpha-unparsable"),
    pytest.param(["--alpha", "eps/0"], ["--alpha", "> 0", "eps/0"], id="alpha-eps-over-0"),
    pytest.param(["--batch-size", "0"], ["--batch-size", ">= 1"], id="batch-size-0"),
    pytest.param(["--steps", "x"], ["--steps", "'x'"], id="steps-not-int"),
    pytest.param(["--device", "tpu"], ["--device", "'tpu'"], id="device-unknown"),
    pytest.param(["--device", "cuda"], ["--device cuda", "CUDA is not available", "--device cpu"],
                 id="device-cuda-without-cuda", marks=NO_CUDA),
    *[pytest.param(["--task", "segmentation", "--attack", name],
                   ["--attack " + name, "segmentation", "pgd"], id=f"segmentation-{name}")
      for name in ("cw", "apgd", "autoattack", "square")],
]

TRAIN_USAGE = [
    pytest.param(["--task", "bogus"], ["--task", "'bogus'", "classification"], id="task"),
    pytest.param(["--depth", "7"], ["--depth", "7", "18"], id="depth"),
    pytest.param(["--depth", "abc"], ["--depth", "'abc'"], id="depth-not-int"),
    pytest.param(["--opt", "adam"], ["--opt", "'adam'", "adamw", "sgd"], id="opt"),
    pytest.param(["--batch-size", "0"], ["--batch-size", "at least 1"], id="batch-size-0"),
    pytest.param(["--batch-size", "-4"], ["--batch-size", "-4"], id="batch-size-negative"),
    pytest.param(["--adv-alpha", "1/0"], ["--adv-alpha", "'1/0'", "eps/4"], id="adv-alpha-unparsable"),
    pytest.param(["--device", "cuda"], ["--device cuda", "CUDA is not available", "--device cpu"],
                 id="device-cuda-without-cuda", marks=NO_CUDA),
]


def assert_sweep_usage_error(tmp_path, capsys, argv: list[str], fragments: list[str]) -> None:
    """main.py with ``argv`` (a missing checkpoint) exits 2 with one error line holding every
    fragment, and never creates --out."""
    out = tmp_path / "out"
    rc, lines = _run(sweep_cli, ["--out", str(out), "--checkpoint", str(tmp_path / "none.pt"), *argv], capsys)
    assert rc == 2
    _assert_one_error_line(lines, *fragments)
    assert not out.exists(), "a usage error must not create the --out folder"


@pytest.mark.parametrize("argv, fragments", SWEEP_USAGE)
def test_sweep_usage_errors(tmp_path, capsys, argv, fragments):
    assert_sweep_usage_error(tmp_path, capsys, argv, fragments)


@pytest.mark.parametrize("argv, fragments", TRAIN_USAGE)
def test_train_usage_errors(tmp_path, capsys, argv, fragments):
    out = tmp_path / "out"
    rc, lines = _run(train_cli, ["--out", str(out), "--data", str(tmp_path / "nodata"), *argv], capsys)
    assert rc == 2
    _assert_one_error_line(lines, *fragments)
    assert not out.exists(), "a usage error must not create the --out folder"


# --------------------------------------------------------------------------- runtime errors (exit 1)
def test_sweep_missing_checkpoint(tmp_path, capsys):
    out, missing = tmp_path / "out", tmp_path / "nope" / "best.pt"
    rc, lines = _run(sweep_cli, ["--out", str(out), "--checkpoint", str(missing), "--device", "cpu"], capsys)
    assert rc == 1
    _assert_one_error_line(lines, str(missing), "not found", "--checkpoint")
    assert _files_under(out) == []


def test_sweep_default_checkpoint_missing_names_the_default_path(tmp_path, capsys):
    out = tmp_path / "out"
    rc, lines = _run(sweep_cli, ["--out", str(out), "--device", "cpu"], capsys)
    assert rc == 1
    _assert_one_error_line(lines, str(out / "checkpoints" / "best.pt"), "not found")
    assert _files_under(out) == []


@pytest.mark.parametrize("ckpt_task, task", [("classification", "segmentation"),
                                             ("segmentation", "classification")])
def test_sweep_checkpoint_for_the_other_task(tmp_path, capsys, checkpoints, ckpt_task, task):
    out = tmp_path / "out"
    rc, lines = _run(sweep_cli, ["--task", task, "--checkpoint", str(checkpoints[ckpt_task]),
                                 "--out", str(out), "--device", "cpu", "--attack", "fgsm"], capsys)
    assert rc == 1
    _assert_one_error_line(lines, str(checkpoints[ckpt_task]), ckpt_task, task, f"--task {ckpt_task}")
    assert _files_under(out) == []


def test_sweep_missing_data_folder(tmp_path, capsys, checkpoints):
    out, data = tmp_path / "out", tmp_path / "no" / "such" / "data"
    rc, lines = _run(sweep_cli, ["--checkpoint", str(checkpoints["classification"]), "--data", str(data),
                                 "--out", str(out), "--device", "cpu", "--eps-list", "0"], capsys)
    assert rc == 1
    _assert_one_error_line(lines, str(data), "does not exist", "--data")
    assert _files_under(out) == []


def test_sweep_unwritable_out(tmp_path, capsys, checkpoints):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    out = afile / "sub"
    rc, lines = _run(sweep_cli, ["--checkpoint", str(checkpoints["classification"]), "--out", str(out),
                                 "--device", "cpu"], capsys)
    assert rc == 1
    _assert_one_error_line(lines, str(out), "not writable", "--out")
    assert afile.read_text() == "not a folder"


def test_train_missing_data_folder(tmp_path, capsys):
    out, data = tmp_path / "out", tmp_path / "no" / "such" / "data"
    rc, lines = _run(train_cli, ["--depth", "18", "--data", str(data), "--out", str(out),
                                 "--device", "cpu", "--workers", "0"], capsys)
    assert rc == 1
    _assert_one_error_line(lines, str(data), "does not exist", "--data")
    assert _files_under(out) == []


def test_train_unwritable_out(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    out = afile / "sub"
    rc, lines = _run(train_cli, ["--depth", "18", "--data", str(tmp_path), "--out", str(out),
                                 "--device", "cpu"], capsys)
    assert rc == 1
    _assert_one_error_line(lines, str(out), "not writable", "--out")
    assert afile.read_text() == "not a folder"


def test_train_resume_missing_checkpoint(tmp_path, capsys):
    out = tmp_path / "out"
    rc, lines = _run(train_cli, ["--depth", "18", "--resume", "--data", str(tmp_path), "--out", str(out),
                                 "--device", "cpu"], capsys)
    assert rc == 1
    _assert_one_error_line(lines, str(out / "checkpoints" / "last.pt"), "not found")
    assert _files_under(out) == []


@pytest.mark.parametrize("ckpt_task, task", [("segmentation", "classification"),
                                             ("classification", "segmentation")])
def test_train_resume_checkpoint_for_the_other_task(tmp_path, capsys, ckpt_task, task):
    out = tmp_path / "out"
    last = write_tiny_checkpoint(out / "checkpoints" / "last.pt", ckpt_task)
    before = last.read_bytes()
    rc, lines = _run(train_cli, ["--task", task, "--depth", "18", "--image-size", "32", "--resume",
                                 "--data", str(tmp_path), "--out", str(out), "--device", "cpu"], capsys)
    assert rc == 1
    _assert_one_error_line(lines, str(last), repr(ckpt_task), repr(task))
    assert _files_under(out) == [last] and last.read_bytes() == before


# --------------------------------------------------------------------------- --debug re-raises
@pytest.mark.parametrize("module, argv, error", [
    pytest.param(sweep_cli, ["--attack", "nope"], UsageError, id="sweep-usage"),
    pytest.param(sweep_cli, ["--checkpoint", "{tmp}/none.pt", "--device", "cpu"], CheckpointError,
                 id="sweep-checkpoint"),
    pytest.param(train_cli, ["--opt", "adam"], UsageError, id="train-usage"),
    pytest.param(train_cli, ["--depth", "18", "--data", "{tmp}/nodata", "--device", "cpu", "--workers", "0"],
                 DataError, id="train-data"),
])
def test_debug_shows_the_traceback(tmp_path, capsys, module, argv, error):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    args = module.get_args_parser().parse_args([*argv, "--out", str(tmp_path / "out"), "--debug"])
    with pytest.raises(error) as info:
        run_cli(module.main, args)
    assert isinstance(info.value, ToolError) and info.traceback  # propagates with its traceback
    assert "error:" not in capsys.readouterr().err  # not swallowed into a one-liner


# --------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("script, argv, code, fragment", [
    pytest.param("main.py", ["--eps-list", "0", "abc"], 2, "--eps-list", id="main-usage"),
    pytest.param("train.py", ["--depth", "18", "--data", "{tmp}/nodata", "--device", "cpu", "--workers", "0"],
                 1, "does not exist", id="train-data"),
])
def test_subprocess_exit_code_and_no_traceback(tmp_path, script, argv, code, fragment):
    out = tmp_path / "out"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    proc = subprocess.run([sys.executable, script, *argv, "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    _assert_one_error_line(proc.stderr.splitlines(), fragment)
    if code == 2:
        assert not out.exists()
    else:
        assert _files_under(out) == []


@pytest.mark.parametrize("failure,line", [(DataError("bad image"), "error: bad image\n"),
                                          (KeyboardInterrupt(), "error: interrupted; finished rows and "
                                                                "checkpoints are kept\n")])
def test_an_error_line_is_written_in_one_call(monkeypatch, failure, line):
    """Two torchrun ranks share stderr, which is unbuffered when it is a pipe: a line written as
    text and newline in two calls can be split by the other rank's line (seen in CI)."""
    writes = []

    class Recorder:
        def write(self, text):
            writes.append(text)

        def flush(self):
            pass

    def fail(_args):
        raise failure

    monkeypatch.setattr(sys, "stderr", Recorder())
    assert run_cli(fail, types.SimpleNamespace(debug=False)) != 0
    assert writes == [line]


@pytest.mark.parametrize("argv,code,fragments", [
    (["--steps", "0"], 2, ["--steps", ">= 1"]),
    (["--eps-list", "x"], 2, ["--eps-list", "'x'"]),
    (["--device", "tpu"], 2, ["unknown device"]),
    (["--splits", "bogus"], 2, ["--splits", "invalid choice"]),
    (["--checkpoint", "{tmp}/missing.pt"], 1, ["not found"]),
], ids=["steps", "eps", "device", "splits", "checkpoint"])
def test_benchmark_reports_bad_input_in_one_line(capsys, tmp_path, checkpoints, argv, code, fragments):
    """benchmarks/sweep_speed.py is not run by CI, but a wrong flag there must not cost a traceback."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import sweep_speed
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    argv = ["--checkpoint", str(checkpoints["classification"]), "--out", str(tmp_path / "b.json"),
            *[a.replace("{tmp}", str(tmp_path)) for a in argv]]
    rc, lines = _run(sweep_speed, argv, capsys)
    assert rc == code
    _assert_one_error_line(lines, *fragments)
    assert not (tmp_path / "b.json").exists()
