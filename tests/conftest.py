"""Shared fixtures: tiny Raabin-WBC-like datasets written to ``tmp_path``.

* ``classification_root``: layout (a) ``<root>/<Class>/*`` with Monocyte missing, a
  lower-case ``lymphocyte/`` folder, and .jpg/.JPG/.png/.bmp files that are RGB, grey,
  RGBA, palette and 16-bit images.
* ``segmentation_root``: layout (b) ``<root>/GrTh/Original/<Class>/NNN.*`` with masks
  ``<root>/GrTh/Ground Truth/<Class>/NNN.*`` whose extension differs from the image's; masks
  are grey PNG, JPEG-compressed grey, RGB PNG, RGB JPEG and grey BMP.
* ``make_classification_data`` / ``make_segmentation_data``: factories for other counts/sizes.
* ``real_seg_root``: the real ``wbc-seg-d1`` data next to the project, or a skip.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

REAL_SEG_ROOT = PROJECT_ROOT.parent / "shared/data/wbc-seg-d1"

CLASSIFICATION_COUNTS = {"Basophil": 3, "Eosinophil": 4, "lymphocyte": 6, "Neutrophil": 10}
SEGMENTATION_COUNTS = {"Basophil": 2, "Eosinophil": 3, "Lymphocyte": 4, "Monocyte": 3, "Neutrophil": 8}
# (extension, PIL mode) cycled over the images of a class
IMAGE_VARIANTS = ((".jpg", "RGB"), (".JPG", "L"), (".png", "RGBA"), (".bmp", "P"), (".png", "I;16"))
# (extension, colour) cycled over the masks; image extensions are cycled separately
MASK_VARIANTS = ((".png", "L"), (".jpg", "L"), (".png", "RGB"), (".jpg", "RGB"), (".bmp", "L"))
SEG_IMAGE_EXTENSIONS = (".jpg", ".png", ".JPG", ".bmp")


def cell_grey_mask(height: int, width: int, index: int = 0) -> np.ndarray:
    """A Raabin-style grey mask: 0 background, 128 cytoplasm disk, 255 nucleus disk inside it."""
    yy, xx = np.mgrid[:height, :width]
    cy, cx = height / 2 + (index % 3) - 1, width / 2 - (index % 2)
    dist = np.hypot(yy - cy, xx - cx)
    radius = min(height, width) / 2
    mask = np.zeros((height, width), np.uint8)
    mask[dist < 0.8 * radius] = 128
    mask[dist < 0.45 * radius] = 255
    return mask


def cell_image(grey_mask: np.ndarray, seed: int = 0) -> np.ndarray:
    """An RGB cell image matching ``grey_mask``: pink background, lilac cytoplasm, purple nucleus."""
    colours = {0: (230, 190, 200), 128: (190, 160, 220), 255: (90, 40, 140)}
    image = np.zeros((*grey_mask.shape, 3), np.int16)
    for grey, colour in colours.items():
        image[grey_mask == grey] = colour
    noise = np.random.default_rng(seed).integers(-8, 9, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def save_image(path: Path, rgb: np.ndarray, mode: str = "RGB", quality: int = 90) -> Path:
    """Save an RGB uint8 array as ``mode`` (RGB, L, RGBA, P or I;16) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(rgb)
    if mode == "I;16":
        grey = np.asarray(img.convert("L")).astype(np.uint16) * 257
        img = Image.fromarray(grey)
    elif mode == "P":
        img = img.quantize(colors=16)
    elif mode != "RGB":
        img = img.convert(mode)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".tif": "TIFF"}[path.suffix.lower()]
    kwargs = {"quality": quality} if fmt == "JPEG" else {}
    img.save(path, format=fmt, **kwargs)
    return path


def write_classification_tree(root: Path, counts: dict[str, int] | None = None,
                              size: tuple[int, int] = (24, 24)) -> Path:
    """Layout (a): ``root/<folder>/<folder>_NN<ext>`` for each ``folder: count``."""
    counts = CLASSIFICATION_COUNTS if counts is None else counts
    for folder, count in counts.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            ext, mode = IMAGE_VARIANTS[i % len(IMAGE_VARIANTS)]
            rgb = cell_image(cell_grey_mask(*size, index=i), seed=i)
            save_image(root / folder / f"{folder.lower()}_{i:02d}{ext}", rgb, mode)
    return root


