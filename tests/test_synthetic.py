"""Tests for the synthetic Raabin-WBC-like generator (small sizes: the whole file runs in seconds)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import synthetic  # noqa: E402
from synthetic import CLASSES, ensure_synthetic, generate_synthetic, render_cell  # noqa: E402
from utils import DataError  # noqa: E402

PER_CLASS, SIZE = 3, 64


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("syn") / "data", PER_CLASS, SIZE, seed=1)


def test_layouts_are_class_balanced(dataset: Path) -> None:
    for name in CLASSES:
        train = sorted(p.name for p in (dataset / "Train" / name).glob("*.jpg"))
        original = sorted(p.name for p in (dataset / "GrTh" / "Original" / name).glob("*.jpg"))
        masks = sorted(p.stem for p in (dataset / "GrTh" / "Ground Truth" / name).glob("*.png"))
        assert len(train) == len(original) == len(masks) == PER_CLASS
        assert train == original and [Path(n).stem for n in original] == masks
    params = json.loads((dataset / "synthetic.json").read_text())
    assert (params["per_class"], params["image_size"], params["seed"]) == (PER_CLASS, SIZE, 1)
    assert not [p for p in dataset.parent.iterdir() if p.name != dataset.name]  # no temp folder left


def test_masks_are_exact_grey_levels_and_match_images(dataset: Path) -> None:
    for name in CLASSES:
        for image_path in (dataset / "GrTh" / "Original" / name).glob("*.jpg"):
            mask_img = Image.open(dataset / "GrTh" / "Ground Truth" / name / f"{image_path.stem}.png")
            image = Image.open(image_path)
            assert mask_img.mode == "L" and image.mode == "RGB"
            assert mask_img.size == image.size == (SIZE, SIZE)
            assert set(np.unique(np.array(mask_img)).tolist()) == {0, 128, 255}


def test_same_seed_is_byte_identical_and_other_seed_differs(dataset: Path, tmp_path: Path) -> None:
    again = generate_synthetic(tmp_path / "again", PER_CLASS, SIZE, seed=1)
    other = generate_synthetic(tmp_path / "other", PER_CLASS, SIZE, seed=2)
    reference = _files(dataset)
    assert _files(again) == reference
    other_files = _files(other)
    assert other_files.keys() == reference.keys()
    assert [k for k in reference if k.endswith(".jpg") and other_files[k] != reference[k]]


def test_a_larger_sample_starts_with_the_smaller_one(dataset: Path, tmp_path: Path) -> None:
    """Each image has its own seed: the default of 400 per class holds the earlier 200 unchanged."""
    larger = _files(generate_synthetic(tmp_path / "larger", PER_CLASS + 2, SIZE, seed=1))
    smaller = _files(dataset)
    images = [name for name in smaller if name.endswith((".jpg", ".png"))]
    assert images and all(larger[name] == smaller[name] for name in images)
    larger_images = [name for name in larger if name.endswith((".jpg", ".png"))]
    assert len(larger_images) == len(images) * (PER_CLASS + 2) // PER_CLASS


def test_render_cell_shapes_labels_and_class_sizes() -> None:
    rng = np.random.default_rng(0)
    nucleus_share = {}
    for name in CLASSES:
        shares = []
        for _ in range(4):
            image, mask = render_cell(rng, name, 96)
            assert image.shape == (96, 96, 3) and image.dtype == np.uint8
            assert mask.shape == (96, 96) and mask.dtype == np.uint8
            assert set(np.unique(mask).tolist()) == {0, 1, 2}
            assert 0.45 < (mask == 0).mean() < 0.92  # a large centred cell, as in the real crops
            shares.append((mask == 2).sum() / (mask > 0).sum())
        nucleus_share[name] = np.mean(shares)
    assert nucleus_share["Lymphocyte"] > nucleus_share["Neutrophil"]  # dense round vs lobed
    with pytest.raises(ValueError):
        render_cell(rng, "Platelet", 64)


def test_ensure_regenerates_only_when_parameters_change(tmp_path: Path, capsys) -> None:
    root = tmp_path / "syn"
    ensure_synthetic(root, per_class=2, image_size=SIZE, seed=0)
    assert "generating" in capsys.readouterr().out
    stamp = (root / "synthetic.json").stat().st_mtime_ns
    ensure_synthetic(root, per_class=2, image_size=SIZE, seed=0)
    assert capsys.readouterr().out == ""
    assert (root / "synthetic.json").stat().st_mtime_ns == stamp
    ensure_synthetic(root, per_class=3, image_size=SIZE, seed=0)
    assert "generating" in capsys.readouterr().out
    assert len(list((root / "Train" / "Monocyte").glob("*.jpg"))) == 3
    assert json.loads((root / "synthetic.json").read_text())["per_class"] == 3


def test_processes_that_all_find_the_data_missing_generate_it_once(tmp_path: Path) -> None:
    """torchrun ranks start together: each finds no data; one generates, the others wait for it
    (unguarded, one renamed the folder away while another read it)."""
    import subprocess

    code = ("import sys; sys.path.insert(0, sys.argv[1]); from synthetic import ensure_synthetic, CLASSES; "
            "from pathlib import Path; root = ensure_synthetic(Path(sys.argv[2]), per_class=4, image_size=64); "
            "assert all(len(list((root / 'Train' / c).glob('*.jpg'))) == 4 for c in CLASSES)")
    repo = str(Path(__file__).resolve().parents[1])
    jobs = [subprocess.Popen([sys.executable, "-c", code, repo, str(tmp_path / "syn")], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(job.wait(), job.communicate()) for job in jobs]
    assert all(rc == 0 for rc, _ in results), [err[-300:] for _, (_, err) in results]
    assert sum("generating" in out for _, (out, _) in results) == 1


def test_refuses_to_replace_a_folder_that_is_not_synthetic(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "keep.txt").write_text("precious")
    with pytest.raises(DataError, match="is not a synthetic dataset"):
        generate_synthetic(tmp_path / "real", 1, SIZE)
    assert (tmp_path / "real" / "keep.txt").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["real"]


def test_cli_writes_dataset_and_grid(tmp_path: Path) -> None:
    out, grid = tmp_path / "cli", tmp_path / "docs" / "grid.png"
    args = synthetic.get_args_parser().parse_args(
        ["--out", str(out), "--per-class", "5", "--image-size", str(SIZE), "--seed", "3", "--grid", str(grid)])
    synthetic.main(args)
    assert (out / "synthetic.json").exists()
    with Image.open(grid) as image:
        assert image.format == "PNG" and image.width > image.height > 0
