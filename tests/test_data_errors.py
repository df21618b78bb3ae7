"""Every bad-data case raises DataError with one line that names the path and the fix."""
from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest

import dataset as D
import raabin
from conftest import save_image
from utils import DataError, ToolError, UsageError


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    assert isinstance(err.value, ToolError) and err.value.exit_code == 1
    return message


@pytest.mark.parametrize("task", D.TASKS)
def test_missing_root(tmp_path, task):
    root = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        raabin.find_samples(task, root)
    assert str(root) in _one_line(err) and "does not exist" in str(err.value)


def test_root_is_a_file(tmp_path):
    path = tmp_path / "data.zip"
    path.write_bytes(b"PK")
    with pytest.raises(DataError, match="not a folder") as err:
        raabin.find_classification_samples(path)
    assert str(path) in _one_line(err)


def test_no_class_folders_lists_the_expected_names(tmp_path):
    (tmp_path / "cats").mkdir()
    with pytest.raises(DataError) as err:
        raabin.find_classification_samples(tmp_path)
    message = _one_line(err)
    assert str(tmp_path) in message and "Train/" in message
    assert all(name in message for name in D.CLASS_NAMES)


def test_no_class_folders_suggests_the_nested_split(make_classification_data):
    release = make_classification_data(name="Raabin/Train").parent
    with pytest.raises(DataError) as err:
        raabin.find_classification_samples(release)
    assert f"point --data at {release / 'Train'}" in _one_line(err)


def test_class_folders_without_images(tmp_path):
    (tmp_path / "Neutrophil").mkdir()
    (tmp_path / "Neutrophil" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="no images") as err:
        raabin.find_classification_samples(tmp_path)
    assert str(tmp_path) in _one_line(err)


def _refuse_listing(monkeypatch, folder: Path) -> None:
    """``folder`` cannot be listed, as after ``chmod 000`` (which does not stop root, so it is simulated)."""
    iterdir = Path.iterdir

    def refuse(self):
        if self == folder:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return iterdir(self)

    monkeypatch.setattr(Path, "iterdir", refuse)


@pytest.mark.parametrize("task,folder", [("classification", "."), ("classification", "Basophil"),
                                         ("segmentation", "GrTh/Original"),
                                         ("segmentation", "GrTh/Ground Truth/Monocyte")])
def test_unreadable_folder_names_it_and_the_fix(request, monkeypatch, task, folder):
    root = request.getfixturevalue(f"{task}_root")
    _refuse_listing(monkeypatch, root / folder)
    with pytest.raises(DataError) as err:
        raabin.find_samples(task, root)
    message = _one_line(err)
    assert f"cannot read {root / folder} (Permission denied)" in message and "point --data elsewhere" in message


def test_unreadable_subfolder_does_not_hide_the_missing_class_folders(tmp_path, monkeypatch):
    (tmp_path / "lost+found").mkdir()
    _refuse_listing(monkeypatch, tmp_path / "lost+found")
    with pytest.raises(DataError, match="no class folders") as err:
        raabin.find_classification_samples(tmp_path)
    assert str(tmp_path) in _one_line(err)


def test_segmentation_without_grth(classification_root):
    with pytest.raises(DataError, match="GrTh/Original") as err:
        raabin.find_segmentation_samples(classification_root)
    assert str(classification_root) in _one_line(err)


def test_segmentation_without_mask_folder(segmentation_root):
    truth = segmentation_root / "GrTh" / "Ground Truth"
    truth.rename(segmentation_root / "GrTh" / "masks")
    with pytest.raises(DataError) as err:
        raabin.find_segmentation_samples(segmentation_root)
    assert str(truth) in _one_line(err)


def test_segmentation_without_images(segmentation_root):
    for path in (segmentation_root / "GrTh" / "Original").rglob("*.*"):
        path.unlink()
    with pytest.raises(DataError, match="no images") as err:
        raabin.find_segmentation_samples(segmentation_root)
    assert str(segmentation_root / "GrTh" / "Original") in _one_line(err)