def write_segmentation_tree(root: Path, counts: dict[str, int] | None = None,
                            size: tuple[int, int] = (24, 24), odd_size: tuple[int, int] = (20, 26)) -> Path:
    """Layout (b) under ``root/GrTh``; every third image has the non-square ``odd_size``."""
    counts = SEGMENTATION_COUNTS if counts is None else counts
    original, truth = root / "GrTh" / "Original", root / "GrTh" / "Ground Truth"
    for folder, count in counts.items():
        (original / folder).mkdir(parents=True, exist_ok=True)
        (truth / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            grey = cell_grey_mask(*(odd_size if i % 3 == 2 else size), index=i)
            image_ext = SEG_IMAGE_EXTENSIONS[i % len(SEG_IMAGE_EXTENSIONS)]
            mask_ext, mask_mode = MASK_VARIANTS[i % len(MASK_VARIANTS)]
            save_image(original / folder / f"{i:03d}{image_ext}", cell_image(grey, seed=i))
            save_image(truth / folder / f"{i:03d}{mask_ext}", np.repeat(grey[:, :, None], 3, 2), mask_mode,
                       quality=75)
    return root


@pytest.fixture
def make_classification_data(tmp_path: Path) -> Callable[..., Path]:
    def make(counts: dict[str, int] | None = None, size: tuple[int, int] = (24, 24), name: str = "cls") -> Path:
        return write_classification_tree(tmp_path / name, counts, size)
    return make


@pytest.fixture
def make_segmentation_data(tmp_path: Path) -> Callable[..., Path]:
    def make(counts: dict[str, int] | None = None, size: tuple[int, int] = (24, 24), name: str = "seg") -> Path:
        return write_segmentation_tree(tmp_path / name, counts, size)
    return make


@pytest.fixture
def classification_root(make_classification_data) -> Path:
    return make_classification_data()


@pytest.fixture
def segmentation_root(make_segmentation_data) -> Path:
    return make_segmentation_data()


@pytest.fixture
def real_seg_root() -> Path:
    if not REAL_SEG_ROOT.is_dir():
        pytest.skip(f"real data {REAL_SEG_ROOT} is absent (wbc-seg-d1 lives in ../shared/data)")
    return REAL_SEG_ROOT


@pytest.fixture(scope="session")
def tiny_synthetic_root(tmp_path_factory) -> Path:
    """A tiny synthetic sample in both layouts (6 images per class, 32x32), made once per session."""
    from synthetic import generate_synthetic

    return generate_synthetic(tmp_path_factory.mktemp("synthetic") / "root", per_class=6, image_size=32, seed=0)


def write_tiny_checkpoint(path: Path, task: str, data: Path | None = None, val_data: Path | None = None,
                          test_data: Path | None = None) -> Path:
    """An untrained depth-18 checkpoint for 32 px images whose recorded data roots are ``data``
    (and the separate ``val_data`` and ``test_data``, if given)."""
    import torch

    from checkpoint import save_checkpoint
    from dataset import CLASS_NAMES, SEG_CLASS_NAMES
    from model import build_model

    names = list(CLASS_NAMES if task == "classification" else SEG_CLASS_NAMES)
    stats = {"mean": [0.5] * 3, "std": [0.25] * 3}
    torch.manual_seed(0)
    model = build_model(task, 18, len(names), **stats).eval()
    as_text = lambda root: str(root) if root is not None else None  # noqa: E731
    args = {"data": as_text(data), "val_data": as_text(val_data), "test_data": as_text(test_data), "seed": 0,
            "image_size": 32, "skip_missing_masks": False}
    save_checkpoint(path, model, task=task, depth=18, class_names=names, image_size=32, args=args, **stats)
    return path


def assert_ranks_stopped_with_one_line_errors(stderr: str, corrupt: Path, script: Path) -> None:
    """A torchrun job in which one rank read the corrupt image ``corrupt``: each of the two
    ranks ends with one ``error:`` line (the cause, and the peer that stopped), no traceback."""
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, stderr[-3000:]
    assert any("cannot read image" in line and corrupt.name in line for line in errors), errors
    assert any("another process of this torchrun job failed" in line for line in errors), errors
    rank_lines = [line for line in stderr.splitlines() if line.startswith("[rank")]
    assert not any("Traceback" in line for line in rank_lines)
    assert f'File "{script}"' not in stderr
