"""The datasets of both tasks: deterministic stratified splits of a data root, albumentations
transforms and loaders. Reading the Raabin-WBC layouts (images, masks, samples) is raabin.py's job.
"""
from __future__ import annotations

import hashlib
import math
import os
import random
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
from torch.utils.data import DataLoader, Dataset

from raabin import CLASS_NAMES, find_samples, load_mask, load_rgb  # noqa: F401 (CLASS_NAMES: shared by the tools)
from utils import DataError, UsageError

SEG_CLASS_NAMES = ("background", "cytoplasm", "nucleus")
TASKS = ("classification", "segmentation")
SPLITS = ("train", "val", "test")


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
    # INTER_NEAREST_EXACT samples pixel centres as INTER_LINEAR does; INTER_NEAREST would shift
    # the mask by about half a pixel against its image (1.5 % of a real crop's pixels relabelled).
    steps += [A.Resize(image_size, image_size, interpolation=cv2.INTER_LINEAR,
                       mask_interpolation=cv2.INTER_NEAREST_EXACT),
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
                 skip_missing_masks: bool = False, augment_train: bool = True) -> dict[str, Dataset]:
    """``{"train", "val", "test"}`` datasets; train augments (unless ``augment_train`` is
    False, for evaluating it), val and test only resize.

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
            folder, flag = Path(own_root).expanduser(), f"--{name}-data"
            if not folder.is_dir():
                raise DataError(f"{flag} folder {folder} {'is not a folder' if folder.exists() else 'does not exist'}; "
                                f"check the path given to {flag}")
            split_samples[name] = find_samples(task, folder, skip_missing_masks)
    _refuse_overlap(split_samples)
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
        datasets[name] = dataset_cls(chosen, build_transform(task, image_size, train=name == "train" and augment_train))
        datasets[name].split_digest = split_digest(split_samples[name])
    copies = training_copies(split_samples["train"], {name: datasets[name].samples for name in ("val", "test")})
    for name in SPLITS:
        datasets[name].training_copies = copies.get(name, [])
    return datasets


def _file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:  # unreadable: loading it reports the problem
        return None


def _file_digest(path: Path, cache: dict[Path, str | None]) -> str | None:
    if path not in cache:
        try:
            cache[path] = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            cache[path] = None
    return cache[path]


def training_copies(train: Sequence[tuple], evaluated: dict[str, Sequence[tuple]]) -> dict[str, list[tuple[Path, Path]]]:
    """Per evaluated split, its images that are byte-identical to a training image, as
    ``(image, training image)`` pairs.

    A dataset that holds an image twice, or a --test-data folder that copies training images,
    puts images the model was trained on among those it is judged on, which makes the split's
    metrics optimistic. Only files whose size equals a training file's are read.
    """
    train_by_size: dict[int, list[Path]] = {}
    for sample in train:
        size = _file_size(Path(sample[0]))
        if size is not None:
            train_by_size.setdefault(size, []).append(Path(sample[0]))
    cache: dict[Path, str | None] = {}
    copies: dict[str, list[tuple[Path, Path]]] = {}
    for name, samples in evaluated.items():
        copies[name] = []
        for sample in samples:
            path = Path(sample[0])
            candidates = train_by_size.get(_file_size(path), [])
            digest = _file_digest(path, cache) if candidates else None
            match = next((c for c in candidates if digest is not None and _file_digest(c, cache) == digest), None)
            if match is not None:
                copies[name].append((path, match))
    return copies


def training_copies_notes(datasets: dict[str, Dataset]) -> list[str]:
    """One line per split of ``datasets`` that holds copies of training images (see ``training_copies``)."""
    notes = []
    for split, data in datasets.items():
        copies = getattr(data, "training_copies", [])
        if copies:
            image, original = copies[0]
            notes.append(f"{len(copies)} {split} images are byte-identical to training images (e.g. {image} = "
                         f"{original}), so the {split} metrics are optimistic; remove the copies from one of the "
                         "two splits")
    return notes


def split_digest(samples: Sequence[tuple]) -> str:
    """A short hash of a split's members in order (class and file name, not the folder they lie
    in), before any ``limit``: train.py stores it, main.py checks it, so a data folder that has
    changed since training (which reshuffles its splits) is never evaluated as if it had not."""
    text = "\n".join(f"{sample[-1]}\t{Path(sample[0]).name}" for sample in samples)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _refuse_overlap(split_samples: dict[str, list[tuple]]) -> None:
    """Own --val-data/--test-data folders must not hold images of another split."""
    files = {name: {Path(sample[0]).resolve() for sample in samples} for name, samples in split_samples.items()}
    for first, second in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = files[first] & files[second]
        if shared:
            raise DataError(f"{len(shared)} images are in both the {first} and the {second} split "
                            f"(e.g. {min(shared)}); give --val-data/--test-data folders that do not overlap "
                            f"each other or --data")


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

    A training loader drops its last, partial batch (a batch of one breaks BatchNorm). Under a
    sampler, every rank would drop its own: with 211 images and batch 16 an epoch would skip 19
    images on 2 or 4 processes and 83 on 8, so there only a last batch of one is dropped.
    """
    generator = torch.Generator()
    generator.manual_seed(seed)
    n_items = len(sampler) if sampler is not None else len(dataset)
    partial = n_items % batch_size
    drop_last = train and n_items > batch_size and (sampler is None or partial == 1)
    return DataLoader(dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                      num_workers=workers, pin_memory=torch.device(device).type == "cuda",
                      drop_last=drop_last, persistent_workers=False,
                      worker_init_fn=seed_worker, generator=generator)
