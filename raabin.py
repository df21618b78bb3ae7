"""Reading Raabin-WBC as released: decoding images and masks, and finding the samples of both layouts.

(a) classification ``<root>/<Class>/*.jpg`` (``Train/``, ``TestA/``, ``TestB/``); (b) segmentation
``<root>/GrTh/Original/<Class>/<name>.jpg`` with the mask ``<root>/GrTh/Ground Truth/<Class>/<name>.*``
(same stem, any image extension). Every data problem raises ``DataError`` with one line naming
the path, the problem and the fix.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from utils import DataError

CLASS_NAMES = ("Basophil", "Eosinophil", "Lymphocyte", "Monocyte", "Neutrophil")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")  # compared lower-cased

# Grey-level thresholds of the Raabin masks (JPEG noise moves the nominal 0/128/255 a little).
CYTOPLASM_MIN_GREY = 50
NUCLEUS_MIN_GREY = 201
MAX_LISTED_FILES = 5
# Lossless masks are preferred when one stem has several mask files.
_MASK_EXTENSION_PREFERENCE = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")


# --------------------------------------------------------------------------- images and masks
def is_image_file(path: Path) -> bool:
    """An image by extension (any letter case); hidden files such as macOS ``._x.jpg`` are not."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _read_uint8(path: Path) -> np.ndarray:
    """Decode ``path`` into an HxW or HxWxC uint8 array; a corrupt file is a DataError."""
    try:
        with Image.open(path) as img:
            img.load()
            return _as_uint8_array(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        reason = "unknown image format" if isinstance(err, UnidentifiedImageError) else err
        raise DataError(f"cannot read image {path} ({reason}); the file is corrupt or not an image: "
                        "replace it or delete it") from err


def _as_uint8_array(img: Image.Image) -> np.ndarray:
    """HxW or HxWxC uint8 from any PIL mode; 16-bit and float images are rescaled to 0..255."""
    if img.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "1"):
        img = img.convert("RGBA" if "transparency" in img.info or img.mode == "PA" else "RGB")
    arr = np.asarray(img)
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        scale = 255.0 if np.nanmax(arr) <= 1.0 else 1.0
        return np.clip(np.nan_to_num(arr) * scale, 0, 255).round().astype(np.uint8)
    if arr.size and arr.max() > 255:  # 16-bit range
        return np.clip(arr.astype(np.float64) / 257.0, 0, 255).round().astype(np.uint8)
    return np.clip(arr, 0, 255).astype(np.uint8)


def load_rgb(path: str | Path) -> np.ndarray:
    """Read an image as HxWx3 RGB uint8 (grey, RGBA, palette and 16-bit are converted)."""
    arr = _read_uint8(Path(path))
    if arr.ndim == 2:
        return np.repeat(arr[:, :, None], 3, axis=2)
    if arr.shape[2] == 2:  # grey + alpha
        return np.repeat(arr[:, :, :1], 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3])


def mask_to_labels(mask: np.ndarray) -> np.ndarray:
    """Map a Raabin mask (HxW grey or HxWx3/4 RGB[A] uint8) to labels 0/1/2.

    Grey < 50 is background, 50..200 cytoplasm, > 200 nucleus. Colour masks are turned into
    grey with the ITU-R 601 luma weights (as ``PIL.Image.convert("L")``); alpha is ignored.
    """
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[2] < 3:  # grey + alpha
        mask = mask[:, :, 0]
    elif mask.ndim == 3:
        rgb = mask[:, :, :3].astype(np.uint32)
        mask = (rgb[..., 0] * 299 + rgb[..., 1] * 587 + rgb[..., 2] * 114 + 500) // 1000
    if mask.ndim != 2:
        raise ValueError(f"expected an HxW or HxWxC mask, got shape {mask.shape}")
    labels = (mask >= CYTOPLASM_MIN_GREY).astype(np.uint8)
    labels += mask >= NUCLEUS_MIN_GREY
    return labels


def load_mask(path: str | Path) -> np.ndarray:
    """Read a mask file and return HxW uint8 labels in {0, 1, 2}."""
    raw = _read_uint8(Path(path))
    if raw.max() <= 2 and (raw > 0).mean() > 0.01:  # would read as all background
        raise DataError(f"mask {path} holds class indices 0/1/2, but masks are read as Raabin's grey levels "
                        f"(0 background, 128 cytoplasm, 255 nucleus); save it with those values")
    return mask_to_labels(raw)


# --------------------------------------------------------------------------- finding samples
def _child_dir(parent: Path, name: str) -> Path | None:
    """The sub-folder of ``parent`` called ``name``, ignoring letter case (exact name first)."""
    exact = parent / name
    if exact.is_dir():
        return exact
    matches = sorted(p for p in _entries(parent, Path.is_dir) if p.name.lower() == name.lower())
    return matches[0] if matches else None


def _entries(folder: Path, keep: Callable[[Path], bool]) -> list[Path]:
    """The entries of ``folder`` that ``keep`` accepts; an unreadable folder is a DataError naming it."""
    try:
        return [path for path in folder.iterdir() if keep(path)]
    except OSError as err:
        raise _unreadable(folder, err) from err


def _unreadable(folder: Path, err: OSError) -> DataError:
    return DataError(f"cannot read {folder} ({err.strerror or err}); make it readable or point --data elsewhere")


def _class_dirs(root: Path) -> list[tuple[Path, int]]:
    """Sub-folders of ``root`` named like a class (any case), with the class id, sorted."""
    ids = {name.lower(): i for i, name in enumerate(CLASS_NAMES)}
    found = [(p, ids[p.name.lower()]) for p in _entries(root, Path.is_dir) if p.name.lower() in ids]
    return sorted(found, key=lambda item: item[0].name)


