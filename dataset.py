"""Raabin-WBC readers, deterministic stratified splits, albumentations transforms and loaders.

Layouts, read exactly as released: (a) classification ``<root>/<Class>/*.jpg`` (``Train/``,
``TestA/``, ``TestB/``); (b) segmentation ``<root>/GrTh/Original/<Class>/<name>.jpg`` with the
mask ``<root>/GrTh/Ground Truth/<Class>/<name>.*`` (same stem, any image extension).
Every data problem raises ``DataError`` with one line naming the path, the problem and the fix.
"""
from __future__ import annotations

import math
import os
import random
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

# albumentations asks PyPI for a newer release on import: a warning and a 2 s wait on offline
# machines (clusters, the GPU nodes here). The user's own setting wins.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from utils import DataError, UsageError

CLASS_NAMES = ("Basophil", "Eosinophil", "Lymphocyte", "Monocyte", "Neutrophil")
SEG_CLASS_NAMES = ("background", "cytoplasm", "nucleus")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")  # compared lower-cased
TASKS = ("classification", "segmentation")
SPLITS = ("train", "val", "test")

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
    return mask_to_labels(_read_uint8(Path(path)))


# --------------------------------------------------------------------------- finding samples
def _child_dir(parent: Path, name: str) -> Path | None:
    """The sub-folder of ``parent`` called ``name``, ignoring letter case (exact name first)."""
    exact = parent / name
    if exact.is_dir():
        return exact
    matches = sorted(p for p in parent.iterdir() if p.is_dir() and p.name.lower() == name.lower())
    return matches[0] if matches else None


def _class_dirs(root: Path) -> list[tuple[Path, int]]:
    """Sub-folders of ``root`` named like a class (any case), with the class id, sorted."""
    ids = {name.lower(): i for i, name in enumerate(CLASS_NAMES)}
    found = [(p, ids[p.name.lower()]) for p in root.iterdir() if p.is_dir() and p.name.lower() in ids]
    return sorted(found, key=lambda item: item[0].name)


def _check_folder(root: Path, what: str) -> None:
    if not root.exists():
        raise DataError(f"{what} {root} does not exist; check the path given to --data")
    if not root.is_dir():
        raise DataError(f"{what} {root} is not a folder; point --data at a Raabin-WBC folder")


def _no_class_folders_error(root: Path) -> DataError:
    expected = ", ".join(f"{name}/" for name in CLASS_NAMES)
    nested = [p.name for p in sorted(root.iterdir()) if p.is_dir() and _class_dirs(p)]
    hint = (f"point --data at {root / nested[0]}" if nested
            else "point --data at Train/ (or TestA/, TestB/) of the Raabin-WBC release")
    return DataError(f"no class folders in {root}: expected some of {expected} or GrTh/Original/; {hint}")


def _images_in_class_dirs(root: Path) -> list[tuple[Path, int]]:
    samples = [(path, label) for folder, label in _class_dirs(root)
               for path in folder.iterdir() if is_image_file(path)]
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


# --------------------------------------------------------------------------- splits
def _apportion(weights: Sequence[float], total: int) -> list[int]:
    """Largest-remainder rounding: integers proportional to ``weights`` summing to ``total``.

    Ties go to the earlier weight; a zero weight never gets anything.
    """
    weight_sum = float(sum(weights))
    exact = [total * w / weight_sum for w in weights]
    sizes = [math.floor(x + 1e-9) for x in exact]
    by_remainder = sorted((i for i, w in enumerate(weights) if w > 0),
                          key=lambda i: -round(exact[i] - sizes[i], 9))
    for i in by_remainder[: total - sum(sizes)]:
        sizes[i] += 1
    return sizes


def _split_sizes(n: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """Train/val/test sizes of one class of ``n`` samples.

    Rounded by largest remainder, then each split with a non-zero fraction gets at least
    one sample while the others keep one, in the order train, test, val: a class with 1
    sample goes to train, with 2 to train and test, with 3 to all three.
    """
    priority = (0, 2, 1)  # train, test, val
    sizes = dict(zip(priority, _apportion([fractions[i] for i in priority], n)))
    for needy in priority:
        if fractions[needy] > 0 and sizes[needy] == 0:
            donor = max(priority, key=lambda i: sizes[i])  # ties: train first
            if sizes[donor] > 1:
                sizes[donor] -= 1
                sizes[needy] += 1
    return sizes[0], sizes[1], sizes[2]


def _check_fractions(fractions: Sequence[float]) -> None:
    if len(fractions) != 3 or any(not (f >= 0) for f in fractions) or not math.isclose(sum(fractions), 1.0):
        raise UsageError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")


def _shuffled(items: Sequence[int], key: str) -> list[int]:
    """Fisher-Yates driven by ``Random(key).random()``: Python guarantees both the string
    seeding (SHA-512) and that stream, so the order is the same on every machine."""
    rng = random.Random(key)
    items = list(items)
    for i in range(len(items) - 1, 0, -1):
        j = int(rng.random() * (i + 1))
        items[i], items[j] = items[j], items[i]
    return items


def stratified_split(labels: Sequence[int], fractions: Sequence[float] = (0.7, 0.15, 0.15),
                     seed: int = 0) -> tuple[list[int], list[int], list[int]]:
    """Split indices of ``labels`` into sorted train/val/test lists, class by class.

    Each class is shuffled with its own generator (seeded by ``seed`` and the class id), so
    the split depends only on the seed and on the order of ``labels`` (the sorted file list)
    and a class's split does not change when another class is added or removed.
    """
    _check_fractions(fractions)
    splits: tuple[list[int], list[int], list[int]] = ([], [], [])
    for label in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == label]
        members = _shuffled(members, f"split/{seed}/{label}")
        n_train, n_val, _ = _split_sizes(len(members), fractions)
        splits[0].extend(members[:n_train])
        splits[1].extend(members[n_train:n_train + n_val])
        splits[2].extend(members[n_train + n_val:])
    return sorted(splits[0]), sorted(splits[1]), sorted(splits[2])


