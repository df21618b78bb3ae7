"""Checkpoints: round trip, atomic writes, and every way a checkpoint can be bad."""
import errno
import os
import pytest
import torch

from checkpoint import file_sha256, load_checkpoint, model_from_checkpoint, save_checkpoint
from files import atomic_write_text
from model import build_model
from utils import CheckpointError, ToolError

CLASSES = ["Basophil", "Eosinophil", "Lymphocyte", "Monocyte", "Neutrophil"]


def _save(path, task="classification", depth=18, **extra):
    torch.manual_seed(0)
    num_classes = 5 if task == "classification" else 3
    names = CLASSES if task == "classification" else ["background", "cytoplasm", "nucleus"]
    model = build_model(task, depth, num_classes, mean=[0.6, 0.5, 0.4], std=[0.2, 0.2, 0.2]).eval()
    save_checkpoint(path, model, task=task, depth=depth, class_names=names, image_size=32,
                    mean=[0.6, 0.5, 0.4], std=[0.2, 0.2, 0.2], epoch=3, metrics={"accuracy": 0.5},
                    args={"data": None, "out": path.parent, "eps": (1, 2)}, **extra)
    return model


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_round_trip_gives_identical_outputs(tmp_path, task):
    path = tmp_path / "best.pt"
    model = _save(path, task)
    ckpt = load_checkpoint(path, task=task, depth=18)
    restored = model_from_checkpoint(ckpt)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), restored(x))
    assert ckpt["epoch"] == 3 and ckpt["class_names"][0] in ("Basophil", "background")
    assert ckpt["args"]["out"] == str(tmp_path)  # Paths stored as plain strings


def test_checkpoint_loads_with_plain_weights_only(tmp_path):
    path = tmp_path / "c.pt"
    _save(path, optimizer={"state": {}, "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]})
    torch.load(path, weights_only=True)  # must not raise


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "c.pt"
    _save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_garbage_checkpoint(tmp_path):
    path = tmp_path / "c.pt"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_unreadable_checkpoint_is_not_called_corrupt(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    _save(path)

    def refuse(f, *args, **kwargs):  # as after chmod 000, which does not stop root
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(f))

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert f"cannot read checkpoint {path} (Permission denied); make it readable" in message
    assert "corrupt" not in message and "\n" not in message


def test_checkpoint_that_is_a_folder_is_named_as_one(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder)
    assert f"cannot read checkpoint {folder} (Is a directory); pass the checkpoint file inside it" in str(err.value)


def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    path = tmp_path / "c.pt"
    _save(path)
    ckpt = load_checkpoint(path)
    del ckpt["model"]["net.conv1.weight"]
    ckpt["model"]["net.extra.weight"] = torch.zeros(1)
    ckpt["class_names"] = CLASSES[:3]  # a 3-class head for the 5-class weights
    with pytest.raises(CheckpointError) as err:
        model_from_checkpoint(ckpt)
    message = str(err.value)
    assert "\n" not in message and "re-create the checkpoint" in message
    assert ("missing keys: net.conv1.weight; unexpected keys: net.extra.weight; size mismatch: "
            "net.fc.weight (checkpoint 5x512, model 3x512), net.fc.bias (checkpoint 5, model 3)") in message


def test_foreign_checkpoint_is_refused(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="not a checkpoint written by this tool"):
        load_checkpoint(path)


class _Payload:
    """Unpickling this runs ``os.system`` (creating a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_would_run_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "wbc-attack-checkpoint", "model": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="could run code"):
        load_checkpoint(path)
    assert not marker.exists()
    # the payload is real: an unrestricted load of the same file does create the marker
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("field,value,words", [
    ("task", "segmentation", "task 'classification'"),
    ("depth", 50, "depth 18"),
    ("image_size", 64, "image size 32"),
    ("class_names", ["a", "b"], "class names"),
])
def test_mismatched_checkpoint_names_both_sides(tmp_path, field, value, words):
    path = tmp_path / "c.pt"
    _save(path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, **{field: value})
    assert words in str(err.value) and repr(value) in str(err.value)


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    _save(path)
    before = file_sha256(path)

    def boom(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(ToolError, match="No space left on device.*previous last.pt is kept"):
        _save(path, depth=34)
    assert file_sha256(path) == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind


def test_atomic_text_write_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    atomic_write_text(path, "old")

    def failing_replace(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(ToolError, match="simulated crash before rename"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_optimizer_state_survives_the_round_trip(tmp_path):
    """Optimizer state is keyed by parameter index (int): it must not come back as str keys."""
    torch.manual_seed(0)
    model = build_model("classification", 18, 5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    path = tmp_path / "last.pt"
    save_checkpoint(path, model, task="classification", depth=18, class_names=CLASSES, image_size=32,
                    mean=[0.5] * 3, std=[0.25] * 3, optimizer=optimizer.state_dict())
    restored = torch.optim.AdamW(model.parameters(), lr=1e-3)
    restored.load_state_dict(load_checkpoint(path)["optimizer"])
    assert restored.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
    for index, state in optimizer.state_dict()["state"].items():
        assert torch.equal(restored.state_dict()["state"][index]["exp_avg"], state["exp_avg"])


def test_atomic_writes_leave_readable_files(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, "{}")
    assert path.stat().st_mode & 0o777 == 0o644