def _holds_class_dirs(folder: Path) -> bool:
    """Whether ``folder`` has class folders; an unreadable one has none (for hints only)."""
    try:
        return bool(_class_dirs(folder))
    except DataError:
        return False


def _check_folder(root: Path, what: str) -> None:
    try:
        exists, is_dir = root.exists(), root.is_dir()
    except OSError as err:  # a parent folder that cannot be entered
        raise _unreadable(root, err) from err
    if not exists:
        raise DataError(f"{what} {root} does not exist; check the path given to --data")
    if not is_dir:
        raise DataError(f"{what} {root} is not a folder; point --data at a Raabin-WBC folder")


def _no_class_folders_error(root: Path) -> DataError:
    expected = ", ".join(f"{name}/" for name in CLASS_NAMES)
    nested = [p.name for p in sorted(_entries(root, Path.is_dir)) if _holds_class_dirs(p)]
    hint = (f"point --data at {root / nested[0]}" if nested
            else "point --data at Train/ (or TestA/, TestB/) of the Raabin-WBC release")
    return DataError(f"no class folders in {root}: expected some of {expected} or GrTh/Original/; {hint}")


def _images_in_class_dirs(root: Path) -> list[tuple[Path, int]]:
    samples = [(path, label) for folder, label in _class_dirs(root)
               for path in _entries(folder, is_image_file)]
    return sorted(samples, key=lambda item: item[0].as_posix())


def _images_or_error(root: Path) -> list[tuple[Path, int]]:
    samples = _images_in_class_dirs(root)
    if not samples:
        raise DataError(f"no images ({'/'.join(IMAGE_EXTENSIONS)}) in the class folders of {root}; "
                        "check that --data points at the right folder")
    return samples


def find_classification_samples(root: Path) -> list[tuple[Path, int]]:
    """``(image, class id)`` pairs sorted by path.

    Reads layout (a) when ``root`` has class folders, else ``root/GrTh/Original`` (or
    ``root/Original`` when ``root`` is the ``GrTh`` folder itself).
    """
    root = Path(root).expanduser()
    _check_folder(root, "data folder")
    image_root = root
    if not _class_dirs(root):
        grth = _child_dir(root, "GrTh") or root
        original = _child_dir(grth, "Original")
        if original is None or not _class_dirs(original):
            raise _no_class_folders_error(root)
        image_root = original
    return _images_or_error(image_root)


def _segmentation_dirs(root: Path) -> tuple[Path, Path]:
    """``(GrTh/Original, GrTh/Ground Truth)`` for ``root`` or ``root/GrTh``."""
    grth = _child_dir(root, "GrTh") or root
    original = _child_dir(grth, "Original")
    if original is None:
        raise DataError(f"no GrTh/Original folder in {root}; segmentation expects "
                        "<root>/GrTh/Original/<Class>/*.jpg and <root>/GrTh/Ground Truth/<Class>/*: "
                        "point --data at the folder that holds GrTh/")
    truth = _child_dir(grth, "Ground Truth")
    if truth is None:
        raise DataError(f"no mask folder {grth / 'Ground Truth'} next to {original}; "
                        "add the Raabin-WBC ground truth masks there")
    return original, truth


def _mask_index(truth: Path) -> dict[tuple[int, str], Path]:
    """``(class id, lower-case stem) -> mask path``; a lossless file wins over a JPEG."""
    index: dict[tuple[int, str], Path] = {}
    by_preference = sorted(_images_in_class_dirs(truth), reverse=True,
                           key=lambda item: (_MASK_EXTENSION_PREFERENCE.index(item[0].suffix.lower()), item[0].name))
    for path, label in by_preference:  # the preferred file is written last
        index[(label, path.stem.lower())] = path
    return index


def find_segmentation_samples(root: Path, skip_missing_masks: bool = False) -> list[tuple[Path, Path, int]]:
    """``(image, mask, class id)`` triples sorted by image path; ``root`` may be the GrTh folder.

    Images are paired with masks by class folder and file stem, so ``001.jpg`` pairs with
    ``001.png``. An image without a mask is an error unless ``skip_missing_masks``.
    """
    root = Path(root).expanduser()
    _check_folder(root, "data folder")
    original, truth = _segmentation_dirs(root)
    if not _class_dirs(original):
        raise _no_class_folders_error(original)
    images = _images_or_error(original)
    masks = _mask_index(truth)
    samples, missing = [], []
    for image, label in images:
        mask = masks.get((label, image.stem.lower()))
        if mask is None:
            missing.append(image)
        else:
            samples.append((image, mask, label))
    if missing and not skip_missing_masks:
        listed = ", ".join(str(p.relative_to(original)) for p in missing[:MAX_LISTED_FILES])
        more = ", ..." if len(missing) > MAX_LISTED_FILES else ""
        raise DataError(f"{len(missing)} image(s) in {original} have no mask with the same name in {truth} "
                        f"({listed}{more}); add the masks or pass --skip-missing-masks to ignore them")
    if missing:
        print(f"warning: skipped {len(missing)} image(s) in {original} without a mask in {truth}",
              file=sys.stderr)
    if not samples:
        raise DataError(f"no image in {original} has a mask in {truth}; add the Raabin-WBC masks there")
    return samples


def find_samples(task: str, root: Path, skip_missing_masks: bool = False) -> list[tuple]:
    """Samples of ``task``; the class id is always the last element of each tuple."""
    if task == "classification":
        return find_classification_samples(root)
    return find_segmentation_samples(root, skip_missing_masks)