def stratified_subset(indices: Sequence[int], labels: Sequence[int], limit: int, seed: int = 0) -> list[int]:
    """At most ``limit`` of ``indices`` (sorted), keeping the class proportions (largest remainder)."""
    if len(indices) <= limit:
        return sorted(indices)
    by_class: dict[int, list[int]] = {}
    for i in sorted(indices):
        by_class.setdefault(labels[i], []).append(i)
    classes = sorted(by_class)
    quotas = _apportion([len(by_class[c]) for c in classes], limit)
    chosen = [i for c, q in zip(classes, quotas) for i in _shuffled(by_class[c], f"limit/{seed}/{c}")[:q]]
    return sorted(chosen)


# --------------------------------------------------------------------------- transforms
def build_transform(task: str, image_size: int, train: bool) -> A.Compose:
    """Albumentations pipeline returning a float32 CxHxW image in [0, 1] (no normalisation:
    the model normalises) and, for segmentation, the mask (uint8; datasets make it int64).

    Geometric transforms act on image and mask together; the mask is always resized with
    nearest-neighbour interpolation, so labels stay in {0, 1, 2}.
    """
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    steps: list[A.BasicTransform] = []
    if train:
        steps += [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomRotate90(p=0.5),
            # A cell on a slide has no orientation: classification rotates by any angle.
            A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05),
                     rotate=(-180, 180) if task == "classification" else (-15, 15),
                     interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
                     border_mode=cv2.BORDER_REFLECT_101, p=0.5),
            # Stain variation between slides and scanners: light colour jitter only.
            A.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02, p=0.5),
        ]
    steps += [A.Resize(image_size, image_size, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST),
              A.ToFloat(max_value=255.0), ToTensorV2()]
    transform = A.Compose(steps)
    reseed_transform(transform, 0)
    return transform


def reseed_transform(transform: A.Compose, seed: int) -> None:
    """Reseed a Compose so its random draws are a pure function of ``seed``.

    ``Compose.set_random_seed`` gives every child the *same* seed, which makes e.g. the
    horizontal and vertical flips fire together; each child gets its own derived seed instead.
    """
    transform.set_random_seed(seed % 2**32)
    child_seeds = np.random.SeedSequence(seed % 2**32).generate_state(len(transform.transforms))
    for child, child_seed in zip(transform.transforms, child_seeds):
        child.set_random_seed(int(child_seed))


# --------------------------------------------------------------------------- datasets
class _SampleDataset(Dataset):
    """Samples ``(..., class id)`` read through an albumentations ``transform``."""

    def __init__(self, samples: Sequence[tuple], transform: A.Compose) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.labels: list[int] = [sample[-1] for sample in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def reseed(self, seed: int) -> None:
        """Restart the augmentation stream from ``seed``: what follows depends on it alone,
        which bit-exact training resume needs (call it per epoch and in each worker)."""
        reseed_transform(self.transform, seed)


class ClassificationDataset(_SampleDataset):
    """Cropped cells ``(image, class id)``: ``(float32 3xHxW in [0, 1], int)``."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(image=load_rgb(path))["image"], label


class SegmentationDataset(_SampleDataset):
    """Image/mask pairs: ``(float32 3xHxW in [0, 1], int64 HxW in {0, 1, 2})``."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path, _ = self.samples[index]
        image, mask = load_rgb(image_path), load_mask(mask_path)
        if image.shape[:2] != mask.shape:
            raise DataError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but image {image_path} is "
                            f"{image.shape[1]}x{image.shape[0]} (WxH); replace the mask with one of the same size")
        out = self.transform(image=image, mask=mask)
        return out["image"], out["mask"].long()