def test_image_without_mask(segmentation_root, capsys):
    (segmentation_root / "GrTh" / "Ground Truth" / "Monocyte" / "001.jpg").unlink()
    with pytest.raises(DataError) as err:
        raabin.find_segmentation_samples(segmentation_root)
    message = _one_line(err)
    assert "Monocyte/001.png" in message and "--skip-missing-masks" in message
    assert str(segmentation_root / "GrTh" / "Original") in message

    samples = raabin.find_segmentation_samples(segmentation_root, skip_missing_masks=True)
    assert len(samples) == 19
    assert "skipped 1 image(s)" in capsys.readouterr().err
    splits = D.build_splits("segmentation", segmentation_root, image_size=16, skip_missing_masks=True)
    assert sum(len(ds) for ds in splits.values()) == 19


def test_many_images_without_masks_are_listed_up_to_five(segmentation_root):
    for path in (segmentation_root / "GrTh" / "Ground Truth" / "Neutrophil").iterdir():
        path.unlink()
    with pytest.raises(DataError) as err:
        raabin.find_segmentation_samples(segmentation_root)
    message = _one_line(err)
    assert message.startswith("8 image(s)") and message.count("Neutrophil/") == 5 and ", ...)" in message


def test_no_image_has_a_mask(segmentation_root):
    for path in (segmentation_root / "GrTh" / "Ground Truth").rglob("*.*"):
        path.unlink()
    with pytest.raises(DataError, match="no image") as err:
        raabin.find_segmentation_samples(segmentation_root, skip_missing_masks=True)
    assert str(segmentation_root / "GrTh" / "Ground Truth") in _one_line(err)


@pytest.mark.parametrize("content", [b"this is not a JPEG at all", b"\xff\xd8\xff\xe0" + b"\x00" * 40])
def test_corrupt_image(classification_root, content):
    bad = classification_root / "Basophil" / "basophil_00.jpg"
    bad.write_bytes(content)
    with pytest.raises(DataError) as err:
        raabin.load_rgb(bad)
    assert str(bad) in _one_line(err)
    ds = D.ClassificationDataset(raabin.find_classification_samples(classification_root),
                                 D.build_transform("classification", 16, train=False))
    with pytest.raises(DataError, match="basophil_00.jpg"):
        ds[0]


def test_truncated_image(tmp_path):
    path = save_image(tmp_path / "cell.jpg", np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DataError) as err:
        raabin.load_rgb(path)
    assert str(path) in _one_line(err)


def test_corrupt_mask(segmentation_root):
    samples = raabin.find_segmentation_samples(segmentation_root)
    samples[0][1].write_bytes(b"garbage")
    with pytest.raises(DataError) as err:
        raabin.load_mask(samples[0][1])
    assert str(samples[0][1]) in _one_line(err)


def test_mask_size_differs_from_image(segmentation_root):
    samples = raabin.find_segmentation_samples(segmentation_root)
    image_path, mask_path, _ = samples[0]
    save_image(mask_path, np.zeros((10, 12, 3), np.uint8), "L")
    ds = D.SegmentationDataset(samples, D.build_transform("segmentation", 16, train=True))
    with pytest.raises(DataError) as err:
        ds[0]
    message = _one_line(err)
    assert str(image_path) in message and str(mask_path) in message
    assert "12x10" in message and "24x24" in message


def test_empty_split(make_classification_data):
    root = make_classification_data({"Neutrophil": 2})
    with pytest.raises(DataError, match="val split") as err:
        D.build_splits("classification", root, image_size=16)
    assert str(root) in _one_line(err)


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.8, 0.3, 0.1), (1.2, -0.1, -0.1)])
def test_bad_fractions_are_usage_errors(fractions):
    with pytest.raises(UsageError):
        D.stratified_split([0, 1, 2], fractions)


def test_unknown_task(tmp_path):
    with pytest.raises(UsageError):
        D.build_splits("detection", tmp_path)