# --------------------------------------------------------------------------- splits of a data root
def resolve_data_root(data: str | Path | None, task: str) -> Path:
    """``--data`` as a path; without it, the synthetic dataset (generated on first use)."""
    if data is not None:
        return Path(data).expanduser()
    from synthetic import ensure_synthetic  # lazy: only needed without --data

    root = ensure_synthetic()
    return root / "Train" if task == "classification" else root


def _split_indices(labels: Sequence[int], fractions: Sequence[float], seed: int,
                   has_val: bool, has_test: bool) -> tuple[list[int], list[int], list[int]]:
    """Split ``labels``; splits given by their own folder get fraction 0 and the rest is
    renormalised (only --val-data: train/test in ratio 0.7:0.15; both: everything to train)."""
    kept = [fractions[0], 0.0 if has_val else fractions[1], 0.0 if has_test else fractions[2]]
    if sum(kept) <= 0:
        raise UsageError(f"split fractions {tuple(fractions)} leave nothing for training")
    return stratified_split(labels, [f / sum(kept) for f in kept], seed)


def build_splits(task: str, data: str | Path | None, val_data: str | Path | None = None,
                 test_data: str | Path | None = None, image_size: int = 128, seed: int = 0,
                 fractions: Sequence[float] = (0.7, 0.15, 0.15), limit: int | None = None,
                 skip_missing_masks: bool = False) -> dict[str, Dataset]:
    """``{"train", "val", "test"}`` datasets; train augments, val and test only resize.

    ``data`` is split stratified by class with ``fractions``. A split given its own folder
    (``val_data``/``test_data``) reads all of that folder, and its fraction of ``data`` goes
    to the other splits in proportion: with only ``val_data``, ``data`` is split into train
    and test as 0.7:0.15 (renormalised); with both, all of ``data`` is training data.
    ``limit`` keeps at most that many samples per split, class proportions preserved.
    """
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}")
    _check_fractions(fractions)
    root = resolve_data_root(data, task)
    samples = find_samples(task, root, skip_missing_masks)
    labels = [s[-1] for s in samples]
    split_idx = _split_indices(labels, fractions, seed, val_data is not None, test_data is not None)
    split_samples = {name: [samples[i] for i in idx] for name, idx in zip(SPLITS, split_idx)}
    for name, own_root in (("val", val_data), ("test", test_data)):
        if own_root is not None:
            split_samples[name] = find_samples(task, Path(own_root).expanduser(), skip_missing_masks)
    dataset_cls = ClassificationDataset if task == "classification" else SegmentationDataset
    datasets = {}
    for name in SPLITS:
        chosen = split_samples[name]
        if limit is not None:
            chosen_labels = [s[-1] for s in chosen]
            chosen = [chosen[i] for i in stratified_subset(range(len(chosen)), chosen_labels, limit, seed)]
        if not chosen:
            raise DataError(f"the {name} split of {root} is empty ({len(samples)} samples, fractions "
                            f"{tuple(fractions)}); add images or give the split its own folder")
        datasets[name] = dataset_cls(chosen, build_transform(task, image_size, train=name == "train"))
    return datasets


def format_split_counts(datasets: dict[str, Dataset], class_names: Sequence[str]) -> str:
    """A small table: one row per class (and a total), one column per split."""
    counts = [Counter(ds.labels) for ds in datasets.values()]
    width = max(len("total"), *(len(c) for c in class_names))

    def row(first: str, cells) -> str:
        return first.ljust(width) + "".join(f"  {cell:>6}" for cell in cells)

    rows = [row("class", datasets)]
    rows += [row(name, [c[label] for c in counts]) for label, name in enumerate(class_names)]
    rows.append(row("total", [len(ds) for ds in datasets.values()]))
    return "\n".join(rows)


# --------------------------------------------------------------------------- loaders
def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed numpy, ``random`` and the worker's copy of the augmentation
    from the worker's torch seed (derived from the loader's generator, so reproducible)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    info = torch.utils.data.get_worker_info()
    dataset = info.dataset if info is not None else None
    while dataset is not None and not hasattr(dataset, "reseed"):
        dataset = getattr(dataset, "dataset", None)  # unwrap torch.utils.data.Subset
    if dataset is not None:
        dataset.reseed(seed)


def make_loader(dataset: Dataset, batch_size: int, train: bool, workers: int = 0,
                device: torch.device | str = "cpu", seed: int = 0, sampler=None) -> DataLoader:
    """A DataLoader whose shuffling and worker seeds come from ``seed`` only.

    With ``sampler`` (e.g. a DistributedSampler) the loader does not shuffle itself. Workers
    are not persistent: fresh workers each epoch take their seeds from ``generator``, which
    train.py reseeds per epoch, so a resumed run sees exactly the same augmentations.
    """
    generator = torch.Generator()
    generator.manual_seed(seed)
    n_items = len(sampler) if sampler is not None else len(dataset)
    return DataLoader(dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                      num_workers=workers, pin_memory=torch.device(device).type == "cuda",
                      drop_last=train and n_items > batch_size, persistent_workers=False,
                      worker_init_fn=seed_worker, generator=generator)
